"""Self-describing checkpoints: plain types and tensors only, written atomically.

A checkpoint holds its format version, the model config, the vocab, the encoder's name and
preprocessing, the decoder weights and the metrics it earned, so it loads on its own with
`torch.load(weights_only=True)`: no pickled code, no side files. A SHA-256 of the whole
content is stored with it and checked on loading, so a damaged file (a flipped bit, a
botched copy) is refused by name instead of loading wrong weights; files from before the
checksum load unchecked.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from captioner.models.encoders import EncoderConfig
from captioner.errors import CheckpointError
from captioner.files import atomic_write, remove_stale_temps
from captioner.models.model import CaptionModel, ModelConfig
from captioner.inference.precision import PRECISIONS
from captioner.data.vocab import Vocab

FORMAT = "captioner-checkpoint"
FORMAT_VERSION = 1
DEFAULT_MODEL = "default"  # the name of the shipped model wherever a checkpoint is taken


def default_model_path() -> Path:
    """The shipped default model (decoder weights and tuned encoder top, fp16) inside the package."""
    return Path(str(resources.files("captioner") / "weights" / "default.pt"))


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A checkpoint argument as a file: None or "default" is the shipped model (a file named
    `default` in the working folder is `./default`)."""
    if path is None or str(path) == DEFAULT_MODEL:
        return default_model_path()
    return Path(path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename: never a half-written file
    (and the temp files of earlier, killed writers are removed)."""
    remove_stale_temps(path)
    atomic_write(path, lambda f: torch.save(obj, f))


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Hash plain types and tensors in a canonical order (dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)};".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_checksum(ckpt: dict) -> str:
    """SHA-256 of a checkpoint's content (everything but the checksum field itself)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


def write_checkpoint(ckpt: dict, path: str | Path) -> None:
    """Store the checksum in the checkpoint, then write it atomically."""
    atomic_torch_save({**ckpt, "checksum": content_checksum(ckpt)}, path)


def checkpoint_dict(model: CaptionModel, metrics: dict | None = None, extra: dict | None = None,
                    half: bool = False) -> dict:
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.decoder.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "encoder": model.encoder_cfg.to_dict(),
        "vocab": model.vocab.to_dict(),
        "decoder_state": state,
        "metrics": dict(metrics or {}),
        "decode": {"length_penalty": float(model.length_penalty), "no_repeat_ngram": int(model.no_repeat_ngram),
                   "precision": str(model.precision)},
        **(extra or {}),
    }


def save_checkpoint(path: str | Path, model: CaptionModel, metrics: dict | None = None,
                    extra: dict | None = None, half: bool = False) -> None:
    write_checkpoint(checkpoint_dict(model, metrics, extra, half), path)


def _why_unreadable(e: Exception, path: Path) -> str:
    """torch.load's failure in words for a user (never its advice to load without weights_only)."""
    text = str(e).strip()
    if path.stat().st_size == 0:
        return "the file is empty"
    if "Weights only load failed" in text or type(e).__name__ == "UnpicklingError":
        return ("it is not a file of plain values and tensors (reading it would mean unpickling arbitrary "
                "objects, which captioner never does)")
    if "central directory" in text or isinstance(e, EOFError):
        return "the file is truncated or damaged"
    first = text.splitlines()[0] if text else type(e).__name__
    return f"truncated, corrupt or another format ({first[:200]}); nothing was unpickled"


def read_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint's dict (`path` may be "default", the shipped model), with a
    clear error for anything else."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found" if not path.exists() else
                              "not a regular file, so not a checkpoint", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"not a readable captioner checkpoint: {_why_unreadable(e, path)}", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError("not a captioner checkpoint (no 'format': 'captioner-checkpoint' field)", path)
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is newer than this captioner "
                              f"reads ({FORMAT_VERSION}); upgrade captioner", path)
    for key in ("model", "encoder", "vocab", "decoder_state"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint lacks the field {key!r}", path)
    if "checksum" in ckpt and ckpt["checksum"] != content_checksum(ckpt):
        raise CheckpointError("the contents do not match the checksum saved with them: the file is damaged "
                              "(on disk or in a copy); use another copy", path)
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[CaptionModel, dict]:
    """Rebuild the model from the checkpoint's config, then load its weights (float32)."""
    ckpt = read_checkpoint(path)
    try:
        model = CaptionModel(ModelConfig.from_dict(ckpt["model"]), Vocab.from_dict(ckpt["vocab"]),
                             EncoderConfig.from_dict(ckpt["encoder"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["decoder_state"].items()}
        model.decoder.load_state_dict(state)
        decode = ckpt.get("decode", {})
        model.length_penalty = float(decode.get("length_penalty", 1.0))
        model.no_repeat_ngram = int(decode.get("no_repeat_ngram", 0))
        model.precision = str(decode.get("precision", "fp32"))
        if model.precision not in PRECISIONS:
            raise ValueError(f"decode precision must be {', '.join(PRECISIONS)}, not {model.precision!r}")
        # settings of 0.1 whose trials lost (docs/experiments.md): their off values still load
        if decode.get("mirror_views", False) is not False:
            raise ValueError("decode mirror_views (reading each photo's mirror image too) was removed in "
                             "captioner 0.2; export the model again with captioner 0.1 and mirror views off")
        if decode.get("encoder_precision", "fp32") != "fp32":
            raise ValueError("decode encoder_precision bf16 was removed in captioner 0.2 (the encoder runs in fp32)")
    except Exception as e:
        raise CheckpointError(f"checkpoint does not match its own config: {e}", path) from None
    return model.eval(), ckpt
