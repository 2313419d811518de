"""The shipped model's Flickr8k test scores in each decoder precision, and int8 against fp32.

    python benchmarks/precision_scores.py [--checkpoint default] [--data ../shared/data/flickr8k]
                                          [--out benchmarks/results/precision_scores.json]

Runs `captioner evaluate --split test --precision P --captions-out ...` for fp32 and int8, and
bf16 where this CPU multiplies bfloat16 natively, one after another (each takes minutes on 2
cores; the test split's feature cache under ~/.cache/captioner is built by the first and read
by the others), then `captioner compare` of int8 against fp32 (a paired bootstrap over the test
photos) and of bf16 against fp32 where it ran. Writes each mode's scores, the comparisons and
the CPU's ISA flags; the captions files stay beside the result (benchmarks/results/precision/)
so the comparison can be rerun. Scores do not depend on the machine's load, only on its kernels.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from captioner.files import atomic_write_text
from captioner.inference.precision import native_bf16
from latency import cpu_info

REPO = Path(__file__).resolve().parents[1]


def captioner(*args: str) -> str:
    """Run the CLI with this interpreter; its stdout (its stderr passes through)."""
    done = subprocess.run([sys.executable, "-m", "captioner.cli", *args], stdout=subprocess.PIPE, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"error: captioner {' '.join(args)} failed (exit {done.returncode})")
    return done.stdout


def captions_changed(a: Path, b: Path) -> int:
    """How many photos two evaluate captions files caption differently."""
    ours = {r["image"]: r["caption"] for r in json.loads(Path(a).read_text())}
    return sum(ours.get(r["image"]) != r["caption"] for r in json.loads(Path(b).read_text()))


def summarise(result: dict, folder: Path, tag: str = "") -> dict:
    """The gaps to fp32: CIDEr-D and how many captions differ."""
    fp32 = result["scores"]["fp32"]["CIDEr"]
    result["cider_gap_to_fp32"] = {m: round(s["CIDEr"] - fp32, 4) for m, s in result["scores"].items()}
    result["captions_changed_from_fp32"] = {
        m: captions_changed(folder / f"{tag}fp32-captions.json", folder / f"{tag}{m}-captions.json") for m in result["scores"]}
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--data", default=None, help="the Flickr8k folder (default: the training config's)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision_scores.json"))
    p.add_argument("--tag", default="", help="prefix of the captions files (e.g. native-), so runs under other "
                                             "kernels keep theirs")
    args = p.parse_args(argv)
    folder = (Path(args.out).parent / "precision").resolve()
    rel = lambda path: str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    modes = ["fp32", "int8"] + (["bf16"] if native_bf16() else [])
    result: dict = {"checkpoint": args.checkpoint, "split": "test", "beam_size": 3, "cpu": cpu_info(),
                    "scores": {}, "minutes": {}, "compare_to_fp32": {}}
    for mode in modes:
        captions = folder / f"{args.tag}{mode}-captions.json"
        cmd = ["evaluate", "--checkpoint", args.checkpoint, "--split", "test", "--precision", mode,
               "--captions-out", rel(captions), "--json"] + (["--data", args.data] if args.data else [])
        started = time.perf_counter()
        out = captioner(*cmd)
        result["minutes"][mode] = round((time.perf_counter() - started) / 60, 2)
        result["scores"][mode] = json.loads(out.strip().splitlines()[-1])
        print(f"{mode}: {result['scores'][mode]}", file=sys.stderr)
    for mode in modes[1:]:
        out = captioner("compare", rel(folder / f"{args.tag}fp32-captions.json"), rel(folder / f"{args.tag}{mode}-captions.json"), "--json")
        result["compare_to_fp32"][mode] = json.loads(out)
    summarise(result, folder, args.tag)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
