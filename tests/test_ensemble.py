"""Ensembles: checkpoints joined into one model that decodes with the mean word distribution."""

import pytest
import torch

from captioner.models.checkpoint import load_checkpoint, save_checkpoint, write_checkpoint
from captioner.cli import main
from captioner.inference.decode import SearchConfig, beam_search
from captioner.models.decoders import build_decoder
from captioner.models.ensemble import ensemble_checkpoint
from captioner.errors import CheckpointError, ConfigError
from captioner.models.model import CaptionModel, ModelConfig
from captioner.data.vocab import Vocab

from conftest import TINY_MODEL

WORDS = ["a red square", "a blue circle", "a green triangle"]


def tiny(seed: int, words=WORDS) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(words, min_count=1)).eval()


@pytest.fixture
def members(tmp_path):
    paths = []
    for seed in (1, 2):
        paths.append(tmp_path / f"m{seed}.pt")
        save_checkpoint(paths[-1], tiny(seed))
    return paths


def test_step_is_the_log_of_the_members_mean_probability():
    params = TINY_MODEL["decoder_params"]
    torch.manual_seed(0)
    ens = build_decoder("ensemble", {"members": [{"decoder": "soft-attention-lstm", "params": params}] * 3},
                        11, 40).eval()
    feats, prev = torch.randn(2, 9, 40), torch.tensor([3, 4])
    logp, state = ens.step(prev, ens.init_state(feats))
    alone = [m.step(prev, m.init_state(feats)) for m in ens.members]
    mean = torch.stack([lp.exp() for lp, _ in alone]).mean(0)
    torch.testing.assert_close(logp.exp(), mean)
    torch.testing.assert_close(state["alpha"], torch.stack([s["alpha"] for _, s in alone]).mean(0))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2))


def test_an_ensemble_of_one_model_twice_captions_like_the_model(tmp_path):
    model = tiny(3)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    out = tmp_path / "twice.pt"
    write_checkpoint(ensemble_checkpoint([path, path]), out)
    ens, _ = load_checkpoint(out)
    feats = torch.randn(4, 49, 1280)
    search = SearchConfig(beam_size=3, max_len=6, n_best=3)
    v = model.vocab
    one = beam_search(model.decoder, feats, v.bos_id, v.eos_id, v.pad_id, search, (v.bos_id, v.unk_id))
    two = beam_search(ens.decoder, feats, v.bos_id, v.eos_id, v.pad_id, search, (v.bos_id, v.unk_id))
    assert torch.equal(one.tokens, two.tokens)
    torch.testing.assert_close(one.scores, two.scores)
    assert ens.captions(feats, search) == model.captions(feats, search)


def test_cli_joins_checkpoints_and_the_result_loads_anywhere(members, tmp_path, capsys):
    out = tmp_path / "ens.pt"
    assert main(["ensemble", *map(str, members), "--out", str(out), "--name", "pair"]) == 0
    assert "2 decoders" in capsys.readouterr().out
    ens, ckpt = load_checkpoint(out)
    assert ckpt["model"]["name"] == "pair" and ckpt["model"]["decoder"] == "ensemble"
    assert len(ens.decoder.members) == 2
    for i, path in enumerate(members):  # each member keeps its own weights
        alone, _ = load_checkpoint(path)
        for k, v in alone.decoder.state_dict().items():
            assert torch.equal(ens.decoder.members[i].state_dict()[k], v), k
    # fp16 export and reload, as the shipped models are stored
    half = tmp_path / "ens16.pt"
    assert main(["export", str(out), str(half), "--half", "--length-penalty", "0.5"]) == 0
    model16, _ = load_checkpoint(half)
    assert model16.length_penalty == 0.5
    feats = torch.randn(2, 49, 1280)
    assert len(model16.captions(feats, model16.search_config(beam_size=2, max_len=5))) == 2


def test_members_must_share_vocab_and_encoder(members, tmp_path, capsys):
    other = tmp_path / "other.pt"
    save_checkpoint(other, tiny(4, WORDS + ["a big dog"]))
    with pytest.raises(CheckpointError, match=r"other\.pt: its vocabulary differs from m1\.pt"):
        ensemble_checkpoint([members[0], other])
    assert main(["ensemble", str(members[0]), str(other), "--out", str(tmp_path / "x.pt")]) != 0
    assert "other.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()

    lite2 = tmp_path / "lite2.pt"
    model = tiny(5)
    from captioner.models.encoders import get_encoder_config

    model.encoder_cfg = get_encoder_config("efficientnet-lite2")  # a registered encoder: the validator takes it
    save_checkpoint(lite2, model)
    with pytest.raises(CheckpointError, match=r"lite2\.pt: its encoder \(efficientnet-lite2\) differs"):
        ensemble_checkpoint([members[0], lite2])


def test_bad_member_lists_are_named(members, tmp_path):
    with pytest.raises(ConfigError, match="two or more"):
        ensemble_checkpoint(members[:1])
    nested = tmp_path / "nested.pt"
    write_checkpoint(ensemble_checkpoint(members), nested)
    with pytest.raises(CheckpointError, match=r"nested\.pt: is itself an ensemble"):
        ensemble_checkpoint([nested, members[0]])
    with pytest.raises(ConfigError, match="two or more decoders"):
        build_decoder("ensemble", {"members": [{"decoder": "show-tell"}]}, 11, 40)
    with pytest.raises(ConfigError, match="member 1"):
        build_decoder("ensemble", {"members": [{"decoder": "show-tell"}, {"arch": "show-tell"}]}, 11, 40)
    with pytest.raises(ConfigError, match="unknown decoder arch 'nope'"):
        build_decoder("ensemble", {"members": [{"decoder": "show-tell"}, {"decoder": "nope"}]}, 11, 40)
