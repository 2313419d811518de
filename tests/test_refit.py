"""`train_on_dev`: a final refit on the train and dev photos together, keeping each stage's
last epoch, since dev can no longer judge a model trained on it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import captioner.training.train as T
from captioner.models.checkpoint import read_checkpoint

from test_train_smoke import tiny_config


def _split(data, name: str) -> list[str]:
    return (data / "Flickr8k_text" / f"Flickr_8k.{name}Images.txt").read_text().split()


@pytest.fixture
def falling_dev(monkeypatch):
    """Dev CIDEr-D that falls every epoch: only the first epoch is ever 'best' on dev."""
    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5])

    def fake_validate(model, cache, records, cfg, env=None):
        s = next(scores)
        return {"Bleu_4": s, "CIDEr": s}
    monkeypatch.setattr(T, "validate", fake_validate)


def _run(tiny_data, tiny_model_file, out, **kw):
    result = T.train(tiny_config(tiny_data, out, tiny_model_file, epochs=3, patience=1, scst_epochs=1,
                                 scst_samples=2, scst_batch_size=4, scst_max_len=6, **kw))
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return result, history


@pytest.mark.slow
def test_a_plain_run_keeps_the_best_dev_epoch_and_stops_early(tiny_data, tiny_model_file, tmp_path, falling_dev):
    out = tmp_path / "plain"
    _, history = _run(tiny_data, tiny_model_file, out)
    assert [h["phase"] for h in history] == ["xe", "xe", "scst"]  # cross-entropy stopped after epoch 2
    assert read_checkpoint(out / "best-xe.pt")["metrics"]["epoch"] == 1
    assert read_checkpoint(out / "best.pt")["metrics"]["epoch"] == 1


@pytest.mark.slow
def test_a_refit_trains_on_dev_too_and_keeps_each_stages_last_epoch(tiny_data, tiny_model_file, tmp_path,
                                                                   falling_dev):
    out = tmp_path / "refit"
    _, history = _run(tiny_data, tiny_model_file, out, train_on_dev=True, mirror_prob=0.5)
    assert [h["phase"] for h in history] == ["xe", "xe", "xe", "scst"]  # no early stop
    # dev is scored only where a stage ends (it judges nothing in a refit)
    assert [h["dev"] is not None for h in history] == [False, False, True, True]
    assert log_says_not_scored(out)
    assert read_checkpoint(out / "best-xe.pt")["metrics"]["epoch"] == 3  # SCST started from the last XE epoch
    assert read_checkpoint(out / "best.pt")["metrics"]["epoch"] == 4
    train, dev = _split(tiny_data, "train"), _split(tiny_data, "dev")
    log = (out / "train.log").read_text()
    assert f"{len(train) + len(dev)} train / {len(dev)} dev images" in log
    assert "train_on_dev" in log and "*kept*" in log
    # the mirror images of the dev photos were encoded for training too
    names = json.loads(next((out / "cache").glob("*-mirror")).joinpath("index.json").read_text())["names"]
    assert sorted(names) == sorted(train + dev)


def log_says_not_scored(out) -> bool:
    return "dev not scored" in (out / "train.log").read_text()


@pytest.mark.slow
def test_a_refit_vocabulary_holds_words_only_dev_captions_use(tiny_data, tiny_model_file, tmp_path, falling_dev):
    dev = set(_split(tiny_data, "dev"))
    token_file = tiny_data / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token_file.read_text().splitlines()
    token_file.write_text("".join(
        (f"{line} zebra\n" if line.split("#")[0] in dev else line + "\n") for line in lines))
    words = {}
    for name, kw in (("plain", {}), ("refit", {"train_on_dev": True})):
        T.train(tiny_config(tiny_data, tmp_path / name, tiny_model_file, epochs=1, **kw))
        words[name] = read_checkpoint(tmp_path / name / "best.pt")["vocab"]
    assert "zebra" not in json.dumps(words["plain"])
    assert "zebra" in json.dumps(words["refit"])


def test_train_on_dev_is_a_config_switch():
    from captioner.training.config import load_train_config
    assert load_train_config(None, []).train_on_dev is False
    assert load_train_config(None, ["train_on_dev=true"]).train_on_dev is True


REPO = Path(__file__).resolve().parents[1]


def test_the_release_script_names_a_missing_input_before_anything_runs(tmp_path):
    run = tmp_path / "run"
    for env, says in (({"SEARCH_FROM": str(tmp_path / "nothing.json")}, "SEARCH_FROM="),
                      ({"CONFIG": str(tmp_path / "no-config.json")}, "CONFIG=")):
        done = subprocess.run(["bash", "release/release.sh", str(tmp_path / "data"), str(run)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert done.returncode == 2 and says in done.stderr and "no such file" in done.stderr
        assert not run.exists()


def test_the_retrain_script_names_a_missing_input_before_anything_runs(tmp_path):
    run = tmp_path / "run"
    for env, args, says in (({"CONFIG": str(tmp_path / "no-config.json")}, [str(tmp_path)], "CONFIG="),
                            ({}, [str(tmp_path / "no-data")], "no such dataset folder")):
        done = subprocess.run(["bash", "release/retrain.sh", *args, str(run)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert done.returncode == 2 and says in done.stderr
        assert not run.exists()
    done = subprocess.run([sys.executable, "release/reproduce.py", "--run", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no best.pt" in done.stderr
