"""Score a checkpoint on a dataset split with the standard caption toolkit."""
from __future__ import annotations

import json
import os
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
from captioner.inference.precision import resolve_precision


@torch.no_grad()
def decode_records(model: CaptionModel, cache: FeatureCache, records: list[ImageRecord],
                   search: SearchConfig, batch_size: int = 100, progress: bool = False,
                   mirror: FeatureCache | None = None) -> dict[str, str]:
    """Caption each record's image from the feature cache: {image: caption}. A model with
    `mirror_views` reads each photo's mirror image too, from `mirror` (a `mirror=True` cache)."""
    if model.mirror_views and mirror is None:
        raise ValueError("this model reads each photo's mirror image too (mirror_views): "
                         "decoding it needs the photos' mirror features")
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for s in tqdm(range(0, len(records), batch_size), desc="decode", disable=not progress, leave=False):
        chunk = records[s:s + batch_size]
        names = [r.image for r in chunk]
        feats = cache.get(names)
        if model.mirror_views:
            feats = torch.cat([feats, mirror.get(names)], 1)
        feats = feats.to(device)
        for r, caption in zip(chunk, model.captions(feats, search)):
            out[r.image] = caption
    return out


def evaluate(model: CaptionModel, data: str | Path, split: str = "test", search: SearchConfig | None = None,
             layout: str = "auto", cache_dir: str | Path = "~/.cache/captioner", seed: int = 0,
             captions_out: str | Path | None = None, progress: bool = True, data_format: str = "auto",
             image_root: str = "", device: str = "cpu", encoder_precision: str | None = None
             ) -> tuple[dict[str, float], list[str]]:
    """Decode every image of `split` ("all" for every image) of a dataset in any format
    `load_dataset` reads, and score it; returns (toolkit scores, notes). `encoder_precision` is
    the precision the photos are encoded in: "fp32", "bf16", or None for the model's own where
    the device does bf16 natively (as `Captioner` resolves it), like its `mirror_views`."""
    encoder_precision = resolve_precision(encoder_precision, model.encoder_precision, device)
    search = search or SearchConfig()
    dataset = load_dataset(data, data_format, layout=layout, seed=seed, image_root=image_root)
    records = dataset.split(split)
    if not records:
        raise DataError(f"split {split!r} has no images", data)

    def cache(mirror: bool) -> FeatureCache:
        return build_cache(dataset.image_dir, [r.image for r in records], model.encoder_cfg,
                           Path(cache_dir).expanduser(), tag=dataset.name, progress=progress,
                           env=DistEnv(device=device), mirror=mirror, precision=encoder_precision)

    preds = decode_records(model, cache(False), records, search, progress=progress,
                           mirror=cache(True) if model.mirror_views else None)
    scores, notes = score_captions(preds, {r.image: r.captions for r in records}, METRIC_NAMES)
    if captions_out is not None:
        path = Path(captions_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"image": r.image, "caption": preds[r.image], "references": r.captions} for r in records]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, path)
    return scores, notes
