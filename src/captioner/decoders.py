"""Caption decoders, found by name through a small registry.

Every decoder offers the same contract:
- `forward(features, tokens) -> logits` for teacher forcing,
- `init_state(features) -> state` and `step(prev_tokens, state) -> (logprobs, state)` for search,
  where `state` is a dict of tensors with the batch on dim 0 (so search can reorder beams), and
  `state["alpha"]` holds the last step's attention weights over the regions.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

State = dict[str, torch.Tensor]

DECODERS: dict[str, tuple[type[nn.Module], type]] = {}


def register_decoder(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        DECODERS[name] = (cls, config_cls)
        return cls
    return wrap


def make_config(config_cls: type, values: dict, where: str = "decoder"):
    """Dict -> typed config, refusing unknown fields by name."""
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return config_cls(**values)


def build_decoder(arch: str, params: dict, vocab_size: int, feature_dim: int) -> nn.Module:
    if arch not in DECODERS:
        raise ConfigError(f"unknown decoder arch {arch!r}; known: {', '.join(sorted(DECODERS))}")
    cls, config_cls = DECODERS[arch]
    return cls(make_config(config_cls, params, f"decoder {arch}"), vocab_size, feature_dim)


@dataclass
class AttentionLSTMConfig:
    embed_dim: int = 512  # word embedding size (also the deep-output size)
    hidden_dim: int = 512  # LSTM state size
    attention_dim: int = 512  # hidden size of the additive attention MLP
    region_dim: int = 512  # encoder regions are projected to this size first
    dropout: float = 0.5  # on embeddings, regions and the deep output
    alpha_c: float = 1.0  # weight of the doubly stochastic attention penalty (training)


@register_decoder("soft-attention-lstm", AttentionLSTMConfig)
class SoftAttentionLSTM(nn.Module):
    """Show, Attend and Tell (Xu et al., 2015): additive soft attention, gating scalar beta,
    deep output layer; LSTM input is [previous word; gated context]."""

    def __init__(self, cfg: AttentionLSTMConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        E, H, A, D = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, cfg.region_dim
        self.region_proj = nn.Linear(feature_dim, D)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H)
        self.att_regions = nn.Linear(D, A)  # W_a a_i, computed once per image
        self.att_hidden_beta = nn.Linear(H, A + D)  # W_h h and the gate f_beta(h), fused
        self.att_score = nn.Linear(A, 1)
        self.embed = nn.Embedding(vocab_size, E)
        self.word_gates = nn.Linear(E, 4 * H)  # LSTM input weights for the word part
        self.recurrent_gates = nn.Linear(D + H, 4 * H, bias=False)  # for [context; h]
        self.out_hidden = nn.Linear(H, E)  # L_h
        self.out_context = nn.Linear(D, E, bias=False)  # L_z
        self.out = nn.Linear(E, vocab_size)  # L_o
        self.drop = nn.Dropout(cfg.dropout)

    # --- shared pieces -------------------------------------------------------------
    def init_state(self, features: torch.Tensor) -> State:
        regions = self.drop(F.relu(self.region_proj(features)))  # (B, N, D)
        mean = regions.mean(1)  # (B, D)
        return {
            "regions": regions,
            "regions_att": self.att_regions(regions),  # (B, N, A)
            "h": torch.tanh(self.init_h(mean)),
            "c": torch.tanh(self.init_c(mean)),
            "alpha": features.new_zeros(features.shape[:2]),
        }

    def _cell(self, word_gates: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One LSTM step given the word's gate contribution; returns the context too."""
        h, c = state["h"], state["c"]
        A = self.cfg.attention_dim
        hb = self.att_hidden_beta(h)  # (B, A + D)
        e = self.att_score(torch.tanh(state["regions_att"] + hb[:, None, :A])).squeeze(-1)  # (B, N)
        alpha = e.softmax(-1)
        context = torch.sigmoid(hb[:, A:]) * (alpha[:, :, None] * state["regions"]).sum(1)  # (B, D)
        gates = word_gates + self.recurrent_gates(torch.cat([context, h], -1))  # (B, 4H)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return context, {**state, "h": h, "c": c, "alpha": alpha}

    def _logits(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(emb + self.out_hidden(h) + self.out_context(context)))

    # --- contract ------------------------------------------------------------------
    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: features (B, N, C), tokens (B, T) -> logits (B, T, V), alphas (B, T, N)."""
        state = self.init_state(features)
        emb = self.drop(self.embed(tokens))  # (B, T, E)
        word_gates = self.word_gates(emb)  # (B, T, 4H), all steps in one matmul
        hs, contexts, alphas = [], [], []
        for t in range(tokens.size(1)):
            context, state = self._cell(word_gates[:, t], state)
            hs.append(state["h"])
            contexts.append(context)
            alphas.append(state["alpha"])
        logits = self._logits(emb, torch.stack(hs, 1), torch.stack(contexts, 1))  # (B, T, V)
        return logits, torch.stack(alphas, 1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(features, tokens)[0]

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        emb = self.drop(self.embed(prev_tokens))  # (B, E)
        context, state = self._cell(self.word_gates(emb), state)
        return self._logits(emb, state["h"], context).log_softmax(-1), state
