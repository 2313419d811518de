"""The lean search path: fused decoder weights and a traced, frozen encoder give the same
captions as the modules as trained, and training never sees them."""
import pytest
import torch

from captioner.inference.api import Captioner
from captioner.inference.decode import SearchConfig, beam_search
from captioner.models.decoders import SoftAttentionLSTM, WithTunedTop, fuse_for_inference, per_image_state
from captioner.models.encoders import build_encoder, frozen_encoder, get_encoder_config, preprocess

from conftest import FLICKR8K, REPO
from test_decoders import decoder, regions  # noqa: F401  (the fixture: every decoder arch and variant)


def search(dec, feats):
    return beam_search(dec, feats, 1, 2, 0, SearchConfig(beam_size=3, max_len=8), banned_ids=(1,))


def lean_state(dec, feats) -> bool:
    """Does search start on the fused path (a state holding the fused hidden products)?"""
    with torch.no_grad():
        return any(k.split(".")[-1] == "hidden" for k in dec.init_state(feats))


def test_fused_search_gives_the_same_captions(decoder):  # noqa: F811
    decoder.eval()
    feats = regions(decoder, 4)
    keys = set(decoder.state_dict())
    ref = search(decoder, feats)
    fused = fuse_for_inference(decoder)
    assert fused == sum(isinstance(m, (SoftAttentionLSTM, WithTunedTop)) for m in decoder.modules())
    assert lean_state(decoder, feats) == any(isinstance(m, SoftAttentionLSTM) for m in decoder.modules())
    got = search(decoder, feats)
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.alphas, ref.alphas, atol=1e-5, rtol=1e-5)
    assert set(decoder.state_dict()) == keys  # the fused weights are held apart: checkpoints read as before


def test_training_after_fusing_drops_the_fused_weights(decoder):  # noqa: F811
    if not fuse_for_inference(decoder.eval()):
        pytest.skip("no lean path for this decoder")
    feats = regions(decoder, 2)
    with torch.no_grad():
        for p in decoder.parameters():  # an optimizer step, in place, as training makes it
            p.add_(0.05 * torch.randn_like(p))
    got = search(decoder, feats)
    assert not lean_state(decoder, feats)  # stale: the path as trained runs instead
    decoder.__dict__.pop("_fused", None)
    for m in decoder.modules():
        m.__dict__.pop("_fused", None)
        m.__dict__.pop("_frozen", None)
    ref = search(decoder, feats)
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.scores, ref.scores)


def test_the_frozen_encoder_matches_the_encoder_at_any_batch():
    cfg = get_encoder_config("efficientnet-lite0-tuned")
    encoder = build_encoder(cfg)
    frozen = frozen_encoder(encoder)
    photos = sorted((REPO / "examples").glob("*.jpg"))
    x = torch.stack([preprocess(p, cfg) for p in photos])
    for batch in (x[:1], x[:3]):
        torch.testing.assert_close(frozen(batch), encoder(batch), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_lean_fp32_captions_equal_the_captions_as_trained():
    """The shipped model in fp32, on the example photos and (where present) 16 Flickr8k test
    photos: the same captions lean (fused, frozen) as with the modules as trained."""
    photos = sorted((REPO / "examples").glob("*.jpg"))
    split = FLICKR8K / "Flickr8k_text" / "Flickr_8k.testImages.txt"
    if split.is_file():
        photos += [FLICKR8K / "Images" / n for n in split.read_text().split()[:16]]
    plain = Captioner.load(precision="fp32", lean=False)
    lean = Captioner.load(precision="fp32")
    ref, got = plain.caption_batch(photos), lean.caption_batch(photos)
    assert [c.text for c in got] == [c.text for c in ref]
    assert max(abs(a.score - b.score) for a, b in zip(ref, got)) < 1e-3


def test_searches_skip_reordering_only_what_is_the_same_on_every_beam(decoder, monkeypatch):  # noqa: F811
    """Beam searches leave a decoder's per-image state (regions, their projections) in place when
    beams are re-ranked: the same captions as reordering every entry."""
    from captioner.inference import decode

    decoder.eval()
    feats = regions(decoder, 3)
    cfg = SearchConfig(beam_size=3, max_len=8)
    kw = dict(bos_id=1, eos_id=2, pad_id=0, cfg=cfg, banned_ids=(1,))
    assert set(per_image_state(decoder)) <= set(decoder.init_state(feats))
    phrases = [[5], [], [6, 7]]
    lean = beam_search(decoder, feats, **kw), decode.constrained_beam_search(decoder, feats, constraints=phrases, **kw)[0]
    monkeypatch.setattr(decode, "per_image_state", lambda d: ())
    full = beam_search(decoder, feats, **kw), decode.constrained_beam_search(decoder, feats, constraints=phrases, **kw)[0]
    for got, ref in zip(lean, full):
        assert torch.equal(got.tokens, ref.tokens)
        torch.testing.assert_close(got.alphas, ref.alphas)


def test_the_frozen_recognizer_gives_the_stock_classifiers_probabilities():
    from captioner.models.recognition import Recognizer

    cfg = get_encoder_config("efficientnet-lite0-tuned")
    frozen, eager = Recognizer(cfg, "stock"), Recognizer(cfg, "stock")
    assert frozen.freeze() and isinstance(frozen.top, torch.jit.ScriptModule)
    assert not frozen.freeze()  # once
    feats = torch.randn(3, cfg.grid_size ** 2, cfg.feature_dim).abs()
    for batch in (feats[:1], feats):
        torch.testing.assert_close(frozen(batch), eager(batch), atol=1e-4, rtol=1e-3)
