"""`train_on_dev`: a final refit on the train and dev photos together, keeping each stage's
last epoch, since dev can no longer judge a model trained on it."""
import json
import os
import subprocess
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


def test_a_plain_run_keeps_the_best_dev_epoch_and_stops_early(tiny_data, tiny_model_file, tmp_path, falling_dev):
    out = tmp_path / "plain"
    _, history = _run(tiny_data, tiny_model_file, out)
    assert [h["phase"] for h in history] == ["xe", "xe", "scst"]  # cross-entropy stopped after epoch 2
    assert read_checkpoint(out / "best-xe.pt")["metrics"]["epoch"] == 1
    assert read_checkpoint(out / "best.pt")["metrics"]["epoch"] == 1


def test_a_refit_trains_on_dev_too_and_keeps_each_stages_last_epoch(tiny_data, tiny_model_file, tmp_path,
                                                                   falling_dev):
    out = tmp_path / "refit"
    _, history = _run(tiny_data, tiny_model_file, out, train_on_dev=True, mirror_prob=0.5)
    assert [h["phase"] for h in history] == ["xe", "xe", "xe", "scst"]  # no early stop
    assert read_checkpoint(out / "best-xe.pt")["metrics"]["epoch"] == 3  # SCST started from the last XE epoch
    assert read_checkpoint(out / "best.pt")["metrics"]["epoch"] == 4
    train, dev = _split(tiny_data, "train"), _split(tiny_data, "dev")
    log = (out / "train.log").read_text()
    assert f"{len(train) + len(dev)} train / {len(dev)} dev images" in log
    assert "train_on_dev" in log and "*kept*" in log
    # the mirror images of the dev photos were encoded for training too
    names = json.loads(next((out / "cache").glob("*-mirror")).joinpath("index.json").read_text())["names"]
    assert sorted(names) == sorted(train + dev)


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


def _bash(script: str, *args, env=None):
    return subprocess.run(["bash", str(REPO / "benchmarks" / script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_ship_default_refuses_to_tune_a_refit_on_dev(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train_on_dev": True}))
    done = _bash("ship_default.sh", tmp_path / "data", run)
    assert done.returncode == 2 and "train_on_dev" in done.stderr and "SEARCH_FROM" in done.stderr
    assert not (run / "length_penalty.json").exists()


def test_ship_default_takes_a_refits_search_from_the_train_only_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train_on_dev": True}))
    tuned = tmp_path / "length_penalty.json"
    tuned.write_text(json.dumps({"split": "dev", "beam_size": 3, "best_length_penalty": 0.5,
                                 "best_no_repeat_ngram": 3, "table": []}))
    done = _bash("ship_default.sh", tmp_path / "data", run, env={"SEARCH_FROM": str(tuned)})
    assert done.returncode != 0  # no best.pt to export: it stops there, after taking the search
    taken = json.loads((run / "length_penalty.json").read_text())
    assert taken == {"split": "dev", "beam_size": 3, "taken_from": str(tuned), "best_length_penalty": 0.5,
                     "best_no_repeat_ngram": 3}


def test_retrain_default_refuses_a_refit_without_its_search_before_training(tmp_path):
    config = tmp_path / "refit.json"
    config.write_text(json.dumps({"train_on_dev": True}))
    run = tmp_path / "run"
    done = _bash("retrain_default.sh", tmp_path / "data", run, env={"CONFIG": str(config), "SEARCH_FROM": ""})
    assert done.returncode == 2 and "SEARCH_FROM" in done.stderr
    assert not run.exists()  # nothing prepared, nothing trained


def test_a_missing_search_file_is_named_before_anything_runs(tmp_path):
    run = tmp_path / "run"
    missing = tmp_path / "nowhere" / "length_penalty.json"
    for script in ("retrain_default.sh", "ship_default.sh"):
        done = _bash(script, tmp_path / "data", run, env={"SEARCH_FROM": str(missing)})
        assert done.returncode == 2 and f"SEARCH_FROM={missing}: no such file" in done.stderr, script
        assert not run.exists()


def test_a_folder_without_a_config_is_no_refit_and_gets_no_traceback(tmp_path):
    """An ensemble's folder has no config.json: shipping it tunes its search on dev as before."""
    check = subprocess.run(["bash", "-c", f'set -eu; source benchmarks/search_from.sh; '
                                          f'check_search_from "{tmp_path}/config.json"; echo passed'],
                           cwd=REPO, capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items() if k != "SEARCH_FROM"})
    assert check.returncode == 0 and check.stdout.strip() == "passed" and check.stderr == ""


def test_a_bad_mirror_views_setting_is_named_before_anything_runs(tmp_path):
    run = tmp_path / "run"
    for script in ("retrain_default.sh", "ship_default.sh"):
        done = _bash(script, tmp_path / "data", run, env={"MIRROR_VIEWS": "yes", "SEARCH_FROM": ""})
        assert done.returncode == 2 and "MIRROR_VIEWS=yes: must be on or off" in done.stderr, script
        assert not run.exists()
