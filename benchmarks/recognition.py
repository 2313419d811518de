"""Recognition for the tuned encoder: cost of the stock top (blocks 11-15 + head + _fc) against the
encoder, in FLOPs (torch.utils.flop_counter, so no timing noise), and how often `_fc` on the tuned
top's output (mode "tuned", free) agrees with the stock classifier (mode "stock") on the COCO dev
photos. Writes benchmarks/results/recognition.json.

    PYTHONPATH=src python benchmarks/recognition.py
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.files import atomic_write_text
from captioner.models.checkpoint import load_checkpoint, resolve_checkpoint
from captioner.models.encoders import build_encoder
from captioner.models.recognition import Recognizer, name_objects

REPO = Path(__file__).resolve().parents[1]


def flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@torch.no_grad()
def main() -> None:
    model, _ = load_checkpoint(resolve_checkpoint(None))
    cfg = model.encoder_cfg
    encoder = build_encoder(cfg)
    stock = Recognizer(cfg, "stock")
    tuned = Recognizer(cfg, "tuned", model.decoder.top)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    feats = encoder(x)
    out = {"encoder_flops": flops(encoder, x), "stock_recognition_flops": flops(stock, feats),
           "tuned_recognition_flops": flops(stock.fc, torch.zeros(1, 1280))}
    out["stock_over_encoder"] = out["stock_recognition_flops"] / out["encoder_flops"]
    dataset = load_dataset(REPO.parent / "shared" / "data" / "coco-mini-train2017", "auto")
    records = dataset.split("all")
    cache = build_cache(dataset.image_dir, [r.image for r in records], cfg, Path("~/.cache/captioner").expanduser(),
                        tag=dataset.name, progress=False)
    f = cache.get([r.image for r in records])
    ps, pt = stock(f), tuned(f)
    ws, wt = name_objects(ps, 1), name_objects(pt, 1)
    out["photos"] = len(records)
    out["top1_class_agreement"] = float((ps.argmax(-1) == pt.argmax(-1)).float().mean())
    out["top1_word_agreement"] = sum(a[0].name == b[0].name for a, b in zip(ws, wt)) / len(records)
    out["mean_top1_word_score_stock"] = sum(a[0].score for a in ws) / len(records)
    out["mean_top1_word_score_tuned"] = sum(b[0].score for b in wt) / len(records)
    print(json.dumps(out, indent=1))
    atomic_write_text(REPO / "benchmarks" / "results" / "recognition.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
