"""A training run: cross-entropy epochs with dev decoding and early stopping on CIDEr-D, then
self-critical epochs (and a soup of trajectories), checkpoints, logs and resume."""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioner.data.datasets import ImageRecord
from captioner.data.features import FeatureCache
from captioner.data.vocab import Vocab
from captioner.distributed import DistEnv, barrier, setup
from captioner.errors import ConfigError
from captioner.files import atomic_write, atomic_write_text, remove_stale_temps_in
from captioner.models.checkpoint import checkpoint_dict, read_checkpoint, write_checkpoint
from captioner.models.encoders import TunedTop
from captioner.models.model import CaptionModel, ModelConfig
from captioner.training.config import TrainConfig
from captioner.training.crossentropy import TeacherForcing, autocast, grad_scaler, lr_at, train_epoch
from captioner.training.dataset import Prepared, TrainingSet, configured_model, epoch_batches, prepare, \
    steps_per_epoch, training_records
from captioner.training.scst import reward_scorer, scst_epoch
from captioner.training.soup import train_soup
from captioner.training.validation import validate

log = logging.getLogger("captioner.training")


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xe = [h for h in history if "train_loss" in h]
    scst = [h for h in history if "reward" in h]
    a.plot([h["epoch"] for h in xe], [h["train_loss"] for h in xe], marker="o", label="cross-entropy loss")
    if scst:
        a.plot([h["epoch"] for h in scst], [h["reward"] for h in scst], marker="s", label="SCST reward (CIDEr-D)")
    a.set(title="training", xlabel="epoch")
    a.legend()
    for key in ("CIDEr", "Bleu_4"):
        b.plot(epochs, [(h["dev"] or {}).get(key, float("nan")) for h in history], marker="o", label=key)
    b.set(title="dev scores (real decoding)", xlabel="epoch")
    b.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    plt.close(fig)


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


def train(cfg: TrainConfig, resume: bool = False, epochs: int | None = None) -> dict:
    """Train per `cfg` into `cfg.out`; returns the best dev scores. `resume` continues last.pt
    with the run's saved config; `epochs` there extends its cross-entropy stage to that many
    epochs (a finished run trains on).

    Under torchrun every process runs this: they train one model with DistributedDataParallel
    (each rank a share of every batch) and rank 0 alone writes the run folder and the log."""
    env = setup(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("captioner")
    if not env.is_main:
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            return _train(cfg, out, resume, env, epochs)
        finally:
            logger.setLevel(level)
    handler = _log_to(out)
    try:
        return _train(cfg, out, resume, env, epochs)
    finally:
        logger.removeHandler(handler)
        handler.close()


@dataclass
class Progress:
    """Where a run stands; last.pt keeps it so --resume continues exactly."""

    epoch: int = 0  # epochs done
    step: int = 0  # cross-entropy optimiser steps done (the LR schedule's clock)
    best: float = -1.0  # best dev CIDEr-D so far (in a refit, `train_on_dev`, the last epoch's)
    stale: int = 0  # epochs since it last improved
    phase: str = "xe"  # "xe" (cross-entropy), then "scst" (self-critical)
    history: list = field(default_factory=list)  # one record per epoch, as in metrics.jsonl


def _open_run(cfg: TrainConfig, out: Path, resume: bool, epochs: int | None = None
              ) -> tuple[TrainConfig, dict | None]:
    """The config to run with, and last.pt's contents when resuming (with `epochs`, its
    cross-entropy stage extended)."""
    last_path = out / "last.pt"
    if not resume and last_path.is_file():
        raise ConfigError(f"run folder {out} already holds a run ({last_path.name}); continue it with "
                          f"--resume, or choose another --out")
    if resume and not last_path.is_file():
        if not (out / "config.json").is_file():
            raise ConfigError(f"--resume: {out} holds no run to continue (no {last_path.name}); leave out "
                              f"--resume to start one")
        log.info("resume: %s holds no %s yet (stopped in its first epoch): starting it again", out, last_path.name)
    if not (resume and last_path.is_file()):
        return cfg, None
    state = read_checkpoint(last_path)
    lacking = [k for k in ("train_config", "optimizer", "progress") if not isinstance(state.get(k), dict)]
    if lacking:
        raise ConfigError(f"{last_path}: holds no training state to resume ({', '.join(lacking)} missing): a "
                          f"model-only checkpoint was written over it; start a new run with another --out")
    try:
        TrainConfig(**state["train_config"])
    except TypeError as e:
        raise ConfigError(f"{last_path}: its train_config does not fit this captioner's ({e})") from None
    if state["train_config"] != cfg.to_dict():
        log.info("resume: using the run's saved config from %s", last_path)
    saved = TrainConfig(**state["train_config"])
    if epochs is not None and epochs != saved.epochs:
        done = state["progress"]
        if epochs < done["epoch"] and done["phase"] == "xe" or epochs < saved.epochs and done["phase"] == "scst":
            raise ConfigError(f"--epochs {epochs}: the run in {out} has already trained {done['epoch']} epochs")
        if done["phase"] == "scst":
            raise ConfigError(f"--epochs {epochs}: the run in {out} has moved on to self-critical training, so its "
                              f"cross-entropy stage ({saved.epochs} epochs) cannot be extended")
        log.info("resume: cross-entropy epochs %d -> %d", saved.epochs, epochs)
        saved = replace(saved, epochs=epochs)
    return saved, state


def _model_config(cfg: TrainConfig, state: dict | None) -> ModelConfig:
    if state is not None:
        return ModelConfig.from_dict(state["model"])
    if cfg.init_checkpoint:
        return ModelConfig.from_dict(read_checkpoint(cfg.init_checkpoint)["model"])
    return configured_model(cfg)


def param_groups(model: CaptionModel, cfg: TrainConfig) -> list[dict]:
    """The decoder's weights for Adam; a tuned encoder top's (every member's, in an ensemble) in
    a group of their own, whose learning rate is `encoder_lr_scale` times the decoder's
    (pretrained weights move slowly)."""
    in_tops = {id(p) for m in model.decoder.modules() if isinstance(m, TunedTop) for p in m.parameters()}
    params = list(model.decoder.parameters())
    groups = [{"params": [p for p in params if id(p) not in in_tops], "lr_scale": 1.0}]
    if in_tops:
        groups.append({"params": [p for p in params if id(p) in in_tops], "lr_scale": cfg.encoder_lr_scale})
    return groups


def adam(groups: list[dict], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam as training uses it: the fused kernel, one pass over each weight (the same update;
    the optimiser's share of a training step fell from 31 to 13 ms on 2 CPU cores)."""
    return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay, fused=True)


def _build(cfg: TrainConfig, state: dict | None, model_cfg: ModelConfig, train_recs: list[ImageRecord],
           device: str = "cpu") -> tuple[CaptionModel, torch.optim.Optimizer, torch.Generator, Progress]:
    """A fresh model, one from `init_checkpoint`, or the run saved in `state`, on `device`."""
    init = state or (read_checkpoint(cfg.init_checkpoint) if cfg.init_checkpoint else None)
    vocab = (Vocab.from_dict(init["vocab"]) if init else
             Vocab.build((c for r in train_recs for c in r.captions), cfg.min_word_count))
    model = CaptionModel(model_cfg, vocab)
    model.length_penalty = cfg.length_penalty
    if init:
        model.decoder.load_state_dict(init["decoder_state"])
    model.to(device)  # before the optimiser exists, so its resumed state lands on the same device
    if model.encoder_cfg.split and not init:  # a fresh tuned top starts from the backbone's ImageNet weights
        model.decoder.top.load_pretrained()
    optimizer = adam(param_groups(model, cfg), cfg.lr, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    progress = Progress()
    if state:
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        progress = Progress(**state["progress"])
        log.info("resume: epoch %d done, best dev CIDEr %.4f", progress.epoch, progress.best)
    elif cfg.init_checkpoint:
        log.info("init: model, vocab and weights from %s", cfg.init_checkpoint)
    return model, optimizer, gen, progress


def _start_scst(model: CaptionModel, best_path: Path, cfg: TrainConfig, progress: Progress,
                main: bool = True) -> torch.optim.Optimizer:
    """Self-critical training starts from the best cross-entropy weights, with a fresh optimiser.
    The main process keeps them as `best-xe.pt`, so the gain from SCST can be measured on test."""
    if best_path.is_file():
        best = read_checkpoint(best_path)
        model.decoder.load_state_dict(best["decoder_state"])
        log.info("scst: starting from %s (dev CIDEr %.4f)", best_path, progress.best)
        if main:
            write_checkpoint(best, best_path.with_name("best-xe.pt"))  # checksum recomputed, same content
    progress.phase, progress.stale = "scst", 0
    return adam(param_groups(model, cfg), cfg.scst_lr, cfg)


def _train(cfg: TrainConfig, out: Path, resume: bool, env: DistEnv, epochs: int | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    best_path = out / "best.pt"
    cfg, state = _open_run(cfg, out, resume, epochs)
    if env.is_main:
        remove_stale_temps_in(out)  # temp files of a killed earlier run (only main writes these)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    model_cfg = _model_config(cfg, state)
    prepared = prepare(cfg, model_cfg.encoder, env)
    train_recs, dev_recs = _splits(prepared, cfg)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, optimizer, gen, progress = _build(cfg, state, model_cfg, train_recs, env.device)
    log.info("model %s: %d decoder parameters, vocab %d words; %d train / %d dev images%s",
             model_cfg.name, sum(p.numel() for p in model.decoder.parameters()), len(model.vocab),
             len(train_recs), len(dev_recs),
             f"; {env.world_size} processes (DDP), {env.device}" if env.distributed else f"; {env.device}")
    if cfg.train_on_dev:
        log.info("train_on_dev: the %d dev images are in the training set; each stage keeps its last epoch "
                 "and dev scores are for the log only", len(prepared.dataset.split("dev")))
    # The log restarts from what last.pt knows: a kill after an epoch's log line but before its
    # checkpoint leaves no orphan line behind.
    if env.is_main:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in progress.history))

    data = TrainingSet(train_recs, prepared.cache, model.vocab, cfg.max_caption_len, prepared.mirrored)
    forward: nn.Module = TeacherForcing(model.decoder)
    if env.distributed:
        forward = DistributedDataParallel(forward, device_ids=[env.local_rank] if env.device.startswith("cuda") else None)
    scaler = grad_scaler(cfg, env.device)
    total_steps = steps_per_epoch(cfg, data) * cfg.epochs
    cider = None
    for epoch in range(progress.epoch + 1, cfg.epochs + cfg.scst_epochs + 1):
        scst = epoch > cfg.epochs
        if not scst and progress.stale >= cfg.patience:
            continue  # cross-entropy stopped early; self-critical epochs (if any) still run
        t0 = time.time()
        if cfg.mirror_prob > 0:
            data.mirror(cfg.mirror_prob, gen)
        if scst:
            if progress.phase != "scst":
                optimizer = _start_scst(model, best_path, cfg, progress, env.is_main)
            cider = cider or reward_scorer([r.captions for r in train_recs])
            per_step = max(1, cfg.scst_batch_size // cfg.scst_samples)
            order = torch.randperm(len(data), generator=gen).tolist()
            batches = [order[i:i + per_step] for i in range(0, len(order), per_step)]
            reward, baseline = scst_epoch(model, optimizer, data, batches, cider, cfg, autocast(cfg, env.device),
                                          f"scst {epoch - cfg.epochs}/{cfg.scst_epochs}", env, forward)
            record = {"epoch": epoch, "phase": "scst", "reward": reward, "baseline": baseline, "lr": cfg.scst_lr}
        else:
            batches = epoch_batches(cfg, data, gen)
            loss, progress.step = train_epoch(model, optimizer, data, batches, progress.step, total_steps,
                                              cfg, f"epoch {epoch}/{cfg.epochs}", env, forward, scaler)
            record = {"epoch": epoch, "phase": "xe", "train_loss": loss,
                      "lr": lr_at(progress.step, total_steps, cfg)}
        record["train_seconds"] = round(time.time() - t0, 1)
        _end_epoch(model, optimizer, gen, progress, record, prepared.cache, dev_recs, cfg, out, env)
    if progress.stale >= cfg.patience and not cfg.scst_epochs:
        log.info("early stop: no dev CIDEr gain in %d epochs", cfg.patience)
    barrier(env)  # rank 0 has written its last files before any process returns
    if cfg.scst_soup > 1 and cfg.scst_epochs:
        progress.best = train_soup(model, cfg, out, prepared.cache, dev_recs, env, train)
    minutes = (time.time() - started) / 60
    log.info("done in %.1f min; best dev CIDEr %.4f -> %s", minutes, progress.best, best_path)
    return {"best_dev_CIDEr": progress.best, "best_checkpoint": str(best_path), "minutes": minutes}


def _splits(prepared: Prepared, cfg: TrainConfig) -> tuple[list[ImageRecord], list[ImageRecord]]:
    train_recs = training_records(prepared.dataset, cfg)
    dev_recs = prepared.dataset.split("dev")
    if cfg.max_val_images:
        dev_recs = dev_recs[:cfg.max_val_images]
    if not train_recs or not dev_recs:
        raise ValueError(f"need train and dev images; found {len(train_recs)} and {len(dev_recs)}")
    return train_recs, dev_recs


def _end_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, gen: torch.Generator,
               progress: Progress, record: dict, cache: FeatureCache, dev_recs: list[ImageRecord],
               cfg: TrainConfig, out: Path, env: DistEnv | None = None) -> None:
    """Score dev for real, keep best.pt, log, and save last.pt (everything --resume needs).
    Every rank keeps the same progress; rank 0 alone writes. A refit (`train_on_dev`) keeps each
    stage's last epoch whatever dev says, so it scores dev only there (`dev` is None before)."""
    t0 = time.time()
    stage_ends = (cfg.epochs, cfg.epochs + cfg.scst_epochs)
    dev = validate(model, cache, dev_recs, cfg, env) if not cfg.train_on_dev or record["epoch"] in stage_ends else None
    record.update(val_seconds=round(time.time() - t0, 1), dev=dev)
    progress.history.append(record)
    progress.epoch = record["epoch"]
    improved = cfg.train_on_dev or dev["CIDEr"] > progress.best  # a refit keeps every stage's last epoch
    if improved:
        progress.best, progress.stale = dev["CIDEr"] if dev else progress.best, 0
    else:
        progress.stale += 1
    if env is not None and not env.is_main:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    # A kept epoch holds what best.pt would, had that epoch been the best; a soup keeps its SCST epochs.
    keep = cfg.keep_epochs or (cfg.scst_soup > 1 and record["phase"] == "scst")
    if improved or keep:
        ckpt = checkpoint_dict(model, metrics={"dev": dev, "epoch": record["epoch"]},
                               extra={"train_config": cfg.to_dict()})
        for path in ([out / "best.pt"] if improved else []) + \
                ([out / "epochs" / f"epoch-{record['epoch']}.pt"] if keep else []):
            write_checkpoint(ckpt, path)
    what = (f"loss {record['train_loss']:.3f}" if record["phase"] == "xe" else
            f"scst reward {record['reward']:.3f} (baseline {record['baseline']:.3f})")
    scores = f"dev BLEU-4 {dev['Bleu_4']:.4f} CIDEr {dev['CIDEr']:.4f}" if dev else "dev not scored (a refit's mid-stage epoch)"
    log.info("epoch %d: %s, %s%s (%.0fs train, %.0fs val)", record["epoch"], what, scores,
             (" *kept*" if cfg.train_on_dev else " *best*") if improved else "",
             record["train_seconds"], record["val_seconds"])
    write_checkpoint({**checkpoint_dict(model), "optimizer": optimizer.state_dict(),
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "progress": asdict(progress), "train_config": cfg.to_dict()},
                     out / "last.pt")
    _plot(progress.history, out / "curves.png")
