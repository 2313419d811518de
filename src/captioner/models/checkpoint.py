"""Self-describing checkpoints: plain types and tensors only, written atomically.

A checkpoint holds its format version, the model config, the vocab, the encoder's name and
preprocessing, the decoder weights and the metrics it earned, so it loads on its own with
`torch.load(weights_only=True)`: no pickled code, no side files. A SHA-256 of the whole
content is stored with it and checked on loading, so a damaged file (a flipped bit, a
botched copy) is refused by name instead of loading wrong weights; files from before the
checksum load unchecked.

A valid checksum says the file is intact, not that it is benign: `validate_checkpoint` checks
every field the loader uses against an allow-list and sane ranges before anything is built or
imported (the encoder must be a registered one, with its own weights package; sizes, the
normalisation and the search settings within range), and the model is first built on the meta
device (no memory) to check that its weights' names and shapes are those the file holds, so
the real build costs no more than the file's own tensors.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from captioner.models.decoders import DECODERS, WithTunedTop
from captioner.models.encoders import ENCODERS, EncoderConfig
from captioner.errors import CheckpointError
from captioner.files import atomic_write, remove_stale_temps
from captioner.models.model import CaptionModel, ModelConfig
from captioner.inference.precision import PRECISIONS
from captioner.data.vocab import SPECIALS, Vocab

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
    if isinstance(obj, torch.Tensor) and (obj.layout != torch.strided or obj.device.type not in ("cpu", "cuda")):
        # no weights are sparse or on the meta device: hashed by kind only, refused by validation
        h.update(f"T{obj.layout}{obj.device.type}{obj.dtype}{tuple(obj.shape)};".encode())
    elif isinstance(obj, torch.Tensor):
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


def write_checkpoint(ckpt: dict, path: str | Path) -> str:
    """Store the checksum in the checkpoint, then write it atomically; returns the checksum.
    What the loader would refuse (`validate_checkpoint`) is refused here, before any file is
    written: a bad export option never replaces a good file with one that cannot be loaded."""
    try:
        validate_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError("not written, as captioner could not load it: "
                              + str(e).removeprefix("refused: "), path) from None
    checksum = content_checksum(ckpt)
    atomic_torch_save({**ckpt, "checksum": checksum}, path)
    return checksum


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
                    extra: dict | None = None, half: bool = False) -> str:
    """Write `model` as a checkpoint; returns its content checksum."""
    return write_checkpoint(checkpoint_dict(model, metrics, extra, half), path)


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
    if _is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is newer than this captioner "
                              f"reads ({FORMAT_VERSION}); upgrade captioner", path)
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"refused: field format_version: checkpoint format version {_show(version)} is not "
                              f"one captioner writes (a whole number 1 to {FORMAT_VERSION})", path)
    for key in ("model", "encoder", "vocab", "decoder_state"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint lacks the field {key!r}", path)
    if "checksum" in ckpt and ckpt["checksum"] != content_checksum(ckpt):
        raise CheckpointError("the contents do not match the checksum saved with them: the file is damaged "
                              "(on disk or in a copy); use another copy", path)
    validate_checkpoint(ckpt, path)
    return ckpt


# --- what a checkpoint may hold ---------------------------------------------------------------

MAX_IMAGE_SIZE = 1024  # encoder input side, pixels (the registered encoders take 224 to 260)
MAX_VOCAB = 200_000  # tokens
MAX_TOKEN_CHARS = 100
MAX_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 10_000
MAX_DIM = 16_384  # any integer size of a decoder (dims, heads, layers, positions)
LENGTH_PENALTY = (0.0, 5.0)  # beams ranked by logprob / length ** this
MAX_NO_REPEAT_NGRAM = 10
DECODE_FIELDS = {"length_penalty", "no_repeat_ngram", "precision", "encoder_precision", "mirror_views"}
MODEL_FIELDS = {"name", "encoder", "decoder", "decoder_params", "description"}


class _Invalid(Exception):
    """One field's problem: `field` is its dotted name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field}: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need_dict(d: Any, where: str, known: set[str] | None = None) -> dict:
    if not isinstance(d, dict):
        raise _Invalid(where, f"expected a table of fields, got {type(d).__name__}")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise _Invalid(where, f"field names must be text, got {bad[0]!r}")
    if known is not None:
        unknown = sorted(set(d) - known)
        if unknown:
            raise _Invalid(f"{where}.{unknown[0]}", f"not a field a checkpoint has (known: {', '.join(sorted(known))})")
    return d


def _text(v: Any, where: str, limit: int = MAX_NAME_CHARS) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise _Invalid(where, f"expected text of at most {limit} characters, got {_show(v)}")
    return v


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_encoder(enc: Any) -> None:
    known = {f.name for f in fields(EncoderConfig)}
    enc = _need_dict(enc, "encoder", known)
    name = enc.get("name")
    if name not in ENCODERS:
        raise _Invalid("encoder.name", f"{_show(name)} is not a known encoder (known: {', '.join(ENCODERS)})")
    registered = ENCODERS[name]
    # what the encoder is built from must be exactly the registered encoder's: above all its weights
    # package, which is imported (a crafted name would import a module from the current folder)
    for key in ("weights_package", "parts", "backbone", "split", "feature_dim"):
        if key in enc:
            value, want = enc[key], getattr(registered, key)
            if (tuple(value) if key == "parts" and isinstance(value, list) else value) != want or \
                    type(value) is bool:
                raise _Invalid(f"encoder.{key}", f"{_show(value)} is not encoder {name}'s ({want!r}); the "
                                                 f"{'weights package must be one of the known encoders' if key == 'weights_package' else 'encoder must be the registered one'}")
    size = enc.get("image_size")
    if not _is_int(size) or not 32 <= size <= MAX_IMAGE_SIZE:
        raise _Invalid("encoder.image_size", f"{_show(size)} is out of range: 32 to {MAX_IMAGE_SIZE} pixels")
    for key, default in (("mean", registered.mean), ("std", registered.std)):
        v = enc.get(key, default)
        if not _is_number(v) or abs(v) > 1e4:
            raise _Invalid(f"encoder.{key}", f"{_show(v)} must be a finite number (at most 10000 in size)")
    if not enc.get("std", registered.std) > 0:
        raise _Invalid("encoder.std", f"{_show(enc.get('std'))} must be above 0 (pixels are divided by it)")


def _check_params(config_cls: type, params: Any, where: str) -> None:
    """A decoder's params: known fields, each of its default's type, numbers within range."""
    params = _need_dict(params, where, {f.name for f in fields(config_cls)})
    for f in fields(config_cls):
        if f.name not in params:
            continue
        v, default, at = params[f.name], f.default, f"{where}.{f.name}"
        if default is MISSING or default is None:  # a structured field (an ensemble's members)
            continue
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise _Invalid(at, f"expected true or false, got {_show(v)}")
        elif isinstance(default, int):
            if not _is_int(v) or not 0 <= v <= MAX_DIM:
                raise _Invalid(at, f"{_show(v)} is out of range: a whole number 0 to {MAX_DIM}")
        elif isinstance(default, float):
            top = 1.0 if "dropout" in f.name else 100.0
            if not _is_number(v) or not 0 <= v <= top:
                raise _Invalid(at, f"{_show(v)} is out of range: a finite number 0 to {top:g}")
        elif isinstance(default, str):
            _text(v, at)


def _check_model(model: Any) -> None:
    model = _need_dict(model, "model", MODEL_FIELDS)
    _text(model.get("name"), "model.name")
    _text(model.get("description", ""), "model.description", MAX_DESCRIPTION_CHARS)
    if model.get("encoder") not in ENCODERS:
        raise _Invalid("model.encoder", f"{_show(model.get('encoder'))} is not a known encoder")
    decoder = model.get("decoder")
    if decoder not in DECODERS:
        raise _Invalid("model.decoder", f"{_show(decoder)} is not a known decoder (known: {', '.join(sorted(DECODERS))})")
    params = model.get("decoder_params", {})
    _check_params(DECODERS[decoder][1], params, "model.decoder_params")
    if decoder == "ensemble":
        members = params.get("members")
        if not isinstance(members, list) or not 2 <= len(members) <= 16:
            raise _Invalid("model.decoder_params.members", "expected a list of 2 to 16 decoders")
        for i, m in enumerate(members):
            at = f"model.decoder_params.members[{i}]"
            m = _need_dict(m, at, {"decoder", "params"})
            if m.get("decoder") not in DECODERS or m.get("decoder") == "ensemble":
                raise _Invalid(f"{at}.decoder", f"{_show(m.get('decoder'))} is not a known decoder")
            _check_params(DECODERS[m["decoder"]][1], m.get("params", {}), f"{at}.params")


def _check_vocab(vocab: Any) -> None:
    vocab = _need_dict(vocab, "vocab", {"tokens"})
    tokens = vocab.get("tokens")
    if not isinstance(tokens, list) or not len(SPECIALS) < len(tokens) <= MAX_VOCAB:
        raise _Invalid("vocab.tokens", f"expected a list of {len(SPECIALS) + 1} to {MAX_VOCAB} tokens")
    if tokens[:len(SPECIALS)] != list(SPECIALS):
        raise _Invalid("vocab.tokens", f"must start with the special tokens {', '.join(SPECIALS)}")
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or not 0 < len(t) <= MAX_TOKEN_CHARS:
            raise _Invalid(f"vocab.tokens[{i}]", f"expected a word of 1 to {MAX_TOKEN_CHARS} characters, got {_show(t)}")
    if len(set(tokens)) != len(tokens):
        raise _Invalid("vocab.tokens", "a token is repeated")


def _check_decode(decode: Any) -> None:
    decode = _need_dict(decode, "decode", DECODE_FIELDS)
    lp = decode.get("length_penalty", 1.0)
    if not _is_number(lp) or not LENGTH_PENALTY[0] <= lp <= LENGTH_PENALTY[1]:
        raise _Invalid("decode.length_penalty", f"{_show(lp)} is out of range: a finite number "
                                                f"{LENGTH_PENALTY[0]:g} to {LENGTH_PENALTY[1]:g}")
    n = decode.get("no_repeat_ngram", 0)
    if not _is_int(n) or not 0 <= n <= MAX_NO_REPEAT_NGRAM:
        raise _Invalid("decode.no_repeat_ngram", f"{_show(n)} is out of range: 0 (off) to {MAX_NO_REPEAT_NGRAM}")
    for key in ("precision", "encoder_precision"):
        if decode.get(key, "fp32") not in PRECISIONS:
            raise _Invalid(f"decode.{key}", f"{_show(decode.get(key))} must be {' or '.join(PRECISIONS)}")
    if not isinstance(decode.get("mirror_views", False), bool):
        raise _Invalid("decode.mirror_views", f"{_show(decode.get('mirror_views'))} must be true or false")


STATE_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64,
                torch.int64}  # weights; batch norm's step count


def _check_state(state: Any) -> None:
    state = _need_dict(state, "decoder_state")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise _Invalid(f"decoder_state.{k}", f"expected a tensor, got {type(v).__name__}")
        if v.layout != torch.strided or v.device.type != "cpu" or v.dtype not in STATE_DTYPES:
            raise _Invalid(f"decoder_state.{k}", f"expected a dense tensor of floats, got a {v.layout} "
                                                f"{v.dtype} tensor on {v.device.type}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise _Invalid(f"decoder_state.{k}", "holds NaN or infinite weights")


def _check_metrics(metrics: Any, where: str = "metrics", depth: int = 0) -> None:
    """What a run earned: plain values (numbers, text, true/false, lists and tables of them), as
    `Captioner.info` hands them on and JSON writes them."""
    if isinstance(metrics, dict) and depth < 8:
        for k, v in _need_dict(metrics, where).items():
            _check_metrics(v, f"{where}.{k}", depth + 1)
    elif isinstance(metrics, list) and depth < 8:
        for i, v in enumerate(metrics):
            _check_metrics(v, f"{where}[{i}]", depth + 1)
    elif depth == 0 or not (metrics is None or isinstance(metrics, (str, bool, int, float))):
        raise _Invalid(where, f"expected {'a table of' if depth == 0 else ''} plain values (numbers, text, "
                              f"lists, tables), got {type(metrics).__name__}")


def validate_checkpoint(ckpt: dict, path: str | Path | None = None) -> None:
    """Check every field the loader uses against its allow-list and range; `CheckpointError`
    naming the first bad field. Nothing is built or imported here. (Fields the loader does not
    use, such as a training run's optimizer state, are left to their own readers.)"""
    try:
        _check_model(ckpt["model"])
        _check_encoder(ckpt["encoder"])
        _check_vocab(ckpt["vocab"])
        _check_decode(ckpt.get("decode", {}))
        _check_state(ckpt["decoder_state"])
        _check_metrics(ckpt.get("metrics", {}))
    except _Invalid as e:
        raise CheckpointError(f"refused: {e}", path) from None


def _check_shapes(model: CaptionModel, state: dict) -> None:
    """The weights the model's config makes must be the ones the file holds, name for name and
    shape for shape (checked on a meta-device build, before the real one allocates anything)."""
    made = model.decoder.state_dict()
    want = {k: tuple(v.shape) for k, v in made.items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            raise ValueError(f"decoder_state.{k}: the config makes {want.get(k) or 'no such weight'}, "
                             f"the file holds {have.get(k) or 'none'}")
        if made[k].is_floating_point() != state[k].is_floating_point():
            raise ValueError(f"decoder_state.{k}: the config makes a {made[k].dtype} tensor, the file holds "
                             f"{state[k].dtype}")


def load_checkpoint(path: str | Path) -> tuple[CaptionModel, dict]:
    """Validate the checkpoint's fields, check its weights' shapes against a meta-device build,
    then rebuild the model from its config and load its weights (float32). A recognition head
    made for exactly this file (`recognition_head_path`) is attached (`model.recognition_head`)."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    try:
        with torch.device("meta"):
            probe = CaptionModel(ModelConfig.from_dict(ckpt["model"]), Vocab.from_dict(ckpt["vocab"]),
                                 EncoderConfig.from_dict(ckpt["encoder"]))
        _check_shapes(probe, ckpt["decoder_state"])
        del probe
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
    sidecar = recognition_head_path(path)
    if model.encoder_cfg.split and isinstance(model.decoder, WithTunedTop) and sidecar.exists():
        model.attach_recognition_head(load_recognition_head(sidecar, ckpt.get("checksum")))
    return model.eval(), ckpt


# --- the recognition head: a sidecar file bound to one checkpoint --------------------------------

HEAD_FORMAT = "captioner-recognition-head"
HEAD_FORMAT_VERSION = 1
HEAD_FIELDS = {"format", "format_version", "checkpoint_checksum", "weight", "bias", "meta"}
HEAD_SHAPE = (1000, 1280)  # ImageNet-1k classes x the tuned top's channels (every EfficientNet-Lite head)


def recognition_head_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's recognition head lies: `default.pt` -> `default.recognition.pt`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".recognition.pt")


def save_recognition_head(path: str | Path, weight: torch.Tensor, bias: torch.Tensor, checkpoint_checksum: str,
                          meta: dict | None = None) -> None:
    """Write a recognition head (`weight` (1000, 1280), `bias` (1000,), stored fp16) bound to the
    checkpoint whose content checksum is `checkpoint_checksum`, atomically."""
    atomic_torch_save({"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION,
                       "checkpoint_checksum": str(checkpoint_checksum),
                       "weight": weight.detach().cpu().half().contiguous(),
                       "bias": bias.detach().cpu().half().contiguous(), "meta": dict(meta or {})}, path)


def load_recognition_head(path: str | Path, checkpoint_checksum: str | None) -> torch.nn.Linear | None:
    """The recognition head in `path` as a float32 Linear(1280, 1000), checked field by field
    (`CheckpointError` naming the problem for a file that is not a valid head); None, with a
    warning, where the head was made for another checkpoint (a stale sidecar after a re-export):
    recognition then falls back to the stock classifier."""
    path = Path(path)
    try:
        head = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"not a readable recognition head: {_why_unreadable(e, path)}", path) from None
    if not isinstance(head, dict) or head.get("format") != HEAD_FORMAT:
        raise CheckpointError(f"not a recognition head (no 'format': {HEAD_FORMAT!r} field)", path)
    if head.get("format_version") != HEAD_FORMAT_VERSION:
        raise CheckpointError(f"recognition head format version {head.get('format_version')!r}: this captioner "
                              f"reads {HEAD_FORMAT_VERSION}; rebuild it with release/recognition_head.py", path)
    unknown = sorted(map(str, set(head) - HEAD_FIELDS))
    if unknown:
        raise CheckpointError(f"recognition head: unknown field(s) {', '.join(unknown)}", path)
    for key, shape in (("weight", HEAD_SHAPE), ("bias", HEAD_SHAPE[:1])):
        t = head.get(key)
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float16, torch.float32):
            raise CheckpointError(f"recognition head: field {key} must be a float16 or float32 tensor", path)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"recognition head: field {key} has shape {tuple(t.shape)}, not {shape}", path)
        if not torch.isfinite(t).all():
            raise CheckpointError(f"recognition head: field {key} holds NaN or infinite values", path)
    bound = head.get("checkpoint_checksum")
    if not isinstance(bound, str):
        raise CheckpointError("recognition head: field checkpoint_checksum must be a string", path)
    if checkpoint_checksum is None or bound != checkpoint_checksum:
        warnings.warn(f"{path}: this recognition head was made for another checkpoint ({bound[:20]}...); "
                      "recognising with the stock classifier instead (`captioner export` carries a model's head to the "
                      "file it writes)",
                      stacklevel=2)
        return None
    linear = torch.nn.Linear(HEAD_SHAPE[1], HEAD_SHAPE[0])
    with torch.no_grad():
        linear.weight.copy_(head["weight"].float())
        linear.bias.copy_(head["bias"].float())
    return linear.requires_grad_(False).eval()
