"""Several trained checkpoints joined into one model that decodes with their mean word
distribution (see `decoders.Ensemble`). The result is an ordinary checkpoint: one config, one
vocab, one weights dict, so everything that loads a model loads an ensemble."""
from __future__ import annotations

from pathlib import Path

from captioner.models.checkpoint import FORMAT, FORMAT_VERSION, read_checkpoint
from captioner.errors import CheckpointError, ConfigError


def ensemble_checkpoint(paths: list[str | Path], name: str = "") -> dict:
    """One checkpoint dict from member checkpoints that share a vocab and an encoder.

    The members keep their own decoder configs and weights (stored under `members.I.`), a tuned
    encoder top included (each member runs its own on the shared cached regions); the
    ensemble starts with plain beam settings (length penalty 1.0, no n-gram blocking), to be
    tuned on dev like any model's.
    """
    if len(paths) < 2:
        raise ConfigError(f"an ensemble needs two or more checkpoints, got {len(paths)}")
    ckpts = [read_checkpoint(p) for p in paths]
    first, first_path = ckpts[0], Path(paths[0])
    members, state = [], {}
    for i, (path, ckpt) in enumerate(zip(paths, ckpts)):
        model = ckpt["model"]
        if model["decoder"] == "ensemble":
            raise CheckpointError("is itself an ensemble; list its member checkpoints instead", path)
        if ckpt["vocab"] != first["vocab"]:
            raise CheckpointError(f"its vocabulary differs from {first_path.name}'s; ensemble members must "
                                  f"share one (train them on the same data with the same min_word_count)", path)
        if ckpt["encoder"] != first["encoder"]:
            raise CheckpointError(f"its encoder ({ckpt['encoder'].get('name')}) differs from "
                                  f"{first_path.name}'s ({first['encoder'].get('name')}); ensemble members "
                                  f"read the same image features", path)
        members.append({"decoder": model["decoder"], "params": model["decoder_params"]})
        state.update({f"members.{i}.{k}": v for k, v in ckpt["decoder_state"].items()})
    names = [c["model"]["name"] for c in ckpts]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": name or f"ensemble-of-{len(ckpts)}", "encoder": first["model"]["encoder"],
                  "decoder": "ensemble", "decoder_params": {"members": members},
                  "description": f"mean word distribution of {len(ckpts)} decoders: {', '.join(names)}"},
        "encoder": first["encoder"],
        "vocab": first["vocab"],
        "decoder_state": state,
        "metrics": {},
        "decode": {"length_penalty": 1.0, "no_repeat_ngram": 0},
    }
