"""Caption decoders, found by name through a small registry.

Every decoder offers the same contract:
- `forward(features, tokens) -> logits` for teacher forcing, and `forward_with_attention(features,
  tokens, rows, need_weights, lengths) -> (logits, alphas)`, which training calls: `lengths` says
  where each caption's padding starts, and a decoder may skip the padded steps (their logits
  are then zero, and never read),
- `init_state(features) -> state` and `step(prev_tokens, state) -> (logprobs, state)` for search,
  where `state` is a dict of tensors with the batch on dim 0 (so search can reorder beams), and
  `state["alpha"]` holds the last step's attention weights over the regions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from captioner.errors import ConfigError

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


def _lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell's update from its summed gate pre-activations (B, 4H); the new (h, c)."""
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class Stamp:
    """Which weights an inference-only derivative (fused matrices, a frozen trace) was made
    from, and their in-place versions then: `fresh` turns false once training changes any of
    them, so the derivative is never used stale. Derivatives are held outside the module tree,
    so state dicts, `.to()` and optimizers never see them."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.seen = [(t, t._version) for t in tensors]

    @property
    def fresh(self) -> bool:
        return all(t._version == v for t, v in self.seen)


def _inference_only(module: nn.Module) -> bool:
    return not module.training and not torch.is_grad_enabled()


def per_image_state(decoder: nn.Module) -> tuple[str, ...]:
    """The keys of `decoder`'s search state whose values are the same on every row of a photo
    (its regions and their projections): beam searches never reorder them, as a beam's new
    source is always a beam of the same photo. A decoder without the attribute: none."""
    return tuple(getattr(decoder, "per_image_state", ()))


def fuse_for_inference(decoder: nn.Module) -> int:
    """Give every part of `decoder` that has a leaner inference path (`fuse_for_inference()`)
    its fused weights; how many parts did. Search then uses them under `torch.no_grad()` in
    eval mode, with the same captions; training never sees them."""
    parts = [m for m in decoder.modules() if callable(getattr(m, "fuse_for_inference", None))]
    for m in parts:
        m.fuse_for_inference()
    return len(parts)


class _FusedAttentionStep(nn.Module):
    """A `SoftAttentionLSTM` step's weights merged for search: each step multiplies the hidden
    state once (deep output, attention and gate, LSTM recurrence together), the context once
    (LSTM input and deep output together), and looks the word's LSTM input up in a table
    (embedding times input weights, bias included) instead of multiplying it."""

    def __init__(self, dec: "SoftAttentionLSTM"):
        super().__init__()
        D = dec.cfg.region_dim
        H, E = dec.cfg.hidden_dim, dec.cfg.embed_dim
        rec = dec.recurrent_gates.weight.detach()  # (4H, D + H): [context; h]
        with torch.no_grad():
            self.hidden = nn.Linear(H, E + dec.att_hidden_beta.out_features + 4 * H)
            self.hidden.weight.copy_(torch.cat([dec.out_hidden.weight, dec.att_hidden_beta.weight, rec[:, D:]]))
            self.hidden.bias.copy_(torch.cat([dec.out_hidden.bias, dec.att_hidden_beta.bias, rec.new_zeros(4 * H)]))
            self.context = nn.Linear(D, 4 * H + E, bias=False)
            self.context.weight.copy_(torch.cat([rec[:, :D], dec.out_context.weight]))
            self.register_buffer("word_gates", dec.word_gates(dec.embed.weight).detach())  # (V, 4H)
        self.requires_grad_(False)
        self.to(rec.device)


@dataclass
class AttentionLSTMConfig:
    embed_dim: int = 512  # word embedding size (also the deep-output size)
    hidden_dim: int = 512  # LSTM state size
    attention_dim: int = 512  # hidden size of the additive attention MLP
    region_dim: int = 512  # encoder regions are projected to this size first
    dropout: float = 0.5  # on embeddings, regions and the deep output
    alpha_c: float = 1.0  # weight of the doubly stochastic attention penalty (training)
    attention: str = "global"  # "global" (all regions) or "local" (a window around a predicted spot)
    window: int = 2  # local attention: half-width of the window, in grid cells


@register_decoder("soft-attention-lstm", AttentionLSTMConfig)
class SoftAttentionLSTM(nn.Module):
    """Show, Attend and Tell (Xu et al., 2015): additive soft attention, gating scalar beta,
    deep output layer; LSTM input is [previous word; gated context]."""

    # state entries equal on every beam of a photo: a search never reorders them (`per_image_state`)
    per_image_state = ("regions", "regions_att")

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
        if cfg.attention not in ("global", "local"):
            raise ConfigError(f"soft-attention-lstm: attention must be 'global' or 'local', not {cfg.attention!r}")
        if cfg.attention == "local":
            if cfg.window < 1:
                raise ConfigError("soft-attention-lstm: local attention needs window >= 1")
            self.position = nn.Sequential(nn.Linear(H, A), nn.Tanh(), nn.Linear(A, 2))  # (row, col) of the spot

    # --- shared pieces -------------------------------------------------------------
    def init_state(self, features: torch.Tensor) -> State:
        regions = self.drop(F.relu(self.region_proj(features)))  # (B, N, D)
        mean = regions.mean(1)  # (B, D)
        state = {
            "regions": regions,
            "regions_att": self.att_regions(regions),  # (B, N, A)
            "h": torch.tanh(self.init_h(mean)),
            "c": torch.tanh(self.init_c(mean)),
            "alpha": features.new_zeros(features.shape[:2]),
        }
        if self._use_fused():
            state["hidden"] = self._fused[0].hidden(state["h"])  # (B, E + A + D + 4H)
        return state

    # --- lean search path ------------------------------------------------------------
    _fused: tuple[_FusedAttentionStep, Stamp] | None = None

    def fuse_for_inference(self) -> None:
        """Merge the step's weights for search (`_FusedAttentionStep`); kept outside the module
        tree, used only under no_grad in eval mode while these weights are unchanged."""
        sources = [self.embed.weight, self.word_gates.weight, self.word_gates.bias, self.recurrent_gates.weight,
                   self.att_hidden_beta.weight, self.att_hidden_beta.bias, self.out_hidden.weight,
                   self.out_hidden.bias, self.out_context.weight]
        self.__dict__["_fused"] = (_FusedAttentionStep(self), Stamp(sources))

    def inference_modules(self) -> list[nn.Module]:
        """For `precision`: the fused step's matrices switch precision with the rest."""
        return [self._fused[0]] if self._fused is not None else []

    def _use_fused(self) -> bool:
        return self._fused is not None and _inference_only(self) and self._fused[1].fresh

    def _fused_step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """`step` on the fused weights: three matrix products instead of seven."""
        fused = self._fused[0]
        A, D, E = self.cfg.attention_dim, self.cfg.region_dim, self.cfg.embed_dim
        hidden = state["hidden"]  # the current h times [L_h; W_h and f_beta; LSTM recurrence]
        hb = hidden[:, E:E + A + D]
        e = self.att_score(torch.tanh(state["regions_att"] + hb[:, None, :A])).squeeze(-1)  # (B, N)
        alpha = e.softmax(-1)
        if self.cfg.attention == "local":
            alpha = self._local(alpha, state["h"])
        context = torch.sigmoid(hb[:, A:]) * (alpha[:, :, None] * state["regions"]).sum(1)  # (B, D)
        ctx = fused.context(context)  # (B, 4H + E)
        G = ctx.size(1) - E
        gates = fused.word_gates[prev_tokens] + hidden[:, E + A + D:] + ctx[:, :G]
        h, c = _lstm_update(gates, state["c"])
        hidden = fused.hidden(h)
        logits = self.out(self.embed(prev_tokens) + hidden[:, :E] + ctx[:, G:])
        return logits.log_softmax(-1), {**state, "h": h, "c": c, "alpha": alpha, "hidden": hidden}

    def _cell(self, word_gates: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One LSTM step given the word's gate contribution; returns the context too."""
        h, c = state["h"], state["c"]
        A = self.cfg.attention_dim
        hb = self.att_hidden_beta(h)  # (B, A + D)
        e = self.att_score(torch.tanh(state["regions_att"] + hb[:, None, :A])).squeeze(-1)  # (B, N)
        alpha = e.softmax(-1)
        if self.cfg.attention == "local":
            alpha = self._local(alpha, h)
        # the weighted sum of the regions as one batched product: no (B, N, D) temporary, and its
        # backward is two products too (training runs this; search runs the fused step)
        context = torch.sigmoid(hb[:, A:]) * torch.bmm(alpha[:, None], state["regions"])[:, 0]  # (B, D)
        h, c = _lstm_update(word_gates + self.recurrent_gates(torch.cat([context, h], -1)), c)
        return context, {**state, "h": h, "c": c, "alpha": alpha}

    def _local(self, alpha: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Local attention (Luong et al., 2015, local-p, on a 2-D grid): predict a spot on the
        grid, keep the regions within `window` cells of it, weight them by a Gaussian
        (sigma = window / 2) around it, and renormalise so the weights stay a distribution."""
        N = alpha.size(1)
        G = math.isqrt(N)
        if G * G != N:
            raise ValueError(f"local attention needs a square region grid, got {N} regions")
        cells = torch.arange(N, device=alpha.device)
        grid = torch.stack([cells // G, cells % G], -1).to(alpha.dtype)  # (N, 2)
        spot = (G - 1) * torch.sigmoid(self.position(h))  # (B, 2)
        offset = grid[None] - spot[:, None]  # (B, N, 2)
        sigma = self.cfg.window / 2
        weight = torch.exp(-(offset ** 2).sum(-1) / (2 * sigma ** 2))  # (B, N)
        inside = (offset.abs() <= self.cfg.window).all(-1)
        alpha = alpha * weight * inside
        return alpha / alpha.sum(-1, keepdim=True).clamp(min=1e-12)

    def _logits(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(emb + self.out_hidden(h) + self.out_context(context)))

    # --- contract ------------------------------------------------------------------
    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor,
                               rows: torch.Tensor | None = None, need_weights: bool = True,
                               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: features (B_img, N, C), tokens (B, T) -> logits (B, T, V), alphas (B, T, N).

        `rows` (B,) names each caption's image (the regions are projected once per image);
        without it caption i belongs to image i. The LSTM computes its alphas either way.
        The captions run longest first and each step runs only the rows still going, so with
        `lengths` (B,) the steps past each caption's length are skipped (their logits and alphas
        are zero) and a batch costs its tokens, not its longest caption times its size; without
        it every step is real.
        """
        state = self.init_state(features)
        B, T = tokens.shape
        if lengths is None:  # every step of every caption is real
            lengths = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        order = lengths.argsort(descending=True, stable=True)  # longest first: running rows are a prefix
        back = order.argsort()
        image = order if rows is None else rows.index_select(0, order)
        state = {k: v.index_select(0, image) for k, v in state.items()}
        steps = torch.arange(T, device=tokens.device)
        mask = lengths[:, None] > steps  # (B, T) the real positions, in the caller's order
        running = mask.index_select(0, order).sum(0).tolist()  # rows still going at each step
        emb = self.drop(self.embed(tokens))  # (B, T, E)
        # T x (B, 4H), sorted; unbound, so the backward stacks the steps' gradients once
        word_gates = self.word_gates(emb.index_select(0, order)).unbind(1)
        hs, contexts, alphas = [], [], []
        for t, n in enumerate(running):
            if n == 0 and t:  # every caption has ended (step 0 always runs, so nothing is empty)
                break
            state = {k: v[:n] for k, v in state.items()}
            context, state = self._cell(word_gates[t][:n], state)
            pad = (0, 0, 0, B - n)  # finished rows: zeros, never read
            hs.append(F.pad(state["h"], pad))
            contexts.append(F.pad(context, pad))
            alphas.append(F.pad(state["alpha"], pad))
        h = torch.stack(hs, 1).index_select(0, back)  # (B, T', H), the caller's order
        context = torch.stack(contexts, 1).index_select(0, back)
        mask = mask[:, :h.size(1)]
        real = self._logits(emb[:, :h.size(1)][mask], h[mask], context[mask])  # (tokens, V)
        logits = real.new_zeros(B, h.size(1), real.size(-1))
        logits[mask] = real
        alpha = torch.stack(alphas, 1).index_select(0, back)
        grow = (0, 0, 0, T - h.size(1))  # steps after the longest caption ended, if any
        return F.pad(logits, grow), F.pad(alpha, grow)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.forward_with_attention(features, tokens, rows)[0]

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if "hidden" in state and self._use_fused():
            return self._fused_step(prev_tokens, state)
        emb = self.drop(self.embed(prev_tokens))  # (B, E)
        context, state = self._cell(self.word_gates(emb), state)
        return self._logits(emb, state["h"], context).log_softmax(-1), state


@dataclass
class UpDownConfig:
    embed_dim: int = 512  # word embedding size
    hidden_dim: int = 512  # state size of both LSTMs
    attention_dim: int = 512  # hidden size of the additive attention MLP
    region_dim: int = 512  # encoder regions are projected to this size first
    dropout: float = 0.5  # on embeddings, regions and the language LSTM's output


@register_decoder("up-down", UpDownConfig)
class UpDownLSTM(nn.Module):
    """The top-down captioner of Anderson et al. (2018), "Bottom-Up and Top-Down Attention",
    over the encoder's region grid: an attention LSTM reads [language LSTM's last output; mean
    region; previous word] and its state drives additive attention over the regions; a language
    LSTM reads [attended context; attention LSTM's state] and predicts the word. Both states
    start at zero, as in the paper."""

    per_image_state = ("regions", "regions_att", "top_mean")

    def __init__(self, cfg: UpDownConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        E, H, A, D = cfg.embed_dim, cfg.hidden_dim, cfg.attention_dim, cfg.region_dim
        self.region_proj = nn.Linear(feature_dim, D)
        self.att_regions = nn.Linear(D, A)  # computed once per image
        self.att_hidden = nn.Linear(H, A)
        self.att_score = nn.Linear(A, 1)
        self.embed = nn.Embedding(vocab_size, E)
        # attention LSTM: the word and mean-region parts of its input are computed outside the loop
        self.top_word = nn.Linear(E, 4 * H)
        self.top_mean = nn.Linear(D, 4 * H, bias=False)
        self.top_recurrent = nn.Linear(2 * H, 4 * H, bias=False)  # [language h; attention h]
        self.language = nn.Linear(D + 2 * H, 4 * H)  # [context; attention h; language h]
        self.out = nn.Linear(H, vocab_size)
        self.drop = nn.Dropout(cfg.dropout)

    def init_state(self, features: torch.Tensor) -> State:
        regions = self.drop(F.relu(self.region_proj(features)))  # (B, N, D)
        zeros = regions.new_zeros(regions.size(0), self.cfg.hidden_dim)
        return {
            "regions": regions,
            "regions_att": self.att_regions(regions),  # (B, N, A)
            "top_mean": self.top_mean(regions.mean(1)),  # (B, 4H)
            "h1": zeros, "c1": zeros, "h2": zeros, "c2": zeros,
            "alpha": features.new_zeros(features.shape[:2]),
        }

    def _cell(self, word_gates: torch.Tensor, state: State) -> State:
        """One step of both LSTMs given the word's gate contribution to the attention LSTM."""
        h2 = state["h2"]
        gates = word_gates + state["top_mean"] + self.top_recurrent(torch.cat([h2, state["h1"]], -1))
        h1, c1 = _lstm_update(gates, state["c1"])
        e = self.att_score(torch.tanh(state["regions_att"] + self.att_hidden(h1)[:, None])).squeeze(-1)  # (B, N)
        alpha = e.softmax(-1)
        context = (alpha[:, :, None] * state["regions"]).sum(1)  # (B, D)
        h2, c2 = _lstm_update(self.language(torch.cat([context, h1, h2], -1)), state["c2"])
        return {**state, "h1": h1, "c1": c1, "h2": h2, "c2": c2, "alpha": alpha}

    # --- contract ------------------------------------------------------------------
    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor,
                               rows: torch.Tensor | None = None, need_weights: bool = True,
                               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: features (B_img, N, C), tokens (B, T) -> logits (B, T, V), alphas (B, T, N).
        `rows` (B,) names each caption's image; without it caption i belongs to image i."""
        state = self.init_state(features)
        if rows is not None:
            state = {k: v.index_select(0, rows) for k, v in state.items()}
        word_gates = self.top_word(self.drop(self.embed(tokens))).unbind(1)  # T x (B, 4H), one matmul
        hs, alphas = [], []
        for t in range(tokens.size(1)):
            state = self._cell(word_gates[t], state)
            hs.append(state["h2"])
            alphas.append(state["alpha"])
        return self.out(self.drop(torch.stack(hs, 1))), torch.stack(alphas, 1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.forward_with_attention(features, tokens, rows)[0]

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        state = self._cell(self.top_word(self.drop(self.embed(prev_tokens))), state)
        return self.out(self.drop(state["h2"])).log_softmax(-1), state


@dataclass
class ShowTellConfig:
    embed_dim: int = 512  # word (and projected image) embedding size
    hidden_dim: int = 512  # LSTM state size
    dropout: float = 0.5  # on the embeddings and the LSTM output


@register_decoder("show-tell", ShowTellConfig)
class ShowTell(nn.Module):
    """Show and Tell (Vinyals et al., 2015): the mean-pooled image, projected to a word
    embedding, is the LSTM's first input; no attention, so `alpha` is uniform."""

    def __init__(self, cfg: ShowTellConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        self.image_proj = nn.Linear(feature_dim, cfg.embed_dim)
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.out = nn.Linear(cfg.hidden_dim, vocab_size)
        self.drop = nn.Dropout(cfg.dropout)

    def init_state(self, features: torch.Tensor) -> State:
        image = self.drop(self.image_proj(features.mean(1)))  # (B, E)
        _, (h, c) = self.lstm(image[:, None])  # the image is step 0's input
        return {"h": h[0], "c": c[0], "alpha": features.new_full(features.shape[:2], 1.0 / features.size(1))}

    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor,
                               rows: torch.Tensor | None = None, need_weights: bool = True,
                               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: features (B_img, N, C), tokens (B, T) -> logits (B, T, V), alphas (B, T, N)."""
        state = self.init_state(features)
        if rows is not None:
            state = {k: v.index_select(0, rows) for k, v in state.items()}
        hs, _ = self.lstm(self.drop(self.embed(tokens)), (state["h"][None], state["c"][None]))  # (B, T, H)
        alphas = state["alpha"][:, None].expand(-1, tokens.size(1), -1)  # (B, T, N)
        return self.out(self.drop(hs)), alphas

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.forward_with_attention(features, tokens, rows)[0]

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        emb = self.drop(self.embed(prev_tokens))[:, None]  # (B, 1, E)
        out, (h, c) = self.lstm(emb, (state["h"][None], state["c"][None]))
        return self.out(self.drop(out[:, 0])).log_softmax(-1), {**state, "h": h[0], "c": c[0]}


@dataclass
class TransformerConfig:
    d_model: int = 512  # width of the residual stream, words and regions alike
    heads: int = 8  # attention heads (d_model must divide by it)
    layers: int = 3  # decoder layers: masked self-attention, cross-attention, feed-forward
    encoder_layers: int = 1  # self-attention layers that refine the region grid, once per image
    ffn_dim: int = 2048  # hidden size of each feed-forward block
    dropout: float = 0.1  # residual, attention and embedding dropout
    region_dropout: float = 0.1  # on the projected region features
    max_len: int = 40  # learned word positions (BOS + words + EOS must fit)
    max_regions: int = 100  # learned region positions (7x7 = 49 for Lite0, 9x9 = 81 for Lite2)


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose keys/values can be projected once and reused (cache, memory)."""

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        if d_model % heads:
            raise ConfigError(f"transformer: d_model {d_model} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.key_value(x).chunk(2, -1)  # (B, S, D) each
        return k, v

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        return x.view(B, S, self.heads, D // self.heads).transpose(1, 2)  # (B, H, S, D/H)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) attends to k, v (B, S, D); weights (B, T, S) averaged over heads if asked."""
        B, T, D = x.shape
        q, k, v = self._split(self.query(x)), self._split(k), self._split(v)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
            if causal:
                scores = scores.masked_fill(torch.ones(T, k.size(2), dtype=torch.bool, device=x.device)
                                            .triu(1 + k.size(2) - T), float("-inf"))
            weights = scores.softmax(-1)
            y = F.dropout(weights, p, self.training) @ v
            mean_weights = weights.mean(1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal and T > 1)
            mean_weights = None
        return self.proj(y.transpose(1, 2).reshape(B, T, D)), mean_weights


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention over the regions, then a feed-forward block."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.heads, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, *self.attn.keys_values(h))[0])
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-norm masked self-attention, cross-attention over the regions, feed-forward."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        D = cfg.d_model
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.self_attn = MultiHeadAttention(D, cfg.heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(D, cfg.heads, cfg.dropout)
        self.ffn = FeedForward(D, cfg.ffn_dim, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, self_kv: tuple[torch.Tensor, torch.Tensor],
                memory_kv: tuple[torch.Tensor, torch.Tensor], causal: bool, need_weights: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`self_kv` are the keys/values of every position so far (this step's included)."""
        x = x + self.drop(self.self_attn(self.norm1(x), *self_kv, causal=causal)[0])
        y, alpha = self.cross_attn(self.norm2(x), *memory_kv, need_weights=need_weights)
        x = x + self.drop(y)
        return x + self.drop(self.ffn(self.norm3(x))), alpha


@register_decoder("transformer", TransformerConfig)
class TransformerDecoder(nn.Module):
    """Transformer decoder (Vaswani et al., 2017) over the region grid, pre-norm, with tied
    word embeddings; `alpha` is the last layer's cross-attention, averaged over heads."""

    @property
    def per_image_state(self) -> tuple[str, ...]:
        return ("t", *(f"mem_{kv}{i}" for i in range(len(self.layers)) for kv in "kv"))

    def __init__(self, cfg: TransformerConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.region_proj = nn.Sequential(nn.Linear(feature_dim, D), nn.ReLU(), nn.Dropout(cfg.region_dropout),
                                         nn.LayerNorm(D))
        self.region_pos = nn.Parameter(torch.zeros(cfg.max_regions, D))
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.memory_norm = nn.LayerNorm(D)
        self.embed = nn.Embedding(vocab_size, D)
        self.word_pos = nn.Parameter(torch.zeros(cfg.max_len, D))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(D)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        self.drop = nn.Dropout(cfg.dropout)
        self._out_bf16: torch.Tensor | None = None  # the tied output weights, set by bf16_inference()
        nn.init.normal_(self.embed.weight, std=D ** -0.5)
        nn.init.normal_(self.region_pos, std=0.02)
        nn.init.normal_(self.word_pos, std=0.02)

    @property
    def max_words(self) -> int:
        """The longest caption search may ask for: BOS and every word need a learned position."""
        return self.cfg.max_len - 1

    def memory(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Regions (B, N, C) -> each layer's cross-attention keys and values, (B, N, D) each."""
        N = features.size(1)
        if N > self.cfg.max_regions:
            raise ConfigError(f"transformer: {N} regions exceed max_regions {self.cfg.max_regions}")
        x = self.region_proj(features) + self.region_pos[:N]  # (B, N, D)
        for layer in self.encoder:
            x = layer(x)
        x = self.memory_norm(x)
        return [layer.cross_attn.keys_values(x) for layer in self.layers]

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        T = tokens.size(1)
        if start + T > self.cfg.max_len:
            raise ValueError(f"transformer: position {start + T} exceeds max_len {self.cfg.max_len}")
        return self.drop(self.embed(tokens) * math.sqrt(self.cfg.d_model) + self.word_pos[start:start + T])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final_norm(x)
        if self._out_bf16 is not None:
            return F.linear(x.to(torch.bfloat16), self._out_bf16).to(x.dtype) + self.out_bias
        return F.linear(x, self.embed.weight, self.out_bias)

    def bf16_inference(self) -> int:
        """For `precision.bf16_linears`: the tied output layer (vocabulary x d_model, the largest
        matrix read at each step) also multiplies in bfloat16. Inference only; the state dict
        keeps its float32 embedding."""
        self._out_bf16 = self.embed.weight.detach().to(torch.bfloat16)
        return 1

    # --- contract ------------------------------------------------------------------
    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor,
                               rows: torch.Tensor | None = None, need_weights: bool = True,
                               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: features (B_img, N, C), tokens (B, T) -> logits (B, T, V), alphas (B, T, N).

        `rows` (B,) names each caption's image, so an image's memory is computed once for all
        its captions; without it caption i belongs to image i.
        """
        memory = self.memory(features)
        if rows is not None:
            memory = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in memory]
        x = self._embed(tokens, 0)  # (B, T, D)
        alpha = None
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            last = i == len(self.layers) - 1
            x, alpha_i = layer(x, layer.self_attn.keys_values(h), memory[i], causal=True,
                               need_weights=need_weights and last)
            alpha = alpha_i if last else alpha
        return self._logits(x), alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.forward_with_attention(features, tokens, rows, need_weights=False)[0]

    def init_state(self, features: torch.Tensor) -> State:
        B, N = features.shape[:2]
        state: State = {"t": torch.zeros(B, dtype=torch.long, device=features.device),
                        "alpha": features.new_zeros(B, N)}
        empty = features.new_zeros(B, 0, self.cfg.d_model)
        for i, (k, v) in enumerate(self.memory(features)):
            state.update({f"mem_k{i}": k, f"mem_v{i}": v, f"k{i}": empty, f"v{i}": empty})
        return state

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        t = int(state["t"][0]) if state["t"].numel() else 0
        x = self._embed(prev_tokens[:, None], t)  # (B, 1, D)
        state = dict(state)
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(layer.norm1(x))
            state[f"k{i}"] = torch.cat([state[f"k{i}"], k], 1)  # (B, t + 1, D)
            state[f"v{i}"] = torch.cat([state[f"v{i}"], v], 1)
            x, alpha = layer(x, (state[f"k{i}"], state[f"v{i}"]), (state[f"mem_k{i}"], state[f"mem_v{i}"]),
                             causal=False, need_weights=i == len(self.layers) - 1)
        state["t"] = state["t"] + 1
        state["alpha"] = alpha[:, 0]
        return self._logits(x[:, 0]).log_softmax(-1), state


@dataclass
class EnsembleConfig:
    members: list = None  # [{"decoder": arch, "params": {...}}, ...], two or more

    def __post_init__(self) -> None:
        if not isinstance(self.members, list) or len(self.members) < 2:
            raise ConfigError("decoder ensemble: members must be a list of two or more decoders")
        for i, m in enumerate(self.members):
            if not isinstance(m, dict) or set(m) - {"decoder", "params"} or "decoder" not in m:
                raise ConfigError(f"decoder ensemble: member {i} must be {{'decoder': arch, 'params': {{...}}}}")
            if m["decoder"] == "ensemble":
                raise ConfigError(f"decoder ensemble: member {i} is itself an ensemble; list its members instead")


@register_decoder("ensemble", EnsembleConfig)
class Ensemble(nn.Module):
    """Decoders trained apart, decoding as one: each step's word distribution is the mean of
    the members' probabilities (the product of experts' cheaper cousin used by Vinyals et al.,
    2015), so the shared search runs on it unchanged. `alpha` is the members' mean attention.
    Built from trained checkpoints by `captioner ensemble`; not trained as a whole."""

    def __init__(self, cfg: EnsembleConfig, vocab_size: int, feature_dim: int):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(build_decoder(m["decoder"], m.get("params", {}), vocab_size, feature_dim)
                                     for m in cfg.members)

    @property
    def max_words(self) -> int:
        return min(getattr(m, "max_words", 10 ** 9) for m in self.members)

    def _mix(self, logprobs: list[torch.Tensor]) -> torch.Tensor:
        """log of the mean probability."""
        return torch.logsumexp(torch.stack(logprobs), 0) - math.log(len(logprobs))

    @property
    def per_image_state(self) -> tuple[str, ...]:
        return tuple(f"{i}.{k}" for i, m in enumerate(self.members) for k in per_image_state(m))

    def _part(self, state: State, i: int) -> State:
        prefix = f"{i}."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor,
                               rows: torch.Tensor | None = None, need_weights: bool = True,
                               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: log of the mean word probability (B, T, V) and mean alphas (B, T, N)."""
        outs = [m.forward_with_attention(features, tokens, rows, need_weights, lengths) for m in self.members]
        alphas = [a for _, a in outs if a is not None]
        return (self._mix([logits.log_softmax(-1) for logits, _ in outs]),
                torch.stack(alphas).mean(0) if need_weights and alphas else None)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.forward_with_attention(features, tokens, rows, need_weights=False)[0]

    def init_state(self, features: torch.Tensor) -> State:
        state: State = {}
        for i, m in enumerate(self.members):
            state.update({f"{i}.{k}": v for k, v in m.init_state(features).items()})
        state["alpha"] = torch.stack([state[f"{i}.alpha"] for i in range(len(self.members))]).mean(0)
        return state

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        new: State = {}
        logprobs = []
        for i, m in enumerate(self.members):
            lp, s = m.step(prev_tokens, self._part(state, i))
            logprobs.append(lp)
            new.update({f"{i}.{k}": v for k, v in s.items()})
        new["alpha"] = torch.stack([new[f"{i}.alpha"] for i in range(len(self.members))]).mean(0)
        return self._mix(logprobs), new


class WithTunedTop(nn.Module):
    """A decoder behind the trained top of its encoder (`encoders.TunedTop`): the cached
    regions pass through `top` first, and search, SCST, training and the CLI use the same
    contract as for any decoder. `top` runs once per photo, before any beam or caption expands
    the batch. In an ensemble of tuned models each member is one of these, with its own top."""

    def __init__(self, top: nn.Module, inner: nn.Module):
        super().__init__()
        self.top = top
        self.inner = inner

    @property
    def max_words(self) -> int:
        return getattr(self.inner, "max_words", 10 ** 9)

    @property
    def per_image_state(self) -> tuple[str, ...]:
        return per_image_state(self.inner)

    def forward_with_attention(self, features: torch.Tensor, tokens: torch.Tensor,
                               rows: torch.Tensor | None = None, need_weights: bool = True,
                               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.inner.forward_with_attention(self.top(features), tokens, rows, need_weights, lengths)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        return self.inner(self.top(features), tokens, rows)

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """The top's output on cached features: what the inner decoder attends over (and what a
        recognition head classifies, `objects.ObjectNamer`, so the top runs once for both)."""
        frozen = self._frozen
        use = frozen is not None and _inference_only(self) and frozen[1].fresh
        return (frozen[0] if use else self.top)(features)

    def init_state(self, features: torch.Tensor) -> State:
        return self.inner.init_state(self.regions(features))

    _frozen: tuple[nn.Module, Stamp] | None = None

    def fuse_for_inference(self) -> None:
        """Trace and freeze the top for search (`encoders.freeze`: batch norm folded), kept
        outside the module tree; used only under no_grad in eval mode while its weights are unchanged."""
        from captioner.models.encoders import freeze

        cfg = self.top.cfg
        weight = next(self.top.parameters())
        example = weight.new_zeros(1, cfg.grid_size ** 2, cfg.feature_dim)
        sources = list(self.top.parameters()) + list(self.top.buffers())
        self.__dict__["_frozen"] = (freeze(self.top, example), Stamp(sources))

    def step(self, prev_tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.inner.step(prev_tokens, state)
