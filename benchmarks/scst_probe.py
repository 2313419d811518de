"""Probe self-critical training from a cross-entropy checkpoint: dev CIDEr-D every few steps.

    python benchmarks/scst_probe.py --checkpoint runs/default/best.pt [--baseline mean|greedy]
        [--sampler beam|multinomial] [--lr 5e-5] [--steps 240] [--dropout] [--dev-images 500]
        [--out benchmarks/results/scst_probe-NAME.json]

Runs `scst_loss` steps of 25 photos over a shuffled train split (240 steps = one epoch) and
scores beam-3 captions of the first `--dev-images` dev photos before and every 60 steps, so a
recipe can be judged in minutes before it goes into a full run. Writes the curve as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from captioner.models.checkpoint import load_checkpoint
from captioner.training.config import TrainConfig
from captioner.inference.decode import SearchConfig
from captioner.evaluation.evaluate import decode_records
from captioner.evaluation.metrics import score_captions
from captioner.training.scst import reward_scorer, scst_loss
from captioner.training.train import TrainingSet, autocast, prepare


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--baseline", default="mean", choices=("mean", "greedy"))
    p.add_argument("--sampler", default="beam", choices=("beam", "multinomial"))
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--images-per-step", type=int, default=25)
    p.add_argument("--dropout", action="store_true", help="keep dropout on (scst_dropout)")
    p.add_argument("--dev-images", type=int, default=500)
    p.add_argument("--every", type=int, default=60)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = TrainConfig(data=args.data, cache_dir=args.cache_dir, progress=False, scst_baseline=args.baseline,
                      scst_sampler=args.sampler, scst_lr=args.lr, scst_dropout=args.dropout)
    model, _ = load_checkpoint(args.checkpoint)
    prepared = prepare(cfg, model.encoder_cfg.name)
    train_recs = prepared.dataset.split("train")
    dev = prepared.dataset.split("dev")[:args.dev_images]
    cider = reward_scorer([r.captions for r in train_recs])
    data = TrainingSet(train_recs, prepared.cache, model.vocab, cfg.max_caption_len)
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=args.lr)

    def dev_scores() -> dict:
        preds = decode_records(model, prepared.cache, dev, SearchConfig(beam_size=3, length_penalty=1.0))
        return score_captions(preds, {r.image: r.captions for r in dev}, ("Bleu_4", "CIDEr"))[0]

    curve = [{"step": 0, **dev_scores()}]
    print(json.dumps(curve[-1]), flush=True)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    rewards, baselines = [], []
    for step in range(1, args.steps + 1):
        start = ((step - 1) * args.images_per_step) % len(order)
        images = order[start:start + args.images_per_step]
        with autocast(cfg):
            loss, reward, baseline = scst_loss(model, data.features[images].float(), images, cider, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
        optimizer.step()
        rewards.append(reward)
        baselines.append(baseline)
        if step % args.every == 0:
            curve.append({"step": step, "train_reward": sum(rewards) / len(rewards),
                          "train_baseline": sum(baselines) / len(baselines), **dev_scores()})
            rewards, baselines = [], []
            print(json.dumps(curve[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=2) + "\n")
    return curve


if __name__ == "__main__":
    main()
