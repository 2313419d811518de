"""SCST soups (`scst_soup`): several self-critical trajectories from one run's cross-entropy
weights, averaged weight by weight into its best.pt."""
import json
from dataclasses import replace

import pytest
import torch

from captioner.inference.api import Captioner
from captioner.models.average import average_checkpoint
from captioner.models.checkpoint import read_checkpoint
from captioner.errors import ConfigError
from captioner.training.soup import soup_members
from captioner.training.train import train

from test_train_smoke import tiny_config


def soup_config(data, out, model_file, **kw):
    return tiny_config(data, out, model_file, **{"epochs": 2, "scst_epochs": 2, "scst_soup": 2, **kw})


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_a_soup_keeps_the_mean_of_both_trajectories_epochs(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    cfg = soup_config(tiny_data, out, tiny_model_file)
    result = train(cfg)
    members = soup_members(cfg, out)
    assert [str(p.relative_to(out)) for p in members] == [
        "epochs/epoch-3.pt", "epochs/epoch-4.pt", "scst-2/epochs/epoch-1.pt", "scst-2/epochs/epoch-2.pt"]
    assert all(p.is_file() for p in members)  # kept without keep_epochs: the soup needs them
    assert not (out / "epochs" / "epoch-1.pt").exists()  # cross-entropy epochs are not
    best = read_checkpoint(out / "best.pt")
    assert_same_weights(best["decoder_state"], average_checkpoint(members)["decoder_state"])
    soup = json.loads((out / "soup.json").read_text())
    assert soup["members"] == best["metrics"]["soup_of"] == [str(p.relative_to(out)) for p in members]
    assert soup["dev"] == best["metrics"]["dev"]
    assert result["best_dev_CIDEr"] == soup["dev"]["CIDEr"]
    # The two trajectories differ (another seed), and both start from best-xe.pt.
    first, second = (read_checkpoint(p)["decoder_state"] for p in (members[0], members[2]))
    assert not torch.equal(first["out.weight"], second["out.weight"])
    sub = json.loads((out / "scst-2" / "config.json").read_text())
    assert (sub["epochs"], sub["seed"], sub["scst_soup"], sub["init_checkpoint"]) == (
        0, cfg.seed + 1, 1, str(out / "best-xe.pt"))
    assert Captioner.load(out / "best.pt").caption(sorted((tiny_data / "Images").iterdir())[0],
                                                   beam_size=2, max_len=6).words


def test_the_second_trajectory_is_the_scst_run_the_cli_would_train(tiny_data, tiny_model_file, tmp_path):
    """What the docs say a user can run by hand: `--set epochs=0 --set seed=1 --set
    init_checkpoint=RUN/best-xe.pt` trains the same weights as the soup's second trajectory."""
    out = tmp_path / "run"
    cfg = soup_config(tiny_data, out, tiny_model_file)
    train(cfg)
    by_hand = tmp_path / "by-hand"
    train(replace(cfg, out=str(by_hand), epochs=0, seed=1, scst_soup=1, keep_epochs=True,
                  init_checkpoint=str(out / "best-xe.pt")))
    for n in (1, 2):
        assert_same_weights(read_checkpoint(by_hand / "epochs" / f"epoch-{n}.pt")["decoder_state"],
                            read_checkpoint(out / "scst-2" / "epochs" / f"epoch-{n}.pt")["decoder_state"])


def test_a_run_killed_before_its_soup_finishes_it_on_resume(tiny_data, tiny_model_file, tmp_path, monkeypatch):
    import captioner.training.train as T

    out = tmp_path / "run"
    cfg = soup_config(tiny_data, out, tiny_model_file)
    real = T.train_soup
    monkeypatch.setattr(T, "train_soup", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert not (out / "soup.json").exists()
    main_only = read_checkpoint(out / "best.pt")["decoder_state"]
    monkeypatch.setattr(T, "train_soup", real)
    train(cfg, resume=True)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the main trajectory was not trained again
    best = read_checkpoint(out / "best.pt")
    assert_same_weights(best["decoder_state"], average_checkpoint(soup_members(cfg, out))["decoder_state"])
    assert not torch.equal(best["decoder_state"]["out.weight"], main_only["out.weight"])


def test_a_soup_that_cannot_be_made_is_refused_naming_the_field(tiny_data, tiny_model_file, tmp_path):
    with pytest.raises(ConfigError, match="field scst_soup: must be a finite number at least 1"):
        soup_config(tiny_data, tmp_path / "run", tiny_model_file, scst_soup=0)
