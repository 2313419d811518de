"""What self-critical training adds: score a cross-entropy checkpoint and the SCST model that
started from it on the same split, with the same search and the same toolkit as `evaluate`.

    python release/scst_gain.py --xe runs/scst/best-xe.pt --scst runs/scst/best.pt \
        [--data ../shared/data/flickr8k] [--split test] [--beam-size 3] [--cache-dir DIR] \
        [--out benchmarks/results/scst_gain.json] [--captions-dir DIR]

A run with `scst_epochs > 0` keeps its best cross-entropy weights as `best-xe.pt` beside the
final `best.pt`, so this compares the two ends of one run. Both are scored with the plain
beam search (length penalty 1, no n-gram blocking) so the difference is the training's alone.
Writes both score sets, their difference and the dev scores each checkpoint was selected on;
with `--captions-dir`, each model's captions too (`captions-SPLIT-xe.json`, `captions-SPLIT-scst.json`),
for `captioner compare` to put an interval on the gain.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.models.checkpoint import load_checkpoint
from captioner.evaluation.evaluate import evaluate


def score(path: str, args: argparse.Namespace, stage: str = "") -> dict:
    """`path` scored on `args.split` with the plain beam; with `args.captions_dir` (ablation.py and
    learning_curve.py call this without one), the captions are kept as captions-SPLIT-STAGE.json."""
    model, ckpt = load_checkpoint(path)
    search = model.search_config(args.beam_size, 25, 1, 1.0, 0)
    captions_dir = getattr(args, "captions_dir", None)
    captions_out = Path(captions_dir) / f"captions-{args.split}-{stage}.json" if captions_dir and stage else None
    scores, notes = evaluate(model, args.data, args.split, search, cache_dir=args.cache_dir, progress=False,
                             captions_out=captions_out)
    for note in notes:
        print(f"note: {note}")
    return {"checkpoint": path, "selected_on_dev": ckpt.get("metrics", {}), "vocab": len(model.vocab),
            args.split: scores}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xe", required=True, help="the cross-entropy starting point")
    p.add_argument("--scst", required=True, help="the self-critically trained model")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--split", default="test")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--out", default="benchmarks/results/scst_gain.json")
    p.add_argument("--captions-dir", default=None, help="also write each model's captions here (not in the repo)")
    args = p.parse_args(argv)
    xe, scst = score(args.xe, args, "xe"), score(args.scst, args, "scst")
    gain = {k: round(scst[args.split][k] - xe[args.split][k], 4) for k in xe[args.split]}
    result = {"split": args.split, "beam_size": args.beam_size, "cross_entropy": xe, "scst": scst, "gain": gain}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(gain))
    return result


if __name__ == "__main__":
    main()
