"""Run configs: typed dataclasses, read from a JSON file plus `key=value` overrides (training),
or from a JSON or TOML file (serving)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .ab import Experiment, experiment_from_dict
from .errors import ConfigError

if TYPE_CHECKING:
    from .images import ImageLimits


@dataclass
class TrainConfig:
    model: str = "show-attend-tell"  # a registered model config (captioner models)
    encoder: str = ""  # swap the model's image encoder (e.g. efficientnet-lite2); "" = the model's own
    data: str = "../shared/data/flickr8k"  # dataset folder or file (any format `captioner prepare` reads)
    data_format: str = "auto"  # flickr8k, flickr30k, coco, karpathy, manifest, prepared, or auto (detected)
    layout: str = "auto"  # Flickr8k/Flickr30k caption file: token, csv or auto
    image_root: str = ""  # folder the dataset's photo paths are relative to; "" = found beside its caption file
    out: str = "runs/show-attend-tell"  # run folder: checkpoints, logs, resolved config
    cache_dir: str = "~/.cache/captioner"  # encoder feature caches
    seed: int = 0
    epochs: int = 12  # upper bound; early stopping may end sooner
    batch_size: int = 100  # captions per optimiser step
    batching: str = "image"  # image: whole photos with all their captions; caption: independent pairs
    lr: float = 1e-3  # peak Adam learning rate
    warmup_steps: int = 200  # linear warm-up, then cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    encoder_lr_scale: float = 0.1  # a tuned encoder top's learning rate, relative to the decoder's (both stages)
    grad_clip: float = 5.0  # max global gradient norm
    ema_decay: float = 0.0  # score and keep a moving average of the weights (e.g. 0.999); 0 = the raw weights
    label_smoothing: float = 0.1
    mirror_prob: float = 0.0  # chance a train photo is seen mirrored in an epoch (0 = never; see train.TrainingSet)
    # Random crops: in each epoch each train photo is seen through a square crop of its cached feature
    # grid, its side a fraction drawn from [crop_scale, 1] of the whole, resized back (1 = never; see train.TrainingSet)
    crop_scale: float = 1.0
    min_word_count: int = 5  # words rarer than this in train captions become <unk>
    max_caption_len: int = 30  # words kept per training caption
    val_beam_size: int = 3  # dev decoding during training, as evaluate does it
    val_max_len: int = 25  # words generated at most
    length_penalty: float = 1.0  # beam ranking: sum(logprob) / length ** length_penalty
    patience: int = 3  # epochs without a dev CIDEr gain before stopping early
    # A final refit: the dev photos join the training set (vocabulary, batches, SCST reward and
    # mirror images included). Dev can then no longer judge the model, so each stage keeps its
    # last epoch and nothing stops early; dev is still scored each epoch, for the log only.
    train_on_dev: bool = False
    scst_epochs: int = 0  # self-critical epochs on CIDEr-D after cross-entropy (0 = none)
    scst_lr: float = 2e-5  # constant Adam learning rate during self-critical training
    scst_samples: int = 5  # captions sampled per image per step
    scst_batch_size: int = 50  # sampled captions per optimiser step (images x samples)
    scst_baseline: str = "greedy"  # reward baseline: greedy caption, or mean of the other samples
    scst_sampler: str = "multinomial"  # how captions are drawn: multinomial sampling, or the beam's top k
    scst_dropout: bool = False  # keep dropout on while sampling and in the gradient pass
    scst_max_len: int = 16  # words sampled at most (longer Flickr8k references are rare)
    # Self-critical trajectories averaged into one model (a "soup"): 1 = one trajectory, its best
    # epoch kept (its last in a refit); N > 1 = N trajectories of scst_epochs each from the same
    # cross-entropy weights (seeds seed, seed + 1, ...), best.pt the mean of all their epochs' weights
    scst_soup: int = 1
    init_checkpoint: str = ""  # start from this checkpoint (model, vocab, weights), e.g. SCST only
    max_train_images: int = 0  # 0 = all; small values make quick smoke runs
    max_val_images: int = 0  # 0 = all dev images
    feature_batch_size: int = 8  # images per encoder call when filling the feature cache
    feature_workers: int = 0  # processes loading photos while the encoder runs (0 = in the main process)
    device: str = "auto"  # cpu, cuda, or auto (this process's GPU where CUDA is present)
    amp: str = "auto"  # bfloat16 autocast while training: auto (where the CPU does bf16 natively), on, off
    threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True  # progress bars
    keep_epochs: bool = False  # also keep each epoch's weights, as epochs/epoch-N.pt (for captioner average)

    def to_dict(self) -> dict:
        return asdict(self)


# TrainConfig fields that say where a run reads and writes, or how it reports and uses the
# machine, not what it learns: two runs that differ only in these train the same model.
NOT_LEARNED = frozenset({"data", "data_format", "layout", "image_root", "out", "cache_dir", "progress", "threads",
                         "device", "feature_batch_size", "feature_workers", "keep_epochs"})


def _coerce(field_type: Any, raw: str, key: str) -> Any:
    kind = field_type if isinstance(field_type, str) else getattr(field_type, "__name__", str(field_type))
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"override {key}={raw!r}: expected a value of type {kind}") from None


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                      **explicit: Any) -> TrainConfig:
    """Defaults < JSON file < `key=value` overrides < explicit keyword values (None ignored)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        unknown = sorted(set(loaded) - set(types))
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        if key not in types:
            raise ConfigError(f"override {item!r}: unknown field {key!r}; known: {', '.join(types)}")
        values[key] = _coerce(types[key], raw, key)
    values.update({k: v for k, v in explicit.items() if v is not None})
    cfg = TrainConfig(**values)
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), f.type if isinstance(f.type, str) else f.type.__name__
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = {"int": isinstance(v, int) and not isinstance(v, bool), "float": number,
              "bool": isinstance(v, bool), "str": isinstance(v, str)}.get(kind, True)
        if not ok:
            raise ConfigError(f"field {f.name}: expected {kind}, got {v!r}")
    if not 0.0 <= cfg.mirror_prob <= 1.0:
        raise ConfigError(f"field mirror_prob: must be 0 to 1, not {cfg.mirror_prob!r}")
    if not 0.0 < cfg.crop_scale <= 1.0:
        raise ConfigError(f"field crop_scale: must be above 0 and at most 1, not {cfg.crop_scale!r}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"field ema_decay: must be at least 0 and below 1, not {cfg.ema_decay!r}")
    if cfg.scst_soup < 1:
        raise ConfigError(f"field scst_soup: must be at least 1, not {cfg.scst_soup!r}")
    if cfg.scst_soup > 1 and cfg.scst_epochs < 1:
        raise ConfigError(f"field scst_soup: {cfg.scst_soup} trajectories need scst_epochs of at least 1")
    if cfg.scst_soup > 1 and cfg.ema_decay:
        raise ConfigError("field scst_soup: a soup averages kept epochs; use it without ema_decay")
    return cfg


@dataclass
class ServeConfig:
    """The server's and the web app's settings (`captioner serve --config FILE`, JSON or TOML)."""

    host: str = "127.0.0.1"  # listen address; the default keeps the server local
    port: int = 8000
    model_dir: str = "models"  # variants' checkpoints must lie inside it (relative to the config file)
    db: str = "captioner.db"  # SQLite feedback store (relative to the config file)
    api_keys: list = field(default_factory=list)  # accepted keys; none = open (plus CAPTIONER_API_KEYS)
    max_batch: int = 16  # photos per model call at most; 1 = no micro-batching
    max_wait_ms: float = 10.0  # how long the first photo of a batch waits for others to join it
    encode_chunk: int = 4  # photos per encoder call within a batch (large batches spill the CPU cache)
    max_body_bytes: int = 10_000_000  # larger request bodies get 413 before they are read
    max_pixels: int = 40_000_000  # larger photos get 413, judged from the header before decoding
    max_images: int = 16  # photos per JSON request
    max_beam_size: int = 8
    max_len: int = 40  # the most words a client may ask for
    max_n_best: int = 5  # the most alternatives a client may ask for (also bounded by the beam)
    store_images: bool = True  # keep uploaded photos in the store (finetune needs them)
    threads: int = 1  # torch CPU threads for the model
    # Pillow formats accepted; any other gets 415 naming it (TIFF is left out: its decoders are a
    # larger attack surface, and phones and browsers do not send it)
    image_formats: list = field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
    decode_workers: int = 2  # photos decoded at once: bounds the memory large uploads can take
    request_timeout_s: float = 30.0  # a caption not ready this long after the request arrived: 503
    body_timeout_s: float = 20.0  # a request body that stalls this long between chunks: 408
    max_in_flight: int = 64  # requests handled at once; more get 503 with Retry-After at once
    keep_alive_s: int = 5  # idle keep-alive connections are closed after this many seconds
    max_connections: int = 256  # uvicorn's hard cap on open connections (it answers 503 above it)
    experiment: Experiment = field(default_factory=Experiment)  # variants and their traffic weights

    def image_limits(self) -> "ImageLimits":
        from .images import ImageLimits

        return ImageLimits(self.max_pixels, tuple(f.upper() for f in self.image_formats))

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
        for key in ("model_dir", "db"):
            if isinstance(loaded.get(key), str):
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
    for name in ("max_batch", "encode_chunk", "max_body_bytes", "max_pixels", "max_images", "max_beam_size",
                 "max_len", "max_n_best", "threads", "decode_workers", "max_in_flight", "keep_alive_s",
                 "max_connections"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}field {name}: must be at least 1")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{where}field port: must be 0 to 65535, not {cfg.port}")
    for name in ("request_timeout_s", "body_timeout_s"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{where}field {name}: must be above 0")
    if not cfg.max_wait_ms >= 0:
        raise ConfigError(f"{where}field max_wait_ms: must be at least 0")
    if not all(isinstance(f, str) and f for f in cfg.image_formats) or not cfg.image_formats:
        raise ConfigError(f"{where}field image_formats: expected a non-empty list of format names, e.g. [\"JPEG\"]")
    return cfg
