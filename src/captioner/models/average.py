"""Checkpoints of one model averaged weight by weight into one (stochastic weight averaging,
Izmailov et al. 2018; the checkpoint averaging of machine translation).

Unlike an ensemble (`captioner.ensemble`), the result is a single model of the same size and
speed: it only makes sense for checkpoints of the same run, or of runs that start from the same
weights, whose weights lie close enough for their mean to be a good model too.
"""
from __future__ import annotations

from pathlib import Path

import torch

from captioner.models.checkpoint import read_checkpoint
from captioner.errors import CheckpointError, ConfigError


def _same(ckpt: dict, first: dict, path: str | Path, first_name: str) -> None:
    """Refuse a checkpoint that is not the same model as the first, naming what differs."""
    for field, what in (("model", "model config"), ("encoder", "encoder"), ("vocab", "vocabulary")):
        if ckpt[field] != first[field]:
            raise CheckpointError(f"its {what} differs from {first_name}'s; only checkpoints of one model "
                                  f"(the same run's epochs) can be averaged", path)
    keys, first_keys = set(ckpt["decoder_state"]), set(first["decoder_state"])
    if keys != first_keys:
        odd = sorted(keys ^ first_keys)[0]
        raise CheckpointError(f"its weights differ from {first_name}'s (e.g. {odd!r})", path)
    for k, v in ckpt["decoder_state"].items():
        if v.shape != first["decoder_state"][k].shape:
            raise CheckpointError(f"weight {k!r} has shape {tuple(v.shape)}, "
                                  f"{first_name}'s {tuple(first['decoder_state'][k].shape)}", path)


def average_checkpoint(paths: list[str | Path]) -> dict:
    """One checkpoint whose floating-point weights are the mean of the given checkpoints'.

    Integer buffers (batch norm's step counters) and the decoding settings come from the first
    file; the mean is taken in float32 and stored in the first file's dtype. The result records
    the files it averages (`averaged_from`) and carries no metrics: it earned none yet.
    """
    if len(paths) < 2:
        raise ConfigError(f"averaging needs two or more checkpoints, got {len(paths)}")
    first_path = Path(paths[0])
    first = read_checkpoint(first_path)
    if first["model"].get("decoder") == "ensemble":
        raise CheckpointError("is an ensemble; average its members' own checkpoints instead", first_path)
    sums = {k: v.float().clone() for k, v in first["decoder_state"].items() if v.is_floating_point()}
    for path in paths[1:]:
        ckpt = read_checkpoint(path)
        _same(ckpt, first, path, first_path.name)
        for k in sums:
            sums[k] += ckpt["decoder_state"][k].float()
    state = {k: (sums[k] / len(paths)).to(v.dtype) if k in sums else v.clone()
             for k, v in first["decoder_state"].items()}
    out = {k: v for k, v in first.items() if k not in ("checksum", "optimizer", "generator", "torch_rng",
                                                      "progress", "weight_average")}
    return {**out, "decoder_state": state, "metrics": {}, "averaged_from": [Path(p).name for p in paths]}
