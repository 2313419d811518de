"""Training configs: a typed dataclass, read from a JSON file plus `key=value` overrides."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from captioner.errors import ConfigError


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
