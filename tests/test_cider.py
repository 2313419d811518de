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
