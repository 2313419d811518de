"""Named objects: the shipped model with and without objects on Flickr8k dev/test and the COCO
dev photos, the threshold tuned on the dev sets; writes benchmarks/results/objects.json and the
captions files `captioner compare` reads (into --out-dir).

    PYTHONPATH=src python benchmarks/objects.py --out-dir /tmp/objects
    PYTHONPATH=src python benchmarks/objects.py --sets coco-mini/all --recognition stock --results R.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.evaluation.evaluate import decode_records
from captioner.evaluation.metrics import score_captions
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, load_recognition_head, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
SETS = {"flickr8k": REPO.parent / "shared" / "data" / "flickr8k",
        "coco-mini": REPO.parent / "shared" / "data" / "coco-mini-train2017"}


def run(captioner: Captioner, name: str, split: str, settings: list, out_dir: Path, cache_dir: Path) -> dict:
    dataset = load_dataset(SETS[name], "auto")
    records = dataset.split(split)
    model = captioner.model
    cache = build_cache(dataset.image_dir, [r.image for r in records], model.encoder_cfg, cache_dir,
                        tag=dataset.name, progress=False)
    refs = {r.image: r.captions for r in records}
    out = {}
    for threshold in settings:  # None = objects off
        t0 = time.perf_counter()
        if threshold is not None:
            model.object_namer(threshold)
        preds = decode_records(model, cache, records, model.search_config(), objects=threshold is not None)
        scores, _ = score_captions(preds, refs, ["CIDEr"])
        tag = "off" if threshold is None else f"t{threshold}"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}-{split}-{tag}.json"
        rows = [{"image": r.image, "caption": preds[r.image], "references": r.captions} for r in records]
        atomic_write_text(path, json.dumps(rows, indent=1) + "\n")
        named = None
        if threshold is not None:
            feats = cache.get([r.image for r in records])
            objs = model.object_namer().recognize(feats)
            named = sum(1 for o in objs if o and o[0].score >= threshold) / len(records)
        out[tag] = {"CIDEr": scores["CIDEr"],
                    "images": len(records), "share_constrained": named, "captions_file": path.name,
                    "seconds": round(time.perf_counter() - t0, 1)}
        print(name, split, tag, json.dumps(out[tag]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="/tmp/objects")
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    ap.add_argument("--thresholds", default="0.3,0.5,0.8")
    ap.add_argument("--test-threshold", type=float, default=None, help="default: the best mean dev CIDEr")
    ap.add_argument("--recognition", choices=("auto", "stock"), default="auto",
                    help="auto: the model's recognition head where it has one; stock: the stock classifier")
    ap.add_argument("--head", default=None,
                    help="a recognition head file (release/recognition_head.py --out) to use instead of the sidecar")
    ap.add_argument("--sets", default="coco-mini/all,flickr8k/dev,flickr8k/test",
                    help="which of coco-mini/all, flickr8k/dev, flickr8k/test to run")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "objects.json"))
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    cache_dir = Path(args.cache_dir).expanduser()
    sets = args.sets.split(",")
    path = resolve_checkpoint(None)
    model, ckpt = load_checkpoint(path)
    if args.head:
        model.attach_recognition_head(load_recognition_head(args.head, ckpt.get("checksum")))
    if args.recognition == "stock":
        model.attach_recognition_head(None)
    captioner = Captioner(model, {"path": str(path), "name": ckpt["model"]["name"]}, precision="fp32")
    grid = [None] + [float(t) for t in args.thresholds.split(",")]
    result = {"model": captioner.name, "precision": captioner.precision, "beam_size": 3,
              "recognition": captioner.model.object_namer().recognizer.mode}
    for key in ("coco-mini/all", "flickr8k/dev"):
        if key in sets:
            name, split = key.split("/")
            result[key] = run(captioner, name, split, grid, out_dir / result["recognition"], cache_dir)
    if "flickr8k/test" in sets:
        best = args.test_threshold
        if best is None:
            best = max(grid[1:], key=lambda t: sum(result[k][f"t{t}"]["CIDEr"] for k in ("coco-mini/all", "flickr8k/dev")
                                                   if k in result))
        result["chosen_threshold"] = best
        result["flickr8k/test"] = run(captioner, "flickr8k", "test", [None, best], out_dir / result["recognition"],
                                      cache_dir)
    atomic_write_text(args.results, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
