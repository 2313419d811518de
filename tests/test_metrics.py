import pytest

from captioner.evaluation import metrics
from captioner.evaluation.metrics import METRIC_NAMES, score_captions

REFS = {
    "a.jpg": ["a dog runs through the snow .", "A brown dog running in snow", "dog in the snow",
              "a dog plays outside in winter", "the dog is running"],
    "b.jpg": ["two children play on the beach", "kids playing in the sand .", "two kids at the beach",
              "children on a sandy beach", "a boy and a girl play near the ocean"],
    "c.jpg": ["a man rides a bike down a hill", "a cyclist on a dirt trail", "man on a mountain bike",
              "a person riding a bicycle", "a biker goes downhill ."],
}
PREDS = {"a.jpg": "a dog is running through the snow", "b.jpg": "two children play in the sand",
         "c.jpg": "a man is riding a bike"}

java = pytest.mark.skipif(not metrics.java_available(), reason="Java not installed")


class _NoSpice:
    """SPICE needs a model download; the rest of COCOEvalCap.evaluate runs unchanged."""

    def method(self):
        return "SPICE"

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)


@pytest.mark.slow
@java
def test_scores_match_the_toolkits_own_evaluation(monkeypatch):
    from pycocoevalcap import eval as coco_eval

    ids = {k: i for i, k in enumerate(sorted(REFS))}

    class FakeCoco:  # the part of the COCO API that COCOEvalCap reads
        def __init__(self, anns):
            self.imgToAnns = anns

        def getImgIds(self):
            return list(self.imgToAnns)

    gts = FakeCoco({ids[k]: [{"image_id": ids[k], "caption": c} for c in v] for k, v in REFS.items()})
    res = FakeCoco({ids[k]: [{"image_id": ids[k], "caption": PREDS[k]}] for k in REFS})
    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    ev = coco_eval.COCOEvalCap(gts, res)
    ev.evaluate()
    ours, notes = score_captions(PREDS, REFS)
    assert notes == []
    assert list(ours) == list(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert ours[k] == pytest.approx(ev.eval[k], abs=1e-9), k


def test_perfect_caption_beats_a_wrong_one():
    good, _ = score_captions({k: v[0] for k, v in REFS.items()}, REFS, ["Bleu_4", "CIDEr"])
    bad, _ = score_captions({k: "an airplane flies over the city" for k in REFS}, REFS, ["Bleu_4", "CIDEr"])
    assert good["CIDEr"] > bad["CIDEr"] + 1.0
    assert good["Bleu_4"] > 0.5 > bad["Bleu_4"]


def test_without_java_meteor_is_left_out_with_a_reason(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores, notes = score_captions(PREDS, REFS)
    assert "METEOR" not in scores and "CIDEr" in scores
    assert any("Java" in n and "METEOR" in n for n in notes)


def test_missing_prediction_is_named():
    with pytest.raises(ValueError, match="c.jpg"):
        score_captions({"a.jpg": "x", "b.jpg": "y"}, REFS)
