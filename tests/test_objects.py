"""Novel-object captioning: constrained beam search, vocab growth, grammar, the off switch, and
objects in the CLI's JSON and the API's schema."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from captioner.data.vocab import Vocab
from captioner.inference.decode import SearchConfig, beam_search, constrained_beam_search
from captioner.models.lexicon import lexicon_words
from captioner.models.model import CaptionModel, ModelConfig
from captioner.models.objects import fix_grammar, grow_vocab, names
from test_decode import BOS, EOS, PAD, TableDecoder, TABLE

EXAMPLES = ["cat", "coffee", "rocket", "astronaut"]


def test_constraint_forces_its_word_and_no_constraint_is_plain_beam_search():
    dec = TableDecoder(TABLE, 8)
    cfg = SearchConfig(beam_size=3, length_penalty=0.0)
    feats = torch.zeros(3, 4, 2)
    plain = beam_search(dec, feats, BOS, EOS, PAD, cfg)
    hyps, met = constrained_beam_search(dec, feats, BOS, EOS, PAD, cfg, [[6], [], [7, 5]])
    assert met.tolist() == [True, False, True]
    assert 6 in hyps.tokens[0, 0].tolist()  # unconstrained it is 4 5 EOS
    assert hyps.tokens[1, 0].tolist()[:3] == plain.tokens[1, 0].tolist()[:3] == [4, 5, EOS]
    row = hyps.tokens[2, 0].tolist()
    assert row[row.index(7) + 1] == 5  # a phrase's tokens in a row, though 7 -> 5 is all but impossible


def test_unreachable_constraint_falls_back_to_the_unconstrained_caption():
    dec = TableDecoder(TABLE, 8)
    cfg = SearchConfig(beam_size=2, max_len=1, length_penalty=0.0)
    hyps, met = constrained_beam_search(dec, torch.zeros(1, 4, 2), BOS, EOS, PAD, cfg, [[3, 5]])
    assert met.tolist() == [False]  # two tokens cannot fit in one word
    assert EOS in hyps.tokens[0, 0].tolist()


TINY = {"soft-attention-lstm": {"embed_dim": 8, "hidden_dim": 8, "attention_dim": 8, "region_dim": 8},
        "up-down": {"embed_dim": 8, "hidden_dim": 8, "attention_dim": 8, "region_dim": 8},
        "show-tell": {"embed_dim": 8, "hidden_dim": 8},
        "transformer": {"d_model": 8, "heads": 2, "layers": 1, "ffn_dim": 16, "max_len": 12}}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_a_word_outside_the_vocab_is_grown_from_its_proxy_and_forced_in(arch):
    torch.manual_seed(0)
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "a", "horse", "in", "field"])
    model = CaptionModel(ModelConfig("t", "efficientnet-lite0", arch, TINY[arch]), vocab).eval()
    feats = torch.randn(2, 49, 1280)
    before = model.generate(feats, SearchConfig(beam_size=2, max_len=6))
    (zebra,) = grow_vocab(model, {"zebra": "horse", "horse": "horse"})  # horse is there: skipped
    assert model.vocab.tokens[zebra] == "zebra" and len(model.vocab) == 9
    emb = model.decoder.embed.weight
    assert torch.equal(emb[zebra], emb[5])
    v = model.vocab
    hyps, met = constrained_beam_search(model.decoder, feats, v.bos_id, v.eos_id, v.pad_id,
                                        SearchConfig(beam_size=2, max_len=6), [[zebra], []],
                                        banned_ids=(v.bos_id, v.unk_id), base_vocab=8)
    assert met.tolist() == [True, False]
    assert "zebra" in v.decode(hyps.tokens[0, 0].tolist()).split()
    # the grown word never appears unasked, and the unconstrained image keeps its caption
    assert zebra not in hyps.tokens[1].flatten().tolist()
    assert hyps.tokens[1, 0].tolist()[:before.tokens.size(-1)] == before.tokens[1, 0].tolist()


def _namer_over(vocab_words: list[str], favourite: str):
    """An ObjectNamer over a tiny soft-attention model whose own caption repeats `favourite`."""
    from captioner.models.objects import ObjectNamer

    torch.manual_seed(0)
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", *vocab_words])
    model = CaptionModel(ModelConfig("t", "efficientnet-lite0", "soft-attention-lstm",
                                     TINY["soft-attention-lstm"]), vocab).eval()
    with torch.no_grad():
        model.decoder.out.bias[vocab.tokens.index(favourite)] += 10.0
    return model, ObjectNamer(model)


def test_a_named_object_keeps_the_models_caption_and_others_are_put_in(monkeypatch):
    from captioner.models.recognition import RecognizedObject

    model, namer = _namer_over(["a", "dog", "dogs", "horse", "in", "field"], favourite="dog")
    feats = torch.randn(3, 49, 1280)
    search = SearchConfig(beam_size=2, max_len=5)
    plain = model.captions(feats, search)
    assert all("dog" in c.split() and "zebra" not in c.split() for c in plain)
    found = [[RecognizedObject("dog", 0.9)], [RecognizedObject("zebra", 0.9)], [RecognizedObject("dog", 0.1)]]
    monkeypatch.setattr(namer, "recognize", lambda f: found)
    got = namer.generate(feats, search)
    assert got.constraint[0].word == "dog" and got.met[0]
    texts = namer.captions(feats, search)
    assert texts[0] == plain[0]  # "dog" is there already: the model's own caption
    assert got.constraint[1].word == "zebra" and got.met[1] and names(texts[1].split(), got.constraint[1])
    assert got.constraint[2] is None and not got.met[2] and texts[2] == plain[2]  # not confident: as it is
    # all from one search: each photo as its own search gives it
    v = namer.model.vocab
    ids = v.tokens.index
    assert namer.phrase(got.constraint[0]) == [[ids("dog"), ids("dogs")]]
    for b, phrase in ((0, namer.phrase(got.constraint[0])), (1, namer.phrase(got.constraint[1])), (2, [])):
        alone, _ = constrained_beam_search(namer.model.decoder, feats[b:b + 1], v.bos_id, v.eos_id, v.pad_id,
                                           search, [phrase], banned_ids=(v.bos_id, v.unk_id),
                                           base_vocab=namer.base_vocab)
        assert got.hyps.tokens[b, 0, :alone.tokens.size(-1)].tolist() == alone.tokens[0, 0].tolist()
        torch.testing.assert_close(got.hyps.scores[b], alone.scores[0])


def test_a_namer_is_rebuilt_from_the_weights_after_training():
    """The namer captions with a copy of the weights it was built from: after training (finetune
    scores before and after), `forget_object_namer` makes the next one copy the trained weights."""
    torch.manual_seed(0)
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "a", "horse", "in", "field"])
    model = CaptionModel(ModelConfig("t", "efficientnet-lite0", "soft-attention-lstm",
                                     TINY["soft-attention-lstm"]), vocab).eval()
    before = model.object_namer()
    with torch.no_grad():
        model.decoder.out.bias[5] += 3.0  # "training"
    assert model.object_namer() is before  # built once: still the old weights
    assert not torch.equal(before.model.decoder.out.bias[:8], model.decoder.out.bias)
    model.forget_object_namer()
    after = model.object_namer()
    assert after is not before and torch.equal(after.model.decoder.out.bias[:8], model.decoder.out.bias)
    model.train()  # training drops it too, so finetune's "after" never captions with "before"'s weights
    model.eval()
    assert model.object_namer() is not after


def test_a_phrase_position_takes_any_of_its_tokens():
    """[[6, 7]]: either token meets the constraint, the likelier one is taken, and a caption
    that has one already is the plain search's; a set of one token is the plain constraint."""
    dec = TableDecoder(TABLE, 8)
    cfg = SearchConfig(beam_size=3, length_penalty=0.0)
    feats = torch.zeros(4, 4, 2)
    plain = beam_search(dec, feats, BOS, EOS, PAD, cfg)
    one, _ = constrained_beam_search(dec, feats[:1], BOS, EOS, PAD, cfg, [[6]])
    two, _ = constrained_beam_search(dec, feats[:1], BOS, EOS, PAD, cfg, [[7]])
    hyps, met = constrained_beam_search(dec, feats, BOS, EOS, PAD, cfg, [[[6, 7]], [[6]], [[5, 6]], [[7], 5]])
    assert met.tolist() == [True, True, True, True]
    assert float(hyps.scores[0, 0]) == pytest.approx(max(float(one.scores[0, 0]), float(two.scores[0, 0])))
    assert {6, 7} & set(hyps.tokens[0, 0].tolist())
    assert hyps.tokens[1, 0, :one.tokens.size(-1)].tolist() == one.tokens[0, 0].tolist()
    # 5 is in the plain caption (4 5 EOS): with either token allowed the answer is that caption
    assert hyps.tokens[2, 0].tolist()[:3] == plain.tokens[2, 0].tolist()[:3] == [4, 5, EOS]
    row = hyps.tokens[3, 0].tolist()
    assert row[row.index(7) + 1] == 5


def test_a_two_word_object_keeps_the_models_own_caption_where_it_names_it(monkeypatch):
    """A phrase's first word can only start the phrase in the constrained banks ("sea" only in
    "sea lion"), so for a longer phrase the own caption is searched too: forced where it does not
    name the object, kept as it is where it does."""
    from captioner.models import objects
    from captioner.models.recognition import RecognizedObject

    model, namer = _namer_over(["a", "dog", "hot", "food", "in", "field"], favourite="dog")
    feats = torch.randn(2, 49, 1280)
    search = SearchConfig(beam_size=2, max_len=5)
    plain = model.captions(feats, search)
    found = [[RecognizedObject("hot dog", 0.9)], [RecognizedObject("hot dog", 0.9)]]
    monkeypatch.setattr(namer, "recognize", lambda f: found)
    got = namer.generate(feats, search)
    texts = namer.captions(feats, search)
    assert all(e.word == "hot dog" for e in got.constraint) and all(got.met)
    assert all(names(t.split(), e) for t, e in zip(texts, got.constraint))  # "dog dog ..." named no hot dog
    monkeypatch.setattr(objects, "names", lambda words, entry: True)  # now the own captions "name" it
    got = namer.generate(feats, search)
    assert got.constraint == [None, None] and namer.captions(feats, search) == plain


def test_the_constraint_for_an_entry_takes_its_plural_too_where_the_model_knows_it():
    _, namer = _namer_over(["a", "dog", "dogs", "horse", "oil", "rig", "rigs", "in", "field"], favourite="dog")
    words = lexicon_words()
    ids = namer.ids
    assert namer.phrase(words["dog"]) == [[ids["dog"], ids["dogs"]]]
    assert namer.phrase(dataclasses.replace(words["dog"], plural="dog")) == [[ids["dog"]]]  # the same word: once
    assert namer.phrase(dataclasses.replace(words["dog"], word="oil rig", plural="oil rigs")) == [
        [ids["oil"]], [ids["rig"], ids["rigs"]]]
    # grown from one proxy, a grown word and its grown plural look alike to the model: singular only
    assert ids["zebras"] >= namer.base_vocab
    assert namer.phrase(words["zebra"]) == [[ids["zebra"]]]


def test_clothing_sports_and_scenery_are_listed_but_not_put_in(monkeypatch):
    from captioner.models.objects import NOT_INSERTED
    from captioner.models.recognition import RecognizedObject

    model, namer = _namer_over(["a", "dog", "ski", "jersey", "in"], favourite="dog")
    assert {"clothing", "sports", "landscape"} <= NOT_INSERTED
    feats = torch.randn(2, 49, 1280)
    search = SearchConfig(beam_size=2, max_len=5)
    found = [[RecognizedObject("ski", 0.95)], [RecognizedObject("jersey", 0.95)]]
    monkeypatch.setattr(namer, "recognize", lambda f: found)
    got = namer.generate(feats, search)
    assert got.constraint == [None, None] and got.objects == found
    assert namer.captions(feats, search) == model.captions(feats, search)


def test_grammar_article_mass_noun_and_plural():
    words = lexicon_words()
    assert fix_grammar("a man drinks a espresso".split(), words["espresso"]) == "a man drinks an espresso".split()
    assert fix_grammar("a plate of a broccoli".split(), words["broccoli"]) == "a plate of broccoli".split()
    assert fix_grammar("two cat sit on a bed".split(), words["cat"]) == "two cats sit on a bed".split()
    assert fix_grammar("a group of cat".split(), words["cat"]) == "a group of cats".split()
    assert fix_grammar("a man sits at a candles".split(), words["candle"]) == "a man sits at a candle".split()
    assert fix_grammar("a espressos".split(), words["espresso"]) == "an espresso".split()
    assert fix_grammar("two cats sit".split(), words["cat"]) == "two cats sit".split()
    # a missing plural changes nothing
    assert fix_grammar("a dog on a bed".split(), dataclasses.replace(words["dog"], plural="")) == "a dog on a bed".split()
    assert fix_grammar("an tennis racket".split(), words["tennis racket"]) == "a tennis racket".split()


@pytest.fixture(scope="module")
def shipped():
    from captioner.inference.api import Captioner

    return Captioner.load(precision="fp32")


@pytest.mark.slow  # the shipped model and encoder on the four examples
def test_off_switch_gives_todays_captions_exactly(shipped):
    paths = [_example(n) for n in EXAMPLES]
    feats = shipped.encode(paths)
    search = shipped.model.search_config()
    today = shipped.model.generate(feats, search)
    off = shipped.caption_features(feats, objects=False)
    assert [c.text for c in off] == [shipped.model.vocab.decode(r[0].tolist()) for r in today.tokens]
    assert all(c.objects == [] and c.to_dict()["objects"] == [] for c in off)
    on = shipped.caption_features(feats, objects=True)
    assert "cat" in on[0].text.split() and "cat" not in off[0].text.split()
    assert "espresso" in on[1].text.split()
    assert on[0].objects[0].name == "cat" and on[1].objects[0].name == "espresso"


def _example(name: str):
    from importlib import resources

    return resources.files("captioner") / "examples" / f"{name}.jpg"


@pytest.mark.slow  # a CLI process loading the shipped model
def test_caption_json_records_carry_objects():
    paths = [str(_example(n)) for n in EXAMPLES]
    out = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", *paths, "--json", "--precision", "fp32"],
                         capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["objects"] and all(set(o) == {"name", "score"} for o in r["objects"])
        scores = [o["score"] for o in r["objects"]]
        assert scores == sorted(scores, reverse=True)


def test_api_schema_has_objects():
    pytest.importorskip("fastapi")
    from captioner.service.config import ServeConfig
    from captioner.service.serve import CaptionRequest, CaptionResult, caption_body

    result = CaptionResult.model_json_schema()
    assert "objects" in result["properties"]
    assert CaptionRequest.model_json_schema()["properties"]["objects"]["default"] is True
    assert "objects" in caption_body(ServeConfig())["content"]["multipart/form-data"]["schema"]["properties"]
