"""Checks on the real Flickr8k copy; skipped where it is absent."""
import pytest

from captioner.inference.api import Captioner
from captioner.data.datasets import load_flickr8k
from captioner.inference.decode import SearchConfig
from captioner.data.features import build_cache
from captioner.evaluation.metrics import score_captions
from captioner.evaluation.evaluate import decode_records

from conftest import FLICKR8K, needs_flickr8k

pytestmark = [needs_flickr8k(), pytest.mark.flickr8k, pytest.mark.slow]


def test_shipped_model_captions_real_test_photos_well(tmp_path):
    """A 150-photo slice of the test split: far above chance, close to the full-split scores."""
    model = Captioner.load().model
    records = load_flickr8k(FLICKR8K).split("test")[:150]
    ds = load_flickr8k(FLICKR8K)
    cache = build_cache(ds.image_dir, [r.image for r in records], model.encoder_cfg, tmp_path, progress=False)
    preds = decode_records(model, cache, records, SearchConfig(beam_size=3))
    scores, _ = score_captions(preds, {r.image: r.captions for r in records}, ["Bleu_4", "CIDEr"])
    assert scores["CIDEr"] > 0.45 and scores["Bleu_4"] > 0.17, scores
    assert len(set(preds.values())) > 100, "the same caption for many photos"
