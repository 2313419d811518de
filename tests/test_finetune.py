"""Fine-tuning on corrected captions: the new checkpoint learns them and can be served."""
from __future__ import annotations

import json

import pytest

from captioner.inference import precision
from captioner.inference.api import Captioner
from captioner.models.checkpoint import read_checkpoint
from captioner.cli import main
from captioner.service.feedback import FeedbackStore, Served
from captioner.training.train import train

from test_train_smoke import tiny_config

pytestmark = pytest.mark.slow  # each test trains a base model first


@pytest.mark.parametrize("shipped", ["fp32", "bf16"])
def test_finetune_learns_corrections_and_writes_a_servable_checkpoint(tiny_data, tiny_model_file, tmp_path, capsys,
                                                                      monkeypatch, shipped):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, tiny_model_file, epochs=2))
    base = run / "best.pt"
    if shipped == "bf16":  # a model shipped for bf16 inference, on a CPU that has it: still trained in fp32
        monkeypatch.setattr(precision, "native_bf16", lambda: True)
        assert main(["export", str(base), str(run / "bf16.pt"), "--precision", "bf16"]) == 0
        base = run / "bf16.pt"
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    photos = sorted((tiny_data / "Images").glob("*_red*square.jpg"))[:2]
    for photo in photos:  # users insist these red squares are green circles
        cid = store.record_caption(Served("api", "u", "exp", "base", True, "tiny-sat", "v", "a red square", -1.0,
                                          {}, image=photo.read_bytes()))
        store.add_feedback(cid, rating=1, correction="a green circle")
    store.close()

    out = tmp_path / "models" / "v2.pt"
    assert main(["finetune", "--db", str(db), "--checkpoint", str(base), "--data", str(tiny_data), "--out",
                 str(out), "--epochs", "4", "--lr", "0.01", "--replay-ratio", "2", "--cache-dir",
                 str(run / "cache"), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["corrections"] == 2 and report["replayed_images"] == 4
    assert report["nll_after"]["corrections"] < 0.7 * report["nll_before"]["corrections"]
    assert report["nll_after"]["original_dev"] < report["nll_before"]["original_dev"] + 1.0  # not forgotten

    ckpt = read_checkpoint(out)
    assert ckpt["finetune"]["base"] == str(base) and ckpt["finetune"]["corrections"] == 2
    assert ckpt["decode"]["precision"] == shipped  # the base's inference precision carries over
    cap = Captioner.load(out).caption(photos[0], beam_size=2, max_len=6)
    assert cap.words and cap.attention.shape == (len(cap.words), 7, 7)


def test_finetune_refuses_without_corrections_or_over_its_base(tiny_data, tmp_path, capsys):
    db = tmp_path / "f.db"
    FeedbackStore(db).close()
    args = ["finetune", "--db", str(db), "--checkpoint", "base.pt", "--data", str(tiny_data)]
    assert main(args + ["--out", "new.pt"]) == 2
    assert "no corrected captions" in capsys.readouterr().err
    assert main(args + ["--out", "base.pt"]) == 2
    assert "overwrite the base" in capsys.readouterr().err
