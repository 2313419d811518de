"""Cross-entropy training: the learning-rate schedule, the teacher-forced loss (with the
doubly stochastic attention penalty) and one epoch's optimiser steps, on one process or under
torchrun."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from captioner.distributed import DistEnv, all_sum, shard
from captioner.errors import ConfigError
from captioner.models.model import CaptionModel
from captioner.training.config import TrainConfig
from captioner.training.dataset import TrainingSet


def warmup_steps(total: int, cfg: TrainConfig) -> int:
    """The warm-up's length: `cfg.warmup_steps`, but at most a tenth of the run's steps, so a
    small dataset (a few steps an epoch) spends most of its run at the full learning rate."""
    return max(1, min(cfg.warmup_steps, total // 10))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * final_lr_ratio at step `total`."""
    warm = warmup_steps(total, cfg)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
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
                need_weights: bool = True, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.forward_with_attention(feats, inputs, rows, need_weights=need_weights, lengths=lengths)


def loss_terms(model: CaptionModel, feats: torch.Tensor, seqs: torch.Tensor, cfg: TrainConfig,
               rows: torch.Tensor | None = None, forward: nn.Module | None = None) -> torch.Tensor:
    """(summed label-smoothed cross-entropy, target tokens, summed attention penalty, penalty
    terms) of one batch: sums, so that shares of a batch on several ranks add up exactly."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]  # (B, T)
    alpha_c = model.cfg.decoder_params.get("alpha_c", 0.0)
    forward = forward or TeacherForcing(model.decoder)
    mask = targets != model.vocab.pad_id  # (B, T): words and EOS, then padding
    logits, alphas = forward(feats, inputs, rows, need_weights=bool(alpha_c), lengths=mask.sum(1))
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
        feats, seq, rows = data.batch(mine)
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
