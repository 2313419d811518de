"""On-disk cache of encoder features: fp16, memory-mapped, keyed by encoder and preprocessing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .encoders import EncoderConfig, build_encoder, preprocess, weights_file
from .files import remove_stale_temps

FORMAT = 1


def encoder_key(cfg: EncoderConfig) -> str:
    """Hash of everything that changes the features: encoder, weights, preprocessing."""
    w = weights_file(cfg)
    blob = json.dumps({"cfg": cfg.to_dict(), "weights": [w.name, w.stat().st_size], "format": FORMAT},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


@dataclass
class FeatureCache:
    """Region features of a list of images, (N_images, regions, channels) fp16."""

    path: Path
    names: list[str]
    features: np.ndarray  # memory-mapped, (N, R, C) float16

    def __post_init__(self) -> None:
        self._row = {n: i for i, n in enumerate(self.names)}

    def rows(self, names: Sequence[str]) -> np.ndarray:
        return np.array([self._row[n] for n in names], dtype=np.int64)

    def get(self, names: Sequence[str]) -> torch.Tensor:
        idx = self.rows(names)
        return torch.from_numpy(np.ascontiguousarray(self.features[idx])).float()


@torch.no_grad()
def extract_features(paths: Sequence[Path], cfg: EncoderConfig, out: np.ndarray,
                     batch_size: int = 8, progress: bool = True) -> None:
    """Run the frozen encoder over `paths`, writing rows of `out` in order."""
    if not paths:
        return
    encoder = build_encoder(cfg)
    bar = tqdm(total=len(paths), desc=f"features {cfg.name}", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(p, cfg) for p in paths[start:start + batch_size]])
        out[start:start + len(batch)] = encoder(batch).numpy().astype(np.float16)
        bar.update(len(batch))
    bar.close()


def _open(folder: Path) -> tuple[dict, np.ndarray] | None:
    """The cache in `folder`, or None where it is missing or damaged (then it is rebuilt)."""
    try:
        index = json.loads((folder / "index.json").read_text())
        feats = np.load(folder / "features.npy", mmap_mode="r")  # never unpickles (allow_pickle=False)
        rows = feats.shape[0]
        if not isinstance(index, dict) or len(index.get("names", ())) != rows or len(index.get("stats", ())) != rows:
            return None
        return index, feats
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return None


def build_cache(image_dir: Path, names: Sequence[str], cfg: EncoderConfig, cache_dir: Path,
                tag: str = "data", batch_size: int = 8, progress: bool = True) -> FeatureCache:
    """Features for these images, computed only for those the cache lacks.

    The folder name carries a hash of the encoder, its weights and its preprocessing; the
    index records each photo's size and mtime. A cache made with another encoder is never
    read, and a photo that changed since is encoded again.
    """
    image_dir = Path(image_dir)
    where = hashlib.sha1(str(image_dir.resolve()).encode()).hexdigest()[:6]
    folder = Path(cache_dir) / f"{tag}-{where}-{cfg.name}-{encoder_key(cfg)}"
    stats = {n: _stat(image_dir / n) for n in names}
    old = _open(folder)
    if old is not None:
        index, feats = old
        cached = dict(zip(index.get("names", []), index.get("stats", [])))
        if all(cached.get(n) == s for n, s in stats.items()):
            return FeatureCache(folder, index["names"], feats)
    # Keep every still-valid row of the old cache, encode the rest.
    keep: list[str] = []
    if old is not None:
        for name, stat in zip(index["names"], index["stats"]):
            if name in stats:
                still_valid = stats[name] == stat
            else:  # a photo this call did not ask for: keep its row while the file is unchanged
                still_valid = (image_dir / name).is_file() and _stat(image_dir / name) == stat
            if still_valid:
                keep.append(name)
    kept = set(keep)
    todo = [n for n in stats if n not in kept]
    all_names = keep + todo
    remove_stale_temps(folder)  # what killed extractions left behind
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shape = (len(all_names), cfg.grid_size ** 2, cfg.feature_dim)
        out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16, shape=shape)
        if keep:
            rows = {n: i for i, n in enumerate(index["names"])}
            for start in range(0, len(keep), 1024):
                chunk = keep[start:start + 1024]
                out[start:start + len(chunk)] = feats[[rows[n] for n in chunk]]
        extract_features([image_dir / n for n in todo], cfg, out[len(keep):], batch_size=batch_size,
                         progress=progress)
        out.flush()
        del out
        all_stats = [stats[n] if n in stats else _stat(image_dir / n) for n in all_names]
        (tmp / "index.json").write_text(json.dumps({"names": all_names, "stats": all_stats,
                                                    "encoder": cfg.to_dict()}))
    except BaseException:  # a photo that cannot be read, an interrupt: no half cache stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The whole folder appears at once: a killed extraction leaves only a .tmp folder behind.
    old = None
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return FeatureCache(folder, all_names, np.load(folder / "features.npy", mmap_mode="r"))
