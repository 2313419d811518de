"""A tuned encoder top: the frozen backbone stops early, its last blocks and head train with
the decoder, and are saved, shipped and run with it."""
import json
from dataclasses import replace

import pytest
import torch

from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, write_checkpoint
from captioner.data.datasets import ImageRecord
from captioner.models.encoders import EncoderConfig, TunedTop, build_encoder, get_encoder_config
from captioner.models.ensemble import ensemble_checkpoint
from captioner.models.model import CaptionModel, get_model_config
from captioner.training.dataset import configured_model
from captioner.training.train import _build, param_groups, train
from captioner.data.vocab import Vocab
from test_train_smoke import tiny_config

TUNED = "efficientnet-lite0-tuned"


@pytest.mark.parametrize("name", [TUNED])
def test_the_untrained_top_on_cached_regions_gives_the_frozen_backbones_regions(name):
    frozen, bottom = build_encoder(get_encoder_config("efficientnet-lite0")), build_encoder(get_encoder_config(name))
    top = TunedTop(get_encoder_config(name))
    top.load_pretrained()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cached = bottom(images)
        assert cached.shape == (2, 49, get_encoder_config(name).feature_dim)
        torch.testing.assert_close(top(cached), frozen(images), atol=1e-4, rtol=1e-4)


def test_encoders_without_a_tuned_top_keep_their_dicts_and_so_their_feature_caches():
    assert set(get_encoder_config("efficientnet-lite0").to_dict()) == {
        "name", "image_size", "mean", "std", "feature_dim", "weights_package"}
    tuned = get_encoder_config(TUNED)
    assert EncoderConfig.from_dict(json.loads(json.dumps(tuned.to_dict()))) == tuned
    assert (tuned.region_dim, get_encoder_config("efficientnet-lite0").region_dim) == (1280, 1280)


def _records():
    return [ImageRecord(f"{i}.jpg", ["a dog runs on the grass", "a red ball"]) for i in range(3)]


def test_a_fresh_run_starts_the_top_from_imagenet_and_trains_it_at_a_scaled_rate(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", "show-attend-tell", encoder=TUNED, encoder_lr_scale=0.25)
    model, optimizer, _, _ = _build(cfg, None, configured_model(cfg), _records())
    pretrained = TunedTop(get_encoder_config(TUNED))
    pretrained.load_pretrained()
    for (name, mine), theirs in zip(model.decoder.top.state_dict().items(), pretrained.state_dict().values()):
        assert torch.equal(mine, theirs), name
    groups = optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 0.25]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.decoder.top.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.decoder.parameters()))
    # a model without a tuned top keeps the one group
    plain = tiny_config(tmp_path, tmp_path / "plain", "show-attend-tell")
    plain_model, _, _, _ = _build(plain, None, configured_model(plain), _records())
    assert [g["lr_scale"] for g in param_groups(plain_model, plain)] == [1.0]


def _tuned_model(seed: int, vocab: Vocab) -> CaptionModel:
    """A tuned show-attend-tell whose top is the package's weights plus noise, as if trained."""
    torch.manual_seed(seed)
    cfg = get_model_config("show-attend-tell")
    model = CaptionModel(cfg.__class__(**{**cfg.to_dict(), "encoder": TUNED}), vocab)
    model.decoder.top.load_pretrained()
    with torch.no_grad():
        for p in model.decoder.top.parameters():
            p.add_(0.01 * torch.randn_like(p))  # no longer the package's weights
    return model.eval()


def test_a_tuned_model_round_trips_through_a_half_precision_checkpoint(tmp_path):
    model = _tuned_model(0, Vocab.build(["a dog runs"] * 5, 1))
    save_checkpoint(tmp_path / "m.pt", model, half=True)
    assert any(k.startswith("top.") for k in read_checkpoint(tmp_path / "m.pt")["decoder_state"])
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.encoder_cfg == get_encoder_config(TUNED)
    feats, tokens = torch.randn(2, 49, 448), torch.randint(0, len(model.vocab), (2, 5))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(feats, tokens), model(feats, tokens), atol=0.05, rtol=0.05)
        moved = [(a - b).abs().max() for a, b in zip(loaded.decoder.top.parameters(), model.decoder.top.parameters())]
    assert max(moved) < 0.01  # fp16 rounding only


def test_tuned_models_join_an_ensemble_each_with_its_own_top(tmp_path):
    vocab = Vocab.build(["a dog runs"] * 5, 1)
    members = [_tuned_model(seed, vocab) for seed in (0, 1)]
    for i, m in enumerate(members):
        save_checkpoint(tmp_path / f"m{i}.pt", m)
    write_checkpoint(ensemble_checkpoint([tmp_path / "m0.pt", tmp_path / "m1.pt"]), tmp_path / "pair.pt")
    pair, _ = load_checkpoint(tmp_path / "pair.pt")
    assert not hasattr(pair.decoder, "top")  # no shared top: each member runs its own
    for joined, alone in zip(pair.decoder.members, members):
        for (name, a), b in zip(joined.top.state_dict().items(), alone.decoder.top.state_dict().values()):
            assert torch.equal(a, b), name
    feats, tokens = torch.randn(2, 49, 448), torch.randint(0, len(vocab), (2, 5))
    with torch.no_grad():
        mean = torch.stack([m(feats, tokens).softmax(-1) for m in members]).mean(0)
        torch.testing.assert_close(pair.eval()(feats, tokens).exp(), mean, atol=1e-5, rtol=1e-4)
    # fine-tuning the pair trains both tops at the scaled rate
    groups = param_groups(pair, tiny_config(tmp_path, tmp_path / "run", "show-attend-tell", encoder=TUNED))
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for m in pair.decoder.members for p in m.top.parameters()}


def test_a_tuned_model_trains_both_stages_saves_and_captions(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, tiny_model_file, epochs=1, encoder=TUNED, scst_epochs=1, scst_batch_size=8)
    train(cfg)
    best = read_checkpoint(out / "best.pt")
    assert best["encoder"]["name"] == TUNED
    pretrained = TunedTop(get_encoder_config(TUNED))
    pretrained.load_pretrained()
    trained = {k[len("top."):]: v for k, v in best["decoder_state"].items() if k.startswith("top.")}
    assert trained.keys() == pretrained.state_dict().keys()
    assert any(not torch.equal(v, pretrained.state_dict()[k]) for k, v in trained.items() if v.is_floating_point())
    cap = Captioner.load(out / "best.pt")
    result = cap.caption(sorted((tiny_data / "Images").iterdir())[0], beam_size=2, max_len=6)
    assert result.words and result.attention.shape == (len(result.words), 7, 7)
