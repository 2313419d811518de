"""Captions of a fixed photo sample, to compare two versions of the code caption for caption.

    python benchmarks/captions_snapshot.py OUT.json
    # then, on another commit (e.g. in a git worktree, with PYTHONPATH=<worktree>/src):
    python benchmarks/captions_snapshot.py OTHER.json
    python benchmarks/captions_snapshot.py --diff OUT.json OTHER.json
    python benchmarks/captions_snapshot.py --batch-vs-single OUT.json

Captions the shipped model, named objects on, in fp32 and int8: Flickr8k photos 1000-1299 (sorted
by name) and the 80 COCO dev photos in batches of 8, and 40 of each one at a time. `--diff`
prints how many captions differ per mode. docs/experiments.md quotes it for changes that must
not change captions (fp32) or may change few (int8, whose activation scales depend on the batch).
`--batch-vs-single` prints, per precision, how many of the 80 photos captioned one at a time got
another caption in their batch of 8 (docs/speed.md quotes it: int8 captions depend on batch mates).
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


def batch_vs_single(snap: dict[str, list[str]]) -> list[tuple[str, int, int]]:
    """(precision, photos whose caption in a batch differs from alone, photos compared): the
    one-at-a-time captions are of the first 40 and the last 40 photos of the batched list."""
    out = []
    for precision in [m for m in snap if not m.endswith("_one_at_a_time")]:
        alone, batched = snap[f"{precision}_one_at_a_time"], snap[precision]
        pairs = list(zip(batched[:40] + batched[-40:], alone))
        out.append((precision, sum(a != b for a, b in pairs), len(pairs)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="where to write the captions (or, with --diff, the first file)")
    p.add_argument("--diff", metavar="OTHER", help="compare OUT with OTHER instead of captioning")
    p.add_argument("--batch-vs-single", action="store_true",
                   help="in OUT, compare each photo's caption in its batch with its caption alone")
    args = p.parse_args(argv)
    if args.batch_vs_single:
        for precision, differ, total in batch_vs_single(json.loads(Path(args.out).read_text())):
            print(f"{precision}: {differ} of {total} photos differ between their batch of 8 and one at a time")
        return
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
