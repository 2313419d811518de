"""Mirror views: each photo read as taken and as its mirror image, captioned with the mean of
the two views' word distributions ("left" and "right" swapped back from the mirror's)."""
import json

import pytest
import torch

from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, write_checkpoint
from captioner.cli import main
from captioner.inference.decode import SearchConfig, beam_search
from captioner.models.decoders import MirrorViews, build_decoder
from captioner.errors import CheckpointError
from captioner.evaluation.evaluate import decode_records
from captioner.data.features import FeatureCache
from captioner.models.model import CaptionModel, ModelConfig
from captioner.data.vocab import Vocab

from conftest import REPO, TINY_MODEL

WORDS = ["a dog runs to the left", "a dog runs to the right", "a red ball"]
LSTM = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 12, "region_dim": 20}


def tiny(seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(WORDS, min_count=1)).eval()


def test_mirrored_ids_swap_left_and_right_and_keep_every_other_word():
    v = Vocab.build(WORDS, min_count=1)
    ids = v.mirrored_ids()
    left, right = v.tokens.index("left"), v.tokens.index("right")
    assert ids[left] == right and ids[right] == left
    assert all(ids[i] == i for i in range(len(v)) if i not in (left, right))
    one_sided = Vocab.build(["a dog runs to the left"], min_count=1)  # no "right" to swap with
    assert one_sided.mirrored_ids() == list(range(len(one_sided)))


def test_step_is_the_mean_of_both_views_with_the_mirrors_words_swapped_back():
    torch.manual_seed(0)
    inner = build_decoder("soft-attention-lstm", LSTM, 8, 40).eval()
    perm = torch.tensor([0, 1, 2, 3, 5, 4, 6, 7])  # words 4 and 5 are each other's mirror
    views = MirrorViews(inner, perm, side=3)
    photo, mirror = torch.randn(2, 9, 40), torch.randn(2, 9, 40)
    prev = torch.tensor([4, 6])
    with torch.no_grad():
        logp, state = views.step(prev, views.init_state(torch.cat([photo, mirror], 1)))
        lp_photo, s_photo = inner.step(prev, inner.init_state(photo))
        lp_mirror, s_mirror = inner.step(perm[prev], inner.init_state(mirror))  # the mirror view read word 5
    expected = (lp_photo.exp() + lp_mirror.exp()[:, perm]) / 2
    torch.testing.assert_close(logp.exp(), expected)
    assert logp.exp()[0, 4] == pytest.approx(float(lp_photo.exp()[0, 4] + lp_mirror.exp()[0, 5]) / 2, rel=1e-5)
    unflipped = s_mirror["alpha"].view(2, 3, 3).flip(-1).reshape(2, 9)
    torch.testing.assert_close(state["alpha"], (s_photo["alpha"] + unflipped) / 2)
    torch.testing.assert_close(state["alpha"].sum(-1), torch.ones(2))


def test_a_symmetric_pair_of_views_captions_like_the_photo_alone():
    model = tiny(1)
    feats = torch.randn(3, 49, 1280)
    v, search = model.vocab, SearchConfig(beam_size=3, max_len=6, n_best=3)
    views = MirrorViews(model.decoder, torch.arange(len(v)), side=7)
    doubled = torch.cat([feats, feats.view(3, 7, 7, 1280).flip(2).reshape(3, 49, 1280)], 1)
    # the mirror view's regions are the photo's flipped: soft attention pools them alike
    one = beam_search(model.decoder, feats, v.bos_id, v.eos_id, v.pad_id, search, (v.bos_id, v.unk_id))
    two = beam_search(views, doubled, v.bos_id, v.eos_id, v.pad_id, search, (v.bos_id, v.unk_id))
    assert torch.equal(one.tokens, two.tokens)
    torch.testing.assert_close(one.scores, two.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.alphas, two.alphas, atol=1e-5, rtol=1e-5)


def test_a_model_with_mirror_views_refuses_one_views_regions():
    model = tiny()
    model.mirror_views = True
    with pytest.raises(ValueError, match=r"98 in all; got features of shape \(2, 49, 1280\)"):
        model.captions(torch.randn(2, 49, 1280), SearchConfig())
    cache = FeatureCache(REPO, ["a.jpg"], torch.zeros(1, 49, 1280, dtype=torch.float16).numpy())
    with pytest.raises(ValueError, match="mirror features"):
        decode_records(model, cache, [], SearchConfig())


def test_the_setting_travels_with_the_checkpoint_and_a_bad_one_is_named(tmp_path):
    model = tiny()
    model.mirror_views = True
    save_checkpoint(tmp_path / "m.pt", model)
    assert load_checkpoint(tmp_path / "m.pt")[0].mirror_views is True
    ckpt = read_checkpoint(tmp_path / "m.pt")
    ckpt["decode"]["mirror_views"] = "yes"
    write_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="mirror_views must be true or false, not 'yes'"):
        load_checkpoint(tmp_path / "bad.pt")
    del ckpt["decode"]["mirror_views"]  # a checkpoint from before the setting: off
    write_checkpoint(ckpt, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[0].mirror_views is False


def test_captioner_encodes_the_mirror_image_as_training_did():
    cap = Captioner.load(mirror_views=True)
    pixels = torch.stack([cap.preprocess(REPO / "examples" / name) for name in ("cat.jpg", "coffee.jpg")])
    feats = cap.encode_pixels(pixels, chunk=1)
    n = cap.model.encoder_cfg.grid_size ** 2
    assert feats.shape[:2] == (2, 2 * n)
    torch.testing.assert_close(feats[:, :n], cap.encoder(pixels))
    torch.testing.assert_close(feats[:, n:], cap.encoder(pixels.flip(-1)))  # as the mirror feature cache flips
    caption = cap.caption(REPO / "examples" / "cat.jpg")
    side = cap.model.encoder_cfg.grid_size
    assert len(caption.text.split()) >= 3 and caption.attention.shape == (len(caption.words), side, side)
    assert caption.attention.sum((1, 2)) == pytest.approx(1.0, abs=1e-4)


def test_cli_exports_the_setting_and_evaluate_reads_the_mirror_images(tiny_data, tmp_path, capsys):
    out = tmp_path / "views.pt"
    default = REPO / "src" / "captioner" / "weights" / "default.pt"
    assert main(["export", str(default), str(out), "--mirror-views", "on"]) == 0
    assert load_checkpoint(out)[0].mirror_views is True
    capsys.readouterr()
    cache = tmp_path / "c"
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(tiny_data), "--cache-dir", str(cache),
                 "--captions-out", str(tmp_path / "caps.json"), "--json", "--beam-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "mirror views on" in printed
    assert len(list(cache.glob("*-mirror"))) == 1  # the test photos' mirror images, cached apart
    assert len(json.loads((tmp_path / "caps.json").read_text())) == 6
    assert main(["caption", str(REPO / "examples" / "cat.jpg"), "--model", str(out), "--mirror-views", "off",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]
