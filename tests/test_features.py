import os

import numpy as np
import pytest
import torch

from captioner.data import features
from captioner.models.encoders import get_encoder_config, load_image, preprocess
from captioner.errors import DataError, ImageError

from conftest import make_photo


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    names = []
    for i, (c, s) in enumerate([("red", "square"), ("blue", "circle"), ("green", "square")]):
        make_photo(d / f"{i}.jpg", c, s, seed=i)
        names.append(f"{i}.jpg")
    return d, names


def test_cache_is_fp16_and_reused_without_recomputing(photos, tmp_path, monkeypatch):
    d, names = photos
    cfg = get_encoder_config("efficientnet-lite0")
    cache = features.build_cache(d, names, cfg, tmp_path / "cache", progress=False)
    assert cache.features.dtype == np.float16 and cache.features.shape == (3, 49, 1280)
    assert isinstance(cache.features, np.memmap)
    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda paths, *a, **k: (calls.append(len(paths)), real(paths, *a, **k)))
    again = features.build_cache(d, names, cfg, tmp_path / "cache", progress=False)
    assert calls == []
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(cache.features))
    before = again.get(names)
    # a changed photo is encoded again, alone; the others keep their rows
    make_photo(d / "1.jpg", "red", "circle", seed=9)
    os.utime(d / "1.jpg", (1, 1))
    changed = features.build_cache(d, names, cfg, tmp_path / "cache", progress=False)
    assert calls == [1]
    after = changed.get(names)
    assert not torch.allclose(after[1], before[1], atol=1e-2)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_a_linked_cache_folder_is_topped_up_where_it_points(photos, tmp_path):
    """A cache folder linked from elsewhere: a new photo is encoded into the linked folder, the link stays."""
    d, names = photos
    cfg = get_encoder_config("efficientnet-lite0")
    first = features.build_cache(d, names[:2], cfg, tmp_path / "kept", progress=False)
    linked = tmp_path / "cache" / first.path.name
    linked.parent.mkdir()
    linked.symlink_to(first.path)
    cache = features.build_cache(d, names, cfg, tmp_path / "cache", progress=False)
    assert linked.is_symlink() and sorted(cache.names) == names
    assert sorted(features.build_cache(d, names, cfg, tmp_path / "kept", progress=False).names) == names
    assert not list(tmp_path.glob("*/*.tmp*"))


def test_cache_key_changes_with_preprocessing():
    cfg = get_encoder_config("efficientnet-lite0")
    from dataclasses import replace

    assert features.encoder_key(cfg) != features.encoder_key(replace(cfg, mean=0.0))
    assert features.encoder_key(cfg) == features.encoder_key(get_encoder_config("efficientnet-lite0"))


def test_features_match_a_fresh_encoder_pass(photos, tmp_path):
    from captioner.models.encoders import build_encoder

    d, names = photos
    cfg = get_encoder_config("efficientnet-lite0")
    cache = features.build_cache(d, names, cfg, tmp_path / "c", progress=False)
    direct = build_encoder(cfg)(preprocess(d / "2.jpg", cfg)[None])[0]
    torch.testing.assert_close(cache.get(["2.jpg"])[0], direct, atol=2e-2, rtol=1e-2)


def test_preprocess_is_the_documented_normalisation(photos):
    d, _ = photos
    cfg = get_encoder_config("efficientnet-lite0")
    x = preprocess(d / "0.jpg", cfg)
    assert x.shape == (3, 224, 224)
    raw = np.asarray(load_image(d / "0.jpg").resize((224, 224), 3), dtype=np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), (raw - 127) / 128, atol=1e-6)


def test_bad_images_get_clear_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<html>not a photo</html>")
    for name in ("empty.jpg", "page.jpg", "absent.jpg"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)


def test_alpha_and_grayscale_become_rgb(tmp_path):
    from PIL import Image

    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 7).save(tmp_path / "g.png")
    a, g = load_image(tmp_path / "a.png"), load_image(tmp_path / "g.png")
    assert a.mode == g.mode == "RGB"
    assert a.getpixel((0, 0)) == (255, 255, 255)  # transparent flattened onto white


@pytest.mark.parametrize("damage", ["empty", "wrong shape", "index names not text", "folder is a file"])
def test_a_damaged_cache_is_rebuilt(photos, tmp_path, damage):
    """A kill or a full disk leaves a 0-byte features.npy; every later run once failed on it."""
    d, names = photos
    cfg = get_encoder_config("efficientnet-lite0")
    good = features.build_cache(d, names, cfg, tmp_path / "cache", progress=False)
    want, folder = np.asarray(good.features).copy(), good.path
    del good
    if damage == "empty":
        (folder / "features.npy").write_bytes(b"")
    elif damage == "wrong shape":
        np.save(folder / "features.npy", np.zeros((3, 49, 10), np.float16))
    elif damage == "index names not text":
        index = (folder / "index.json").read_text().replace('"0.jpg"', '["0.jpg"]')
        (folder / "index.json").write_text(index)
    else:
        import shutil

        shutil.rmtree(folder)
        folder.write_text("stray")
    again = features.build_cache(d, names, cfg, tmp_path / "cache", progress=False)
    assert again.path == folder and folder.is_dir()
    np.testing.assert_array_equal(np.asarray(again.features), want)


def test_the_cache_stays_in_its_folder_whatever_the_dataset_calls_itself(photos, tmp_path):
    d, names = photos
    cfg = get_encoder_config("efficientnet-lite0")
    cache = features.build_cache(d, names[:1], cfg, tmp_path / "cache", tag="../../escaped/x", progress=False)
    assert cache.path.parent == tmp_path / "cache" and not (tmp_path / "escaped").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; give --cache-dir a folder"):
        features.build_cache(d, names, cfg, tmp_path / "file", progress=False)
