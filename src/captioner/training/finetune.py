"""Fine-tune a served model on the corrections its users gave, mixed with its original training
data so that it does not forget, into a new checkpoint that can be served as a new variant.

    captioner finetune --db captioner.db --checkpoint models/base.pt --data ../shared/data/flickr8k --out models/v2.pt
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, save_checkpoint
from captioner.training.config import TrainConfig
from captioner.data.datasets import ImageRecord
from captioner.errors import CaptionerError, ConfigError
from captioner.service.feedback import FeedbackStore
from captioner.data.features import FeatureCache
from captioner.models.model import CaptionModel
from captioner.training.crossentropy import train_epoch
from captioner.training.dataset import TrainingSet, images_per_batch, length_bucketed_batches, prepare
from captioner.training.train import param_groups
from captioner.data.vocab import tokenize

log = logging.getLogger("captioner.training.finetune")


@dataclass
class FinetuneConfig:
    db: str  # feedback store holding the corrected captions (and their photos)
    checkpoint: str  # the base model to continue from
    data: str  # its original dataset (Flickr8k layout): train photos are replayed beside the corrections
    out: str  # the new checkpoint
    epochs: int = 3  # passes over the mixed set
    lr: float = 1e-4  # peak Adam learning rate: the base is trained already, so small steps
    batch_size: int = 50  # captions per optimiser step
    replay_ratio: float = 10.0  # original train photos (all their captions) per corrected photo
    correction_repeats: int = 3  # copies of each correction per epoch: a few corrections among many originals
    eval_images: int = 100  # original dev photos on which forgetting is measured (0 = none)
    layout: str = "auto"  # Flickr8k caption layout: token, csv or auto
    cache_dir: str = "~/.cache/captioner"  # encoder feature cache of the original data
    max_caption_len: int = 30  # words kept per caption
    seed: int = 0
    half: bool = False  # store the new weights as fp16, as the shipped model is
    progress: bool = False  # progress bars


def _train_config(cfg: FinetuneConfig) -> TrainConfig:
    return TrainConfig(data=cfg.data, layout=cfg.layout, cache_dir=cfg.cache_dir, seed=cfg.seed, lr=cfg.lr,
                       batch_size=cfg.batch_size, max_caption_len=cfg.max_caption_len, warmup_steps=1,
                       final_lr_ratio=0.1, progress=cfg.progress, epochs=cfg.epochs)


@torch.no_grad()
def caption_nll(model: CaptionModel, data: TrainingSet, images: list[int], batch_images: int = 16) -> float:
    """Mean per-word cross-entropy (nats) of the captions of `images` under the model."""
    if not images:
        return float("nan")
    model.eval()
    total, words = 0.0, 0
    for s in range(0, len(images), batch_images):
        feats, seqs, rows = data.batch(images[s:s + batch_images])
        logits = model.decoder(feats, seqs[:, :-1], rows)  # (B, T, V)
        targets = seqs[:, 1:]
        mask = targets != model.vocab.pad_id
        total += F.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
        words += int(mask.sum())
    return total / max(words, 1)


def _correction_features(captioner: Captioner, photos: list[bytes]) -> tuple[np.ndarray, list[int]]:
    """Encode the corrected photos; returns features and the indices that could be read."""
    feats, ok = [], []
    for i, photo in enumerate(photos):
        try:
            feats.append(captioner.encode([photo])[0].numpy().astype(np.float16))  # (N, C)
            ok.append(i)
        except CaptionerError as e:
            log.warning("skipping a stored photo that cannot be read: %s", e)
    return (np.stack(feats) if feats else np.zeros((0,), np.float16)), ok


def finetune(cfg: FinetuneConfig) -> dict:
    """Continue training `cfg.checkpoint` on the store's corrections plus replayed original data;
    write `cfg.out` and return a report (losses before and after, counts)."""
    if Path(cfg.out).resolve() == Path(cfg.checkpoint).resolve():
        raise ConfigError(f"--out {cfg.out} would overwrite the base checkpoint; choose a new file")
    if not Path(cfg.db).is_file():
        raise ConfigError(f"{cfg.db}: feedback database not found")
    store = FeedbackStore(cfg.db)
    corrections = store.corrections()
    store.close()
    if not corrections:
        raise ConfigError(f"{cfg.db}: no corrected captions to learn from yet")

    model, ckpt = load_checkpoint(cfg.checkpoint)
    # fp32 whatever the model ships with: this model is trained below, and bf16 inference
    # would swap its Linear weights for gradient-less bfloat16 copies (captioner.precision).
    captioner = Captioner(model, {"path": cfg.checkpoint}, precision="fp32")
    corr_feats, ok = _correction_features(captioner, [c.image for c in corrections])
    corrections = [corrections[i] for i in ok]
    if not corrections:
        raise ConfigError(f"{cfg.db}: none of the corrected photos could be read")
    known = set(model.vocab.tokens)
    oov = sorted({w for c in corrections for w in tokenize(c.caption) if w not in known})  # learnt as <unk>

    tcfg = _train_config(cfg)
    prepared = prepare(tcfg, model.encoder_cfg.name)
    train_recs = prepared.dataset.split("train")
    dev_recs = prepared.dataset.split("dev")[:cfg.eval_images]
    rng = random.Random(cfg.seed)
    n_replay = min(len(train_recs), math.ceil(cfg.replay_ratio * len(corrections)))
    replay = rng.sample(train_recs, n_replay)

    # One in-memory feature table: replayed and dev photos from the cache, then the corrected photos.
    names = [r.image for r in replay + dev_recs] + [f"feedback:{c.caption_id}" for c in corrections]
    cached = prepared.cache.features[prepared.cache.rows([r.image for r in replay + dev_recs])]
    table = FeatureCache(prepared.cache.path, names, np.concatenate([cached, corr_feats]))
    corr_recs = [ImageRecord(f"feedback:{c.caption_id}", [c.caption]) for c in corrections]
    data = TrainingSet(replay + corr_recs * cfg.correction_repeats, table, model.vocab, cfg.max_caption_len)
    held = TrainingSet(corr_recs + dev_recs, table, model.vocab, cfg.max_caption_len)
    corr_idx, dev_idx = list(range(len(corr_recs))), list(range(len(corr_recs), len(held)))

    before = {"corrections": caption_nll(model, held, corr_idx), "original_dev": caption_nll(model, held, dev_idx)}
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(param_groups(model, tcfg), lr=cfg.lr)
    batch_images = images_per_batch(tcfg, data)
    total = math.ceil(len(data) / batch_images) * cfg.epochs
    step, losses = 0, []
    for epoch in range(1, cfg.epochs + 1):
        batches = length_bucketed_batches(data.lengths, batch_images, gen)
        loss, step = train_epoch(model, optimizer, data, batches, step, total, tcfg, f"finetune {epoch}/{cfg.epochs}")
        losses.append(loss)
        log.info("finetune epoch %d: loss %.3f", epoch, loss)
    after = {"corrections": caption_nll(model, held, corr_idx), "original_dev": caption_nll(model, held, dev_idx)}

    report = {"corrections": len(corrections), "replayed_images": len(replay), "dev_images": len(dev_recs),
              "epochs": cfg.epochs, "train_loss": losses, "nll_before": before, "nll_after": after,
              "unknown_words": oov, "base": str(cfg.checkpoint), "out": str(cfg.out)}
    provenance = {"base": str(cfg.checkpoint), "base_metrics": ckpt.get("metrics", {}),
                  "config": asdict(cfg), "corrections": len(corrections)}
    save_checkpoint(cfg.out, model, metrics={"finetune": {"nll_before": before, "nll_after": after}},
                    extra={"finetune": provenance}, half=cfg.half)
    return report
