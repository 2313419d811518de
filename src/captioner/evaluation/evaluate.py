"""Score a checkpoint on a dataset split with the standard caption toolkit."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.data.datasets import ImageRecord, load_dataset
from captioner.errors import DataError
from captioner.inference.decode import SearchConfig
from captioner.distributed import DistEnv
from captioner.data.features import FeatureCache, build_cache
from captioner.evaluation.metrics import METRIC_NAMES, score_captions
from captioner.models.model import CaptionModel
from captioner.files import atomic_write_text


@torch.no_grad()
def decode_records(model: CaptionModel, cache: FeatureCache, records: list[ImageRecord],
                   search: SearchConfig, batch_size: int = 100, progress: bool = False,
                   objects: bool = False) -> dict[str, str]:
    """Caption each record's image from the feature cache: {image: caption}; `objects` names
    recognised objects in the captions (`captioner.models.objects`)."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for s in tqdm(range(0, len(records), batch_size), desc="decode", disable=not progress, leave=False):
        chunk = records[s:s + batch_size]
        feats = cache.get([r.image for r in chunk]).to(device)
        for r, caption in zip(chunk, model.captions(feats, search, objects=objects)):
            out[r.image] = caption
    return out


def evaluate(model: CaptionModel, data: str | Path, split: str = "test", search: SearchConfig | None = None,
             layout: str = "auto", cache_dir: str | Path = "~/.cache/captioner", seed: int = 0,
             captions_out: str | Path | None = None, progress: bool = True, data_format: str = "auto",
             image_root: str = "", device: str = "cpu", objects: bool = False,
             objects_threshold: float | None = None) -> tuple[dict[str, float], list[str]]:
    """Decode every image of `split` ("all" for every image) of a dataset in any format
    `load_dataset` reads, and score it; returns (toolkit scores, notes). With `captions_out`,
    each photo's caption and references are written there (the input of `captioner compare`)."""
    search = search or SearchConfig()
    dataset = load_dataset(data, data_format, layout=layout, seed=seed, image_root=image_root)
    records = dataset.split(split)
    if not records:
        raise DataError(f"split {split!r} has no images", data)
    cache = build_cache(dataset.image_dir, [r.image for r in records], model.encoder_cfg,
                        Path(cache_dir).expanduser(), tag=dataset.name, progress=progress, env=DistEnv(device=device))
    if objects and objects_threshold is not None:
        model.object_namer(objects_threshold)
    preds = decode_records(model, cache, records, search, progress=progress, objects=objects)
    scores, notes = score_captions(preds, {r.image: r.captions for r in records}, METRIC_NAMES)
    if captions_out is not None:
        rows = [{"image": r.image, "caption": preds[r.image], "references": r.captions} for r in records]
        atomic_write_text(captions_out, json.dumps(rows, indent=1) + "\n")
    return scores, notes
