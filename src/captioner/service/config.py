"""The server's and the web app's settings, read from a JSON or TOML file."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import ConfigError
from captioner.files import repeated_key
from captioner.service.ab import Experiment, experiment_from_dict
from captioner.service.feedback import is_url, text_problem

if TYPE_CHECKING:
    from captioner.data.images import ImageLimits

MOST_THREADS = 256  # threads, model workers, photo decoders: more is a typo, not a machine
# The range of every numeric field. Values outside it are typos or unit mix-ups that would fail
# late and far from the config: `max_wait_ms = inf` kills every model worker, `threads = 10**20`
# overflows torch, `model_workers = 10**9` never finishes starting. (64: the widest beam the
# search takes, captioner.inference.api.MAX_BEAM_SIZE, not imported here: it brings torch.)
RANGES: dict[str, tuple[float, float]] = {
    "port": (0, 65535), "db_pool": (1, 1024), "max_batch": (1, 1024), "max_wait_ms": (0, 60_000),
    "encode_chunk": (1, 1024), "max_body_bytes": (1, 2**30), "max_pixels": (1, 1_000_000_000),
    "max_scans": (1, 10_000), "max_images": (1, 1024), "max_beam_size": (1, 64), "max_len": (1, 1000),
    "max_n_best": (1, 64), "model_workers": (1, MOST_THREADS), "threads": (1, MOST_THREADS),
    "decode_workers": (1, MOST_THREADS), "request_timeout_s": (0, 3600), "body_timeout_s": (0, 3600),
    "body_deadline_s": (0, 3600), "max_in_flight": (1, 100_000), "keep_alive_s": (1, 3600),
    "max_connections": (1, 100_000),
}
ABOVE_LOW = {"request_timeout_s", "body_timeout_s", "body_deadline_s"}  # 0 s would refuse every request
MAX_NAME_CHARS = 100  # the experiment's name, recorded with every caption


@dataclass
class ServeConfig:
    """The server's and the web app's settings (`captioner serve --config FILE`, JSON or TOML)."""

    host: str = "127.0.0.1"  # listen address; the default keeps the server local
    port: int = 8000
    model_dir: str = "models"  # variants' checkpoints must lie inside it (relative to the config file)
    # the feedback and A/B store: a SQLite file (relative to the config file), or a PostgreSQL
    # URL (postgresql://user@host:5432/name) that several replicas share
    db: str = "captioner.db"
    db_pool: int = 8  # PostgreSQL connections one server process opens at most
    api_keys: list = field(default_factory=list)  # accepted keys; none = open (plus CAPTIONER_API_KEYS)
    max_batch: int = 16  # photos per model call at most; 1 = no micro-batching
    max_wait_ms: float = 10.0  # how long the first photo of a batch waits for others to join it
    encode_chunk: int = 4  # photos per encoder call within a batch (large batches spill the CPU cache)
    max_body_bytes: int = 10_000_000  # larger request bodies get 413 before they are read
    max_pixels: int = 40_000_000  # larger photos get 413, judged from the header before decoding
    max_scans: int = 100  # a JPEG with more scans is refused (413) from its bytes before decoding
    max_images: int = 16  # photos per JSON request
    max_beam_size: int = 8
    max_len: int = 40  # the most words a client may ask for
    max_n_best: int = 5  # the most alternatives a client may ask for (also bounded by the beam)
    store_images: bool = True  # keep uploaded photos in the store (finetune needs them)
    # model workers: each gathers its own batches and captions them, with `threads` torch
    # threads; two workers of one thread keep two cores busy (speed.md says which to use where)
    model_workers: int = 2
    threads: int = 1  # torch CPU threads for each model worker
    # Pillow formats accepted; any other gets 415 naming it (TIFF is left out: its decoders are a
    # larger attack surface, and phones and browsers do not send it)
    image_formats: list = field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
    decode_workers: int = 2  # photos decoded at once: bounds the memory large uploads can take
    request_timeout_s: float = 30.0  # a caption not ready this long after the request arrived: 503
    body_timeout_s: float = 20.0  # a request body that stalls this long between chunks: 408
    body_deadline_s: float = 25.0  # a request body not all arrived this long after the request began: 408
    max_in_flight: int = 64  # requests handled at once; more get 503 with Retry-After at once
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this many seconds
    max_connections: int = 256  # uvicorn's hard cap on open connections (it answers 503 above it)
    experiment: Experiment = field(default_factory=Experiment)  # variants and their traffic weights

    def image_limits(self) -> "ImageLimits":
        from captioner.data.images import ImageLimits

        return ImageLimits(self.max_pixels, tuple(f.upper() for f in self.image_formats), self.max_scans)

    def keys(self, where: str = "") -> list[str]:
        """API keys from the config and the CAPTIONER_API_KEYS environment variable (comma-separated;
        empty = none), each checked: one that can never match is refused, not silently useless.
        `where` (the config file) prefixes the config's own keys in errors."""
        env = os.environ.get("CAPTIONER_API_KEYS", "")
        named = [(f"{where}field api_keys[{i}]", k) for i, k in enumerate(self.api_keys)]
        named += [(f"CAPTIONER_API_KEYS[{i}]", k) for i, k in enumerate(env.split(",") if env else [])]
        for name, key in named:
            problem = key_problem(key)
            if problem:
                raise ConfigError(f"{name}: {problem}")
        return [k for _, k in named]


def key_problem(key: object) -> str | None:
    """Why `key` could never authenticate, or None. A header value is latin-1 and uvicorn strips
    its ends, so only printable ASCII without surrounding spaces can match (the key is never echoed)."""
    if not isinstance(key, str):
        return f"expected a string, not {type(key).__name__}"
    if not key:
        return "an empty key"
    if key != key.strip():
        return "has leading or trailing whitespace"
    bad = next((i for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if bad is not None:
        return f"holds a character other than printable ASCII at position {bad} (HTTP headers carry ASCII)"
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are all different: otherwise the last silently wins, and
    {"api_keys": ["k"], "api_keys": []} would open the server."""
    twice = repeated_key(pairs)
    if twice is not None:
        raise ConfigError(f"{twice[:60]!r} appears twice in one object; give each field once")
    return dict(pairs)


def _read_table(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            loaded = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    else:
        try:
            loaded = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except ValueError as e:  # an integer of more digits than Python converts
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a table/object of config fields")
    return loaded


def load_serve_config(path: str | Path | None = None, **explicit: Any) -> ServeConfig:
    """Defaults < the JSON/TOML file < explicit keyword values (None ignored). Relative
    `model_dir` and `db` in the file are taken relative to the file's folder."""
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(ServeConfig)}
    if path is not None:
        path = Path(path)
        loaded = _read_table(path)
        unknown = sorted(set(loaded) - set(types))
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}")
        if "experiment" in loaded:
            loaded["experiment"] = experiment_from_dict(loaded["experiment"], f"{path}: experiment")
        for key in ("model_dir", "db"):  # a URL stays as it is: the store refuses a scheme it does not know
            if isinstance(loaded.get(key), str) and not is_url(loaded[key]):
                loaded[key] = str(path.parent / Path(loaded[key]).expanduser())
        values.update(loaded)
    values.update({k: v for k, v in explicit.items() if v is not None})
    cfg = ServeConfig(**values)
    where = f"{path}: " if path is not None else ""
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), f.type if isinstance(f.type, str) else f.type.__name__
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"int": isinstance(v, int) and not isinstance(v, bool), "float": number,
              "bool": isinstance(v, bool), "str": isinstance(v, str), "list": isinstance(v, list)}.get(kind, True)
        if not ok:  # api_keys' value is not echoed: it may be a key
            shown = type(v).__name__ if f.name == "api_keys" else repr(v)[:60]
            raise ConfigError(f"{where}field {f.name}: expected {kind}, got {shown}")
    for name, (low, high) in RANGES.items():
        v = getattr(cfg, name)
        if not (low < v <= high if name in ABOVE_LOW else low <= v <= high):  # NaN fails both
            need = f"above {low:g} and at most {high:g}" if name in ABOVE_LOW else f"{low:g} to {high:g}"
            shown = repr(v) if len(repr(v)) <= 20 else f"{v:.3g}"
            raise ConfigError(f"{where}field {name}: must be a finite number {need}, not {shown}")
    if not cfg.host.strip():
        raise ConfigError(f"{where}field host: empty; give the address to listen on (127.0.0.1 keeps the server "
                          f"local; 0.0.0.0 listens on every interface, said explicitly)")
    cfg.keys(where)
    _check_image_formats(cfg.image_formats, where)
    _check_experiment(cfg.experiment, where)
    return cfg


def _check_image_formats(formats: list, where: str) -> None:
    """Each a format name Pillow knows: a misspelt one ("JPGE") would refuse every photo with 415."""
    if not formats or not all(isinstance(f, str) and f for f in formats):
        raise ConfigError(f"{where}field image_formats: expected a non-empty list of format names, e.g. [\"JPEG\"]")
    from PIL import Image

    Image.init()
    known = set(Image.OPEN) | set(Image.registered_extensions().values())
    for i, f in enumerate(formats):
        if f.upper() not in known:
            raise ConfigError(f"{where}field image_formats[{i}]: {f[:40]!r} is not an image format Pillow knows "
                              f"(e.g. JPEG, PNG, WEBP, GIF, BMP)")


def _check_experiment(experiment: Experiment, where: str) -> None:
    """What `experiment_from_dict` leaves: the name stored with every caption, and weights whose
    shares can be computed (inf or ~1e308 would send all traffic one way)."""
    problem = text_problem(experiment.name)
    if problem is None and len(experiment.name) > MAX_NAME_CHARS:
        problem = f"is {len(experiment.name)} characters long; at most {MAX_NAME_CHARS}"
    if problem:
        raise ConfigError(f"{where}experiment.name: {problem}")
    for i, v in enumerate(experiment.variants):
        if not math.isfinite(v.weight):
            raise ConfigError(f"{where}experiment.variants[{i}].weight: expected a finite number >= 0, "
                              f"not {v.weight!r}")
    if not math.isfinite(sum(v.weight for v in experiment.variants)):
        raise ConfigError(f"{where}experiment.variants: the weights add up to more than a float holds; "
                          f"give smaller ones (only their ratios count)")
