"""Cheaper stock recognition by a smaller input: the stock top and classifier run on the cached
block-11 input shrunk from 14x14 (2x2 average pooling, or bilinear resizing to 10x10 or 8x8;
FLOPs fall about with the area), against the stock top at full size, on the dev sets: top-1
word agreement, over all photos and over those the stock classifier scores >= 0.4 (the ones
that reach the caption). Writes benchmarks/results/recognition_lowres.json; docs/objects.md
quotes it.

    PYTHONPATH=src python benchmarks/recognition_lowres.py
"""
import json
import time
from pathlib import Path
import torch, torch.nn.functional as F
from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.encoders import regions_to_grid
from captioner.models.recognition import name_objects

def main() -> None:
    cap = Captioner.load(precision="fp32")
    model = cap.model
    rec = model.object_namer().recognizer
    top, fc = rec.top, rec.fc
    cfg = top.cfg

    def stock_x(feats):
        return regions_to_grid(feats.float(), cfg)

    def run(x):
        for block in top.blocks:
            x = block(x)
        x = top.act(top.bn1(top.conv_head(x)))
        return fc(x.mean((2, 3))).softmax(-1)

    variants = {
        "stock": lambda f: run(stock_x(f)),
        "avgpool2": lambda f: run(F.avg_pool2d(stock_x(f), 2)),
        "resize10": lambda f: run(F.interpolate(stock_x(f), size=(10, 10), mode="bilinear", align_corners=False)),
        "resize8": lambda f: run(F.interpolate(stock_x(f), size=(8, 8), mode="bilinear", align_corners=False)),
    }
    REPO = Path(__file__).resolve().parents[1]
    SHARED = REPO.parent / "shared" / "data"
    SETS = {"coco-mini": (SHARED / "coco-mini-train2017", "all"), "flickr8k-dev": (SHARED / "flickr8k", "dev")}
    result = {"model": "default", "sets": {}}
    for name, (data, split) in SETS.items():
        ds = load_dataset(data, "auto"); recs = ds.split(split)
        cache = build_cache(ds.image_dir, [r.image for r in recs], model.encoder_cfg, Path("~/.cache/captioner").expanduser(), tag=ds.name, progress=False)
        words = {k: [] for k in variants}; times = {k: 0.0 for k in variants}
        with torch.no_grad():
            for s in range(0, len(recs), 50):
                f = cache.get([r.image for r in recs[s:s+50]])
                for k, fn in variants.items():
                    t = time.perf_counter(); p = fn(f); times[k] += time.perf_counter() - t
                    words[k] += [(o[0].name if o else None, o[0].score if o else 0) for o in name_objects(p)]
        result["sets"][name] = {}
        for k in variants:
            agree = sum(a[0] == b[0] for a, b in zip(words[k], words["stock"])) / len(recs)
            conf = [(a, b) for a, b in zip(words[k], words["stock"]) if b[1] >= 0.4]
            agree_conf = sum(a[0] == b[0] for a, b in conf) / max(len(conf), 1)
            result["sets"][name][k] = {"agree_top1_word": round(agree, 3), "agree_where_stock_ge_0.4": round(agree_conf, 3),
                                       "photos": len(recs), "photos_stock_ge_0.4": len(conf), "seconds": round(times[k], 2)}
            print(f"{name} {k:10s} agree {agree:.3f} agree@stock>=0.4 {agree_conf:.3f} (n={len(conf)}) time {times[k]:.2f}s", flush=True)
    atomic_write_text(REPO / "benchmarks" / "results" / "recognition_lowres.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
