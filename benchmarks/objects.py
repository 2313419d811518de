"""Named objects on and off: the shipped model's scores on the Flickr8k dev and test splits and on
the 80 COCO dev photos, each with objects off and on (the shipped rule and threshold, chosen on
the dev sets by benchmarks/objects_rules.py), in the precision this CPU gets by default, with a
paired bootstrap interval of on minus off (`captioner compare`).

    PYTHONPATH=src python benchmarks/objects.py [--out benchmarks/results/objects.json]

Runs `captioner evaluate ... --objects on|off --captions-out ...` for each set (the Flickr8k runs
take minutes each on 2 cores), then `captioner compare off on`. The captions files stay in
benchmarks/results/objects/ so the comparisons can be rerun. Flickr8k dev is part of the shipped
model's training data (a refit on train + dev): its level is inflated, its on-off gap is not.
To score the int8 path on a CPU with native bf16, hold the kernels to AVX2 (docs/speed.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from captioner.files import atomic_write_text
from latency import cpu_info
from precision_scores import captioner, captions_changed
from results_blocks import replace_block

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SETS = {"coco-mini/all": (SHARED / "coco-mini-train2017", "all"),
        "flickr8k/dev": (SHARED / "flickr8k", "dev"),
        "flickr8k/test": (SHARED / "flickr8k", "test")}


LABELS = {"coco-mini/all": "COCO dev photos (80; tuning set, never trained on)",
          "flickr8k/dev": "Flickr8k dev (1000; the shipped model trained on it)",
          "flickr8k/test": "Flickr8k test (1000)"}


def results_block(result: dict) -> str:
    """docs/results.md's objects table, from this script's result."""
    lines = [f"CIDEr-D, beam 3, {result['precision']}, threshold {result['threshold']}; "
             f"`benchmarks/results/objects.json`.", "",
             "| set | objects off | objects on | on − off, 95% interval | captions changed |",
             "|---|---|---|---|---|"]
    for name, entry in result["sets"].items():
        (m,) = [x for x in entry["compare_on_minus_off"]["metrics"] if x["metric"] == "CIDEr"]
        lo, hi = m["diff_interval"]
        lines.append(f"| {LABELS.get(name, name)} | {m['a']:.3f} | {m['b']:.3f} | {m['b'] - m['a']:+.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}] | {entry['captions_changed']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "objects.json"))
    args = p.parse_args(argv)
    folder = (Path(args.out).parent / "objects").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    from captioner.inference.api import Captioner
    from captioner.models.objects import DEFAULT_THRESHOLD, NOT_INSERTED

    loaded = Captioner.load(args.checkpoint)
    result: dict = {"checkpoint": args.checkpoint, "precision": loaded.precision, "beam_size": 3,
                    "threshold": DEFAULT_THRESHOLD, "not_inserted": sorted(NOT_INSERTED),
                    "recognition": getattr(loaded.model.object_namer().recognizer, "mode", None),
                    "cpu": cpu_info(), "sets": {}}
    for name, (data, split) in SETS.items():
        if not data.exists():
            print(f"skipped {name}: {data} not found", file=sys.stderr)
            continue
        entry: dict = {"scores": {}, "minutes": {}}
        files = {}
        for objects in ("off", "on"):
            files[objects] = folder / f"{name.replace('/', '-')}-{objects}.json"
            started = time.perf_counter()
            out = captioner("evaluate", "--checkpoint", args.checkpoint, "--data", str(data), "--split", split,
                            "--objects", objects, "--captions-out", str(files[objects]), "--json")
            entry["minutes"][objects] = round((time.perf_counter() - started) / 60, 2)
            entry["scores"][objects] = json.loads(out.strip().splitlines()[-1])
            print(f"{name} objects {objects}: CIDEr-D {entry['scores'][objects]['CIDEr']:.4f}", file=sys.stderr)
        entry["compare_on_minus_off"] = json.loads(captioner("compare", str(files["off"]), str(files["on"]), "--json"))
        entry["captions_changed"] = captions_changed(files["off"], files["on"])
        result["sets"][name] = entry
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    if args.out == p.get_default("out"):
        replace_block("objects", results_block(result))
    print(json.dumps({k: {o: round(v["scores"][o]["CIDEr"], 4) for o in ("off", "on")} for k, v in result["sets"].items()}))
    return result


if __name__ == "__main__":
    main()
