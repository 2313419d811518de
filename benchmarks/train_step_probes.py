"""The training speed-ups of docs/experiments.md ("Faster steps, same recipe"), each against
what it replaced, interleaved in one run on this machine.

    python benchmarks/train_step_probes.py [--data ../shared/data/flickr8k] [--cache-dir DIR]
                                           [--rounds 12] [--out benchmarks/results/train_step_probes.json]

- draw: one word drawn for 50 rows over the shipped vocabulary, `torch.multinomial` against the
  inverse-CDF draw sampling now uses (`decode._draw`);
- encoder: the frozen bottom of the tuned encoder per photo, eager against traced and frozen (as
  feature extraction now runs it), and the share of fp16-cached values that come out identical;
- cross-entropy and self-critical steps of the release recipe's model, with each caption's
  padding skipped (`lengths`) against without, and a cross-entropy step of 20 photos against 10.
Medians after two warm-up rounds. Needs the Flickr8k feature cache (filled first where empty).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from captioner.files import atomic_write_text
from latency import cpu_info

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v[2:] or v) * 1000, 2) for k, v in times.items()}


def main(argv=None) -> dict:
    from captioner.inference.decode import _draw
    from captioner.models.encoders import build_encoder, frozen_encoder, preprocess
    from captioner.training.config import load_train_config
    from captioner.training.crossentropy import TeacherForcing, caption_loss
    from captioner.training.dataset import TrainingSet, configured_model, length_bucketed_batches, prepare
    from captioner.training.scst import reward_scorer, scst_loss
    from captioner.training.train import _build, _splits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step_probes.json"))
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder (this needs ../shared/data/flickr8k)")

    cfg = load_train_config(REPO / "configs" / "flickr8k-release.json", data=args.data, cache_dir=args.cache_dir,
                            progress=False)
    prepared = prepare(cfg, configured_model(cfg).encoder)
    train_recs, _ = _splits(prepared, cfg)
    torch.manual_seed(0)
    model, optimizer, gen, _ = _build(cfg, None, configured_model(cfg), train_recs)
    data = TrainingSet(train_recs, prepared.cache, model.vocab, cfg.max_caption_len, prepared.mirrored)
    result: dict = {"rounds": args.rounds, "cpu": cpu_info()}

    # the draw
    probs = torch.randn(50, len(model.vocab)).softmax(-1)
    logits = probs.log()
    draw = {"multinomial": [], "inverse_cdf": []}
    for _ in range(50):
        draw["multinomial"].append(timed(lambda: torch.multinomial(probs, 1)))
        draw["inverse_cdf"].append(timed(lambda: _draw(logits, 1.0, None)))
    result["draw_ms"] = medians(draw)

    # the encoder's frozen bottom, per photo
    encoder = build_encoder(model.encoder_cfg).eval()
    frozen = frozen_encoder(encoder)
    photos = [prepared.dataset.image_path(r) for r in train_recs[:8]]
    pixels = torch.stack([preprocess(x, model.encoder_cfg) for x in photos])
    last = pixels.contiguous(memory_format=torch.channels_last)
    enc = {"eager": [], "frozen": []}
    with torch.no_grad():
        same = (encoder(pixels).half() == frozen(last).half()).float().mean().item()
        for _ in range(args.rounds):
            enc["eager"].append(timed(lambda: encoder(pixels)) / len(photos))
            enc["frozen"].append(timed(lambda: frozen(last)) / len(photos))
    result["encoder_ms_per_photo"] = medians(enc)
    result["encoder_fp16_values_identical"] = round(same, 4)

    # training steps
    class Unpacked(TeacherForcing):
        def forward(self, feats, inputs, rows=None, need_weights=True, lengths=None):
            return super().forward(feats, inputs, rows, need_weights, None)

    forwards = {"lengths": TeacherForcing(model.decoder), "no_lengths": Unpacked(model.decoder)}
    batches = {n: length_bucketed_batches(data.lengths, n, gen) for n in (10, 20)}

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
        optimizer.step()

    def xe_step(items, forward) -> None:
        feats, seq, rows = data.batch(items)
        update(caption_loss(model, feats, seq, cfg, rows, forward))

    model.train()
    xe = {"lengths": [], "no_lengths": [], "lengths_20_photos": []}
    for k in range(args.rounds):
        for name in (("lengths", "no_lengths") if k % 2 else ("no_lengths", "lengths")):
            xe[name].append(timed(lambda: xe_step(batches[10][k], forwards[name])))
        xe["lengths_20_photos"].append(timed(lambda: xe_step(batches[20][k], forwards["lengths"])))
    result["xe_step_ms"] = medians(xe)
    result["xe_20_over_10_photos"] = round(result["xe_step_ms"]["lengths_20_photos"] / result["xe_step_ms"]["lengths"], 3)

    cider = reward_scorer([r.captions for r in train_recs])
    order = torch.randperm(len(data), generator=gen).tolist()

    def scst_step(k, forward) -> None:
        images = order[k * 10:(k + 1) * 10]
        loss, _, _ = scst_loss(model, data.photo_features(images), images, cider, cfg, forward,
                               data.is_mirrored[images].tolist())
        update(loss)

    sc = {"lengths": [], "no_lengths": []}
    for k in range(args.rounds):
        for name in (("lengths", "no_lengths") if k % 2 else ("no_lengths", "lengths")):
            sc[name].append(timed(lambda: scst_step(k, forwards[name])))
    result["scst_step_ms"] = medians(sc)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "cpu"}, indent=2))
    return result


if __name__ == "__main__":
    main()
