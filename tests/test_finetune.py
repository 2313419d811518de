"""Learning from feedback: finetune holds a check set back, grows the vocab from corrections,
refuses a harmful update, and the whole loop (API feedback -> finetune -> A/B variant ->
ab-report -> promote) runs end to end."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.data.vocab import Vocab
from captioner.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from captioner.models.model import CaptionModel, ModelConfig
from captioner.models.objects import ObjectNamer, vocab_rows
from captioner.service.feedback import Correction, FeedbackStore, Served
from captioner.errors import ConfigError
from captioner.training.config import TrainConfig
from captioner.training.finetune import FinetuneConfig
from captioner.training.crossentropy import caption_loss
from captioner.training.dataset import TrainingSet
from captioner.training.finetune import (FALLBACK_PROXY, gate_split, gate_verdict, grow_from_corrections,
                                         group_by_photo, new_words, only_new_rows, split_photos)

from conftest import COLORS, SHAPES, TINY_MODEL, make_flickr_like, make_photo

KINDS = [(c, s) for c in COLORS for s in SHAPES]


def train_tiny_base(data: Path, cache_dir: Path, path: Path, steps: int = 80) -> Path:
    """A tiny soft-attention model that has learnt the generated photos ("a red square", ...):
    plain cross-entropy steps, no run folder, so it takes seconds."""
    ds = load_dataset(data)
    recs = ds.split("train")
    cache = build_cache(ds.image_dir, [r.image for r in ds.records], CaptionModel(
        ModelConfig.from_dict(TINY_MODEL), Vocab.build(["a"], 1)).encoder_cfg, cache_dir, tag=ds.name,
        progress=False)
    torch.manual_seed(0)
    vocab = Vocab.build((c for r in recs for c in r.captions), min_count=1)
    model = CaptionModel(ModelConfig.from_dict(TINY_MODEL), vocab)
    data_set = TrainingSet(recs, cache, vocab, 30)
    opt = torch.optim.Adam(model.decoder.parameters(), lr=0.01)
    cfg, rng = TrainConfig(), random.Random(0)
    model.train()
    for _ in range(steps):
        feats, seqs, rows = data_set.batch(rng.sample(range(len(data_set)), 6))
        loss = caption_loss(model, feats, seqs, cfg, rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(path, model.eval())
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(dataset folder, feature cache folder, trained tiny base checkpoint), shared by this module."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_flickr_like(root / "data", n_per_kind=4)
    return data, root / "cache", train_tiny_base(data, root / "cache", root / "base.pt")


def correction_photos(folder: Path, per_kind: int = 2, seed: int = 500) -> list[tuple[bytes, str, str]]:
    """New generated photos, not in the dataset: (bytes, colour, shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(per_kind):
        for j, (color, shape) in enumerate(KINDS):
            path = folder / f"c{seed + k * 10 + j}.jpg"
            make_photo(path, color, shape, seed=seed + k * 10 + j)
            out.append((path.read_bytes(), color, shape))
    return out


def fill_store(db: Path | str, photos: list[tuple[bytes, str]]) -> None:
    """Record a served caption per (photo, correction) and correct it."""
    store = FeedbackStore(db)
    for image, text in photos:
        cid = store.record_caption(Served("api", "u", "exp", "current", True, "tiny-sat", "v", "a thing", -1.0, {},
                                          image=image))
        store.add_feedback(cid, correction=text)
    store.close()


def finetune_args(db, base_path, data, cache, out, *extra) -> list[str]:
    return ["finetune", "--db", str(db), "--checkpoint", str(base_path), "--data", str(data), "--cache-dir",
            str(cache), "--out", str(out), "--no-progress", *extra]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# --- fast: the parts ----------------------------------------------------------------------------

def test_split_is_by_photo_seeded_and_needs_two_photos():
    corrections = [Correction(f"c{i}", bytes([i % 5]) * 10, f"caption {i}") for i in range(25)]
    photos = group_by_photo(corrections)
    assert len(photos) == 5 and all(len(p.captions) == 5 for p in photos)  # the 5 corrections of a photo stay together
    learn, check = split_photos(photos, 0.2, seed=0)
    assert len(check) == 1 and len(learn) == 4
    assert [p.key for p in split_photos(photos, 0.2, seed=0)[1]] == [p.key for p in check]  # deterministic
    assert not {p.key for p in learn} & {p.key for p in check}
    with pytest.raises(Exception, match="at least 2"):
        split_photos(photos[:1], 0.2, seed=0)


def test_the_command_line_defaults_are_the_config_defaults():
    """`captioner finetune` with no options trains the documented recipe (FinetuneConfig's)."""
    import dataclasses

    from captioner.cli import build_parser
    from captioner.training.finetune import FinetuneConfig

    args = build_parser().parse_args(["finetune", "--db", "x.db", "--out", "y.pt"])
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    dataset_options = ("db", "out", "data", "data_format", "layout", "image_root", "cache_dir")  # _train_config's
    shared = [k for k in vars(args) if k in defaults and k not in dataset_options]
    assert {"scst_replay_ratio", "replay_ratio", "lr", "scst_lr", "epochs", "scst_epochs"} <= set(shared)
    given = {k: getattr(args, k) == "on" if k == "objects" else getattr(args, k) for k in shared}
    assert "objects" in shared and given == {k: defaults[k] for k in shared}


def test_the_gate_scores_a_split_the_base_never_trained_on():
    assert gate_split({})[0] == "dev"
    assert gate_split({"train_config": {"train_on_dev": False}})[0] == "dev"
    split, why = gate_split({"train_config": {"train_on_dev": True}})  # a refit, as the shipped model is
    assert split == "test" and "never saw" in why
    assert gate_split({"train_config": {"train_on_dev": True}}, "dev")[0] == "dev"  # asked for explicitly
    assert gate_split(read_checkpoint("default"))[0] == "test"


def test_new_words_need_the_minimum_count_and_start_from_their_proxy(tmp_path):
    torch.manual_seed(0)
    vocab = Vocab.build(["a horse runs on a red square", "a dog"], min_count=1)
    model = CaptionModel(ModelConfig.from_dict(TINY_MODEL), vocab)
    captions = ["a zebra on a crimson square", "a zebra and a crimson square", "two zebras", "a zebra",
                "a crimson sqaure", "crimson"]
    grow, rare = new_words(captions, set(vocab.tokens), min_count=3)
    assert grow == {"crimson": 4, "zebra": 3} and rare == {"and": 1, "sqaure": 1, "two": 1, "zebras": 1}
    out = model.decoder.out
    old_w, old_b = out.weight.detach().clone(), out.bias.detach().clone()
    proxies = grow_from_corrections(model, list(grow))
    assert proxies == {"crimson": FALLBACK_PROXY, "zebra": "horse"}  # zebra from the lexicon, crimson from <unk>
    idx = {t: i for i, t in enumerate(model.vocab.tokens)}
    assert len(model.vocab) == len(vocab) + 2 and model.decoder.out.out_features == len(vocab) + 2
    emb = model.decoder.embed.weight
    assert torch.equal(emb[idx["zebra"]], emb[idx["horse"]]) and torch.equal(emb[idx["crimson"]], emb[idx["<unk>"]])
    assert torch.equal(model.decoder.out.weight[idx["zebra"]], old_w[idx["horse"]])
    assert model.decoder.out.bias[idx["zebra"]] < old_b[idx["horse"]]  # starts less likely than its proxy
    assert torch.equal(model.decoder.out.bias[:len(vocab)], old_b)  # the known words are untouched

    # the grown model saves and loads as a normal checkpoint, and the object namer grows it further
    save_checkpoint(tmp_path / "grown.pt", model)
    loaded, ckpt = load_checkpoint(tmp_path / "grown.pt")
    assert ckpt["vocab"]["tokens"][-2:] == ["crimson", "zebra"] and len(loaded.vocab) == len(model.vocab)
    namer = ObjectNamer(loaded)
    assert namer.base_vocab == len(model.vocab) and "zebra" in namer.model.vocab.tokens
    assert len(namer.model.vocab) > len(model.vocab)  # lexicon words whose proxy (dog, horse) it knows


def test_the_gate_refuses_only_what_is_worse_beyond_noise():
    worse = {"before": 0.664, "after": 0.618, "diff": -0.046, "diff_interval": [-0.067, -0.024], "photos": 1000}
    msg = gate_verdict(worse, "test", "flickr8k", 0.95)
    assert msg == ("refused: the finetuned model is worse on flickr8k test beyond noise (CIDEr-D 0.664 -> 0.618, "
                   "95% interval of the difference [-0.067, -0.024] over 1000 photos)")
    assert gate_verdict({**worse, "diff_interval": [-0.067, 0.001]}, "test", "flickr8k", 0.95) is None  # noise


@pytest.mark.slow  # finetunes a tiny model: ~10-30 s on a busy 2-core machine
def test_finetune_refuses_corrections_that_do_not_describe_their_photos(base, tmp_path, capsys):
    data, cache, base_path = base
    photos = correction_photos(tmp_path / "photos")
    wrong = {k: KINDS[(i + 3) % len(KINDS)] for i, k in enumerate(KINDS)}  # every kind told it is another
    db = tmp_path / "feedback.db"
    fill_store(db, [(img, f"a {wrong[(c, s)][0]} {wrong[(c, s)][1]}") for img, c, s in photos for _ in range(3)])
    out = tmp_path / "candidate.pt"
    fast = ["--epochs", "2", "--scst-epochs", "0", "--replay-ratio", "0.5", "--lr", "0.02"]
    code = main(finetune_args(db, base_path, data, cache, out, *fast))
    captured = capsys.readouterr()
    assert code == 1 and not out.exists()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: refused: the corrections do not look like descriptions of their photos")
    report = last_json(captured.out)
    rel = report["relevance"]
    assert rel["diff_interval"][0] <= 0 and f"CIDEr-D {rel['own']:.3f} vs {rel['others']:.3f}" in err
    assert report["refused"] and "nothing trained or written" in err and "--force" in err

    # forced, it trains (the self-critical stage: cross-entropy trains only new words' rows, and
    # these corrections have none); the gate then finds the model worse on dev and still writes
    # it, saying so
    harm = ["--scst-epochs", "2", "--scst-lr", "0.02", "--scst-replay-ratio", "0"]
    assert main(finetune_args(db, base_path, data, cache, out, *fast, *harm, "--force")) == 0
    captured = capsys.readouterr()
    report = last_json(captured.out)
    assert out.is_file() and report["gate"]["diff_interval"][1] < 0 and report["gate_split"] == "dev"
    assert "worse on dev beyond noise; written anyway (--force)" in captured.out


@pytest.mark.slow
def test_cross_entropy_trains_only_the_new_words_rows(base, tmp_path, capsys):
    """Cross-entropy teaches the corrections' new words and leaves every other weight as the
    (self-critically trained) base has it."""
    data, cache, base_path = base
    db = tmp_path / "feedback.db"
    fill_store(db, [(img, f"a {'crimson' if c == 'red' else c} {sh}") for img, c, sh in
                    correction_photos(tmp_path / "photos") for _ in range(3)])
    out = tmp_path / "candidate.pt"
    assert main(finetune_args(db, base_path, data, cache, out, "--scst-epochs", "0", "--force")) == 0
    report = last_json(capsys.readouterr().out)
    assert list(report["vocab"]["new_words"]) == ["crimson"] and len(report["train_loss"]) == 2
    before, after = read_checkpoint(base_path), read_checkpoint(out)
    start, _ = load_checkpoint(base_path)
    grow_from_corrections(start, ["crimson"])  # where training started
    V0 = len(before["vocab"]["tokens"])
    grown = [k for k, v in after["decoder_state"].items() if v.dim() and v.size(0) == V0 + 1]
    assert grown  # the embedding and output rows
    start_state = start.decoder.state_dict()
    for key, v in after["decoder_state"].items():
        old = before["decoder_state"][key]
        if key in grown:
            assert torch.equal(v[:V0], old) and not torch.equal(v[V0:], start_state[key][V0:]), key
        else:
            assert torch.equal(v, old), key


def test_new_rows_training_trains_the_rows_alone_and_restores_the_flags():
    model = CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(["a red square"], 1))
    first_new = len(model.vocab)
    grow_from_corrections(model, ["crimson"])
    next(model.parameters()).requires_grad_(False)  # a weight the caller had frozen stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    rows = {id(p) for p in vocab_rows(model)}
    with only_new_rows(model, first_new):
        assert {id(p) for p in model.parameters() if p.requires_grad} == rows
    assert [p.requires_grad for p in model.parameters()] == flags


def test_finetune_input_errors_are_one_line(tiny_data, tmp_path, capsys):
    data, cache, base_path = tiny_data, tmp_path / "cache", tmp_path / "base.pt"
    save_checkpoint(base_path, CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(["a red square"], 1)))
    args = lambda db, out: finetune_args(db, base_path, data, cache, out)  # noqa: E731
    assert main(args(tmp_path / "none.db", tmp_path / "x.pt")) == 2
    assert "feedback database not found" in capsys.readouterr().err
    db = tmp_path / "f.db"
    FeedbackStore(db).close()
    assert main(args(db, tmp_path / "x.pt")) == 2
    assert "no corrected captions" in capsys.readouterr().err
    assert main(args(db, base_path)) == 2
    assert "overwrite the base" in capsys.readouterr().err
    fill_store(db, [(correction_photos(tmp_path / "p", per_kind=1)[0][0], "a red square")])
    assert main(args(db, tmp_path / "x.pt")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the corrections cover 1 photo(s); finetune needs at least 2") and len(
        err.strip().splitlines()) == 1


# --- the loop, end to end ------------------------------------------------------------------------

@pytest.mark.slow
def test_feedback_finetune_ab_promote_loop(base, tmp_path, capsys):
    """Users correct captions through the API (a new word among them) -> finetune -> the candidate
    served beside the current model -> ab-report -> promote: new clients get the candidate,
    assigned ones keep theirs."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from captioner.service.config import load_serve_config
    from captioner.service.serve import create_app

    data, cache, base_path = base
    (tmp_path / "models").mkdir()
    # the current model as shipped: fp16 weights, scored for bf16 inference; the candidate keeps both
    assert main(["export", str(base_path), str(tmp_path / "models" / "current.pt"), "--half", "--precision",
                 "bf16"]) == 0
    db = tmp_path / "feedback.db"
    variants = [{"name": "current", "checkpoint": "current.pt"}]
    cfg_file = tmp_path / "serve.json"

    def serve_config(variants) -> Path:
        cfg_file.write_text(json.dumps({"model_dir": "models", "db": str(db), "experiment": {
            "name": "exp", "variants": variants}}))
        return cfg_file

    fast = {"beam_size": "1", "max_len": "6"}
    photos = correction_photos(tmp_path / "photos", per_kind=2)
    with TestClient(create_app(load_serve_config(serve_config(variants)))) as client:
        for i, (image, color, shape) in enumerate(photos):
            for k in range(3):
                r = client.post("/v1/captions", files={"image": ("p.jpg", image, "image/jpeg")}, data=fast,
                                headers={"X-Client-Id": f"user{i}-{k}"})
                assert r.status_code == 200, r.text
                word = "crimson" if color == "red" else color  # users call red "crimson": a word the model lacks
                f = client.post("/v1/feedback", json={"caption_id": r.json()["caption_id"], "rating": 2,
                                                      "correction": f"a {word} {shape}"})
                assert f.status_code == 200, f.text

    candidate = tmp_path / "models" / "candidate.pt"
    assert main(finetune_args(db, tmp_path / "models" / "current.pt", data, cache, candidate, "--lr", "0.005",
                              "--epochs", "3", "--scst-epochs", "1")) == 0
    report = last_json(capsys.readouterr().out)
    assert report["photos"] == 12 and report["corrections"] == 36 and report["check_photos"] >= 1
    assert report["vocab"]["new_words"] == {"crimson": FALLBACK_PROXY}
    assert set(report["check"]) >= {"before", "after", "diff_interval"} and not report["refused"]
    assert report["objects"] is True  # scored as served: named objects on
    ckpt = read_checkpoint(candidate)
    assert "crimson" in ckpt["vocab"]["tokens"] and ckpt["decode"]["precision"] == "bf16"
    assert all(v.dtype == torch.float16 for v in ckpt["decoder_state"].values() if v.is_floating_point())
    assert ckpt["finetune"]["config"]["db"] == str(db)

    variants.append({"name": "candidate", "checkpoint": "candidate.pt"})
    with TestClient(create_app(load_serve_config(serve_config(variants)))) as client:
        served = {}
        for n in range(16):
            r = client.post("/v1/captions", files={"image": ("p.jpg", photos[n % 12][0], "image/jpeg")}, data=fast,
                            headers={"X-Client-Id": f"ab{n}"})
            assert r.status_code == 200, r.text
            served[f"ab{n}"] = r.json()["variant"]
            client.post("/v1/feedback", json={"caption_id": r.json()["caption_id"],
                                              "rating": 4 if served[f"ab{n}"] == "candidate" else 2})
        assert set(served.values()) == {"current", "candidate"}
    assert main(["ab-report", "--db", str(db), "--experiment", "exp", "--json"]) == 0
    ab = last_json(capsys.readouterr().out)
    assert "candidate" in json.dumps(ab)

    assert main(["promote", "candidate", "--config", str(cfg_file)]) == 0
    assert "candidate promoted" in capsys.readouterr().out
    with TestClient(create_app(load_serve_config(cfg_file))) as client:
        def variant(cid: str) -> str:
            r = client.post("/v1/captions", files={"image": ("p.jpg", photos[0][0], "image/jpeg")}, data=fast,
                            headers={"X-Client-Id": cid})
            assert r.status_code == 200, r.text
            return r.json()["variant"]
        assert all(variant(f"new{n}") == "candidate" for n in range(4))  # new traffic: the winner
        sticky = next(c for c, v in served.items() if v == "current")
        assert variant(sticky) == "current"  # an assigned user keeps its variant until it is retired


def test_finetune_reads_corrections_from_sqlite_and_postgresql(store_db, tiny_data, tmp_path, capsys):
    base_path = tmp_path / "base.pt"
    save_checkpoint(base_path, CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(["a red square"], 1)))
    photos = correction_photos(tmp_path / "p", per_kind=1)
    fill_store(store_db, [(photos[0][0], "a red square"), (photos[0][0], "a red box")])  # two of one photo
    assert main(finetune_args(store_db, base_path, tiny_data, tmp_path / "cache", tmp_path / "x.pt")) == 2
    assert "the corrections cover 1 photo(s)" in capsys.readouterr().err  # read, grouped by photo


@pytest.mark.parametrize("field, value, says", [
    ("replay_ratio", float("nan"), "--replay-ratio must be a finite number"),
    ("scst_replay_ratio", float("inf"), "--scst-replay-ratio must be a finite number"),
    ("confidence", 1.5, "--confidence must be between 0 and 1"),
    ("batch_size", 0, "--batch-size must be at least 1"),
    ("resamples", 10 ** 9, "--resamples must be 100 to 100000"),
])
def test_finetune_options_out_of_range_are_refused_before_anything_loads(field, value, says):
    cfg = FinetuneConfig(db="none.db", out="x.pt", **{field: value})
    with pytest.raises(ConfigError, match=says):
        cfg.check()
