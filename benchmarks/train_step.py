"""Median time of one cross-entropy training step per registered decoder, fp32 against bf16 autocast;
and of a tuned encoder top's share of a step (forward, backward and Adam on the same 10 photos),
run in float32 and in bf16 (`TunedTop` itself always runs in float32).

    python benchmarks/train_step.py [--threads 1] [--repeats 6] [--out benchmarks/results/train_step.json]

A step is forward, backward and Adam on random region features of 10 photos x 5 captions
of 14 tokens (the default batch of 50 captions, image-grouped), vocab 2538, 7x7 x 1280 regions,
with each registered model's decoder config.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from captioner.models.decoders import build_decoder
from captioner.models.encoders import ENCODERS, TunedTop
from captioner.models.model import get_model_config, list_models

REPO = Path(__file__).resolve().parents[1]


def median_step_ms(loss_fn, params, bf16: bool, repeats: int) -> float:
    """Median ms of forward (`loss_fn()`, under bf16 autocast or not), backward and Adam."""
    optimizer = torch.optim.Adam(params, 1e-4)
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times[1:])


def step_ms(name: str, bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    cfg = get_model_config(name)
    decoder = build_decoder(cfg.decoder, cfg.decoder_params, 2538, 1280).train()
    feats, tokens = torch.randn(10, 49, 1280), torch.randint(4, 2538, (50, 14))
    rows = torch.arange(10).repeat_interleave(5)
    return median_step_ms(lambda: decoder(feats, tokens, rows).float().logsumexp(-1).mean(),
                          decoder.parameters(), bf16, repeats)


def top_step_ms(encoder: str, bf16: bool, repeats: int) -> float:
    torch.manual_seed(0)
    cfg = ENCODERS[encoder]
    top = TunedTop(cfg)
    feats = torch.randn(10, cfg.grid_size ** 2, cfg.feature_dim)
    # _forward: the convolutions in the autocast's precision (forward() keeps them in float32)
    return median_step_ms(lambda: top._forward(feats).float().square().mean(), top.parameters(), bf16, repeats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {name: {"fp32_ms": round(step_ms(name, False, args.repeats), 1),
                   "bf16_ms": round(step_ms(name, True, args.repeats), 1)} for name in list_models()}
    tops = {name: {"fp32_ms": round(top_step_ms(name, False, args.repeats), 1),
                   "bf16_ms": round(top_step_ms(name, True, args.repeats), 1)} for name, cfg in ENCODERS.items()
            if cfg.split}
    for r in [*rows.values(), *tops.values()]:
        r["speed_up"] = round(r["fp32_ms"] / r["bf16_ms"], 2)
    result = {"threads": args.threads, "repeats": args.repeats,
              "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "models": rows,
              "tuned_encoder_tops": tops}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
