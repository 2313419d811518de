"""Dev scoring during training: decode the dev photos for real and score them with the same
metrics code as the final evaluation."""
from __future__ import annotations

from captioner.data.datasets import ImageRecord
from captioner.data.features import FeatureCache
from captioner.distributed import DistEnv, broadcast, gather_lists, shard
from captioner.evaluation.evaluate import decode_records
from captioner.evaluation.metrics import score_captions
from captioner.inference.decode import SearchConfig
from captioner.models.model import CaptionModel
from captioner.training.config import TrainConfig

VAL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


def validate(model: CaptionModel, cache: FeatureCache, records: list[ImageRecord], cfg: TrainConfig,
             env: DistEnv | None = None) -> dict[str, float]:
    """Decode the dev photos for real (each rank its share) and score them on rank 0; every
    rank gets the scores, so all agree on early stopping."""
    search = SearchConfig(beam_size=cfg.val_beam_size, max_len=cfg.val_max_len,
                          length_penalty=cfg.length_penalty)
    main = env is None or env.is_main
    preds = decode_records(model, cache, shard(records, env), search, progress=cfg.progress and main)
    preds = dict(gather_lists(list(preds.items()), env))
    scores = score_captions(preds, {r.image: r.captions for r in records}, VAL_METRICS)[0] if main else None
    return broadcast(scores, env)
