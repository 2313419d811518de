"""Cross-entropy training with dev-set decoding, early stopping on CIDEr, and resume."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import atomic_torch_save, checkpoint_dict, read_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import CaptionDataset, ImageRecord, load_flickr8k
from .decode import SearchConfig
from .evaluate import decode_records
from .encoders import get_encoder_config
from .errors import ConfigError
from .features import FeatureCache, build_cache
from .metrics import score_captions
from .model import CaptionModel, get_model_config
from .vocab import Vocab

log = logging.getLogger("captioner.train")
VAL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


@dataclass
class Prepared:
    """A dataset with its vocab and feature cache, ready to train or evaluate on."""

    dataset: CaptionDataset
    cache: FeatureCache


def prepare(cfg: TrainConfig) -> Prepared:
    """Load and check the dataset, then fill (or reuse) the feature cache for all its images."""
    dataset = load_flickr8k(cfg.data, layout=cfg.layout, seed=cfg.seed)
    for note in dataset.notes:
        log.info("data: %s", note)
    enc = get_encoder_config(get_model_config(cfg.model).encoder)
    cache = build_cache(dataset.image_dir, [r.image for r in dataset.records], enc,
                        Path(cfg.cache_dir).expanduser(), tag=dataset.name,
                        batch_size=cfg.feature_batch_size, progress=cfg.progress)
    return Prepared(dataset, cache)


class TrainingSet:
    """(image, caption) pairs of the train split, with the images' features held in RAM."""

    def __init__(self, records: list[ImageRecord], cache: FeatureCache, vocab: Vocab, max_len: int):
        self.vocab = vocab
        self.rows: list[int] = []  # feature row of each pair
        self.seqs: list[list[int]] = []  # [BOS, words..., EOS] of each pair
        for i, r in enumerate(records):
            for c in r.captions:
                self.rows.append(i)
                self.seqs.append(vocab.encode(c, max_len))
        self.lengths = [len(s) for s in self.seqs]
        # fp16 in RAM once: random batch access without touching the disk
        self.features = torch.from_numpy(np.ascontiguousarray(
            cache.features[cache.rows([r.image for r in records])]))  # (N_images, R, C)

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair indices -> features (B, R, C) float32 and PAD-padded token ids (B, T)."""
        seq = torch.full((len(pairs), max(self.lengths[i] for i in pairs)), self.vocab.pad_id, dtype=torch.long)
        for j, i in enumerate(pairs):
            seq[j, :self.lengths[i]] = torch.tensor(self.seqs[i])
        return self.features[[self.rows[i] for i in pairs]].float(), seq


def length_bucketed_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffle, sort by length within pools of 50 batches, then shuffle the batches:
    batches hold captions of near-equal length, so little compute goes to padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    pool = batch_size * 50
    batches = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s:s + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    low = cfg.lr * cfg.final_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def caption_loss(model: CaptionModel, feats: torch.Tensor, seqs: torch.Tensor, cfg: TrainConfig
                 ) -> torch.Tensor:
    """Cross-entropy (label-smoothed) + the doubly stochastic attention penalty."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]  # (B, T)
    logits, alphas = model.decoder.forward_with_attention(feats, inputs)  # (B, T, V), (B, T, N)
    mask = targets != model.vocab.pad_id
    loss = F.cross_entropy(logits[mask], targets[mask], label_smoothing=cfg.label_smoothing)
    alpha_c = model.cfg.decoder_params.get("alpha_c", 0.0)
    if alpha_c:
        coverage = (alphas * mask[:, :, None]).sum(1)  # (B, N)
        loss = loss + alpha_c * ((1.0 - coverage) ** 2).mean()
    return loss


def validate(model: CaptionModel, cache: FeatureCache, records: list[ImageRecord], cfg: TrainConfig
             ) -> dict[str, float]:
    search = SearchConfig(beam_size=cfg.val_beam_size, max_len=cfg.val_max_len,
                          length_penalty=cfg.length_penalty)
    preds = decode_records(model, cache, records, search, progress=cfg.progress)
    scores, _ = score_captions(preds, {r.image: r.captions for r in records}, VAL_METRICS)
    return scores


def train_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, data: TrainingSet,
                batches: list[list[int]], step: int, total_steps: int, cfg: TrainConfig, desc: str
                ) -> tuple[float, int]:
    """One pass over `batches`; returns (mean loss, global step after it)."""
    model.train()
    loss_sum = 0.0
    bar = tqdm(batches, desc=desc, disable=not cfg.progress, leave=False)
    for n, pairs in enumerate(bar, 1):
        feats, seq = data.batch(pairs)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total_steps, cfg)
        loss = caption_loss(model, feats, seq, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        loss_sum += loss.item()
        bar.set_postfix(loss=f"{loss_sum / n:.3f}")
    return loss_sum / max(len(batches), 1), step


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set(title="training loss", xlabel="epoch")
    for key in ("CIDEr", "Bleu_4"):
        b.plot(epochs, [h["dev"].get(key, float("nan")) for h in history], marker="o", label=key)
    b.set(title="dev scores (real decoding)", xlabel="epoch")
    b.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def _log_to(out: Path) -> logging.Handler:
    """Send the captioner log to out/train.log (and the console) for one run."""
    logger = logging.getLogger("captioner")
    logger.setLevel(logging.INFO)
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return handler


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train per `cfg` into `cfg.out`; returns the best dev scores. `resume` continues last.pt."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = _log_to(out)
    try:
        return _train(cfg, out, resume)
    finally:
        logging.getLogger("captioner").removeHandler(handler)
        handler.close()


def _train(cfg: TrainConfig, out: Path, resume: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    last_path, best_path = out / "last.pt", out / "best.pt"
    state = None
    if not resume and last_path.is_file():
        raise ConfigError(f"run folder {out} already holds a run ({last_path.name}); continue it with "
                          f"--resume, or choose another --out")
    if resume and last_path.is_file():
        state = read_checkpoint(last_path)
        saved = state["train_config"]
        if saved != cfg.to_dict():
            log.info("resume: using the run's saved config from %s", last_path)
        cfg = TrainConfig(**saved)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    prepared = prepare(cfg)
    train_recs = prepared.dataset.split("train")
    dev_recs = prepared.dataset.split("dev")
    if cfg.max_train_images:
        train_recs = train_recs[:cfg.max_train_images]
    if cfg.max_val_images:
        dev_recs = dev_recs[:cfg.max_val_images]
    if not train_recs or not dev_recs:
        raise ValueError(f"need train and dev images; found {len(train_recs)} and {len(dev_recs)}")

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    vocab = (Vocab.from_dict(state["vocab"]) if state else
             Vocab.build((c for r in train_recs for c in r.captions), cfg.min_word_count))
    model = CaptionModel(get_model_config(cfg.model), vocab)
    model.length_penalty = cfg.length_penalty
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start_epoch, step, best, stale = 1, 0, -1.0, 0
    if state:
        model.decoder.load_state_dict(state["decoder_state"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, step, best, stale = state["history"], state["step"], state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        log.info("resume: epoch %d done, best dev CIDEr %.4f", state["epoch"], best)
    log.info("model %s: %d decoder parameters, vocab %d words; %d train / %d dev images",
             cfg.model, sum(p.numel() for p in model.decoder.parameters()), len(vocab),
             len(train_recs), len(dev_recs))

    # The log restarts from what last.pt knows: a kill after an epoch's log line but before its
    # checkpoint leaves no orphan line behind.
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    data = TrainingSet(train_recs, prepared.cache, vocab, cfg.max_caption_len)
    total_steps = math.ceil(len(data) / cfg.batch_size) * cfg.epochs

    for epoch in range(start_epoch, cfg.epochs + 1):
        if stale >= cfg.patience:
            break
        t0 = time.time()
        batches = length_bucketed_batches(data.lengths, cfg.batch_size, gen)
        train_loss, step = train_epoch(model, optimizer, data, batches, step, total_steps, cfg,
                                       f"epoch {epoch}/{cfg.epochs}")
        train_seconds = time.time() - t0
        dev = validate(model, prepared.cache, dev_recs, cfg)
        record = {"epoch": epoch, "train_loss": train_loss, "lr": lr_at(step, total_steps, cfg),
                  "train_seconds": round(train_seconds, 1), "val_seconds": round(time.time() - t0 - train_seconds, 1),
                  "dev": dev}
        history.append(record)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        improved = dev["CIDEr"] > best
        if improved:
            best, stale = dev["CIDEr"], 0
            save_checkpoint(best_path, model, metrics={"dev": dev, "epoch": epoch},
                            extra={"train_config": cfg.to_dict()})
        else:
            stale += 1
        log.info("epoch %d: loss %.3f, dev BLEU-4 %.4f CIDEr %.4f%s (%.0fs train, %.0fs val)", epoch,
                 record["train_loss"], dev["Bleu_4"], dev["CIDEr"], " *best*" if improved else "",
                 record["train_seconds"], record["val_seconds"])
        atomic_torch_save({**checkpoint_dict(model), "optimizer": optimizer.state_dict(),
                           "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                           "history": history, "step": step, "best": best, "stale": stale, "epoch": epoch,
                           "train_config": cfg.to_dict()}, last_path)
        _plot(history, out / "curves.png")
    if stale >= cfg.patience:
        log.info("early stop: no dev CIDEr gain in %d epochs", cfg.patience)
    log.info("done in %.1f min; best dev CIDEr %.4f -> %s", (time.time() - started) / 60, best, best_path)
    return {"best_dev_CIDEr": best, "best_checkpoint": str(best_path), "minutes": (time.time() - started) / 60}
