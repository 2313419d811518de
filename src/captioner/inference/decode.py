"""Greedy and batched beam search, written once on the decoder's `step`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from captioner.models.decoders import per_image_state


@dataclass
class SearchConfig:
    beam_size: int = 3  # 1 = greedy
    max_len: int = 25  # words, EOS not counted
    length_penalty: float = 1.0  # hypotheses ranked by sum(logprob) / length ** length_penalty
    n_best: int = 1  # hypotheses returned per image (at most beam_size)
    no_repeat_ngram: int = 0  # if > 0, no n-gram of this size appears twice in a caption


@dataclass
class Hypotheses:
    tokens: torch.Tensor  # (B, K, T) word ids, PAD after EOS
    scores: torch.Tensor  # (B, K) length-normalised log-probability, best first
    logprobs: torch.Tensor  # (B, K) summed log-probability
    alphas: torch.Tensor  # (B, K, T, N) attention weights per emitted token


@torch.no_grad()
def beam_search(decoder: nn.Module, features: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
                cfg: SearchConfig, banned_ids: tuple[int, ...] = ()) -> Hypotheses:
    """Batched, length-normalised beam search over `decoder.step`.

    All images and beams advance together as one (B*K) batch. Finished beams stay in the
    beam with a frozen score, so finished and live hypotheses compete on the same
    length-normalised score; search stops when every beam has emitted EOS or at max_len.
    """
    B, K = features.size(0), cfg.beam_size
    if K < 1:
        raise ValueError("beam_size must be at least 1")
    state = decoder.init_state(features)
    state = {k: v.repeat_interleave(K, 0) for k, v in state.items()}  # (B*K, ...)
    fixed = per_image_state(decoder)  # the same on a photo's every beam: never reordered
    device = features.device
    sums = torch.full((B, K), float("-inf"), device=device)
    sums[:, 0] = 0.0  # only one live beam at the start: the rest would be duplicates
    lengths = torch.zeros(B, K, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=device)
    seqs = torch.empty(B, K, 0, dtype=torch.long, device=device)
    alphas = torch.empty(B, K, 0, state["alpha"].size(-1), device=device)
    offsets = (torch.arange(B, device=device) * K)[:, None]  # (B, 1)

    for t in range(cfg.max_len + 1):
        logprobs, state = decoder.step(tokens, state)
        V = logprobs.size(-1)
        logprobs = logprobs.view(B, K, V).clone()
        for i in banned_ids:
            logprobs[..., i] = float("-inf")
        if cfg.no_repeat_ngram > 0 and seqs.size(-1) >= cfg.no_repeat_ngram:
            _ban_repeated_ngrams(logprobs, seqs, cfg.no_repeat_ngram)
        if t == cfg.max_len:  # out of room: every live beam must end now
            logprobs[..., :] = float("-inf")
            logprobs[..., eos_id] = 0.0
        # A finished beam has one continuation, PAD, which keeps its score.
        logprobs[finished] = float("-inf")
        logprobs[..., pad_id] = torch.where(finished, 0.0, float("-inf"))
        cand_sum = sums[:, :, None] + logprobs  # (B, K, V)
        cand_len = (lengths + (~finished).float())[:, :, None]  # EOS counts as a token
        cand_score = cand_sum / cand_len.clamp(min=1) ** cfg.length_penalty
        top_score, top_idx = cand_score.view(B, K * V).topk(K, -1)  # (B, K)
        beam, word = top_idx // V, top_idx % V  # floor division: beam index, word id
        sums = cand_sum.view(B, K * V).gather(1, top_idx)
        lengths = cand_len.expand(B, K, V).reshape(B, K * V).gather(1, top_idx)
        flat = (offsets + beam).view(-1)  # (B*K,) rows of the old beams
        state = {k: v if k in fixed else v.index_select(0, flat) for k, v in state.items()}
        was_finished = finished.gather(1, beam)
        finished = was_finished | (word == eos_id)
        seqs = torch.cat([seqs.gather(1, beam[:, :, None].expand_as(seqs)), word[:, :, None]], -1)
        step_alpha = state["alpha"].view(B, K, 1, -1) * (~was_finished).float()[:, :, None, None]
        alphas = torch.cat([alphas.gather(1, beam[:, :, None, None].expand_as(alphas)), step_alpha], 2)
        tokens = word.view(-1)
        if bool(finished.all()):
            break

    scores = sums / lengths.clamp(min=1) ** cfg.length_penalty
    order = scores.argsort(-1, descending=True)
    n = min(cfg.n_best, K)
    pick = order[:, :n]
    return Hypotheses(
        tokens=seqs.gather(1, pick[:, :, None].expand(B, n, seqs.size(-1))),
        scores=scores.gather(1, pick),
        logprobs=sums.gather(1, pick),
        alphas=alphas.gather(1, pick[:, :, None, None].expand(B, n, *alphas.shape[2:])),
    )


def _ban_repeated_ngrams(logprobs: torch.Tensor, seqs: torch.Tensor, n: int) -> None:
    """Set -inf on every word that would complete an n-gram the beam already holds."""
    B, K, T = seqs.shape
    rows = seqs.view(B * K, T).tolist()
    flat = logprobs.view(B * K, -1)
    for r, seq in enumerate(rows):
        prefix = tuple(seq[T - n + 1:])
        for s in range(T - n + 1):
            if tuple(seq[s:s + n - 1]) == prefix:
                flat[r, seq[s + n - 1]] = float("-inf")


@dataclass
class Samples:
    tokens: torch.Tensor  # (B * n, T) word ids, EOS included, PAD after it; rows image-major
    logprobs: torch.Tensor  # (B * n,) summed log-probability under the model (temperature 1)
    alphas: torch.Tensor  # (B * n, T, N) attention weights per emitted token


@torch.no_grad()
def sample(decoder: nn.Module, features: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
           max_len: int = 25, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           banned_ids: tuple[int, ...] = (), generator: torch.Generator | None = None) -> Samples:
    """`n` captions per image, drawn word by word from `decoder.step`, all images at once.

    temperature 0 picks the most likely word (greedy); top_p < 1 draws only from the smallest
    set of words whose probability reaches top_p (nucleus sampling).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    state = decoder.init_state(features)
    if n > 1:
        state = {k: v.repeat_interleave(n, 0) for k, v in state.items()}  # (B*n, ...)
    rows = features.size(0) * n
    tokens = torch.full((rows,), bos_id, dtype=torch.long, device=features.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=features.device)
    total = torch.zeros(rows, device=features.device)
    out, alphas = [], []
    for t in range(max_len + 1):
        logprobs, state = decoder.step(tokens, state)
        logprobs = logprobs.clone()
        for i in (pad_id, *banned_ids):  # PAD only ever follows EOS
            logprobs[:, i] = float("-inf")
        if t == max_len:  # out of room: end every caption now
            word = torch.full_like(tokens, eos_id)
        elif temperature == 0:
            word = logprobs.argmax(-1)
        else:
            word = _draw(logprobs / temperature, top_p, generator)
        word = torch.where(finished, torch.full_like(word, pad_id), word)
        total += torch.where(finished, 0.0, logprobs.gather(1, word[:, None])[:, 0].clamp(min=-1e4))
        alphas.append(state["alpha"] * (~finished).float()[:, None])
        out.append(word)
        finished = finished | (word == eos_id)
        tokens = word
        if bool(finished.all()):
            break
    return Samples(torch.stack(out, 1), total, torch.stack(alphas, 1))


def _draw(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = logits.softmax(-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep a word while the mass before it is below top_p: the top word always stays
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    # inverse-CDF draw: the same distribution as torch.multinomial, several times faster at a
    # vocabulary's width on CPU (benchmarks/train_step_probes.py); a word of zero mass is never drawn
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    word = torch.searchsorted(cdf, u, right=True)[:, 0]
    return torch.where(word < cdf.size(-1), word, probs.argmax(-1))  # u rounded up to the total: rare


@torch.no_grad()
def constrained_beam_search(decoder: nn.Module, features: torch.Tensor, bos_id: int, eos_id: int, pad_id: int,
                            cfg: SearchConfig, constraints: list[list[int | Sequence[int]]],
                            banned_ids: tuple[int, ...] = (),
                            base_vocab: int | None = None) -> tuple[Hypotheses, torch.Tensor]:
    """Constrained beam search (Anderson et al., 2017) for one phrase per image: the caption must
    contain `constraints[b]` (a token sequence; [] = no constraint, the search of `beam_search`).
    A position of the phrase may be a set of tokens, any of which will do (a word or its plural:
    [[cat, cats]]; "oil rig" or "oil rigs": [oil, [rig, rigs]]).

    The constraint is a finite-state machine whose state is how many of the phrase's tokens the
    caption has emitted so far (0 .. len). Each state keeps its own bank of K beams, so an image
    with a phrase of n tokens has n + 1 banks, and the banks of all images (as many as each
    needs) advance through `decoder.step` together. A beam in state s < len moves to s + 1 only
    by emitting the phrase's next token; once a phrase has started it must be completed. The
    answer is the best finished hypothesis of the final state; where none finished it, that of
    state 0 (the unconstrained search).
    Word ids >= `base_vocab` (words the vocab was grown with) are reachable only through a
    constraint, and each step's probabilities are renormalised over the ids below it, so a grown
    word's probability is measured against the vocabulary the decoder was trained on.
    Returns the hypotheses and a (B,) bool tensor: did the image's caption meet its constraint.

    Each bank's K new beams are the best of K x V candidates that stay in it (its beams, any word
    it allows) and K x M that enter it (the previous bank's beams, by one of the M tokens the
    phrase allows next): the rules are additive masks built once, so a step costs a few
    whole-tensor operations.
    """
    B, K = features.size(0), cfg.beam_size
    if K < 1:
        raise ValueError("beam_size must be at least 1")
    if len(constraints) != B:
        raise ValueError(f"{len(constraints)} constraints for {B} images")
    device = features.device
    inf = float("-inf")
    # each position of a phrase as its set of tokens, padded to M with -1
    constraints = [[[t] if isinstance(t, int) else list(t) for t in c] for c in constraints]
    M = max((len(alts) for c in constraints for alts in c), default=1)
    # the banks of all images in one row: image b's banks 0 .. len(constraints[b]) in order
    image = [b for b, c in enumerate(constraints) for _ in range(len(c) + 1)]
    bank = [s for c in constraints for s in range(len(c) + 1)]
    G = len(bank)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    pad = lambda alts: alts + [-1] * (M - len(alts))  # noqa: E731
    length = as_tensor([len(c) for c in constraints])  # (B,)
    first = as_tensor([i for i, s in enumerate(bank) if s == 0])  # (B,) each image's bank 0
    final = first + length  # (B,) the bank where the constraint is met
    # the tokens that move a beam on from each bank (-1: none), and those that enter it
    moves = as_tensor([pad(constraints[b][s]) if s < len(constraints[b]) else [-1] * M
                       for b, s in zip(image, bank)])  # (G, M)
    # (a dead beam may still pick a padding entry: 0 there keeps its token a valid id)
    enters = as_tensor([pad(constraints[b][s - 1]) if s > 0 else [-1] * M for b, s in zip(image, bank)]).clamp(min=0)
    allowed = moves >= 0  # (G, M)
    nxt = moves.clamp(min=0)[:, None, :].expand(G, K, M)
    opening = as_tensor(bank) == 0  # (G,): no bank before it
    middle = torch.tensor([0 < s < len(constraints[b]) for b, s in zip(image, bank)], device=device)
    state = decoder.init_state(features)
    per_image = (length + 1) * K  # rows of each image
    state = {k: v.repeat_interleave(per_image, 0) for k, v in state.items()}  # (G*K, ...)
    fixed = per_image_state(decoder)  # the same on a photo's every beam: never reordered
    sums = torch.full((G, K), inf, device=device)
    sums[first, 0] = 0.0
    lengths = torch.zeros(G, K, device=device)
    finished = torch.zeros(G, K, dtype=torch.bool, device=device)
    tokens = torch.full((G * K,), bos_id, dtype=torch.long, device=device)
    seqs = torch.empty(G, K, 0, dtype=torch.long, device=device)
    alphas = torch.empty(G, K, 0, state["alpha"].size(-1), device=device)
    rows = torch.arange(G, device=device)[:, None] * K  # (G, 1) each bank's first row
    stay_mask = done = None

    for t in range(cfg.max_len + 1):
        logprobs, state = decoder.step(tokens, state)
        V = logprobs.size(-1)
        logprobs = logprobs.view(G, K, V)
        grown = base_vocab is not None and base_vocab < V
        if stay_mask is None:
            # staying in a state: any word but the banned ones, the phrase's next one and grown
            # ones; inside a phrase nothing (it must go on); PAD only after EOS
            stay_mask = torch.zeros(G, 1, V, device=device)
            stay_mask[..., list(banned_ids) + [pad_id]] = inf
            if grown:
                stay_mask[..., base_vocab:] = inf
            for m in range(M):
                tok = nxt[:, :1, m:m + 1]
                barred = torch.where(allowed[:, m, None, None], inf, stay_mask.gather(-1, tok))
                stay_mask.scatter_(-1, tok, barred)
            stay_mask[middle] = inf
            done = torch.full((V,), inf, device=device)  # a finished beam's one continuation: PAD
            done[pad_id] = 0.0
        if grown:
            logprobs = logprobs - logprobs[..., :base_vocab].logsumexp(-1, keepdim=True)
        if cfg.no_repeat_ngram > 0 and seqs.size(-1) >= cfg.no_repeat_ngram:
            logprobs = logprobs.clone()
            _ban_repeated_ngrams(logprobs, seqs, cfg.no_repeat_ngram)
        if t == cfg.max_len:  # out of room: every live beam must end now
            logprobs = torch.full_like(logprobs, inf)
            logprobs[..., eos_id] = 0.0
        stay = torch.where(finished[..., None], done, logprobs + stay_mask)  # (G, K, V)
        stay_sum = sums[..., None] + stay
        stay_len = lengths + (~finished).float()
        # entering a bank from the one before it, by a token its phrase allows (a finished beam
        # enters nothing): candidate (k, m) is beam k of the bank before, by token m
        enter = torch.where(allowed[:, None, :] & ~finished[..., None], logprobs.gather(-1, nxt), inf)  # (G, K, M)
        enter_sum = torch.cat([sums[:1, :, None].expand(1, K, M), (sums[..., None] + enter)[:-1]])
        enter_sum = enter_sum.masked_fill(opening[:, None, None], inf).view(G, K * M)
        enter_len = torch.cat([lengths[:1], lengths[:-1] + 1])  # (G, K)
        cand_sum = torch.cat([stay_sum.view(G, K * V), enter_sum], -1)  # (G, K*V + K*M)
        pen = cfg.length_penalty
        cand_score = torch.cat([(stay_sum / stay_len.clamp(min=1)[..., None] ** pen).view(G, K * V),
                                enter_sum / enter_len.repeat_interleave(M, -1).clamp(min=1) ** pen], -1)
        _, top_idx = cand_score.topk(K, -1)  # (G, K)
        entered = top_idx >= K * V
        entry = (top_idx - K * V).clamp(min=0)
        src_beam = torch.where(entered, entry // M, top_idx // V)
        word = torch.where(entered, enters.gather(-1, entry % M), top_idx % V)
        sums = cand_sum.gather(-1, top_idx)
        lengths = torch.where(entered, enter_len.gather(-1, src_beam), stay_len.gather(-1, src_beam))
        old = (rows - entered.long() * K + src_beam).clamp(min=0).view(-1)  # (G*K,) rows of the old beams
        state = {k: v if k in fixed else v.index_select(0, old) for k, v in state.items()}
        was_finished = finished.view(-1)[old].view(G, K)
        finished = was_finished | (word == eos_id)
        seqs = torch.cat([seqs.view(G * K, -1)[old].view(G, K, -1), word[..., None]], -1)
        step_alpha = state["alpha"].view(G, K, 1, -1) * (~was_finished).float()[..., None, None]
        alphas = torch.cat([alphas.view(G * K, *alphas.shape[2:])[old].view(G, K, *alphas.shape[2:]), step_alpha], 2)
        tokens = word.view(-1)
        if bool((finished | torch.isinf(sums)).all()):
            break

    scores = sums / lengths.clamp(min=1) ** cfg.length_penalty  # (G, K)
    met = torch.isfinite(scores[final].max(-1).values)  # (B,)
    pick_bank = torch.where(met, final, first)  # (B,)
    scores, sums, seqs, alphas = scores[pick_bank], sums[pick_bank], seqs[pick_bank], alphas[pick_bank]
    order = scores.argsort(-1, descending=True)
    n = min(cfg.n_best, K)
    pick = order[:, :n]
    hyps = Hypotheses(
        tokens=seqs.gather(1, pick[:, :, None].expand(B, n, seqs.size(-1))),
        scores=scores.gather(1, pick),
        logprobs=sums.gather(1, pick),
        alphas=alphas.gather(1, pick[:, :, None, None].expand(B, n, *alphas.shape[2:])),
    )
    return hyps, met & (length > 0)
