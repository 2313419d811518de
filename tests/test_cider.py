"""The reward scorer computes the toolkit's CIDEr-D."""
import pytest

from captioner.evaluation.cider import CiderD, corpus_cider

REFS = {
    "a": ["a dog runs through the snow", "a brown dog running in snow", "the dog plays in the white snow"],
    "b": ["two children play on a beach", "kids playing in the sand", "two kids on the beach near the water"],
    "c": ["a man rides a bike down a hill", "a cyclist on a dirt path", "a person riding a bicycle"],
}
PREDS = {"a": "a dog runs in the snow", "b": "two kids play on the beach", "c": "a man in a red shirt"}


def test_matches_the_toolkit_cider_with_the_same_references():
    Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider
    toolkit, per_image = Cider().compute_score({k: v for k, v in REFS.items()}, {k: [PREDS[k]] for k in REFS})
    refs = {k: [r.split() for r in v] for k, v in REFS.items()}
    ours = corpus_cider({k: PREDS[k].split() for k in REFS}, refs)
    assert ours == pytest.approx(toolkit, abs=1e-9)
    scorer = CiderD(refs)
    for k, expected in zip(sorted(REFS), per_image):
        assert scorer.score(k, PREDS[k].split()) == pytest.approx(expected, abs=1e-9)


def test_better_captions_earn_more():
    scorer = CiderD({k: [r.split() for r in v] for k, v in REFS.items()})
    good = scorer.score("a", "a dog runs through the snow".split())
    worse = scorer.score("a", "a dog".split())
    wrong = scorer.score("a", "two kids on the beach".split())
    assert good > worse > wrong >= 0
    assert scorer.score("a", []) == 0.0


def test_document_frequencies_can_come_from_a_larger_corpus():
    """Given the references themselves as the documents, the scores are the default's; given a
    corpus where "dog" is in every photo's captions, matching "dog" earns less than matching
    the rare "zebra"."""
    refs = {0: [["a", "zebra", "runs"]], 1: [["a", "dog", "runs"]], 2: [["a", "cat", "sits"]]}
    default = CiderD(refs)
    same = CiderD(refs, documents=list(refs.values()))
    for key, caption in [(0, ["a", "zebra"]), (1, ["a", "dog"]), (2, ["a", "cat", "runs"])]:
        assert same.score(key, caption) == pytest.approx(default.score(key, caption))
    corpus = list(refs.values()) + [[["a", "dog", "sits"]]] * 20
    wide = CiderD(refs, documents=corpus)
    assert default.score(0, ["a", "zebra"]) == pytest.approx(default.score(1, ["a", "dog"]))
    assert wide.score(0, ["a", "zebra"]) > wide.score(1, ["a", "dog"])
