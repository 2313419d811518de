"""The recognition head of a tuned encoder: a sidecar bound to its checkpoint, validated as
untrusted input, and run on the tuned top's output the caption search computes anyway."""
from __future__ import annotations

import pytest
import torch

from captioner.data.vocab import Vocab
from captioner.errors import CheckpointError
from captioner.inference.decode import SearchConfig
from captioner.models.checkpoint import (HEAD_SHAPE, load_checkpoint, load_recognition_head, read_checkpoint,
                                         recognition_head_path, save_checkpoint, save_recognition_head)
from captioner.models.model import CaptionModel, get_model_config
from captioner.models.objects import ObjectNamer
from captioner.models.recognition import Recognizer

TUNED = "efficientnet-lite0-tuned"


def _head(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HEAD_SHAPE, generator=g) * 0.05, torch.randn(HEAD_SHAPE[0], generator=g)


@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory):
    """A small tuned show-attend-tell checkpoint and a head made for it."""
    torch.manual_seed(0)
    cfg = get_model_config("show-attend-tell")
    vocab = Vocab.build(["a cat sits on a mat", "a dog runs on the grass", "a man rides a horse"] * 5, 1)
    model = CaptionModel(cfg.__class__(**{**cfg.to_dict(), "encoder": TUNED}), vocab).eval()
    path = tmp_path_factory.mktemp("tuned") / "m.pt"
    save_checkpoint(path, model, half=True)
    w, b = _head()
    save_recognition_head(recognition_head_path(path), w, b, read_checkpoint(path)["checksum"])
    return path


def test_the_sidecar_sits_next_to_its_checkpoint():
    assert recognition_head_path("/x/default.pt").name == "default.recognition.pt"


def test_a_checkpoint_loads_with_its_head_and_objects_recognise_with_it(tuned_file):
    model, _ = load_checkpoint(tuned_file)
    w, b = _head()
    assert model.recognition_head is not None
    torch.testing.assert_close(model.recognition_head.weight, w.half().float())
    assert "recognition_head" not in str(list(model.state_dict()))  # never saved with the model
    assert ObjectNamer(model).recognizer.mode == "head"
    model.attach_recognition_head(None)
    assert ObjectNamer(model).recognizer.mode == "stock"


@pytest.mark.parametrize("mode", ["head", "stock"])
def test_the_tuned_top_runs_once_for_recognition_and_search_with_the_same_captions(tuned_file, mode):
    model, _ = load_checkpoint(tuned_file)
    namer = ObjectNamer(model, threshold=0.0, mode=mode)  # every photo gets a constraint
    calls = []
    namer.model.decoder.top.register_forward_hook(lambda *a: calls.append(1))
    feats = torch.randn(3, 49, 448)
    search = SearchConfig(beam_size=2, max_len=5)
    named = namer.generate(feats, search)
    # before, the top ran once per search (and once more for "tuned" recognition)
    assert len(calls) == 1
    assert [o[0].name for o in named.objects] == [o[0].name for o in namer.recognize(feats)]
    # the same searches through WithTunedTop, which runs the top itself
    from captioner.inference.decode import constrained_beam_search
    v = namer.model.vocab
    decode = dict(bos_id=v.bos_id, eos_id=v.eos_id, pad_id=v.pad_id, cfg=search,
                  banned_ids=(v.bos_id, v.unk_id), base_vocab=namer.base_vocab)
    plain, _ = constrained_beam_search(namer.model.decoder, feats, constraints=[[]] * 3, **decode)
    index = {t: i for i, t in enumerate(v.tokens)}
    rows = [b for b, e in enumerate(named.constraint) if e is not None]
    for b in range(3):
        want = plain.tokens[b, 0]
        if b in rows:
            phrase = [index[t] for t in named.constraint[b].tokens]
            one, _ = constrained_beam_search(namer.model.decoder, feats[b:b + 1], constraints=[phrase], **decode)
            want = one.tokens[0, 0]
        got = named.hyps.tokens[b, 0]
        n = max(len(got), len(want))
        pad = lambda t: torch.nn.functional.pad(t, (0, n - len(t)), value=v.pad_id)  # noqa: E731
        assert torch.equal(pad(got), pad(want))


def test_a_head_made_for_another_checkpoint_falls_back_to_the_stock_classifier(tuned_file, tmp_path):
    model, _ = load_checkpoint(tuned_file)
    other = tmp_path / "other.pt"
    save_checkpoint(other, model, half=True, metrics={"CIDEr": 0.1})  # another file: another checksum
    recognition_head_path(other).write_bytes(recognition_head_path(tuned_file).read_bytes())
    with pytest.warns(UserWarning, match="made for another checkpoint"):
        loaded, _ = load_checkpoint(other)
    assert loaded.recognition_head is None and ObjectNamer(loaded).recognizer.mode == "stock"


def _bad(tmp_path, **change):
    w, b = _head()
    path = tmp_path / "h.recognition.pt"
    save_recognition_head(path, w, b, "sha256:x")
    head = torch.load(path, weights_only=True)
    head.update(change)
    torch.save({k: v for k, v in head.items() if v is not None}, path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"weight": torch.zeros(1000, 1281)}, "field weight has shape"),
    ({"bias": torch.zeros(999)}, "field bias has shape"),
    ({"weight": torch.zeros(HEAD_SHAPE, dtype=torch.int32)}, "float16 or float32"),
    ({"bias": torch.full((1000,), float("nan"))}, "NaN"),
    ({"weight": None}, "field weight must be"),
    ({"format": "something"}, "not a recognition head"),
    ({"format_version": 9}, "format version 9"),
    ({"extra": 1}, "unknown field"),
    ({"checkpoint_checksum": 3}, "checkpoint_checksum must be a string"),
])
def test_a_malformed_head_is_refused_by_name(tmp_path, change, message):
    path = _bad(tmp_path, **change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_recognition_head(path, "sha256:x")
    assert str(path) in str(e.value)


def test_a_file_that_is_no_torch_file_is_refused(tmp_path):
    path = tmp_path / "h.recognition.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable recognition head"):
        load_recognition_head(path, "sha256:x")


def test_a_head_mode_needs_a_head_and_a_tuned_top():
    from captioner.models.encoders import get_encoder_config

    with pytest.raises(ValueError, match="needs a recognition head"):
        Recognizer(get_encoder_config(TUNED), "head", torch.nn.Identity())
    with pytest.raises(ValueError, match="needs the model's tuned top"):
        Recognizer(get_encoder_config(TUNED), "head", None, torch.nn.Linear(1280, 1000))


def test_export_carries_the_head_to_the_file_it_writes_and_drops_a_stale_one(tuned_file, tmp_path):
    from captioner.cli import main

    out = tmp_path / "shipped.pt"
    assert main(["export", str(tuned_file), str(out), "--length-penalty", "0.5"]) == 0
    exported, _ = load_checkpoint(out)
    assert exported.recognition_head is not None  # bound to the new file's checksum, not the old one's
    torch.testing.assert_close(exported.recognition_head.weight, _head()[0].half().float())
    # a model without a head leaves no sidecar of an earlier export behind
    plain = tmp_path / "plain.pt"
    model, _ = load_checkpoint(tuned_file)
    model.attach_recognition_head(None)
    save_checkpoint(plain, model)
    assert main(["export", str(plain), str(out)]) == 0
    assert not recognition_head_path(out).exists()
    assert load_checkpoint(out)[0].recognition_head is None
