"""Training configs: a typed dataclass, read from a JSON file plus `key=value` overrides."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from captioner.errors import ConfigError


@dataclass
class TrainConfig:
    """A training run. The defaults are the recipe the shipped model was trained with (its release
    run adds only `train_on_dev`, see configs/flickr8k-release.json); docs/experiments.md says
    why each value won."""

    model: str = "show-attend-tell"  # a registered model config (captioner models)
    encoder: str = "efficientnet-lite0-tuned"  # the image encoder; "" = the model config's own
    data: str = "../shared/data/flickr8k"  # dataset folder or file (any format `captioner prepare` reads)
    data_format: str = "auto"  # flickr8k, flickr30k, coco, karpathy, manifest, prepared, or auto (detected)
    layout: str = "auto"  # Flickr8k/Flickr30k caption file: token, csv or auto
    image_root: str = ""  # folder the dataset's photo paths are relative to; "" = found beside its caption file
    out: str = "runs/default"  # run folder: checkpoints, logs, resolved config
    cache_dir: str = "~/.cache/captioner"  # encoder feature caches
    seed: int = 0
    epochs: int = 10  # cross-entropy epochs at most; early stopping may end sooner
    batch_size: int = 50  # captions per optimiser step (whole photos with all their captions)
    lr: float = 1e-3  # peak Adam learning rate
    # linear warm-up over this many steps, at most a tenth of the cross-entropy steps (tiny
    # datasets warm up in proportion), then cosine decay to lr * final_lr_ratio
    warmup_steps: int = 200
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    encoder_lr_scale: float = 0.1  # a tuned encoder top's learning rate, relative to the decoder's (both stages)
    grad_clip: float = 5.0  # max global gradient norm
    label_smoothing: float = 0.0  # 0.1 lost on dev CIDEr-D (docs/experiments.md)
    mirror_prob: float = 0.5  # chance a train photo is seen mirrored in an epoch ("left" and "right" swapped)
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
    scst_epochs: int = 3  # self-critical epochs on CIDEr-D after cross-entropy (0 = none)
    scst_lr: float = 1e-4  # constant Adam learning rate during self-critical training
    scst_samples: int = 5  # captions sampled per image per step; each one's baseline is the others' mean
    scst_batch_size: int = 50  # sampled captions per optimiser step (images x samples)
    scst_max_len: int = 16  # words sampled at most (longer Flickr8k references are rare)
    # Self-critical trajectories averaged into one model (a "soup"): 1 = one trajectory, its best
    # epoch kept (its last in a refit); N > 1 = N trajectories of scst_epochs each from the same
    # cross-entropy weights (seeds seed, seed + 1, ...), best.pt the mean of all their epochs' weights
    scst_soup: int = 2
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


# Fields whose trials lost, removed from the product; their results stay in docs/experiments.md.
REMOVED = {
    "batching": "batches are always whole photos with all their captions",
    "ema_decay": "a moving average of the weights did not beat the raw weights on dev",
    "crop_scale": "random crops lost on dev",
    "scst_baseline": "the baseline is always the mean reward of the other samples",
    "scst_sampler": "captions are always drawn by multinomial sampling",
    "scst_dropout": "dropout stays off while sampling",
}


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


# numeric fields that must be at least 1 (the others at least 0), or above 0
AT_LEAST_ONE = {"batch_size", "scst_batch_size", "scst_samples", "scst_soup", "scst_max_len", "val_beam_size",
                "val_max_len", "max_caption_len", "min_word_count", "feature_batch_size"}
ABOVE_ZERO = {"lr", "scst_lr"}


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                      **explicit: Any) -> TrainConfig:
    """Defaults < JSON file < `key=value` overrides < explicit keyword values (None ignored)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a JSON config file (not UTF-8 text)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        removed = sorted(set(loaded) & set(REMOVED))
        if removed:
            raise ConfigError(f"{path}: field(s) {', '.join(removed)} were removed in captioner 0.2 "
                              f"({'; '.join(REMOVED[k] for k in removed)}); see docs/experiments.md")
        unknown = sorted(set(loaded) - set(types))
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)}")
        values.update(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        if key in REMOVED:
            raise ConfigError(f"override {item!r}: the field {key} was removed in captioner 0.2 ({REMOVED[key]})")
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
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        low = 1 if f.name in AT_LEAST_ONE else 0
        if not math.isfinite(v) or v < low or (f.name in ABOVE_ZERO and v <= 0):
            need = "above 0" if f.name in ABOVE_ZERO else f"at least {low}"
            raise ConfigError(f"field {f.name}: must be a finite number {need}, not {v!r}")
    if not 0.0 <= cfg.mirror_prob <= 1.0:
        raise ConfigError(f"field mirror_prob: must be 0 to 1, not {cfg.mirror_prob!r}")
    if not cfg.label_smoothing < 1.0:
        raise ConfigError(f"field label_smoothing: must be 0 to below 1, not {cfg.label_smoothing!r}")
    if cfg.scst_samples < 2:
        raise ConfigError(f"field scst_samples: must be at least 2 (each caption's baseline is the others' "
                          f"mean), not {cfg.scst_samples!r}")
    if cfg.epochs == 0 and cfg.scst_epochs == 0:
        raise ConfigError("fields epochs and scst_epochs: both are 0, so there is nothing to train")
    return cfg
