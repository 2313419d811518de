"""Mirror augmentation: features of photos flipped left to right, with "left" and "right"
swapped in their captions (training input) and mirrored back before the SCST reward."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.data import features
from captioner.training.config import load_train_config
from captioner.data.datasets import ImageRecord
from captioner.models.encoders import build_encoder, get_encoder_config, preprocess
from captioner.errors import ConfigError
from captioner.data.features import FeatureCache
from captioner.training.scst import _words
from captioner.training.dataset import TrainingSet
from captioner.training.train import train
from captioner.data.vocab import Vocab

from conftest import make_photo
from test_train_smoke import tiny_config


def test_mirror_cache_holds_the_flipped_photos_features_in_a_folder_of_its_own(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    make_photo(d / "0.jpg", "red", "square")
    # an asymmetric photo: a mark on its left half only
    from PIL import Image, ImageDraw
    img = Image.open(d / "0.jpg")
    ImageDraw.Draw(img).rectangle((2, 2, 20, 60), fill=(0, 0, 0))
    img.save(d / "0.jpg")
    cfg = get_encoder_config("efficientnet-lite0")
    plain = features.build_cache(d, ["0.jpg"], cfg, tmp_path / "cache", progress=False)
    mirrored = features.build_cache(d, ["0.jpg"], cfg, tmp_path / "cache", progress=False, mirror=True)
    assert plain.path != mirrored.path and mirrored.path.name.endswith("-mirror")
    direct = build_encoder(cfg)(preprocess(d / "0.jpg", cfg).flip(-1)[None])[0]
    torch.testing.assert_close(mirrored.get(["0.jpg"])[0], direct, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(plain.get(["0.jpg"])[0], direct, atol=5e-2)
    # the plain cache is still the plain photo's
    again = features.build_cache(d, ["0.jpg"], cfg, tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(plain.features))


def _training_set(n: int = 40) -> TrainingSet:
    records = [ImageRecord(f"{i}.jpg", ["a dog on the left", "a dog runs right past a man"]) for i in range(n)]
    vocab = Vocab.build((c for r in records for c in r.captions), min_count=1)
    names = [r.image for r in records]
    plain = FeatureCache(Path("plain"), names, np.zeros((n, 4, 3), np.float16))
    mirrored = FeatureCache(Path("mirrored"), names, np.ones((n, 4, 3), np.float16))
    return TrainingSet(records, plain, vocab, 30, mirrored)


def test_mirrored_photos_give_mirror_features_and_swap_left_and_right():
    data = _training_set()
    v = data.vocab
    assert not data.is_mirrored.any() and float(data.features.float().sum()) == 0.0
    data.mirror(0.5, torch.Generator().manual_seed(0))
    flips = data.is_mirrored.tolist()
    assert 0 < sum(flips) < len(flips)
    feats, seqs, rows = data.batch(list(range(len(data))))
    for r in range(seqs.size(0)):
        image = int(rows[r])
        text = v.decode(seqs[r].tolist())
        assert float(feats[image].mean()) == (1.0 if flips[image] else 0.0)
        assert text in (("a dog on the right", "a dog runs left past a man") if flips[image] else
                        ("a dog on the left", "a dog runs right past a man"))
    data.mirror(0.0, torch.Generator())
    assert not data.is_mirrored.any() and float(data.features.float().sum()) == 0.0
    assert v.decode(data.batch([0])[1][0].tolist()) == "a dog on the left"


def test_without_mirrored_features_mirror_is_refused():
    data = _training_set()
    data.mirror_features = None
    with pytest.raises(ValueError, match="no mirrored features"):
        data.mirror(0.5, torch.Generator())


def test_reward_scores_a_mirrored_photos_caption_mirrored_back():
    assert _words("a dog on the left turns right", True) == "a dog on the right turns left".split()
    assert _words("a dog on the left", False) == "a dog on the left".split()


def test_mirror_prob_must_be_a_probability():
    with pytest.raises(ConfigError, match="mirror_prob"):
        load_train_config(None, ["mirror_prob=1.5"])
    assert load_train_config(None, ["mirror_prob=0.5"]).mirror_prob == 0.5


@pytest.mark.slow
def test_training_with_mirroring_uses_the_mirror_cache(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=2, scst_epochs=1, scst_samples=2,
                      scst_batch_size=4, scst_max_len=6, mirror_prob=0.5))
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["xe", "xe", "scst"]
    mirror_caches = list((out / "cache").glob("*-mirror"))
    assert len(mirror_caches) == 1
    names = json.loads((mirror_caches[0] / "index.json").read_text())["names"]
    train_split = (tiny_data / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split()
    assert sorted(names) == sorted(train_split)


def test_prepare_fills_the_mirror_cache_when_the_config_asks(tiny_data, tmp_path, capsys):
    from captioner.cli import main

    cache = tmp_path / "c"
    assert main(["prepare", "--data", str(tiny_data), "--cache-dir", str(cache), "--no-progress",
                 "--set", "encoder=", "--set", "mirror_prob=0"]) == 0
    assert not list(cache.glob("*-mirror"))
    assert main(["prepare", "--data", str(tiny_data), "--cache-dir", str(cache), "--no-progress",
                 "--set", "encoder="]) == 0  # the recipe's mirror_prob
    assert "mirrored features (mirror_prob 0.5)" in capsys.readouterr().out
    assert len(list(cache.glob("*-mirror"))) == 1
