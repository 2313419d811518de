"""Random-crop augmentation: each epoch sees each train photo through a random square crop of
its cached feature grid, resampled to the whole grid (`crop_scale`)."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioner.training.config import load_train_config
from captioner.data.datasets import ImageRecord
from captioner.models.encoders import get_encoder_config
from captioner.errors import ConfigError
from captioner.data.features import FeatureCache
from captioner.training.train import TrainingSet, crop_regions, train
from captioner.data.vocab import Vocab

from test_train_smoke import tiny_config, train_killed_after


def _columns(side: int, channels: int, fold: int) -> torch.Tensor:
    """Regions (1, side*side, channels*fold*fold) of a fine grid (side*fold cells a side) whose
    every channel holds the cell's column index, folded as a tuned top's cache is."""
    fine = torch.arange(side * fold, dtype=torch.float32).expand(1, channels, side * fold, side * fold)
    return F.pixel_unshuffle(fine, fold).flatten(2).transpose(1, 2)


def _fine(regions: torch.Tensor, side: int, fold: int) -> torch.Tensor:
    return F.pixel_shuffle(regions.transpose(1, 2).reshape(1, -1, side, side), fold)[0, 0]


@pytest.mark.parametrize("fold", [1, 2])
def test_the_whole_grid_as_its_crop_changes_nothing(fold):
    regions = torch.randn(3, 49, 5 * fold * fold)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3)
    torch.testing.assert_close(crop_regions(regions, identity, fold), regions)


@pytest.mark.parametrize("fold", [1, 2])
def test_a_crop_of_the_left_half_spreads_the_left_half_over_the_grid(fold):
    side = 7
    regions = _columns(side, 3, fold)
    left = torch.tensor([[[0.5, 0, -0.5], [0, 0.5, 0]]])  # side 0.5, centred on the left half
    fine = _fine(crop_regions(regions, left, fold), side, fold)
    width = side * fold
    assert float(fine.max()) <= (width - 1) / 2 + 1e-5  # nothing from the right half
    assert float(fine[:, 0].max()) < 0.5 and float(fine[:, -1].min()) > (width - 1) / 2 - 1
    assert bool((fine[:, 1:] >= fine[:, :-1]).all())  # still left to right
    # every row alike: a horizontal crop of a grid that changes only along x
    torch.testing.assert_close(fine, fine[:1].expand_as(fine))


def test_a_caches_fold_comes_from_where_the_backbone_is_split():
    assert get_encoder_config("efficientnet-lite0-tuned").cache_fold == 2  # block 11's input: 14x14
    assert get_encoder_config("efficientnet-lite0-tuned8").cache_fold == 2  # block 8's input: 14x14
    last_block = replace(get_encoder_config("efficientnet-lite0-tuned"), split=15, feature_dim=192)
    assert last_block.cache_fold == 1  # block 15's input is already on the 7x7 grid
    assert get_encoder_config("efficientnet-lite0").cache_fold == 1


def _training_set(n: int = 30) -> TrainingSet:
    records = [ImageRecord(f"{i}.jpg", ["a dog runs"]) for i in range(n)]
    vocab = Vocab.build((c for r in records for c in r.captions), min_count=1)
    feats = np.random.default_rng(0).standard_normal((n, 49, 8)).astype(np.float16)
    return TrainingSet(records, FeatureCache(Path("c"), [r.image for r in records], feats), vocab, 30, fold=2)


def test_each_photo_gets_its_own_crop_inside_the_grid_until_the_next_draw():
    data = _training_set()
    plain = data.photo_features(list(range(len(data))))
    torch.testing.assert_close(plain, data.features.float())
    data.crop(0.6, torch.Generator().manual_seed(0))
    side, centre = data.crops[:, 0, 0], data.crops[:, :, 2]
    assert bool((side >= 0.6).all() and (side <= 1).all()) and len(set(side.tolist())) == len(data)
    torch.testing.assert_close(data.crops[:, 1, 1], side)
    assert bool((centre.abs() <= (1 - side)[:, None] + 1e-6).all())  # the crop stays inside the grid
    cropped = data.photo_features(list(range(len(data))))
    assert cropped.shape == plain.shape and not torch.allclose(cropped, plain)
    torch.testing.assert_close(data.photo_features([3, 1]), cropped[[3, 1]])  # the same crop all epoch
    data.crop(0.6, torch.Generator().manual_seed(1))
    assert not torch.allclose(data.photo_features(list(range(len(data)))), cropped)


def test_crop_scale_must_be_a_fraction():
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match="crop_scale"):
            load_train_config(None, [f"crop_scale={bad}"])
    assert load_train_config(None, ["crop_scale=0.8"]).crop_scale == 0.8
    assert load_train_config(None, []).crop_scale == 1.0


def test_training_with_crops_draws_them_every_epoch_and_resumes_to_the_same_run(tiny_data, tiny_model_file,
                                                                               tmp_path, monkeypatch):
    kw = dict(epochs=2, scst_epochs=1, scst_samples=2, scst_batch_size=4, scst_max_len=6)
    plain = tmp_path / "plain"
    train(tiny_config(tiny_data, plain, tiny_model_file, **kw))
    drawn = []
    real = TrainingSet.crop
    monkeypatch.setattr(TrainingSet, "crop", lambda self, scale, gen: (drawn.append(scale), real(self, scale, gen)))
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config(tiny_data, full, tiny_model_file, crop_scale=0.7, **kw))
    assert drawn == [0.7, 0.7, 0.7]  # both cross-entropy epochs and the SCST epoch
    train_killed_after(2, tiny_config(tiny_data, part, tiny_model_file, crop_scale=0.7, **kw))
    train(tiny_config(tiny_data, part, tiny_model_file, crop_scale=0.7, **kw), resume=True)
    a, b, p = ([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (full, part, plain))
    assert [h["phase"] for h in a] == ["xe", "xe", "scst"]
    assert a[0]["train_loss"] != p[0]["train_loss"]  # the crops changed what the model saw
    assert a[1]["train_loss"] == pytest.approx(b[1]["train_loss"], rel=1e-5)
    assert a[2]["reward"] == pytest.approx(b[2]["reward"], rel=1e-5)
