"""Does a retrain reproduce the shipped model? Both are captioned on the Flickr8k test split the
same way, and the retrain's CIDEr-D is held against the shipped score's bootstrap interval.

    python release/reproduce.py --run RUN_DIR [--data ../shared/data/flickr8k] [--cache-dir DIR]
                                [--out benchmarks/results/reproduce.json]

`release/retrain.sh` runs this after its timed retrain. The retrain's `best.pt` is exported as
the shipped model was (fp16 weights, the shipped model's length penalty and n-gram blocking), and
both models caption the test photos with `captioner evaluate` in fp32, objects off (the model
alone), beam 3. The shipped model's 95% interval comes from the paired bootstrap over the test
photos (`captioner compare`'s), as docs/results.md quotes it. Writes RUN_DIR/reproduce.json (and
--out): both scores, both intervals, the interval of the difference, the retrain minutes from
RUN_DIR/timing.json, and `reproduced`: the retrain's CIDEr-D inside the shipped score's interval.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def evaluate(checkpoint: str, data: str, cache_dir: str | None, captions: Path) -> dict:
    """`captioner evaluate` on the test split, fp32, the model alone; its scores."""
    cmd = ["captioner", "evaluate", "--data", data, "--split", "test", "--checkpoint", checkpoint, "--beam-size", "3",
           "--precision", "fp32", "--objects", "off", "--captions-out", str(captions), "--json"]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    from captioner.evaluation.compare import compare_files
    from captioner.files import atomic_write_text
    from captioner.models.checkpoint import load_checkpoint, save_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the retrain's run folder (best.pt, timing.json)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--cache-dir", default=None, help="the retrain's feature cache (default: the config's)")
    p.add_argument("--out", default=None, help="also write the result here")
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "best.pt").is_file():
        p.error(f"--run {run}: no best.pt (has the retrain finished?)")

    shipped, _ = load_checkpoint("default")
    model, ckpt = load_checkpoint(run / "best.pt")
    model.length_penalty, model.no_repeat_ngram = shipped.length_penalty, shipped.no_repeat_ngram
    exported = run / "model.pt"
    save_checkpoint(exported, model, metrics=ckpt.get("metrics"),
                    extra={"train_config": ckpt["train_config"]} if "train_config" in ckpt else None, half=True)
    scores = {"shipped": evaluate("default", args.data, args.cache_dir, run / "captions-test-shipped.json"),
              "retrain": evaluate(str(exported), args.data, args.cache_dir, run / "captions-test-retrain.json")}
    comparison = compare_files(run / "captions-test-shipped.json", run / "captions-test-retrain.json",
                               resamples=args.resamples)
    cider = next(m for m in comparison.metrics if m.metric == "CIDEr")
    low, high = cider.a_interval
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").is_file() else {}
    result = {
        "retrain_minutes": timing.get("retrain_minutes"),
        "timing": timing,
        "train_config": ckpt.get("train_config"),
        "search": {"beam_size": 3, "length_penalty": shipped.length_penalty, "no_repeat_ngram": shipped.no_repeat_ngram,
                   "precision": "fp32", "objects": "off"},
        "test_CIDEr": {"shipped": cider.a, "retrain": cider.b, "shipped_interval": [low, high],
                       "retrain_interval": list(cider.b_interval), "difference_interval": list(cider.diff_interval)},
        "reproduced": low <= cider.b <= high,
        "scores": scores,
        "comparison": asdict(comparison),
    }
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(run / "reproduce.json", text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    print(json.dumps({k: result[k] for k in ("retrain_minutes", "test_CIDEr", "reproduced")}, indent=2))
    return result


if __name__ == "__main__":
    main()
