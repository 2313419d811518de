"""Checkpoint averaging: one model's checkpoints averaged weight by weight into one."""

import pytest
import torch

from captioner.models.average import average_checkpoint
from captioner.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, write_checkpoint
from captioner.cli import main
from captioner.inference.decode import SearchConfig, beam_search
from captioner.models.ensemble import ensemble_checkpoint
from captioner.errors import CheckpointError, ConfigError
from captioner.models.model import CaptionModel, ModelConfig
from captioner.data.vocab import Vocab

from conftest import TINY_MODEL

WORDS = ["a red square", "a blue circle", "a green triangle"]


def tiny(seed: int, words=WORDS, params=None) -> CaptionModel:
    torch.manual_seed(seed)
    cfg = dict(TINY_MODEL, decoder_params={**TINY_MODEL["decoder_params"], **(params or {})})
    return CaptionModel(ModelConfig.from_dict(cfg), Vocab.build(words, min_count=1)).eval()


@pytest.fixture
def epochs(tmp_path):
    paths = []
    for seed in (1, 2, 3):
        paths.append(tmp_path / f"epoch-{seed}.pt")
        save_checkpoint(paths[-1], tiny(seed), metrics={"dev": {"CIDEr": 0.1 * seed}})
    return paths


def test_the_weights_are_the_mean_of_the_checkpoints(epochs):
    avg = average_checkpoint(epochs)
    states = [read_checkpoint(p)["decoder_state"] for p in epochs]
    assert set(avg["decoder_state"]) == set(states[0])
    for k, v in avg["decoder_state"].items():
        torch.testing.assert_close(v, sum(s[k] for s in states) / 3)
    assert avg["averaged_from"] == [p.name for p in epochs]
    assert avg["metrics"] == {}  # the mean earned no scores yet
    assert "checksum" not in avg  # write_checkpoint computes the new one


def test_half_checkpoints_average_in_float32_and_stay_half(tmp_path):
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"h{seed}.pt")
        save_checkpoint(paths[-1], tiny(seed), half=True)
    avg = average_checkpoint(paths)
    states = [read_checkpoint(p)["decoder_state"] for p in paths]
    for k, v in avg["decoder_state"].items():
        assert v.dtype == torch.float16
        torch.testing.assert_close(v, ((states[0][k].float() + states[1][k].float()) / 2).half())


def test_one_checkpoint_twice_captions_exactly_like_it(epochs, tmp_path):
    out = tmp_path / "avg.pt"
    write_checkpoint(average_checkpoint([epochs[0], epochs[0]]), out)
    avg, _ = load_checkpoint(out)
    model, _ = load_checkpoint(epochs[0])
    feats = torch.randn(3, 49, 1280)
    v = model.vocab
    search = SearchConfig(beam_size=3, max_len=6)
    one = beam_search(model.decoder, feats, v.bos_id, v.eos_id, v.pad_id, search, (v.bos_id, v.unk_id))
    two = beam_search(avg.decoder, feats, v.bos_id, v.eos_id, v.pad_id, search, (v.bos_id, v.unk_id))
    assert torch.equal(one.tokens, two.tokens)


def test_the_first_files_decoding_settings_are_kept(tmp_path):
    model = tiny(1)
    model.length_penalty, model.no_repeat_ngram = 0.5, 3
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    save_checkpoint(paths[0], model)
    save_checkpoint(paths[1], tiny(2))
    out = tmp_path / "avg.pt"
    write_checkpoint(average_checkpoint(paths), out)
    avg, _ = load_checkpoint(out)
    assert (avg.length_penalty, avg.no_repeat_ngram) == (0.5, 3)


def test_other_models_are_refused_by_name(epochs, tmp_path):
    other_vocab = tmp_path / "other-vocab.pt"
    save_checkpoint(other_vocab, tiny(4, words=WORDS + ["a big yellow star"]))
    with pytest.raises(CheckpointError, match="other-vocab.pt.*vocabulary differs from epoch-1.pt"):
        average_checkpoint([epochs[0], other_vocab])
    other_config = tmp_path / "other-config.pt"
    save_checkpoint(other_config, tiny(4, params={"hidden_dim": 32}))
    with pytest.raises(CheckpointError, match="other-config.pt.*model config differs"):
        average_checkpoint([epochs[0], other_config])
    with pytest.raises(ConfigError, match="two or more"):
        average_checkpoint([epochs[0]])
    pair = tmp_path / "pair.pt"
    write_checkpoint(ensemble_checkpoint(epochs[:2]), pair)
    with pytest.raises(CheckpointError, match="pair.pt.*ensemble"):
        average_checkpoint([pair, pair])


def test_cli_writes_a_checkpoint_that_loads_and_names_a_bad_file(epochs, tmp_path, capsys):
    out = tmp_path / "avg.pt"
    assert main(["average", *map(str, epochs), "--out", str(out)]) == 0
    assert "the mean of 3 checkpoints" in capsys.readouterr().out
    model, ckpt = load_checkpoint(out)
    assert ckpt["averaged_from"] == [p.name for p in epochs]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["average", str(epochs[0]), str(broken), "--out", str(tmp_path / "x.pt")]) != 0
    assert "broken.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()  # nothing half-written


@pytest.mark.slow
def test_keep_epochs_keeps_each_epochs_weights_and_averaging_them_captions(tiny_data, tiny_model_file, tmp_path):
    from test_train_smoke import tiny_config

    from captioner.inference.api import Captioner
    from captioner.training.train import train

    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=2, scst_epochs=1, keep_epochs=True))
    kept = [out / "epochs" / f"epoch-{n}.pt" for n in (1, 2, 3)]
    assert all(p.is_file() for p in kept)
    last, best = read_checkpoint(out / "last.pt"), read_checkpoint(out / "best.pt")
    states = [read_checkpoint(p)["decoder_state"] for p in kept]
    for k, v in last["decoder_state"].items():  # the last epoch's file holds what last.pt holds
        assert torch.equal(states[-1][k], v)
    best_epoch = best["metrics"]["epoch"]
    for k, v in best["decoder_state"].items():  # and best.pt is one of the kept epochs
        assert torch.equal(states[best_epoch - 1][k], v)
    assert not torch.equal(states[0]["out.weight"], states[1]["out.weight"])
    avg = tmp_path / "avg.pt"
    assert main(["average", *map(str, kept[1:]), "--out", str(avg)]) == 0
    cap = Captioner.load(avg).caption(sorted((tiny_data / "Images").iterdir())[0], beam_size=2, max_len=6)
    assert cap.words
