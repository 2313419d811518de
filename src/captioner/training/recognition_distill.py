"""The last stage of a run with a tuned encoder top: teach the top to recognise again.

Captioning moves the tuned top away from ImageNet, so recognising objects (named objects,
`captioner.models.objects`) needed the stock top run beside it, at 58% of the frozen bottom's
FLOPs. This stage brings the stock classifier back into the captioner's own top: a linear head
(1280 -> 1000, starting from the wheel's `_fc`) on the tuned top's pooled output learns the stock
classifier's softmax, and the top learns with it, while the captions are held where the stage
started. Each step takes whole photos with their captions (as cross-entropy batches them) and
minimises

    KL(start's words || model's words) + recognition_weight * KL(stock classes || head's classes)

the first teacher-forced on the reference captions (learning without forgetting: Li and Hoiem,
2016), the second on the photo (Hinton et al., 2015, at temperature 1). The head is written
beside the run's best.pt (`checkpoint.save_recognition_head`, bound to it), so a loaded model
recognises with one pooled linear layer on what the caption search computes anyway. Measured in
docs/objects.md.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.files import atomic_write_text
from captioner.models.checkpoint import (checkpoint_dict, read_checkpoint, recognition_head_path,
                                         save_recognition_head, write_checkpoint)
from captioner.models.model import CaptionModel
from captioner.models.recognition import Recognizer
from captioner.training.config import TrainConfig
from captioner.training.crossentropy import TeacherForcing
from captioner.training.dataset import TrainingSet, epoch_batches

log = logging.getLogger("captioner.training")


def kl(target: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || probabilities), `target` probabilities, `log_probs` log-probabilities."""
    return (target * (target.clamp_min(1e-12).log() - log_probs)).sum(-1).mean()


class RecognitionDistillation:
    """One model, the frozen copy it started as, the stock classifier and the head being taught."""

    def __init__(self, model: CaptionModel, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.start = copy.deepcopy(model).eval().requires_grad_(False)
        self.stock = Recognizer(model.encoder_cfg, "stock")
        self.stock.freeze()
        self.head = torch.nn.Linear(self.stock.fc.in_features, self.stock.fc.out_features)
        with torch.no_grad():
            self.head.weight.copy_(self.stock.fc.weight)
            self.head.bias.copy_(self.stock.fc.bias)
        # Only the top and the head learn. The decoder stays as it was: its words can change only
        # where the top's output does, and Adam cannot turn the near-zero gradients of a term that
        # starts at its minimum into full-size steps of every decoder weight.
        for p in model.decoder.parameters():
            p.requires_grad_(False)
        top = list(model.decoder.top.parameters())
        for p in top:
            p.requires_grad_(True)
        lr = cfg.scst_lr
        self.optimizer = torch.optim.Adam([
            {"params": list(self.head.parameters()), "lr": lr},
            {"params": top, "lr": lr * cfg.recognition_encoder_lr_scale}], fused=True)
        self.forward = TeacherForcing(model.decoder)

    def step(self, feats: torch.Tensor, seqs: torch.Tensor, rows: torch.Tensor) -> dict:
        """One optimiser step on whole photos (features, their captions' token ids, each caption's photo)."""
        model, vocab = self.model, self.model.vocab
        inputs, mask = seqs[:, :-1], seqs[:, 1:] != vocab.pad_id
        lengths = mask.sum(1)
        model.train(False)  # no dropout: the words are held to the starting model's own (eval) distribution
        with torch.no_grad():
            classes = self.stock(feats)  # (B, 1000)
            held = self.start.decoder.forward_with_attention(feats, inputs, rows, need_weights=False,
                                                             lengths=lengths)[0][mask].float().softmax(-1)
        regions = model.decoder.top(feats)  # (B, N, 1280), run once for both terms
        logits = model.decoder.inner.forward_with_attention(regions, inputs, rows, need_weights=False,
                                                            lengths=lengths)[0]
        words = kl(held, logits[mask].float().log_softmax(-1))
        taught = self.head(regions.float().mean(1)).log_softmax(-1)
        recognition = kl(classes, taught)
        loss = words + self.cfg.recognition_weight * recognition
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.decoder.top.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        agree = (taught.argmax(-1) == classes.argmax(-1)).float().mean()
        return {"words_kl": words.item(), "recognition_kl": recognition.item(), "top1_agreement": agree.item()}


def distill_recognition(model: CaptionModel, data: TrainingSet, cfg: TrainConfig, out: Path,
                        gen: torch.Generator) -> Path:
    """Run `cfg.recognition_epochs` epochs of the stage on `model` (the run's best.pt, already
    loaded), then write the result as best.pt and its head as best.recognition.pt; the model it
    started from stays as best-captions.pt. Returns the head's path."""
    best = out / "best.pt"
    kept = out / "best-captions.pt"
    stage = RecognitionDistillation(model, cfg)
    history = []
    for epoch in range(1, cfg.recognition_epochs + 1):
        t0 = time.time()
        if cfg.mirror_prob > 0:
            data.mirror(cfg.mirror_prob, gen)
        sums: dict[str, float] = {}
        batches = epoch_batches(cfg, data, gen)
        bar = tqdm(batches, desc=f"recognition {epoch}/{cfg.recognition_epochs}", disable=not cfg.progress, leave=False)
        for k, images in enumerate(bar, 1):
            feats, seqs, rows = data.batch(images)
            for key, v in stage.step(feats, seqs, rows).items():
                sums[key] = sums.get(key, 0.0) + v
            bar.set_postfix(agree=f"{sums['top1_agreement'] / k:.3f}")
        record = {"epoch": epoch, **{k: v / max(len(batches), 1) for k, v in sums.items()},
                  "seconds": round(time.time() - t0, 1)}
        history.append(record)
        log.info("recognition epoch %d: words KL %.4f, recognition KL %.4f, top-1 agreement with the stock "
                 "classifier %.3f (training photos)", epoch, record["words_kl"], record["recognition_kl"],
                 record["top1_agreement"])
    model.decoder.requires_grad_(True)  # as the stage found it
    if best.is_file() and not kept.is_file():
        write_checkpoint(read_checkpoint(best), kept)
    ckpt = checkpoint_dict(model, metrics={"recognition_distillation": history, "started_from": kept.name},
                           extra={"train_config": cfg.to_dict()})
    write_checkpoint(ckpt, best)
    head = recognition_head_path(best)
    save_recognition_head(head, stage.head.weight, stage.head.bias, read_checkpoint(best)["checksum"],
                          meta={"recognition_distillation": history})
    atomic_write_text(out / "recognition.json", json.dumps(history, indent=2) + "\n")
    log.info("recognition: %s and its head %s (the captioning weights it started from: %s)", best, head, kept)
    return head
