"""Self-critical sequence training (Rennie et al., 2017): CIDEr-D as reward, a baseline from
the model's own captions, policy gradient on sampled captions."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn
from tqdm import tqdm

from captioner.evaluation.cider import CiderD
from captioner.training.config import TrainConfig
from captioner.training.crossentropy import TeacherForcing
from captioner.inference.decode import sample
from captioner.distributed import DistEnv, all_sum, shard
from captioner.models.model import CaptionModel
from captioner.data.vocab import MIRRORED_WORDS, tokenize

if TYPE_CHECKING:
    from captioner.training.dataset import TrainingSet


def reward_scorer(captions: list[list[str]]) -> CiderD:
    """CIDEr-D over the training references, keyed by image index."""
    return CiderD({i: [tokenize(c) for c in caps] for i, caps in enumerate(captions)})


def _words(text: str, mirrored: bool) -> list[str]:
    """A caption's words as the reward scores them: a caption of a mirrored photo is mirrored
    back (left and right swapped), since the references describe the photo as taken."""
    words = text.split()
    return [MIRRORED_WORDS.get(w, w) for w in words] if mirrored else words


def scst_loss(model: CaptionModel, feats: torch.Tensor, images: list[int], cider: CiderD,
              cfg: TrainConfig, forward: nn.Module | None = None,
              mirrored: Sequence[bool] | None = None) -> tuple[torch.Tensor, float, float]:
    """Policy-gradient loss for one batch of images; also (mean sample reward, mean baseline).

    `scst_samples` captions are drawn per image by multinomial sampling (Rennie et al., 2017);
    each caption's baseline is the mean reward of the image's other captions (Luo, 2020).
    Sampling and the gradient pass both run without dropout, so the gradient is taken under
    the very policy that drew the captions. `forward` runs the gradient pass (under torchrun,
    the DDP-wrapped teacher-forcing module). `mirrored[i]`: image i's features are those of its
    mirror image (see TrainingSet.mirror).
    """
    v, n = model.vocab, cfg.scst_samples
    model.train(False)
    drawn = sample(model.decoder, feats, v.bos_id, v.eos_id, v.pad_id, max_len=cfg.scst_max_len, n=n,
                   temperature=1.0, banned_ids=(v.bos_id, v.unk_id)).tokens  # (B*n, T)
    flips = list(mirrored) if mirrored is not None else [False] * len(images)
    keys = [i for i in images for _ in range(n)]
    words = [_words(v.decode(s), flips[k // n]) for k, s in enumerate(drawn.tolist())]
    rewards = torch.tensor(cider.scores(keys, words), device=feats.device)
    rewards = rewards.view(len(images), n)  # (B, n)
    base = (rewards.sum(1, keepdim=True) - rewards) / max(n - 1, 1)  # (B, n): the others' mean
    advantage = (rewards - base).view(-1)  # (B*n,)

    inputs = torch.cat([torch.full_like(drawn[:, :1], v.bos_id), drawn[:, :-1]], 1)  # (B*n, T)
    rows = torch.arange(len(images), device=feats.device).repeat_interleave(n)
    lengths = (drawn != v.pad_id).sum(1)  # words and the EOS that ends them
    forward = forward or TeacherForcing(model.decoder)
    logits = forward(feats, inputs, rows, need_weights=False, lengths=lengths)[0].float()  # (B*n, T, V)
    # the policy that drew the captions never emits BOS or <unk> (nor PAD before EOS)
    logits[..., [v.bos_id, v.unk_id, v.pad_id]] = float("-inf")
    logp = logits.log_softmax(-1).gather(2, drawn[:, :, None])[:, :, 0]  # (B*n, T)
    logp = logp.masked_fill(drawn == v.pad_id, 0.0)
    mask = (drawn != v.pad_id).float()  # words and the EOS that ends them
    loss = -(advantage[:, None] * logp * mask).sum() / mask.sum()
    return loss, float(rewards.mean()), float(base.mean())


def scst_epoch(model: CaptionModel, optimizer: torch.optim.Optimizer, data: TrainingSet, batches: list[list[int]],
               cider: CiderD, cfg: TrainConfig, precision: AbstractContextManager, desc: str,
               env: DistEnv | None = None, forward: nn.Module | None = None) -> tuple[float, float]:
    """One self-critical pass over `batches` of image indices; (mean reward, mean baseline).
    `precision` wraps each step's forward passes (autocast). Under torchrun (`env`, `forward`
    DDP-wrapped) each rank samples for its share of each batch's photos and DDP averages the
    ranks' gradients."""
    device = env.device if env is not None else "cpu"
    reward_sum = base_sum = 0.0
    bar = tqdm(batches, desc=desc, disable=not cfg.progress or (env is not None and not env.is_main), leave=False)
    for k, images in enumerate(bar, 1):
        mine, weight = shard(images, env), 1.0
        if not mine:  # a short last batch: this rank still joins the gradient exchange, adding nothing
            mine, weight = images[:1], 0.0
        feats = data.photo_features(mine).to(device)
        for g in optimizer.param_groups:
            g["lr"] = cfg.scst_lr * g.get("lr_scale", 1.0)  # runs saved before groups had scales: 1
        with precision:
            loss, reward, base = scst_loss(model, feats, mine, cider, cfg, forward, data.is_mirrored[mine].tolist())
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
        optimizer.step()
        if env is not None and env.distributed:  # the batch's means, over every rank's share
            n = len(mine) * weight
            total = all_sum(torch.tensor([reward * n, base * n, n], dtype=torch.float64), env)
            reward, base = (total[0] / total[2]).item(), (total[1] / total[2]).item()
        reward_sum, base_sum = reward_sum + reward, base_sum + base
        bar.set_postfix(reward=f"{reward_sum / k:.3f}", baseline=f"{base_sum / k:.3f}")
    return reward_sum / max(len(batches), 1), base_sum / max(len(batches), 1)
