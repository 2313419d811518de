"""The server's and the web app's settings, read from a JSON or TOML file."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import ConfigError
from captioner.service.ab import Experiment, experiment_from_dict
from captioner.service.feedback import is_url

if TYPE_CHECKING:
    from captioner.data.images import ImageLimits


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

    def keys(self) -> list[str]:
        """API keys from the config and the CAPTIONER_API_KEYS environment variable (comma-separated)."""
        env = [k.strip() for k in os.environ.get("CAPTIONER_API_KEYS", "").split(",") if k.strip()]
        return [str(k) for k in self.api_keys] + env


def _read_table(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
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
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
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
        if not ok:
            raise ConfigError(f"{where}field {f.name}: expected {kind}, got {v!r}")
    for name in ("max_batch", "encode_chunk", "max_body_bytes", "max_pixels", "max_scans", "max_images", "max_beam_size",
                 "max_len", "max_n_best", "threads", "model_workers", "decode_workers", "max_in_flight", "keep_alive_s",
                 "max_connections", "db_pool"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}field {name}: must be at least 1")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{where}field port: must be 0 to 65535, not {cfg.port}")
    for name in ("request_timeout_s", "body_timeout_s", "body_deadline_s"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{where}field {name}: must be above 0")
    if not cfg.max_wait_ms >= 0:
        raise ConfigError(f"{where}field max_wait_ms: must be at least 0")
    if not all(isinstance(f, str) and f for f in cfg.image_formats) or not cfg.image_formats:
        raise ConfigError(f"{where}field image_formats: expected a non-empty list of format names, e.g. [\"JPEG\"]")
    return cfg
