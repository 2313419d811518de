"""The `Captioner` facade: the one object the CLI, server and web app use."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .encoders import Encoder, ImageInput, build_encoder, preprocess
from .model import CaptionModel


def default_model_path() -> Path:
    """The shipped default model (decoder weights, fp16) inside the package."""
    return Path(str(resources.files("captioner") / "weights" / "default.pt"))


@dataclass
class Caption:
    """One image's caption, with what a user needs to trust or show it."""

    text: str
    score: float  # length-normalised log-probability of the caption (higher is better)
    words: list[str]
    attention: np.ndarray | None = None  # (len(words), grid, grid) weights; each map sums to 1
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # next-best (text, score)

    def to_dict(self) -> dict:
        return {"caption": self.text, "score": self.score,
                "alternatives": [{"caption": t, "score": s} for t, s in self.alternatives]}


class Captioner:
    """Photo in, caption out. `Captioner.load()` gives the shipped default model."""

    def __init__(self, model: CaptionModel, info: dict | None = None, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.info = info or {}
        self.device = torch.device(device)
        self._encoder: Encoder | None = None

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu") -> "Captioner":
        path = Path(path) if path is not None else default_model_path()
        model, ckpt = load_checkpoint(path)
        info = {"path": str(path), "name": ckpt["model"]["name"], "metrics": ckpt.get("metrics", {})}
        return cls(model, info, device)

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:  # built on first use: loading a checkpoint stays cheap
            self._encoder = build_encoder(self.model.encoder_cfg).to(self.device)
        return self._encoder

    @property
    def name(self) -> str:
        return self.info.get("name", self.model.cfg.name)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Photos -> region features (B, N, C), preprocessed exactly as in training."""
        batch = torch.stack([preprocess(im, self.model.encoder_cfg) for im in images]).to(self.device)
        return self.encoder(batch)

    @torch.no_grad()
    def caption_features(self, feats: torch.Tensor, beam_size: int = 3, max_len: int = 25,
                         n_best: int = 1, length_penalty: float | None = None,
                         no_repeat_ngram: int | None = None) -> list[Caption]:
        search = self.model.search_config(beam_size, max_len, n_best, length_penalty, no_repeat_ngram)
        hyps = self.model.generate(feats, search)
        grid = self.model.encoder_cfg.grid_size
        vocab = self.model.vocab
        out = []
        for b in range(feats.size(0)):
            texts = [vocab.decode(hyps.tokens[b, k].tolist()) for k in range(hyps.tokens.size(1))]
            words = texts[0].split()
            attention = hyps.alphas[b, 0, :len(words)].reshape(len(words), grid, grid).cpu().numpy()
            out.append(Caption(texts[0], float(hyps.scores[b, 0]), words, attention,
                               [(t, float(hyps.scores[b, k])) for k, t in enumerate(texts) if k > 0]))
        return out

    def caption_batch(self, images: Sequence[ImageInput], **search) -> list[Caption]:
        """Caption several photos in one encoder call and one batched beam search."""
        if not images:
            return []
        return self.caption_features(self.encode(images), **search)

    def caption(self, image: ImageInput, **search) -> Caption:
        """Caption one photo (path, bytes or PIL image). Options: beam_size, max_len, n_best,
        length_penalty and no_repeat_ngram (default: the values the model was tuned with)."""
        return self.caption_batch([image], **search)[0]
