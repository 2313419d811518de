"""Captions with objects on, recognised by the stock classifier against a recognition head
(release/recognition_head.py --out FILE), on the COCO dev photos (and Flickr8k dev with --flickr):
CIDEr per threshold, and a paired bootstrap of head against stock at the default threshold and at
the head's best (`captioner compare`), and the README examples' captions. fp32, beam 3, the shipped
model and its objects rule.
Writes the captions files into --out-dir and benchmarks/results/recognition_captions.json.

    PYTHONPATH=src python benchmarks/recognition_captions.py --head FILE [--thresholds 0.3,0.4,0.5]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.evaluation.compare import compare_files
from captioner.evaluation.evaluate import decode_records
from captioner.evaluation.metrics import score_captions
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, load_recognition_head, resolve_checkpoint
from captioner.models.objects import DEFAULT_THRESHOLD

REPO = Path(__file__).resolve().parents[1]
SETS = {"coco-mini/all": (REPO.parent / "shared" / "data" / "coco-mini-train2017", "all"),
        "flickr8k/dev": (REPO.parent / "shared" / "data" / "flickr8k", "dev")}
EXAMPLES = ("cat", "coffee", "rocket", "astronaut")


def captioner_with(head_file: str | None) -> Captioner:
    """The shipped model, fp32, recognising with `head_file`'s head (None: the stock classifier)."""
    path = resolve_checkpoint(None)
    model, ckpt = load_checkpoint(path)
    model.attach_recognition_head(load_recognition_head(head_file, ckpt.get("checksum")) if head_file else None)
    return Captioner(model, {"path": str(path), "name": ckpt["model"]["name"]}, precision="fp32")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", required=True, help="a recognition head file")
    ap.add_argument("--thresholds", default="0.3,0.4,0.5", help="for the head (stock runs at the default)")
    ap.add_argument("--flickr", action="store_true", help="Flickr8k dev too (minutes on 2 cores)")
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    ap.add_argument("--out-dir", default="/tmp/recognition_captions")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {"stock": (captioner_with(None), [DEFAULT_THRESHOLD]),
            "head": (captioner_with(args.head), [float(t) for t in args.thresholds.split(",")])}
    result: dict = {"head": Path(args.head).name, "default_threshold": DEFAULT_THRESHOLD, "sets": {},
                    "examples": {}}
    from importlib import resources
    photos = {n: resources.files("captioner") / "examples" / f"{n}.jpg" for n in EXAMPLES}
    for mode, (cap, _) in runs.items():  # the README examples at the default threshold
        cap.model.object_namer(DEFAULT_THRESHOLD)
        for name, c in zip(photos, cap.caption_features(cap.encode(list(photos.values())))):
            result["examples"].setdefault(name, {})[mode] = {
                "caption": c.text, "objects": [o.to_dict() for o in c.objects[:3]]}
    for name, (root, split) in SETS.items():
        if name == "flickr8k/dev" and not args.flickr:
            continue
        dataset = load_dataset(root, "auto")
        records = dataset.split(split)
        refs = {r.image: r.captions for r in records}
        row: dict = {}
        files: dict = {}
        for mode, (cap, thresholds) in runs.items():
            model = cap.model
            cache = build_cache(dataset.image_dir, [r.image for r in records], model.encoder_cfg,
                                Path(args.cache_dir).expanduser(), tag=dataset.name, progress=False)
            assert model.object_namer().recognizer.mode == mode
            for t in thresholds:
                model.object_namer(t)
                preds = decode_records(model, cache, records, model.search_config(), objects=True)
                path = out_dir / f"{name.replace('/', '-')}-{mode}-t{t}.json"
                atomic_write_text(path, json.dumps([{"image": r.image, "caption": preds[r.image],
                                                     "references": r.captions} for r in records], indent=1) + "\n")
                files[(mode, t)] = path
                row[f"{mode} t{t}"] = round(score_captions(preds, refs, ["CIDEr"])[0]["CIDEr"], 4)
                print(name, mode, t, row[f"{mode} t{t}"], flush=True)
        best = max(runs["head"][1], key=lambda t: row[f"head t{t}"])
        for t in dict.fromkeys([DEFAULT_THRESHOLD, best]):
            c = compare_files(files[("stock", DEFAULT_THRESHOLD)], files[("head", t)])
            cider = next(m for m in c.metrics if m.metric == "CIDEr")
            row[f"head t{t} - stock, CIDEr 95% interval"] = [round(x, 4) for x in asdict(cider)["diff_interval"]]
        result["sets"][name] = row
    print(json.dumps(result, indent=1))
    atomic_write_text(REPO / "benchmarks" / "results" / "recognition_captions.json",
                      json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
