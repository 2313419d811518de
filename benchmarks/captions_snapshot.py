"""Captions of a fixed photo sample, to compare two versions of the code caption for caption.

    python benchmarks/captions_snapshot.py OUT.json
    # then, on another commit (e.g. in a git worktree, with PYTHONPATH=<worktree>/src):
    python benchmarks/captions_snapshot.py OTHER.json
    python benchmarks/captions_snapshot.py --diff OUT.json OTHER.json

Captions the shipped model, named objects on, in fp32 and int8: Flickr8k photos 1000-1299 (sorted
by name) and the 80 COCO dev photos in batches of 8, and 40 of each one at a time. `--diff`
prints how many captions differ per mode. docs/experiments.md quotes it for changes that must
not change captions (fp32) or may change few (int8, whose activation scales depend on the batch).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from captioner.files import atomic_write_text
from captioner.inference.api import Captioner

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def snapshot() -> dict[str, list[str]]:
    photos = (sorted((DATA / "flickr8k" / "Images").glob("*.jpg"))[1000:1300]
              + sorted((DATA / "coco-mini-train2017").rglob("*.jpg")))
    if not photos:
        raise SystemExit(f"no photos under {DATA}: this needs ../shared/data")
    out = {}
    for precision in ("fp32", "int8"):
        captioner = Captioner.load(precision=precision)
        out[precision] = [c.text for s in range(0, len(photos), 8) for c in captioner.caption_batch(photos[s:s + 8])]
        out[f"{precision}_one_at_a_time"] = [captioner.caption(p).text for p in photos[:40] + photos[-40:]]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="where to write the captions (or, with --diff, the first file)")
    p.add_argument("--diff", metavar="OTHER", help="compare OUT with OTHER instead of captioning")
    args = p.parse_args(argv)
    if args.diff:
        a, b = json.loads(Path(args.out).read_text()), json.loads(Path(args.diff).read_text())
        for mode in a:
            changed = sum(x != y for x, y in zip(a[mode], b[mode]))
            print(f"{mode}: {changed} of {len(a[mode])} captions differ")
        return
    torch.set_num_threads(2)
    atomic_write_text(args.out, json.dumps(snapshot()) + "\n")


if __name__ == "__main__":
    main()
