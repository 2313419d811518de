"""Where a retrain of the shipped recipe spends its time, stage by stage, on this machine.

    python benchmarks/train_stages.py [--config configs/flickr8k-release.json] [--data ../shared/data/flickr8k]
                                      [--cache-dir DIR] [--steps 12] [--out benchmarks/results/train_stages.json]

Times, in this process with torch's default threads, on the recipe's own model and data: the
frozen encoder on a few photos (what `captioner prepare` runs per photo and mirror image), a
number of cross-entropy steps split into data, forward, backward and optimiser (and the tuned
top's forward and backward alone on one batch), the same for self-critical steps (sampling,
rewards and the gradient forward counted together as "loss"), and dev validation per photo.
It then multiplies each by what the recipe runs (photos, epochs, steps per epoch, trajectories)
into minutes per stage and a prediction of `release/retrain.sh`'s retrain minutes. Dev is scored after every epoch, or in a refit (`train_on_dev`) after each stage's last. Medians
of the steps after two warm-up steps; a prediction, not a retrain: `release/retrain.sh` runs one.
The cache is filled first where it is empty (minutes: that is `captioner prepare`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from captioner.files import atomic_write_text
from latency import cpu_info

REPO = Path(__file__).resolve().parents[1]


def median_ms(values: list[float], skip: int = 2) -> float:
    kept = values[skip:] if len(values) > skip else values
    return round(statistics.median(kept) * 1000, 1)


def main(argv=None) -> dict:
    from captioner.inference.decode import SearchConfig
    from captioner.evaluation.evaluate import decode_records
    from captioner.models.encoders import build_encoder, preprocess
    from captioner.training.config import load_train_config
    from captioner.training.crossentropy import TeacherForcing, autocast, caption_loss
    from captioner.training.dataset import TrainingSet, configured_model, epoch_batches, prepare
    from captioner.training.scst import reward_scorer, scst_loss
    from captioner.training.train import _build, _splits

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "flickr8k-release.json"))
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--cache-dir", default=None, help="the feature cache (default: the config's)")
    p.add_argument("--steps", type=int, default=12, help="steps timed per training stage (default 12)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_stages.json"))
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        p.error(f"--data {args.data}: no such folder (this needs ../shared/data/flickr8k)")

    cfg = load_train_config(args.config, data=args.data, cache_dir=args.cache_dir)
    model_cfg = configured_model(cfg)
    t0 = time.perf_counter()
    prepared = prepare(cfg, model_cfg.encoder)
    prepare_s = time.perf_counter() - t0
    train_recs, dev_recs = _splits(prepared, cfg)
    torch.manual_seed(cfg.seed)
    model, optimizer, gen, _ = _build(cfg, None, model_cfg, train_recs)
    data = TrainingSet(train_recs, prepared.cache, model.vocab, cfg.max_caption_len, prepared.mirrored)
    batches = epoch_batches(cfg, data, gen)

    # the frozen encoder per photo, as prepare runs it (batches of feature_batch_size)
    encoder = build_encoder(model.encoder_cfg)
    photos = [prepared.dataset.image_path(r) for r in dev_recs[:4 * cfg.feature_batch_size]]
    enc_s = []
    with torch.no_grad():
        for s in range(0, len(photos), cfg.feature_batch_size):
            t = time.perf_counter()
            encoder(torch.stack([preprocess(x, model.encoder_cfg) for x in photos[s:s + cfg.feature_batch_size]]))
            enc_s.append((time.perf_counter() - t) / cfg.feature_batch_size)

    def update(loss: torch.Tensor, t: list[float]) -> None:
        """Backward, then clip and step, as training does; each part's end time appended to t."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
        optimizer.step()
        t.append(time.perf_counter())

    def record(parts: dict[str, list[float]], names: tuple[str, ...], t: list[float]) -> None:
        for k, name in enumerate(names):
            parts.setdefault(name, []).append(t[k + 1] - t[k])

    # cross-entropy steps
    forward = TeacherForcing(model.decoder)
    model.train()
    xe: dict[str, list[float]] = {}
    for items in batches[:args.steps + 2]:
        t = [time.perf_counter()]
        feats, seq, rows = data.batch(items)
        t.append(time.perf_counter())
        with autocast(cfg, "cpu"):
            loss = caption_loss(model, feats, seq, cfg, rows, forward)
        t.append(time.perf_counter())
        update(loss, t)
        record(xe, ("data", "forward", "backward", "optimiser"), t)
    top = getattr(model.decoder, "top", None)
    top_ms = None
    if top is not None:  # the tuned top alone, on one batch's photos
        feats = data.batch(batches[0])[0]
        fw, bw = [], []
        for _ in range(5):
            t = time.perf_counter()
            out = top(feats)
            fw.append(time.perf_counter() - t)
            t = time.perf_counter()
            out.float().sum().backward()
            bw.append(time.perf_counter() - t)
        top_ms = {"forward": median_ms(fw), "backward": median_ms(bw), "images": feats.size(0)}
        optimizer.zero_grad(set_to_none=True)

    # self-critical steps
    cider = reward_scorer([r.captions for r in train_recs])
    per_step = max(1, cfg.scst_batch_size // cfg.scst_samples)
    order = torch.randperm(len(data), generator=gen).tolist()
    sc: dict[str, list[float]] = {}
    for k in range(args.steps + 2):
        images = order[k * per_step:(k + 1) * per_step]
        feats = data.photo_features(images)
        t = [time.perf_counter()]
        loss, _, _ = scst_loss(model, feats, images, cider, cfg, None, data.is_mirrored[images].tolist())
        t.append(time.perf_counter())
        update(loss, t)
        record(sc, ("loss (sample, reward, forward)", "backward", "optimiser"), t)

    # dev validation per photo (beam search as validate runs it)
    search = SearchConfig(beam_size=cfg.val_beam_size, max_len=cfg.val_max_len, length_penalty=cfg.length_penalty)
    model.eval()
    few = dev_recs[:100]
    t = time.perf_counter()
    decode_records(model, prepared.cache, few, search)
    val_per_photo = (time.perf_counter() - t) / len(few)

    # what the recipe runs
    n_photos = len(prepared.dataset.records)
    mirrored = len(train_recs) if prepared.mirrored else 0
    xe_steps, scst_steps = len(batches), -(-len(data) // per_step)
    trajectories = max(1, cfg.scst_soup)
    xe_step_ms = sum(median_ms(v) for v in xe.values())
    scst_step_ms = sum(median_ms(v) for v in sc.values())
    # dev is scored after every epoch, but a refit (train_on_dev) scores only each stage's last;
    # a soup is scored once more
    soup = 1 if trajectories > 1 else 0
    validations = (1 + trajectories if cfg.train_on_dev else cfg.epochs + trajectories * cfg.scst_epochs) + soup
    minutes = {
        "prepare (frozen encoder on every photo and mirror image)": (n_photos + mirrored) * statistics.median(enc_s) / 60,
        "cross-entropy": cfg.epochs * xe_steps * xe_step_ms / 60000,
        "self-critical": trajectories * cfg.scst_epochs * scst_steps * scst_step_ms / 60000,
        "dev validation": validations * len(dev_recs) * val_per_photo / 60,
    }
    result = {
        "config": str(args.config), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "recipe": {"photos": n_photos, "mirror_images": mirrored, "xe_epochs": cfg.epochs, "xe_steps_per_epoch": xe_steps,
                   "images_per_xe_step": len(batches[0]), "scst_trajectories": trajectories,
                   "scst_epochs": cfg.scst_epochs, "scst_steps_per_epoch": scst_steps,
                   "images_per_scst_step": per_step, "validations": validations, "dev_photos": len(dev_recs)},
        "ms": {"encoder_per_photo": round(statistics.median(enc_s) * 1000, 1),
               "xe_step": {k: median_ms(v) for k, v in xe.items()}, "xe_step_total": round(xe_step_ms, 1),
               "tuned_top_on_one_xe_batch": top_ms,
               "scst_step": {k: median_ms(v) for k, v in sc.items()}, "scst_step_total": round(scst_step_ms, 1),
               "validation_per_photo": round(val_per_photo * 1000, 1)},
        "predicted_minutes": {k: round(v, 1) for k, v in minutes.items()},
        "predicted_retrain_minutes": round(sum(minutes.values()), 1),
        "cache_ready_seconds": round(prepare_s, 1),
        "cpu": cpu_info(),
        "load_average_at_end": list(os.getloadavg()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms", "predicted_minutes", "predicted_retrain_minutes")}, indent=2))
    return result


if __name__ == "__main__":
    main()
