"""Cross-entropy training with dev-set decoding, early stopping on CIDEr, and resume."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioner.models.average import average_checkpoint
from captioner.models.checkpoint import checkpoint_dict, read_checkpoint, write_checkpoint
from captioner.training.config import TrainConfig
from captioner.data.datasets import CaptionDataset, DataOptions, ImageRecord, load_dataset
from captioner.inference.decode import SearchConfig
from captioner.distributed import DistEnv, all_sum, barrier, broadcast, gather_lists, setup, shard
from captioner.evaluation.evaluate import decode_records
from captioner.models.encoders import TunedTop, get_encoder_config
from captioner.errors import ConfigError
from captioner.data.features import FeatureCache, build_cache
from captioner.files import atomic_write_text, remove_stale_temps
from captioner.evaluation.metrics import score_captions
from captioner.models.model import CaptionModel, ModelConfig, get_model_config
from captioner.training.scst import reward_scorer, scst_epoch
from captioner.data.vocab import MIRRORED_WORDS, Vocab

log = logging.getLogger("captioner.training.train")
VAL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


@dataclass
class Prepared:
    """A dataset with its vocab and feature cache, ready to train or evaluate on."""

    dataset: CaptionDataset
    cache: FeatureCache
    mirrored: FeatureCache | None = None  # features of the train photos flipped left to right


def data_options(cfg: TrainConfig) -> DataOptions:
    return DataOptions(layout=cfg.layout, seed=cfg.seed, image_root=cfg.image_root)


def prepare(cfg: TrainConfig, encoder: str | None = None, env: DistEnv | None = None) -> Prepared:
    """Load and check the dataset (any format `load_dataset` reads), then fill (or reuse) the
    feature cache for all its images (`encoder` defaults to that of `cfg.model`). Under torchrun
    (`env`) the ranks share the feature extraction."""
    dataset = load_dataset(cfg.data, cfg.data_format, data_options(cfg))
    for note in dataset.notes:
        log.info("data: %s", note)
    return Prepared(dataset, cache_features(dataset, cfg, encoder, env), mirror_features(dataset, cfg, encoder, env))


def cache_features(dataset: CaptionDataset, cfg: TrainConfig, encoder: str | None = None,
                   env: DistEnv | None = None, mirror: bool = False) -> FeatureCache:
    """Fill (or reuse) the feature cache of every photo of `dataset`, or with `mirror` that of
    the training photos' mirror images."""
    enc = get_encoder_config(encoder or configured_model(cfg).encoder)
    records = training_records(dataset, cfg) if mirror else dataset.records
    return build_cache(dataset.image_dir, [r.image for r in records], enc,
                       Path(cfg.cache_dir).expanduser(), tag=dataset.name, batch_size=cfg.feature_batch_size,
                       progress=cfg.progress and (env is None or env.is_main), env=env, workers=cfg.feature_workers,
                       mirror=mirror)


def training_records(dataset: CaptionDataset, cfg: TrainConfig) -> list[ImageRecord]:
    """The photos a run trains on: the train split (its first `max_train_images`), and the dev
    split too with `train_on_dev`."""
    records = dataset.split("train")
    if cfg.max_train_images:
        records = records[:cfg.max_train_images]
    return records + dataset.split("dev") if cfg.train_on_dev else records


def mirror_features(dataset: CaptionDataset, cfg: TrainConfig, encoder: str | None = None,
                    env: DistEnv | None = None) -> FeatureCache | None:
    """The training photos' mirror-image cache where `cfg.mirror_prob` > 0 (filled if need be), else None."""
    return cache_features(dataset, cfg, encoder, env, mirror=True) if cfg.mirror_prob > 0 else None


def crop_regions(regions: torch.Tensor, theta: torch.Tensor, fold: int = 1) -> torch.Tensor:
    """Regions (B, N, C) of a square grid, each `fold` x `fold` cells of a finer grid kept as
    channels, -> the same grid resampled (bilinear, on the finer grid) from the crops `theta`
    (B, 2, 3): affine maps from the output grid into the input's [-1, 1] coordinates."""
    b, n, c = regions.shape
    side = math.isqrt(n)
    x = F.pixel_shuffle(regions.transpose(1, 2).reshape(b, c, side, side), fold)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.pixel_unshuffle(x, fold).flatten(2).transpose(1, 2)


class TrainingSet:
    """Train-split images with all their captions, the images' features held in RAM.

    Batches are groups of images with every caption of each (`batch`): an image's regions are
    encoded once per step for all its captions, as self-critical training needs them grouped
    too. `batch_pairs` gives the older batching, (image, caption) pairs drawn independently.

    With a `mirrored` cache (features of the photos flipped left to right), `mirror` draws
    which photos an epoch sees mirrored: those give their mirror image's features, and
    captions with "left" and "right" swapped. `crop` draws the part of each photo an epoch
    sees: a random square of its feature grid, resampled to the whole grid (`crop_regions`).
    """

    def __init__(self, records: list[ImageRecord], cache: FeatureCache, vocab: Vocab, max_len: int,
                 mirrored: FeatureCache | None = None, fold: int = 1):
        self.vocab = vocab
        self.fold = fold  # cells per region side in the cache (EncoderConfig.cache_fold)
        self.crops: torch.Tensor | None = None  # this epoch's crop of each photo (affine_grid's theta)
        self.seqs: list[list[list[int]]] = [[vocab.encode(c, max_len) for c in r.captions] for r in records]
        self.lengths = [max(len(s) for s in seqs) for seqs in self.seqs]  # longest caption per image
        self.captions = sum(len(s) for s in self.seqs)
        self.pairs = [(i, k) for i, seqs in enumerate(self.seqs) for k in range(len(seqs))]
        self.pair_lengths = [len(self.seqs[i][k]) for i, k in self.pairs]
        # fp16 in RAM once: random batch access without touching the disk
        self.features = torch.from_numpy(np.ascontiguousarray(
            cache.features[cache.rows([r.image for r in records])]))  # (N_images, R, C)
        self.is_mirrored = torch.zeros(len(records), dtype=torch.bool)  # this epoch's mirrored photos
        self.mirror_features = None
        if mirrored is not None:
            self.mirror_features = torch.from_numpy(np.ascontiguousarray(
                mirrored.features[mirrored.rows([r.image for r in records])]))
            ids = {t: i for i, t in enumerate(vocab.tokens)}
            swap = {ids[a]: ids[b] for a, b in MIRRORED_WORDS.items() if a in ids and b in ids}
            self.mirror_seqs = [[[swap.get(t, t) for t in s] for s in seqs] for seqs in self.seqs]

    def mirror(self, prob: float, gen: torch.Generator) -> None:
        """Each photo is seen mirrored until the next call with probability `prob`."""
        if self.mirror_features is None:
            raise ValueError("this training set has no mirrored features")
        self.is_mirrored = torch.rand(len(self), generator=gen) < prob

    def crop(self, scale: float, gen: torch.Generator) -> None:
        """Until the next call each photo is seen through a square crop of its grid, the crop's
        side a fraction drawn uniformly from [scale, 1] of the grid's, placed uniformly within it."""
        n = len(self)
        side = scale + (1 - scale) * torch.rand(n, generator=gen)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = side
        theta[:, :, 2] = (1 - side)[:, None] * (2 * torch.rand(n, 2, generator=gen) - 1)  # the crop's centre
        self.crops = theta

    def photo_features(self, images: list[int]) -> torch.Tensor:
        """Image indices -> their features (B, R, C) float32, as this epoch sees each photo."""
        feats = self.features[images]
        flips = self.is_mirrored[images]
        if bool(flips.any()):
            feats = torch.where(flips[:, None, None], self.mirror_features[images], feats)
        feats = feats.float()
        return feats if self.crops is None else crop_regions(feats, self.crops[images], self.fold)

    def _captions(self, image: int) -> list[list[int]]:
        return self.mirror_seqs[image] if self.is_mirrored[image] else self.seqs[image]

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, images: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image indices -> features (B_img, R, C) float32, PAD-padded token ids (B, T) of all
        their captions, and each caption's row in the features (B,)."""
        seqs = [(j, s) for j, i in enumerate(images) for s in self._captions(i)]
        rows = torch.tensor([j for j, _ in seqs])
        return self.photo_features(images), self._pad([s for _, s in seqs]), rows

    def batch_pairs(self, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Pair indices -> features (B, R, C) float32 (one row per caption) and token ids (B, T)."""
        seqs = [self._captions(i)[k] for i, k in (self.pairs[j] for j in pairs)]
        return self.photo_features([self.pairs[j][0] for j in pairs]), self._pad(seqs), None

    def _pad(self, seqs: list[list[int]]) -> torch.Tensor:
        """Token id lists -> (B, T) PAD-padded to the longest."""
        tokens = torch.full((len(seqs), max(len(s) for s in seqs)), self.vocab.pad_id, dtype=torch.long)
        for k, seq in enumerate(seqs):
            tokens[k, :len(seq)] = torch.tensor(seq)
        return tokens


def length_bucketed_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffle, sort by length within pools of 50 batches, then shuffle the batches:
    batches hold items of near-equal length, so little compute goes to padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    pool = batch_size * 50
    batches = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s:s + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def images_per_batch(cfg: TrainConfig, data: TrainingSet) -> int:
    """batch_size counts captions; batches hold whole images, so round to images."""
    per_image = max(1, round(data.captions / max(len(data), 1)))
    return max(1, cfg.batch_size // per_image)


def epoch_batches(cfg: TrainConfig, data: TrainingSet, gen: torch.Generator) -> list[list[int]]:
    """One epoch's cross-entropy batches: of images (`batching=image`) or of pairs (`caption`)."""
    if cfg.batching == "image":
        return length_bucketed_batches(data.lengths, images_per_batch(cfg, data), gen)
    if cfg.batching == "caption":
        return length_bucketed_batches(data.pair_lengths, cfg.batch_size, gen)
    raise ConfigError(f"batching must be image or caption, not {cfg.batching!r}")


def steps_per_epoch(cfg: TrainConfig, data: TrainingSet) -> int:
    if cfg.batching == "caption":
        return math.ceil(len(data.pairs) / cfg.batch_size)
    return math.ceil(len(data) / images_per_batch(cfg, data))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    low = cfg.lr * cfg.final_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(cfg: TrainConfig, device: str = "cpu") -> torch.autocast:
    """Mixed precision for the training matmuls (weights stay fp32). On CPU bfloat16: about
    twice as fast on CPUs with native bf16 (AVX512-BF16, AMX), so `auto` turns it on only
    there. On a GPU bfloat16 where it has it, else float16 (with a gradient scaler)."""
    if cfg.amp not in ("auto", "on", "off"):
        raise ConfigError(f"amp must be auto, on or off, not {cfg.amp!r}")
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype, enabled=cfg.amp != "off")
    enabled = cfg.amp == "on" or (cfg.amp == "auto" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def grad_scaler(cfg: TrainConfig, device: str) -> torch.amp.GradScaler | None:
    """A gradient scaler where training runs in float16 (a GPU without bf16); else None."""
    if device.startswith("cuda") and cfg.amp != "off" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


class TeacherForcing(nn.Module):
    """The decoder's teacher-forced pass as a module's `forward`: DistributedDataParallel
    synchronises the gradients of what runs through the forward of the module it wraps."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, feats: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor | None = None,
                need_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.forward_with_attention(feats, inputs, rows, need_weights=need_weights)


def loss_terms(model: CaptionModel, feats: torch.Tensor, seqs: torch.Tensor, cfg: TrainConfig,
               rows: torch.Tensor | None = None, forward: nn.Module | None = None) -> torch.Tensor:
    """(summed label-smoothed cross-entropy, target tokens, summed attention penalty, penalty
    terms) of one batch: sums, so that shares of a batch on several ranks add up exactly."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]  # (B, T)
    alpha_c = model.cfg.decoder_params.get("alpha_c", 0.0)
    forward = forward or TeacherForcing(model.decoder)
    logits, alphas = forward(feats, inputs, rows, need_weights=bool(alpha_c))
    mask = targets != model.vocab.pad_id  # (B, T)
    ce = F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=cfg.label_smoothing, reduction="sum")
    penalty, n_penalty = ce.new_zeros(()), 0
    if alpha_c:
        coverage = (alphas * mask[:, :, None]).sum(1)  # (B, N)
        penalty, n_penalty = ((1.0 - coverage) ** 2).sum(), coverage.numel()
    return ce, int(mask.sum()), penalty, n_penalty


def caption_loss(model: CaptionModel, feats: torch.Tensor, seqs: torch.Tensor, cfg: TrainConfig,
                 rows: torch.Tensor | None = None, forward: nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy (label-smoothed, mean per target token) + the doubly stochastic attention
    penalty where the decoder has one (`alpha_c`)."""
    ce, tokens, penalty, n_penalty = loss_terms(model, feats, seqs, cfg, rows, forward)
    loss = ce / max(tokens, 1)
    if n_penalty:
        loss = loss + model.cfg.decoder_params["alpha_c"] * penalty / n_penalty
    return loss


def distributed_loss(model: CaptionModel, feats: torch.Tensor, seqs: torch.Tensor, cfg: TrainConfig,
                     rows: torch.Tensor | None, forward: nn.Module, env: DistEnv, weight: float = 1.0
                     ) -> tuple[torch.Tensor, float]:
    """This rank's share of a batch -> (loss to backpropagate, the whole batch's loss).

    The means divide by the whole batch's token count, and DDP averages gradients over ranks,
    so the loss is scaled by world_size: the gradient is then exactly the single-process one
    for the same global batch. `weight` 0 marks a rank with no share of a short last batch."""
    ce, tokens, penalty, n_penalty = loss_terms(model, feats, seqs, cfg, rows, forward)
    ce, penalty = ce * weight, penalty * weight
    sums = all_sum(torch.tensor([tokens * weight, n_penalty * weight, ce.item(), penalty.item()],
                                dtype=torch.float64), env)
    alpha_c = model.cfg.decoder_params.get("alpha_c", 0.0)
    loss = ce / max(sums[0].item(), 1)
    whole = sums[2].item() / max(sums[0].item(), 1)
    if n_penalty:
        loss = loss + alpha_c * penalty / max(sums[1].item(), 1)
        whole += alpha_c * sums[3].item() / max(sums[1].item(), 1)
    return loss * env.world_size, whole


def validate(model: CaptionModel, cache: FeatureCache, records: list[ImageRecord], cfg: TrainConfig,
             env: DistEnv | None = None) -> dict[str, float]:
    """Decode the dev photos for real (each rank its share) and score them on rank 0; every
    rank gets the scores, so all agree on early stopping."""
    search = SearchConfig(beam_size=cfg.val_beam_size, max_len=cfg.val_max_len,
                          length_penalty=cfg.length_penalty)
    main = env is None or env.is_main
    preds = decode_records(model, cache, shard(records, env), search, progress=cfg.progress and main)
    preds = dict(gather_lists(list(preds.items()), env))
    scores = score_captions(preds, {r.image: r.captions for r in records}, VAL_METRICS)[0] if main else None
    return broadcast(scores, env)


def train_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, data: TrainingSet,
                batches: list[list[int]], step: int, total_steps: int, cfg: TrainConfig, desc: str,
                env: DistEnv | None = None, forward: nn.Module | None = None,
                scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """One pass over `batches`; returns (mean loss, global step after it).

    Under torchrun (`env`, with `forward` the DDP-wrapped TeacherForcing) every rank takes its
    share of each batch; the step is the same as one process taking the whole batch."""
    env = env or DistEnv(device=str(next(model.parameters()).device))
    forward = forward or TeacherForcing(model.decoder)
    model.train()
    loss_sum = 0.0
    bar = tqdm(batches, desc=desc, disable=not cfg.progress or not env.is_main, leave=False)
    for n, items in enumerate(bar, 1):
        mine, weight = shard(items, env), 1.0
        if not mine:  # a short last batch: this rank still joins the gradient exchange, adding nothing
            mine, weight = items[:1], 0.0
        feats, seq, rows = data.batch(mine) if cfg.batching == "image" else data.batch_pairs(mine)
        feats, seq = feats.to(env.device, non_blocking=True), seq.to(env.device, non_blocking=True)
        rows = rows.to(env.device) if rows is not None else None
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total_steps, cfg) * g.get("lr_scale", 1.0)
        with autocast(cfg, env.device):
            if env.distributed:
                loss, whole = distributed_loss(model, feats, seq, cfg, rows, forward, env, weight)
            else:
                loss = caption_loss(model, feats, seq, cfg, rows, forward)
                whole = None
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        loss_sum += loss.item() if whole is None else whole
        bar.set_postfix(loss=f"{loss_sum / n:.3f}")
    return loss_sum / max(len(batches), 1), step


class WeightAverage:
    """An exponential moving average of a module's weights (Polyak averaging), updated after each
    optimiser step: shadow = d * shadow + (1 - d) * weights. Training goes on from the raw weights;
    dev scoring and best.pt use the average. Over the first updates d is warmed up as
    min(decay, (1 + n) / (10 + n)), so the starting weights do not linger in it."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.reset()

    def reset(self) -> None:
        """Start averaging afresh from the module's current weights."""
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def update(self, *_) -> None:  # *_: also an optimiser step hook's (optimizer, args, kwargs)
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in self.module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v, 1 - d)
            else:
                self.shadow[k].copy_(v)

    @contextmanager
    def applied(self):
        """The module holds the averaged weights inside the block, its raw ones again after."""
        raw = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.shadow)
        try:
            yield
        finally:
            self.module.load_state_dict(raw)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}


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
    """Train per `cfg` into `cfg.out`; returns the best dev scores. `resume` continues last.pt.

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
            return _train(cfg, out, resume, env)
        finally:
            logger.setLevel(level)
    handler = _log_to(out)
    try:
        return _train(cfg, out, resume, env)
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


def _open_run(cfg: TrainConfig, out: Path, resume: bool) -> tuple[TrainConfig, dict | None]:
    """The config to run with, and last.pt's contents when resuming."""
    last_path = out / "last.pt"
    if not resume and last_path.is_file():
        raise ConfigError(f"run folder {out} already holds a run ({last_path.name}); continue it with "
                          f"--resume, or choose another --out")
    if not (resume and last_path.is_file()):
        return cfg, None
    state = read_checkpoint(last_path)
    if state["train_config"] != cfg.to_dict():
        log.info("resume: using the run's saved config from %s", last_path)
    return TrainConfig(**state["train_config"]), state


def _model_config(cfg: TrainConfig, state: dict | None) -> ModelConfig:
    if state is not None:
        return ModelConfig.from_dict(state["model"])
    if cfg.init_checkpoint:
        return ModelConfig.from_dict(read_checkpoint(cfg.init_checkpoint)["model"])
    return configured_model(cfg)


def configured_model(cfg: TrainConfig) -> ModelConfig:
    """The model config `cfg.model` names, with its encoder swapped where `cfg.encoder` says so."""
    model_cfg = get_model_config(cfg.model)
    if not cfg.encoder or cfg.encoder == model_cfg.encoder:
        return model_cfg
    try:
        get_encoder_config(cfg.encoder)
    except ValueError as e:
        raise ConfigError(f"config field encoder: {e}") from None
    return replace(model_cfg, name=f"{model_cfg.name}@{cfg.encoder}", encoder=cfg.encoder)


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
    optimizer = torch.optim.Adam(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    return torch.optim.Adam(param_groups(model, cfg), lr=cfg.scst_lr, weight_decay=cfg.weight_decay)


def _train(cfg: TrainConfig, out: Path, resume: bool, env: DistEnv) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    best_path = out / "best.pt"
    cfg, state = _open_run(cfg, out, resume)
    if env.is_main:
        for name in ("last.pt", "best.pt", "best-xe.pt", "config.json", "metrics.jsonl"):
            remove_stale_temps(out / name)  # temp files of a killed earlier run (only main writes these)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    model_cfg = _model_config(cfg, state)
    prepared = prepare(cfg, model_cfg.encoder, env)
    train_recs, dev_recs = _splits(prepared, cfg)

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, optimizer, gen, progress = _build(cfg, state, model_cfg, train_recs, env.device)
    average = WeightAverage(model.decoder, cfg.ema_decay) if cfg.ema_decay else None
    if average is not None:
        if state and "weight_average" in state:
            average.load_state_dict(state["weight_average"])
        optimizer.register_step_post_hook(average.update)
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

    data = TrainingSet(train_recs, prepared.cache, model.vocab, cfg.max_caption_len, prepared.mirrored,
                       model.encoder_cfg.cache_fold)
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
        if cfg.crop_scale < 1:
            data.crop(cfg.crop_scale, gen)
        if scst:
            if progress.phase != "scst":
                optimizer = _start_scst(model, best_path, cfg, progress, env.is_main)
                if average is not None:  # SCST averages afresh from the weights it starts from
                    average.reset()
                    optimizer.register_step_post_hook(average.update)
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
        _end_epoch(model, optimizer, gen, progress, record, prepared.cache, dev_recs, cfg, out, env, average)
    if progress.stale >= cfg.patience and not cfg.scst_epochs:
        log.info("early stop: no dev CIDEr gain in %d epochs", cfg.patience)
    barrier(env)  # rank 0 has written its last files before any process returns
    if cfg.scst_soup > 1:
        progress.best = _soup(model, cfg, out, prepared.cache, dev_recs, env)
    minutes = (time.time() - started) / 60
    log.info("done in %.1f min; best dev CIDEr %.4f -> %s", minutes, progress.best, best_path)
    return {"best_dev_CIDEr": progress.best, "best_checkpoint": str(best_path), "minutes": minutes}


def soup_members(cfg: TrainConfig, out: Path) -> list[Path]:
    """The epoch files a soup of `cfg.scst_soup` trajectories averages: the run's own SCST epochs,
    then those of each further trajectory, a run of its own in `out/scst-K` (K = 2, 3, ...)."""
    scst = range(1, cfg.scst_epochs + 1)
    return ([out / "epochs" / f"epoch-{cfg.epochs + n}.pt" for n in scst] +
            [out / f"scst-{k}" / "epochs" / f"epoch-{n}.pt" for k in range(2, cfg.scst_soup + 1) for n in scst])


def _soup(model: CaptionModel, cfg: TrainConfig, out: Path, cache: FeatureCache, dev_recs: list[ImageRecord],
          env: DistEnv) -> float:
    """After the run's own trajectory: train the others from the same cross-entropy weights
    (`best-xe.pt`), each with the next seed, then keep the mean of every trajectory's epoch
    weights as best.pt, scored on dev (`soup.json`). A trajectory already finished, as on
    --resume, is not trained again. Returns the soup's dev CIDEr-D."""
    start = out / "best-xe.pt"
    if not start.is_file():
        raise ConfigError(f"scst_soup: {start} is missing, so the other trajectories cannot start where this "
                          f"one did (the run's cross-entropy weights)")
    for k in range(2, cfg.scst_soup + 1):
        sub = out / f"scst-{k}"
        log.info("scst soup: trajectory %d of %d (seed %d) in %s", k, cfg.scst_soup, cfg.seed + k - 1, sub)
        train(replace(cfg, out=str(sub), epochs=0, scst_soup=1, seed=cfg.seed + k - 1, init_checkpoint=str(start),
                      keep_epochs=True), resume=(sub / "last.pt").is_file())
    members = soup_members(cfg, out)
    missing = [str(p) for p in members if not p.is_file()]
    if missing:
        raise ConfigError(f"scst_soup: epoch weights missing: {', '.join(missing)}")
    soup = average_checkpoint(members)
    model.decoder.load_state_dict(soup["decoder_state"])
    dev = validate(model, cache, dev_recs, cfg, env)
    names = [str(p.relative_to(out)) for p in members]
    if env.is_main:
        write_checkpoint({**soup, "metrics": {"dev": dev, "soup_of": names}}, out / "best.pt")
        atomic_write_text(out / "soup.json", json.dumps({"members": names, "dev": dev}, indent=2) + "\n")
    log.info("scst soup of %d epochs (%d trajectories): dev BLEU-4 %.4f CIDEr %.4f -> %s", len(members),
             cfg.scst_soup, dev["Bleu_4"], dev["CIDEr"], out / "best.pt")
    barrier(env)
    return dev["CIDEr"]


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
               cfg: TrainConfig, out: Path, env: DistEnv | None = None,
               average: WeightAverage | None = None) -> None:
    """Score dev for real, keep best.pt, log, and save last.pt (everything --resume needs).
    With a weight `average`, dev scores it and best.pt holds it. Every rank keeps the same
    progress; rank 0 alone writes."""
    t0 = time.time()
    if average is not None:  # the raw weights' score too, so a run shows what averaging gave
        record["dev_raw"] = validate(model, cache, dev_recs, cfg, env)
    with average.applied() if average is not None else nullcontext():
        dev = validate(model, cache, dev_recs, cfg, env)
    record.update(val_seconds=round(time.time() - t0, 1), dev=dev)
    progress.history.append(record)
    progress.epoch = record["epoch"]
    improved = dev["CIDEr"] > progress.best or cfg.train_on_dev  # a refit keeps every stage's last epoch
    if improved:
        progress.best, progress.stale = dev["CIDEr"], 0
    else:
        progress.stale += 1
    if env is not None and not env.is_main:
        return
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    # A kept epoch holds what best.pt would, had that epoch been the best; a soup keeps its SCST epochs.
    keep = cfg.keep_epochs or (cfg.scst_soup > 1 and record["phase"] == "scst")
    if improved or keep:
        with average.applied() if average is not None else nullcontext():  # written inside: the dict shares the weights
            ckpt = checkpoint_dict(model, metrics={"dev": dev, "epoch": record["epoch"]},
                                   extra={"train_config": cfg.to_dict()})
            for path in ([out / "best.pt"] if improved else []) + \
                    ([out / "epochs" / f"epoch-{record['epoch']}.pt"] if keep else []):
                write_checkpoint(ckpt, path)
    what = (f"loss {record['train_loss']:.3f}" if record["phase"] == "xe" else
            f"scst reward {record['reward']:.3f} (baseline {record['baseline']:.3f})")
    raw = f" (raw weights: CIDEr {record['dev_raw']['CIDEr']:.4f})" if "dev_raw" in record else ""
    log.info("epoch %d: %s, dev BLEU-4 %.4f CIDEr %.4f%s%s (%.0fs train, %.0fs val)", record["epoch"], what,
             dev["Bleu_4"], dev["CIDEr"], raw,
             (" *kept*" if cfg.train_on_dev else " *best*") if improved else "", record["train_seconds"],
             record["val_seconds"])
    write_checkpoint({**checkpoint_dict(model), "optimizer": optimizer.state_dict(),
                      "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "progress": asdict(progress), "train_config": cfg.to_dict(),
                      **({"weight_average": average.state_dict()} if average is not None else {})},
                     out / "last.pt")
    _plot(progress.history, out / "curves.png")
