import pickle

import pytest
import torch

from captioner.models.checkpoint import FORMAT_VERSION, checkpoint_dict, load_checkpoint, save_checkpoint
from captioner.inference.decode import SearchConfig
from captioner.errors import CheckpointError
from captioner.models.model import CaptionModel, ModelConfig
from captioner.data.vocab import Vocab

from conftest import TINY_MODEL


@pytest.fixture
def model():
    torch.manual_seed(0)
    vocab = Vocab.build(["a red square", "a blue circle"], min_count=1)
    return CaptionModel(ModelConfig.from_dict(TINY_MODEL), vocab).eval()


def test_roundtrip_gives_identical_captions(model, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, metrics={"dev": {"CIDEr": 0.5}})
    loaded, ckpt = load_checkpoint(path)
    feats = torch.randn(3, 49, 1280)
    search = SearchConfig(beam_size=2, max_len=5)
    assert loaded.captions(feats, search) == model.captions(feats, search)
    assert ckpt["metrics"]["dev"]["CIDEr"] == 0.5
    assert ckpt["vocab"]["tokens"] == model.vocab.tokens
    assert ckpt["encoder"]["image_size"] == 224 and ckpt["encoder"]["mean"] == 127.0
    assert ckpt["format_version"] == FORMAT_VERSION


def test_half_checkpoint_stores_fp16_and_loads_as_float(model, tmp_path):
    path = tmp_path / "half.pt"
    save_checkpoint(path, model, half=True)
    raw = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in raw["decoder_state"].values() if v.is_floating_point())
    loaded, _ = load_checkpoint(path)
    assert next(loaded.decoder.parameters()).dtype == torch.float32


def test_save_leaves_no_temp_file_and_keeps_old_file_on_failure(model, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_truncated_checkpoint_error_names_the_file(model, tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, model)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(path)


def test_foreign_and_newer_files_are_refused(model, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(other)
    newer = tmp_path / "newer.pt"
    torch.save({**checkpoint_dict(model), "format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "captioner-checkpoint", "x": Payload()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out
