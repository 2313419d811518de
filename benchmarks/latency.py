"""Caption latency of a model on this machine: one photo at a time, model already loaded.

    python benchmarks/latency.py [--model PATH] [--precision auto|fp32|bf16] [--mirror-views auto|on|off]
                                 [--encoder-precision auto|fp32|bf16] [--repeats 30]
                                 [--out benchmarks/results/latency.json]

Times the whole `Captioner.caption` call (decode + resize + encoder + beam search) per
example photo and reports medians over the repeats, with the encoder alone and the
decoder alone for comparison, and the encoder per photo in a batch of 8 run 4 at a time (as
`captioner serve` encodes its micro-batches). Timings on a shared machine are noisy: read the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from captioner.inference.api import Captioner
from captioner.inference.decode import SearchConfig
from captioner.models.encoders import preprocess

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="decoder precision (default: the model's own, as users get it)")
    p.add_argument("--mirror-views", default="auto", choices=("auto", "on", "off"),
                   help="read each photo's mirror image too (default: the model's own setting)")
    p.add_argument("--encoder-precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="the frozen encoder's precision (default: the model's own, as users get it)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latency.json"))
    args = p.parse_args(argv)
    cap = Captioner.load(args.model, precision=args.precision,
                         mirror_views={"auto": None, "on": True, "off": False}[args.mirror_views],
                         encoder_precision=args.encoder_precision)
    photos = sorted((REPO / "examples").glob("*.jpg"))
    rows = {}
    for beam in (1, 3):
        per_photo = [median_ms(lambda: cap.caption(ph, beam_size=beam), args.repeats) for ph in photos]
        rows[f"caption_beam{beam}_ms"] = round(statistics.median(per_photo), 1)
    feats = cap.encode([photos[0]])
    x = preprocess(photos[0], cap.model.encoder_cfg)[None]  # (1, 3, S, S)
    # the encoder as captioning runs it: with mirror views, on the photo and its mirror image
    rows["encoder_only_ms"] = round(median_ms(lambda: cap.encode_pixels(x), args.repeats), 1)
    x8 = x.expand(8, -1, -1, -1).contiguous()  # (8, 3, S, S)
    rows["encoder_batch8_ms_per_image"] = round(median_ms(lambda: cap.encode_pixels(x8, chunk=4), args.repeats) / 8, 2)
    rows["beam3_decode_only_ms"] = round(median_ms(
        lambda: cap.model.generate(feats, SearchConfig(beam_size=3)), args.repeats), 1)
    batch = cap.encode(photos * 8)  # 32 photos' features
    t = median_ms(lambda: cap.model.generate(batch, SearchConfig(beam_size=3)), max(3, args.repeats // 5))
    rows["beam3_decode_batch32_ms_per_image"] = round(t / len(batch), 2)
    result = {"model": cap.info["path"].replace(str(REPO) + "/", ""),
              "model_mb": round(Path(cap.info["path"]).stat().st_size / 1e6, 1), "photos": [ph.name for ph in photos],
              "precision": cap.precision, "encoder_precision": cap.encoder_precision,
              "mirror_views": cap.model.mirror_views, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(), **rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
