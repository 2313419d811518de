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


# --- crafted checkpoints: a valid checksum is not trust -----------------------------------------

def crafted(model, tmp_path, name: str, change) -> "Path":
    """The model's checkpoint dict, changed by `change(ckpt)`, written with a fresh checksum."""
    from builders import write_unchecked

    ckpt = checkpoint_dict(model)
    change(ckpt)
    path = tmp_path / f"{name}.pt"
    write_unchecked(ckpt, path)
    return path


CRAFTED = {
    "weights_package": (lambda c: c["encoder"].update(weights_package="evil_module"), "encoder.weights_package"),
    "encoder_name": (lambda c: c["encoder"].update(name="os"), "encoder.name"),
    "image_size_huge": (lambda c: c["encoder"].update(image_size=100_000), "encoder.image_size"),
    "image_size_zero": (lambda c: c["encoder"].update(image_size=0), "encoder.image_size"),
    "image_size_bool": (lambda c: c["encoder"].update(image_size=True), "encoder.image_size"),
    "std_zero": (lambda c: c["encoder"].update(std=0.0), "encoder.std"),
    "std_nan": (lambda c: c["encoder"].update(std=float("nan")), "encoder.std"),
    "mean_inf": (lambda c: c["encoder"].update(mean=float("inf")), "encoder.mean"),
    "length_penalty_nan": (lambda c: c["decode"].update(length_penalty=float("nan")), "decode.length_penalty"),
    "length_penalty_huge": (lambda c: c["decode"].update(length_penalty=1e9), "decode.length_penalty"),
    "no_repeat_ngram": (lambda c: c["decode"].update(no_repeat_ngram=-3), "decode.no_repeat_ngram"),
    "decode_unknown": (lambda c: c["decode"].update(run="rm -rf"), "decode.run"),
    "vocab_empty": (lambda c: c["vocab"].update(tokens=[]), "vocab.tokens"),
    "vocab_not_text": (lambda c: c["vocab"]["tokens"].insert(4, 7), "vocab.tokens[4]"),
    "decoder_unknown": (lambda c: c["model"].update(decoder="exec"), "model.decoder"),
    "hidden_dim_huge": (lambda c: c["model"]["decoder_params"].update(hidden_dim=10 ** 9),
                        "model.decoder_params.hidden_dim"),
    "dropout": (lambda c: c["model"]["decoder_params"].update(dropout=7.0), "model.decoder_params.dropout"),
    "param_unknown": (lambda c: c["model"]["decoder_params"].update(evil=1), "model.decoder_params.evil"),
    "nan_weights": (lambda c: c["decoder_state"][next(iter(c["decoder_state"]))].fill_(float("nan")),
                    "decoder_state."),
    "sparse_weights": (lambda c: _replace_first(c, lambda w: w.to_sparse()), "decoder_state."),
    "complex_weights": (lambda c: _replace_first(c, lambda w: w.to(torch.complex64)), "decoder_state."),
    "bool_weights": (lambda c: _replace_first(c, lambda w: w > 0), "decoder_state."),
    "metrics_not_a_table": (lambda c: c.update(metrics="abc"), "metrics"),
    "metrics_tensor": (lambda c: c.update(metrics={"cider": torch.ones(2)}), "metrics.cider"),
}


def _replace_first(ckpt: dict, change) -> None:
    state = ckpt["decoder_state"]
    name = next(iter(state))
    state[name] = change(state[name])


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_checkpoints_are_refused_naming_the_field(model, tmp_path, case):
    change, field = CRAFTED[case]
    path = crafted(model, tmp_path, case, change)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert f"{path}: refused: field {field}" in message and "\n" not in message, message


@pytest.mark.parametrize("case", ["length_penalty_nan", "no_repeat_ngram", "decode_unknown", "metrics_tensor"])
def test_what_the_loader_refuses_is_never_written(model, tmp_path, case):
    """`export --no-repeat-ngram -1` once wrote a file every later load refused, over a good one."""
    from captioner.models.checkpoint import write_checkpoint

    change, field = CRAFTED[case]
    ckpt = checkpoint_dict(model)
    change(ckpt)
    path = tmp_path / "good.pt"
    path.write_bytes(b"the good model")
    with pytest.raises(CheckpointError, match=rf"good\.pt: not written, as captioner could not load it: field {field}"):
        write_checkpoint(ckpt, path)
    assert path.read_bytes() == b"the good model"


@pytest.mark.parametrize("version", [-1, 0, True, "1", None])
def test_a_format_version_that_is_not_one_is_refused(model, tmp_path, version):
    from builders import write_unchecked

    path = tmp_path / "v.pt"
    write_unchecked({**checkpoint_dict(model), "format_version": version}, path)
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)


def test_a_config_that_does_not_make_the_saved_weights_is_refused_before_building(model, tmp_path, monkeypatch):
    """The model is built on the meta device first: a config whose weights differ from the
    file's (here 16x the hidden size, within the ranges) never allocates them."""
    path = crafted(model, tmp_path, "wide", lambda c: c["model"]["decoder_params"].update(hidden_dim=24 * 16))
    with pytest.raises(CheckpointError, match=r"decoder_state\.\S+: the config makes \(\d+"):
        load_checkpoint(path)


def test_the_shipped_default_passes_the_validator():
    from captioner.inference.api import default_model_path
    from captioner.models.checkpoint import read_checkpoint

    read_checkpoint(default_model_path())  # validates
