"""The frozen encoder in bfloat16: a setting saved with the model, run the same way by the
Captioner (caption, serve, bulk) and by evaluate's feature cache."""
import json

import pytest
import torch

from captioner.inference import precision
from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, write_checkpoint
from captioner.cli import main
from captioner.errors import CheckpointError
from captioner.data.features import build_cache
from captioner.models.model import CaptionModel, ModelConfig
from captioner.data.vocab import Vocab

from conftest import REPO, TINY_MODEL

DEFAULT = REPO / "src" / "captioner" / "weights" / "default.pt"
PHOTOS = [REPO / "examples" / name for name in ("cat.jpg", "coffee.jpg")]


def test_the_setting_travels_with_the_checkpoint_and_a_bad_one_is_named(tmp_path):
    model = CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(["a dog runs"], min_count=1))
    model.encoder_precision = "bf16"
    save_checkpoint(tmp_path / "m.pt", model)
    assert load_checkpoint(tmp_path / "m.pt")[0].encoder_precision == "bf16"
    ckpt = read_checkpoint(tmp_path / "m.pt")
    ckpt["decode"]["encoder_precision"] = "int8"
    write_checkpoint(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="decode encoder_precision must be fp32 or bf16, not 'int8'"):
        load_checkpoint(tmp_path / "bad.pt")
    del ckpt["decode"]["encoder_precision"]  # a checkpoint from before the setting: fp32
    write_checkpoint(ckpt, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[0].encoder_precision == "fp32"


def test_auto_takes_the_models_own_only_where_the_cpu_does_bf16(monkeypatch):
    model, _ = load_checkpoint(DEFAULT)
    model.encoder_precision = "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert Captioner(model, encoder_precision="auto").encoder_precision == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert Captioner(model, encoder_precision="auto").encoder_precision == "bf16"
    assert Captioner(model, encoder_precision="fp32").encoder_precision == "fp32"  # asked for: as asked


def test_bf16_regions_are_float32_and_close_to_fp32s_but_not_equal():
    fp32 = Captioner.load(encoder_precision="fp32")
    bf16 = Captioner.load(encoder_precision="bf16")
    pixels = torch.stack([fp32.preprocess(p) for p in PHOTOS])
    a, b = fp32.encode_pixels(pixels), bf16.encode_pixels(pixels)
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert not torch.equal(a, b)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert (cosine > 0.99).all(), cosine
    # in chunks or at once, the same regions
    torch.testing.assert_close(bf16.encode_pixels(pixels, chunk=1), b, rtol=0, atol=0.05)


def test_evaluate_cache_holds_what_the_captioner_encodes(tiny_data, tmp_path):
    # the scores evaluate reports for a bf16 encoder are those of the regions a user's photo gets
    cap = Captioner.load(encoder_precision="bf16")
    images = sorted(p.name for p in (tiny_data / "Images").iterdir())[:3]
    cfg = cap.model.encoder_cfg
    fp32 = build_cache(tiny_data / "Images", images, cfg, tmp_path / "c", progress=False)
    bf16 = build_cache(tiny_data / "Images", images, cfg, tmp_path / "c", progress=False, precision="bf16")
    assert bf16.path.name == fp32.path.name + "-bf16"
    expected = cap.encode_pixels(torch.stack([cap.preprocess(tiny_data / "Images" / n) for n in images]))
    torch.testing.assert_close(bf16.get(images), expected, rtol=1e-2, atol=2e-3)  # stored as fp16
    assert not torch.allclose(fp32.get(images), expected, rtol=1e-2, atol=2e-3)


def test_cli_exports_the_setting_and_evaluate_and_caption_follow_it(tiny_data, tmp_path, capsys):
    out = tmp_path / "bf16.pt"
    assert main(["export", str(DEFAULT), str(out), "--encoder-precision", "bf16"]) == 0
    assert load_checkpoint(out)[0].encoder_precision == "bf16"
    capsys.readouterr()
    cache = tmp_path / "c"
    args = ["evaluate", "--checkpoint", str(out), "--data", str(tiny_data), "--cache-dir", str(cache),
            "--captions-out", str(tmp_path / "caps.json"), "--json", "--beam-size", "2"]
    assert main(args + ["--encoder-precision", "bf16"]) == 0
    assert "encoder precision bf16" in capsys.readouterr().out
    assert [p.name.endswith("-bf16") for p in cache.iterdir()] == [True]
    assert main(args + ["--encoder-precision", "fp32"]) == 0  # a user's override
    assert "encoder precision fp32" in capsys.readouterr().out
    assert sorted(p.name.endswith("-bf16") for p in cache.iterdir()) == [False, True]
    assert main(["caption", str(PHOTOS[0]), "--model", str(out), "--encoder-precision", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]


def test_evaluate_encodes_as_the_model_was_exported_unless_told_otherwise(tiny_data, tmp_path, monkeypatch):
    # like its mirror_views, a model's encoder precision holds for library callers of evaluate too
    from captioner.inference.decode import SearchConfig
    from captioner.evaluation.evaluate import evaluate

    model, _ = load_checkpoint(DEFAULT)
    model.encoder_precision = "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    search = SearchConfig(beam_size=1, max_len=5)
    evaluate(model, tiny_data, "test", search, cache_dir=tmp_path / "own", progress=False)
    assert [p.name.endswith("-bf16") for p in (tmp_path / "own").iterdir()] == [True]
    evaluate(model, tiny_data, "test", search, cache_dir=tmp_path / "asked", progress=False, encoder_precision="fp32")
    assert [p.name.endswith("-bf16") for p in (tmp_path / "asked").iterdir()] == [False]
    monkeypatch.setattr(precision, "native_bf16", lambda: False)  # no native bf16: fp32, as the Captioner does
    evaluate(model, tiny_data, "test", search, cache_dir=tmp_path / "plain", progress=False)
    assert [p.name.endswith("-bf16") for p in (tmp_path / "plain").iterdir()] == [False]
