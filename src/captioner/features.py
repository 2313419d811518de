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

FORMAT = 1


def encoder_key(cfg: EncoderConfig) -> str:
    """Hash of everything that changes the features: encoder, weights, preprocessing."""
    w = weights_file(cfg)
    blob = json.dumps({"cfg": cfg.to_dict(), "weights": [w.name, w.stat().st_size], "format": FORMAT},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _files_fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:12]


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
    encoder = build_encoder(cfg)
    bar = tqdm(total=len(paths), desc=f"features {cfg.name}", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([preprocess(p, cfg) for p in paths[start:start + batch_size]])
        out[start:start + len(batch)] = encoder(batch).numpy().astype(np.float16)
        bar.update(len(batch))
    bar.close()


def build_cache(image_dir: Path, names: Sequence[str], cfg: EncoderConfig, cache_dir: Path,
                tag: str = "data", batch_size: int = 8, progress: bool = True) -> FeatureCache:
    """Load the cache for these images and encoder, computing it first if absent or stale.

    The folder name carries the encoder key, the index records each image's size and mtime:
    a cache made with other weights, preprocessing or photos is never reused.
    """
    names = list(names)
    paths = [Path(image_dir) / n for n in names]
    folder = Path(cache_dir) / f"{tag}-{cfg.name}-{encoder_key(cfg)}-{_files_fingerprint(paths)}"
    index_file = folder / "index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("names") == names:
            feats = np.load(folder / "features.npy", mmap_mode="r")
            return FeatureCache(folder, names, feats)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shape = (len(names), cfg.grid_size ** 2, cfg.feature_dim)
    out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16, shape=shape)
    extract_features(paths, cfg, out, batch_size=batch_size, progress=progress)
    out.flush()
    del out
    (tmp / "index.json").write_text(json.dumps({"names": names, "encoder": cfg.to_dict()}))
    # Whole folder appears at once: a killed extraction leaves only a .tmp folder behind.
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return FeatureCache(folder, names, np.load(folder / "features.npy", mmap_mode="r"))
