import math

import pytest
import torch
from torch import nn

from captioner.inference.decode import SearchConfig, beam_search
from captioner.models.decoders import build_decoder

PAD, BOS, EOS = 0, 1, 2


class TableDecoder(nn.Module):
    """A decoder whose next-token distribution depends only on the previous token."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: int):
        super().__init__()
        self.vocab = vocab
        self.table = torch.full((vocab, vocab), -1e9)
        for prev, nxt in table.items():
            for tok, p in nxt.items():
                self.table[prev, tok] = math.log(p)

    def init_state(self, features):
        return {"x": features[:, 0, :1], "alpha": features.new_ones(features.shape[:2]) / features.size(1)}

    def step(self, prev, state):
        return self.table[prev].log_softmax(-1), state


# Greedy takes 3 (p=.5) then a flat step; the beam finds 4 -> 5 -> EOS, far likelier overall.
TABLE = {BOS: {3: 0.5, 4: 0.4, EOS: 0.1}, 3: {5: 0.34, 6: 0.33, 7: 0.33}, 4: {5: 1.0},
         5: {EOS: 1.0}, 6: {EOS: 1.0}, 7: {EOS: 1.0}}


def run(cfg, batch=1):
    dec = TableDecoder(TABLE, 8)
    return beam_search(dec, torch.zeros(batch, 4, 2), BOS, EOS, PAD, cfg)


def test_greedy_takes_the_locally_best_word():
    h = run(SearchConfig(beam_size=1, length_penalty=0.0))
    assert h.tokens[0, 0, :3].tolist() == [3, 5, EOS]


def test_beam_finds_the_globally_better_caption():
    h = run(SearchConfig(beam_size=3, length_penalty=0.0))
    assert h.tokens[0, 0, :3].tolist() == [4, 5, EOS]
    assert h.logprobs[0, 0].item() == pytest.approx(math.log(0.4), abs=1e-4)


def test_n_best_sorted_and_padded_after_eos():
    h = run(SearchConfig(beam_size=3, n_best=3, length_penalty=0.0))
    assert h.tokens.shape[:2] == (1, 3)
    assert (h.scores[0, :-1] >= h.scores[0, 1:]).all()
    for row in h.tokens[0].tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_scores_are_length_normalised():
    short = run(SearchConfig(beam_size=3, n_best=3, length_penalty=0.0))
    norm = run(SearchConfig(beam_size=3, n_best=3, length_penalty=1.0))
    assert norm.scores[0, 0].item() == pytest.approx(norm.logprobs[0, 0].item() / 3, abs=1e-4)
    assert short.scores[0, 0].item() == pytest.approx(short.logprobs[0, 0].item(), abs=1e-4)


def test_max_len_forces_an_end():
    h = run(SearchConfig(beam_size=2, max_len=1))
    assert h.tokens.shape[-1] <= 2
    assert (h.tokens[0, 0] == EOS).any()


def test_batched_search_equals_one_image_at_a_time():
    torch.manual_seed(0)
    dec = build_decoder("soft-attention-lstm", {"embed_dim": 8, "hidden_dim": 16, "attention_dim": 8,
                                                "region_dim": 8}, 12, 10).eval()
    feats = torch.randn(4, 5, 10)
    cfg = SearchConfig(beam_size=3, max_len=7, n_best=2)
    together = beam_search(dec, feats, BOS, EOS, PAD, cfg)
    for i in range(4):
        alone = beam_search(dec, feats[i:i + 1], BOS, EOS, PAD, cfg)
        T = alone.tokens.size(-1)
        assert together.tokens[i, :, :T].tolist() == alone.tokens[0].tolist()
        torch.testing.assert_close(together.scores[i], alone.scores[0])


def test_attention_has_one_map_per_token():
    torch.manual_seed(0)
    dec = build_decoder("soft-attention-lstm", {"embed_dim": 8, "hidden_dim": 16, "attention_dim": 8,
                                                "region_dim": 8}, 12, 10).eval()
    h = beam_search(dec, torch.randn(2, 5, 10), BOS, EOS, PAD, SearchConfig(beam_size=2, max_len=6))
    assert h.alphas.shape[:3] == h.tokens.shape and h.alphas.shape[-1] == 5
    live = h.tokens != PAD
    torch.testing.assert_close(h.alphas.sum(-1)[live], torch.ones(int(live.sum())))


def test_no_repeat_ngram_blocks_loops():
    loop = {BOS: {3: 0.9, EOS: 0.1}, 3: {4: 0.9, EOS: 0.1}, 4: {3: 0.9, EOS: 0.1}}
    dec = TableDecoder(loop, 8)
    free = beam_search(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD, SearchConfig(beam_size=2, max_len=8))
    assert free.tokens[0, 0, :4].tolist() == [3, 4, 3, 4]  # the loop is the likeliest caption
    blocked = beam_search(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD,
                          SearchConfig(beam_size=2, max_len=8, no_repeat_ngram=2))
    words = [t for t in blocked.tokens[0, 0].tolist() if t not in (PAD, EOS)]
    bigrams = list(zip(words, words[1:]))
    assert len(bigrams) == len(set(bigrams)) and words[:2] == [3, 4]


def test_sampling_at_temperature_zero_is_greedy_search():
    from captioner.inference.decode import sample

    dec = TableDecoder(TABLE, 8)
    feats = torch.zeros(2, 4, 2)
    greedy = sample(dec, feats, BOS, EOS, PAD, max_len=5, temperature=0.0)
    beam1 = beam_search(dec, feats, BOS, EOS, PAD, SearchConfig(beam_size=1, max_len=5, length_penalty=0.0))
    assert greedy.tokens[:, :2].tolist() == [[3, 5], [3, 5]]
    assert greedy.tokens[:, :2].tolist() == beam1.tokens[:, 0, :2].tolist()
    torch.testing.assert_close(greedy.logprobs, torch.full((2,), math.log(0.5 * 0.34)), atol=1e-4, rtol=0)


def test_samples_follow_the_model_and_end_with_eos_then_pad():
    from captioner.inference.decode import sample

    dec = TableDecoder(TABLE, 8)
    gen = torch.Generator().manual_seed(0)
    out = sample(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD, max_len=5, n=2000, generator=gen)
    first = out.tokens[:, 0]
    # P(3) = .5, P(4) = .4, P(EOS) = .1 at the first step
    assert (first == 3).float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert (first == 4).float().mean().item() == pytest.approx(0.4, abs=0.04)
    for row in out.tokens.tolist():
        end = row.index(EOS)
        assert all(t == PAD for t in row[end + 1:])
        assert PAD not in row[:end]
    assert out.alphas.shape[:2] == out.tokens.shape


def test_nucleus_sampling_keeps_only_the_top_mass():
    from captioner.inference.decode import sample

    dec = TableDecoder(TABLE, 8)
    gen = torch.Generator().manual_seed(0)
    # top_p 0.5: only word 3 (p .5) is kept at the first step
    out = sample(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD, max_len=5, n=200, top_p=0.5, generator=gen)
    assert set(out.tokens[:, 0].tolist()) == {3}
    # top_p 0.85 keeps 3 and 4, never the EOS of p .1
    out = sample(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD, max_len=5, n=400, top_p=0.85, generator=gen)
    assert set(out.tokens[:, 0].tolist()) == {3, 4}
    with pytest.raises(ValueError, match="top_p"):
        sample(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD, top_p=0.0)


def test_drawing_a_word_follows_its_probability_and_never_a_zero_mass_word():
    """Sampling's draw (an inverse-CDF draw, not torch.multinomial): each word as often as its
    probability, banned words (-inf) never, nucleus sampling only inside its mass."""
    from captioner.inference.decode import _draw

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0, float("-inf")]]).repeat(20000, 1)
    counts = torch.bincount(_draw(logits, 1.0, gen), minlength=5).float() / 20000
    torch.testing.assert_close(counts, logits[0].softmax(-1), atol=0.012, rtol=0)
    assert counts[1] == 0 and counts[4] == 0
    kept = torch.bincount(_draw(logits, 0.7, gen), minlength=5).float() / 20000
    assert kept[0] == 0 and kept[3] == pytest.approx(0.665 / (0.665 + 0.245), abs=0.012)
    one = torch.tensor([[float("-inf"), 3.0, float("-inf")]])
    assert _draw(one.repeat(100, 1), 1.0, gen).eq(1).all()
