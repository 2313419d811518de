"""Train a tiny model for a few steps on generated photos, save, reload, caption, resume."""
import json

import pytest

from captioner.inference.api import Captioner
from captioner.models.checkpoint import read_checkpoint
from captioner.training.config import load_train_config
from captioner.errors import ConfigError
from captioner.training.train import configured_model, train


def tiny_config(data, out, model_file, **kw):
    sets = {"data": str(data), "out": str(out), "model": str(model_file), "cache_dir": str(out / "cache"),
            "epochs": 3, "batch_size": 8, "warmup_steps": 2, "lr": 0.01, "patience": 5,
            "val_beam_size": 2, "val_max_len": 6, "progress": False, "min_word_count": 1}
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
    own = configured_model(load_train_config(None, ["model=show-attend-tell"]))
    assert own.encoder == "efficientnet-lite0" and own.name == "show-attend-tell"
    swapped = configured_model(load_train_config(None, ["model=show-attend-tell", "encoder=efficientnet-lite2"]))
    assert (swapped.name, swapped.encoder) == ("show-attend-tell@efficientnet-lite2", "efficientnet-lite2")
    assert swapped.decoder_params == own.decoder_params
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
                      scst_batch_size=4, scst_max_len=6, scst_baseline="mean",
                      init_checkpoint=str(out / "best.pt")))
    history = [json.loads(x) for x in (only / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["scst"]
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(tiny_data, only, tiny_model_file, epochs=0, scst_epochs=1))


def test_caption_batching_trains_on_independent_pairs(tiny_data, tiny_model_file, tmp_path):
    import captioner.training.train as T

    out = tmp_path / "pairs"
    cfg = tiny_config(tiny_data, out, tiny_model_file, epochs=2, batching="caption", amp="off")
    train(cfg)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    with pytest.raises(ConfigError, match="batching"):
        T.epoch_batches(tiny_config(tiny_data, out, tiny_model_file, batching="photos"), None, None)


def test_weight_average_follows_the_weights_and_leaves_them_untouched():
    import torch

    from captioner.training.train import WeightAverage

    layer = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(layer.weight), torch.nn.init.zeros_(layer.bias)
    average = WeightAverage(layer, decay=0.5)
    expected, d = 0.0, None
    for n in range(1, 6):
        with torch.no_grad():
            layer.weight.fill_(float(n))
        average.update()
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * n
    with average.applied():
        assert torch.allclose(layer.weight, torch.full((1, 2), expected))
    assert torch.equal(layer.weight, torch.full((1, 2), 5.0))  # the raw weights are back
    restored = WeightAverage(layer, decay=0.5)
    restored.load_state_dict(average.state_dict())
    with restored.applied():
        assert torch.allclose(layer.weight, torch.full((1, 2), expected))
    average.reset()
    with average.applied():
        assert torch.equal(layer.weight, torch.full((1, 2), 5.0))


def test_weight_average_is_what_dev_scores_and_best_keeps_and_it_resumes(tiny_data, tiny_model_file, tmp_path):
    import torch

    kw = dict(epochs=1, ema_decay=0.9, amp="off")
    one = tmp_path / "one"  # one epoch: best.pt is its average, last.pt its raw weights and the average
    train(tiny_config(tiny_data, one, tiny_model_file, **kw))
    last, best = read_checkpoint(one / "last.pt"), read_checkpoint(one / "best.pt")
    assert last["weight_average"]["updates"] > 0
    for k, v in best["decoder_state"].items():
        assert torch.allclose(v.float(), last["weight_average"]["shadow"][k].float(), atol=1e-3), k
    assert any(not torch.allclose(v.float(), last["decoder_state"][k].float(), atol=1e-3)
               for k, v in best["decoder_state"].items())
    record = json.loads((one / "metrics.jsonl").read_text())  # dev scored for the average and the raw weights
    assert set(record["dev_raw"]) == set(record["dev"])

    scst = tmp_path / "scst"  # SCST averages afresh: as many updates as its own optimiser's steps
    train(tiny_config(tiny_data, scst, tiny_model_file, **kw, scst_epochs=1, scst_lr=0.001, scst_samples=2,
                      scst_batch_size=4, scst_max_len=6))
    last = read_checkpoint(scst / "last.pt")
    assert last["weight_average"]["updates"] == int(last["optimizer"]["state"][0]["step"])

    # A run killed after epoch 2 (last.pt written), then resumed, ends with the same average.
    kw["epochs"] = 3
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config(tiny_data, full, tiny_model_file, **kw))
    train_killed_after(2, tiny_config(tiny_data, part, tiny_model_file, **kw))
    train(tiny_config(tiny_data, part, tiny_model_file, **kw), resume=True)
    a, b = (read_checkpoint(run / "last.pt")["weight_average"] for run in (full, part))
    assert a["updates"] == b["updates"]
    for k, v in a["shadow"].items():
        assert torch.allclose(v, b["shadow"][k], atol=1e-5), k
    with pytest.raises(ConfigError, match="ema_decay"):
        load_train_config(None, ["ema_decay=1.0"])


def test_a_model_on_the_combined_encoder_trains_saves_and_captions(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=1, encoder="efficientnet-lite0+lite2"))
    cap = Captioner.load(out / "best.pt")
    assert cap.model.encoder_cfg.parts == ("efficientnet-lite0", "efficientnet-lite2")
    result = cap.caption(sorted((tiny_data / "Images").iterdir())[0], beam_size=2, max_len=6)
    assert result.words and result.attention.shape == (len(result.words), 7, 7)
