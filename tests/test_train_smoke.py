"""Train a tiny model for a few steps on generated photos, save, reload, caption, resume."""
import json
from pathlib import Path

import pytest

from captioner.inference.api import Captioner
from captioner.models.checkpoint import read_checkpoint
from captioner.training.config import NOT_LEARNED, load_train_config
from captioner.errors import ConfigError, DataError
from captioner.training.dataset import configured_model
from captioner.training.train import train


def tiny_config(data, out, model_file, **kw):
    sets = {"data": str(data), "out": str(out), "model": str(model_file), "cache_dir": str(out / "cache"),
            "epochs": 3, "batch_size": 8, "warmup_steps": 2, "lr": 0.01, "patience": 5,
            "val_beam_size": 2, "val_max_len": 6, "progress": False, "min_word_count": 1,
            # the recipe's tuned encoder, mirror images and self-critical soup are switched on by the
            # tests that are about them; a tiny run is plain cross-entropy on the model's own encoder
            "encoder": "", "mirror_prob": 0.0, "scst_epochs": 0, "scst_soup": 1}
    sets.update(kw)
    return load_train_config(None, [f"{k}={v}" for k, v in sets.items()])


def train_killed_after(epochs: int, cfg) -> None:
    """Train per `cfg`, killed (KeyboardInterrupt) once `epochs` epochs have written last.pt."""
    import captioner.training.train as T

    real_plot, calls = T._plot, {"n": 0}

    def plot_then_maybe_die(history, path):
        real_plot(history, path)
        calls["n"] += 1
        if calls["n"] == epochs:
            raise KeyboardInterrupt

    T._plot = plot_then_maybe_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        T._plot = real_plot


def test_train_save_reload_caption(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(tiny_data, out, tiny_model_file))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]["dev"]) >= {"Bleu_4", "CIDEr"}
    assert result["best_dev_CIDEr"] == max(h["dev"]["CIDEr"] for h in history)
    for name in ("best.pt", "last.pt", "config.json", "curves.png", "train.log"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["epochs"] == 3

    cap = Captioner.load(out / "best.pt").caption(sorted((tiny_data / "Images").iterdir())[0], beam_size=2,
                                                  max_len=6)
    vocab = set(Captioner.load(out / "best.pt").model.vocab.tokens)
    assert cap.words and all(w in vocab for w in cap.words)
    assert cap.attention.shape == (len(cap.words), 7, 7)


def test_resume_continues_where_it_stopped(tiny_data, tiny_model_file, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config(tiny_data, full, tiny_model_file, epochs=3))
    # The same run, interrupted after epoch 2 (once last.pt is written), then resumed.
    train_killed_after(2, tiny_config(tiny_data, part, tiny_model_file, epochs=3))
    train(tiny_config(tiny_data, part, tiny_model_file, epochs=3), resume=True)
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)


def test_config_overrides_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="no_such_field"):
        load_train_config(None, ["no_such_field=1"])
    with pytest.raises(ConfigError, match="epochs"):
        load_train_config(None, ["epochs=many"])
    bad = tmp_path / "c.json"
    bad.write_text('{"epochs": 3,\n "lr": }')
    with pytest.raises(ConfigError, match="line 2"):
        load_train_config(bad)
    assert load_train_config(None, ["epochs=4", "progress=false"]).epochs == 4


def test_encoder_field_swaps_the_models_encoder():
    own = configured_model(load_train_config(None, ["model=show-attend-tell", "encoder="]))
    assert own.encoder == "efficientnet-lite0" and own.name == "show-attend-tell"
    swapped = configured_model(load_train_config(None, ["model=show-attend-tell", "encoder=efficientnet-lite2"]))
    assert (swapped.name, swapped.encoder) == ("show-attend-tell@efficientnet-lite2", "efficientnet-lite2")
    assert swapped.decoder_params == own.decoder_params
    recipe = configured_model(load_train_config(None, ["model=show-attend-tell"]))  # the default's encoder
    assert (recipe.name, recipe.encoder) == ("show-attend-tell@efficientnet-lite0-tuned", "efficientnet-lite0-tuned")
    with pytest.raises(ConfigError, match="encoder.*efficientnet-lite9"):
        configured_model(load_train_config(None, ["encoder=efficientnet-lite9"]))


def test_fresh_run_refuses_to_overwrite_an_existing_run(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=1))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(tiny_data, out, tiny_model_file, epochs=1))
    assert (out / "last.pt").read_bytes() == before


def test_self_critical_stage_follows_cross_entropy_and_resumes(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    kw = dict(epochs=2, scst_epochs=2, scst_lr=0.001, scst_samples=3, scst_batch_size=6, scst_max_len=6)
    train(tiny_config(tiny_data, out, tiny_model_file, **kw))
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["xe", "xe", "scst", "scst"]
    xe_best = read_checkpoint(out / "best-xe.pt")  # the starting point, kept to measure the gain
    assert xe_best["metrics"]["epoch"] <= 2
    for h in history[2:]:
        assert 0.0 <= h["baseline"] and 0.0 <= h["reward"] <= 10.0
        assert "CIDEr" in h["dev"]
    # SCST alone on a finished model: init_checkpoint, no cross-entropy epochs
    only = tmp_path / "only"
    train(tiny_config(tiny_data, only, tiny_model_file, epochs=0, scst_epochs=1, scst_samples=2,
                      scst_batch_size=4, scst_max_len=6,
                      init_checkpoint=str(out / "best.pt")))
    history = [json.loads(x) for x in (only / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["scst"]
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(tiny_data, only, tiny_model_file, epochs=0, scst_epochs=1))


def test_resume_with_no_run_in_the_folder_is_refused(tiny_data, tiny_model_file, tmp_path):
    """`--resume --epochs 1` into an empty folder once started a full default run instead."""
    with pytest.raises(ConfigError, match="holds no run to continue"):
        train(tiny_config(tiny_data, tmp_path / "none", tiny_model_file, epochs=1), resume=True, epochs=1)
    assert not (tmp_path / "none" / "config.json").exists()


@pytest.mark.parametrize("override, says", [
    ("batch_size=0", "field batch_size: must be a finite number at least 1"),
    ("epochs=-1", "field epochs: must be a finite number at least 0"),
    ("lr=nan", "field lr: must be a finite number above 0"),
    ("threads=-1", "field threads"),
    ("scst_samples=1", "field scst_samples: must be at least 2"),
    ("label_smoothing=1", "field label_smoothing"),
])
def test_config_values_out_of_range_are_refused_by_name(override, says):
    with pytest.raises(ConfigError, match=says):
        load_train_config(None, [override])


def test_no_self_critical_stage_means_no_soup():
    """The quick run of docs/training.md: `--set scst_epochs=0` with the default soup of two."""
    cfg = load_train_config(None, ["epochs=3", "scst_epochs=0"])
    assert cfg.scst_soup == 2 and cfg.scst_epochs == 0
    with pytest.raises(ConfigError, match="nothing to train"):
        load_train_config(None, ["epochs=0", "scst_epochs=0"])


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", None])
def test_a_config_file_that_is_not_json_text_is_refused(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content) if content is not None else path.mkdir()
    with pytest.raises(ConfigError, match="config.json: "):
        load_train_config(path)


def test_fields_whose_trials_lost_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="ema_decay was removed in captioner 0.2"):
        load_train_config(None, ["ema_decay=0.99"])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"epochs": 2, "crop_scale": 0.8, "batching": "caption"}))
    with pytest.raises(ConfigError, match="batching, crop_scale were removed"):
        load_train_config(old)


def test_the_defaults_are_the_shipped_recipe():
    """TrainConfig() is what the shipped model trained with; its release run adds only the refit."""
    import torch

    from captioner.models.checkpoint import read_checkpoint

    shipped = read_checkpoint("default")["train_config"]
    release = json.loads((Path(__file__).parents[1] / "configs" / "flickr8k-release.json").read_text())
    assert release == {"train_on_dev": True}
    learned = {k: v for k, v in load_train_config(None, ["train_on_dev=true"]).to_dict().items()
               if k not in NOT_LEARNED}
    assert learned == {k: shipped[k] for k in learned}
    assert torch.get_num_threads() >= 1


def test_resume_with_more_epochs_extends_a_finished_run(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=1))
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=1), resume=True, epochs=3)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    with pytest.raises(ConfigError, match="already trained 3 epochs"):
        train(tiny_config(tiny_data, out, tiny_model_file), resume=True, epochs=2)


@pytest.mark.slow
def test_resume_is_bit_identical_for_the_shipped_architecture(tiny_data, tiny_model_file, tmp_path):
    """Tuned encoder top and mirror images, as the default trains: 2 epochs straight and 1 + resume
    give the same weights to the bit (model construction must not move the resumed RNG)."""
    import torch

    from captioner.models.checkpoint import read_checkpoint

    kw = dict(epochs=2, encoder="efficientnet-lite0-tuned", mirror_prob=0.5, amp="off")
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config(tiny_data, full, tiny_model_file, **kw))
    train_killed_after(1, tiny_config(tiny_data, part, tiny_model_file, **kw))
    train(tiny_config(tiny_data, part, tiny_model_file, **kw), resume=True)
    a, b = (read_checkpoint(run / "last.pt")["decoder_state"] for run in (full, part))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_dataset_a_run_cannot_learn_from_is_refused_before_any_feature(tmp_path, tiny_model_file):
    from builders import make_manifest

    path, _ = make_manifest(tmp_path / "m", kind="csv", with_split=False)
    rows = path.read_text().splitlines()
    no_dev = tmp_path / "m" / "train-only.csv"
    no_dev.write_text("\n".join([rows[0] + ",split"] + [r + ",train" for r in rows[1:]]) + "\n")
    cyrillic = tmp_path / "m" / "cyrillic.csv"
    cyrillic.write_text("\n".join([rows[0]] + [r.split(",")[0] + ",собака бежит по пляжу" for r in rows[1:]]) + "\n")
    for data, says in ((no_dev, "0 dev"), (cyrillic, "no word the tokenizer keeps")):
        out = tmp_path / data.stem
        with pytest.raises(DataError, match=says):
            train(tiny_config(data, out, tiny_model_file))
        assert not (out / "cache").exists()  # refused before extraction


def test_resume_over_a_model_only_last_pt_is_refused(tiny_data, tiny_model_file, tmp_path):
    """`captioner average ... --out runs/a/last.pt` once left a run that --resume crashed on."""
    from captioner.models.checkpoint import read_checkpoint, write_checkpoint

    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=1))
    best = read_checkpoint(out / "best.pt")
    write_checkpoint({k: v for k, v in best.items() if k != "checksum"}, out / "last.pt")
    with pytest.raises(ConfigError, match="holds no training state to resume"):
        train(tiny_config(tiny_data, out, tiny_model_file, epochs=1), resume=True)
