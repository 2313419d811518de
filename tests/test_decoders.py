"""Contract tests, run for every registered decoder."""
from dataclasses import replace

import pytest
import torch

from captioner.models.decoders import DECODERS, WithTunedTop, build_decoder
from captioner.models.encoders import HEAD_DIM, TunedTop, get_encoder_config
from captioner.errors import ConfigError
from captioner.models.model import get_model_config, list_models

SMALL = {
    "soft-attention-lstm": {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 12, "region_dim": 20},
    "show-tell": {"embed_dim": 16, "hidden_dim": 24},
    "up-down": {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 12, "region_dim": 20},
    "transformer": {"d_model": 16, "heads": 2, "layers": 2, "encoder_layers": 1, "ffn_dim": 24},
}
# an ensemble of two different archs: their states and attention maps must combine
SMALL["ensemble"] = {"members": [{"decoder": "soft-attention-lstm", "params": SMALL["soft-attention-lstm"]},
                                 {"decoder": "transformer", "params": SMALL["transformer"]}]}
V, C, N, B, T = 30, 40, 9, 3, 6


# Variants of a registered arch that change its computation, tested like archs of their own.
VARIANTS = {"local-attention-lstm": ("soft-attention-lstm", {**SMALL["soft-attention-lstm"], "attention": "local",
                                                             "window": 1})}
# The LSTM behind a tuned encoder top; the top here is Lite0's last block and head (the registered
# tuned encoder trains five blocks), on that block's 192-channel input over the 7x7 grid.
TUNED = "tuned-top-lstm"
SMALL_TOP = replace(get_encoder_config("efficientnet-lite0-tuned"), split=15, feature_dim=192)


@pytest.fixture(params=sorted(DECODERS) + sorted(VARIANTS) + [TUNED])
def decoder(request):
    torch.manual_seed(0)
    if request.param == TUNED:
        return WithTunedTop(TunedTop(SMALL_TOP), build_decoder("soft-attention-lstm", SMALL["soft-attention-lstm"],
                                                               V, HEAD_DIM))
    arch, params = VARIANTS.get(request.param, (request.param, SMALL.get(request.param, {})))
    return build_decoder(arch, params, V, C)


def regions(decoder, b: int) -> torch.Tensor:
    """Random regions of the shape `decoder` reads: (b, N, C), or a tuned top's cached input."""
    if isinstance(decoder, WithTunedTop):
        cfg = decoder.top.cfg
        return torch.randn(b, cfg.grid_size ** 2, cfg.feature_dim)
    return torch.randn(b, N, C)


def test_every_registered_decoder_has_a_small_test_config():
    assert set(DECODERS) <= set(SMALL)


def test_forward_shapes_and_no_nan(decoder):
    feats, tokens = regions(decoder, B), torch.randint(0, V, (B, T))
    logits = decoder(feats, tokens)
    assert logits.shape == (B, T, V)
    assert torch.isfinite(logits).all()


def test_backward_reaches_every_parameter(decoder):
    feats, tokens = regions(decoder, B), torch.randint(0, V, (B, T))
    decoder(feats, tokens).logsumexp(-1).mean().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("att_score.bias"):  # softmax over regions ignores a shared shift: zero up to rounding
            continue
        assert p.grad.abs().sum() > 0, name


def test_step_agrees_with_teacher_forced_forward(decoder):
    decoder.eval()
    feats, tokens = regions(decoder, B), torch.randint(0, V, (B, T))
    with torch.no_grad():
        full = decoder(feats, tokens).log_softmax(-1)
        state = decoder.init_state(feats)
        for t in range(T):
            logprobs, state = decoder.step(tokens[:, t], state)
            torch.testing.assert_close(logprobs, full[:, t], atol=1e-5, rtol=1e-4)


def test_attention_weights_are_distributions(decoder):
    decoder.eval()
    with torch.no_grad():
        feats = regions(decoder, B)
        state = decoder.init_state(feats)
        _, state = decoder.step(torch.zeros(B, dtype=torch.long), state)
    alpha = state["alpha"]
    assert alpha.shape == (B, feats.shape[1])
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))


def test_unknown_arch_and_field_are_named():
    with pytest.raises(ConfigError, match="no-such"):
        build_decoder("no-such", {}, V, C)
    with pytest.raises(ConfigError, match="hidden_size"):
        build_decoder("soft-attention-lstm", {"hidden_size": 3}, V, C)


def test_rows_share_one_image_between_captions(decoder):
    decoder.eval()
    feats, tokens = regions(decoder, 2), torch.randint(0, V, (4, T))
    rows = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        shared = decoder(feats, tokens, rows)
        repeated = decoder(feats[rows], tokens)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-4)


def test_local_attention_stays_inside_its_window():
    torch.manual_seed(0)
    dec = build_decoder("soft-attention-lstm", {**SMALL["soft-attention-lstm"], "attention": "local", "window": 1},
                        V, C).eval()
    with torch.no_grad():
        state = dec.init_state(torch.randn(B, 49, C))
        _, state = dec.step(torch.zeros(B, dtype=torch.long), state)
    alpha = state["alpha"].view(B, 7, 7)
    for a in alpha:
        rows, cols = (a > 0).nonzero(as_tuple=True)
        # a window of half-width 1 spans at most 3 x 3 cells
        assert 1 <= len(rows) <= 9
        assert rows.max() - rows.min() <= 2 and cols.max() - cols.min() <= 2
    with pytest.raises(ConfigError, match="attention"):
        build_decoder("soft-attention-lstm", {"attention": "nearby"}, V, C)


@pytest.mark.parametrize("name", list_models())
def test_every_named_model_config_builds_and_steps(name):
    """The shipped model configs (`captioner train --model NAME`) with their real sizes: the
    decoder builds from the file's params, on its encoder's regions, and decodes a word."""
    cfg = get_model_config(name)
    enc = get_encoder_config(cfg.encoder)
    torch.manual_seed(0)
    dec = build_decoder(cfg.decoder, cfg.decoder_params, V, enc.region_dim).eval()
    with torch.no_grad():
        state = dec.init_state(torch.randn(2, enc.grid_size ** 2, enc.feature_dim))
        logprobs, state = dec.step(torch.zeros(2, dtype=torch.long), state)
    assert logprobs.shape == (2, V) and torch.isfinite(logprobs).all()
    assert state["alpha"].shape == (2, enc.grid_size ** 2)


def test_lengths_skip_padding_without_changing_the_real_positions(decoder):
    """Training passes each caption's length: a decoder may skip the padded steps, but the real
    positions' logits, attention and gradients stay those of the full pass."""
    decoder.eval()  # no dropout: both passes see the same weights and masks
    feats, tokens = regions(decoder, 2), torch.randint(0, V, (4, T))
    rows, lengths = torch.tensor([1, 0, 0, 1]), torch.tensor([2, T, 1, 4])
    real = lengths[:, None] > torch.arange(T)
    grads = []
    for given in (None, lengths):
        decoder.zero_grad()
        logits, alphas = decoder.forward_with_attention(feats, tokens, rows, lengths=given)
        assert logits.shape == (4, T, V)
        logits[real].logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None})
        if given is None:
            full, full_alphas = logits.detach(), alphas
        else:
            torch.testing.assert_close(logits.detach()[real], full[real], atol=1e-5, rtol=1e-4)
            if alphas is not None and full_alphas is not None:
                torch.testing.assert_close(alphas.detach()[real], full_alphas.detach()[real], atol=1e-6, rtol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-3, msg=name)
    with torch.no_grad():  # nothing real at all: the right shape, and nothing to read
        logits, _ = decoder.forward_with_attention(feats, tokens, rows, lengths=torch.zeros(4, dtype=torch.long))
    assert logits.shape == (4, T, V)
