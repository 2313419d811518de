"""On-disk cache of encoder features: fp16, memory-mapped, keyed by encoder and preprocessing."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from captioner.distributed import DistEnv, barrier, broadcast, shard
from captioner.models.encoders import EncoderConfig, build_encoder, frozen_encoder, weights_files
from captioner.errors import DataError, ImageError
from captioner.files import remove_stale_temps
from captioner.data.loading import load_batches

FORMAT = 1


def encoder_key(cfg: EncoderConfig) -> str:
    """Hash of everything that changes the features: encoder, weights, preprocessing."""
    weights = [[w.name, w.stat().st_size] for w in weights_files(cfg)]  # a single encoder's as it always was
    blob = json.dumps({"cfg": cfg.to_dict(), "weights": weights[0] if len(weights) == 1 else weights,
                       "format": FORMAT}, sort_keys=True)
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
                     batch_size: int = 8, progress: bool = True, workers: int = 0, device: str = "cpu",
                     mirror: bool = False) -> None:
    """Run the frozen encoder over `paths`, writing rows of `out` in order; `workers` > 0 loads
    photos in that many processes, and on a GPU the encoder runs in fp16 autocast. `mirror`
    encodes each photo flipped left to right."""
    if not paths:
        return
    encoder = build_encoder(cfg).to(device)
    cuda = device.startswith("cuda")
    if not cuda:  # traced and frozen, batch norm folded (as captioning runs it): fewer, larger kernels
        encoder = frozen_encoder(encoder)
    bar = tqdm(total=len(paths), desc=f"features {cfg.name}", unit="img", disable=not progress)
    start = 0
    for batch in load_batches(paths, cfg, batch_size, workers, mirror):
        for _, _, error in batch:
            if error:
                raise ImageError(error)
        pixels = torch.stack([x for _, x, _ in batch]).to(device)
        if not cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            feats = encoder(pixels)  # (B, R, C)
        out[start:start + len(batch)] = feats.float().cpu().numpy().astype(np.float16)
        start += len(batch)
        bar.update(len(batch))
    bar.close()


def _open(folder: Path, cfg: EncoderConfig) -> tuple[dict, np.ndarray] | None:
    """The cache in `folder`, or None where it is missing or damaged (then it is rebuilt): an
    index that is not names and stats for every row, features of another shape or type, a file
    cut short (0 bytes after a full disk, say)."""
    try:
        index = json.loads((folder / "index.json").read_text())
        feats = np.load(folder / "features.npy", mmap_mode="r")  # never unpickles (allow_pickle=False)
        rows = feats.shape[0]
        if not isinstance(index, dict) or feats.dtype != np.float16 or \
                feats.shape[1:] != (cfg.grid_size ** 2, cfg.feature_dim):
            return None
        names, stats = index.get("names"), index.get("stats")
        if not (isinstance(names, list) and isinstance(stats, list) and len(names) == len(stats) == rows):
            return None
        if not all(isinstance(n, str) for n in names) or not all(isinstance(s, list) for s in stats):
            return None
        return index, feats
    except (OSError, ValueError, TypeError, AttributeError, IndexError, EOFError, RecursionError):
        return None


def _plan(folder: Path, image_dir: Path, names: Sequence[str], cfg: EncoderConfig) -> dict:
    """What a cache build must do: nothing (`complete`), or keep some rows and encode the rest."""
    stats = {n: _stat(image_dir / n) for n in names}
    old = _open(folder, cfg)
    if old is None:
        return {"complete": False, "keep": [], "todo": list(stats)}
    index, _ = old
    cached = dict(zip(index.get("names", []), index.get("stats", [])))
    if all(cached.get(n) == s for n, s in stats.items()):
        return {"complete": True}
    # Keep every still-valid row of the old cache, encode the rest.
    keep: list[str] = []
    for name, stat in zip(index["names"], index["stats"]):
        if name in stats:
            still_valid = stats[name] == stat
        else:  # a photo this call did not ask for: keep its row while the file is unchanged
            still_valid = (image_dir / name).is_file() and _stat(image_dir / name) == stat
        if still_valid:
            keep.append(name)
    kept = set(keep)
    return {"complete": False, "keep": keep, "todo": [n for n in stats if n not in kept]}


def build_cache(image_dir: Path, names: Sequence[str], cfg: EncoderConfig, cache_dir: Path,
                tag: str = "data", batch_size: int = 8, progress: bool = True, env: DistEnv | None = None,
                workers: int = 0, mirror: bool = False) -> FeatureCache:
    """Features for these images, computed only for those the cache lacks.

    The folder name carries a hash of the encoder, its weights and its preprocessing; the
    index records each photo's size and mtime. A cache made with another encoder is never
    read, and a photo that changed since is encoded again. Under torchrun (`env`) every rank
    encodes its share of the missing photos and rank 0 joins the shares into the one cache,
    row for row what a single process writes (the cache folder must be one all ranks see).
    `mirror` caches the features of the photos flipped left to right, in a folder of its own.
    """
    image_dir, cache_dir = Path(image_dir), Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError("the feature cache folder is a file; give --cache-dir a folder", cache_dir)
    where = hashlib.sha1(str(image_dir.resolve()).encode()).hexdigest()[:6]
    suffix = "-mirror" if mirror else ""
    # the tag comes from the dataset's own files (its name): never a path out of the cache folder
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", tag).strip("._")[:60] or "data"
    folder = cache_dir / f"{tag}-{where}-{cfg.name}-{encoder_key(cfg)}{suffix}"
    main = env is None or env.is_main
    plan = broadcast(_plan(folder, image_dir, names, cfg) if main else None, env)  # one plan for every rank
    if not plan["complete"]:
        keep, todo = plan["keep"], plan["todo"]
        device = env.device if env is not None else "cpu"
        if env is not None and env.distributed:
            shards = folder.with_name(f"{folder.name}.tmp{broadcast(os.getpid(), env)}-shards")
            shards.mkdir(parents=True, exist_ok=True)
            mine = shard(todo, env)
            part = np.lib.format.open_memmap(shards / f"rank{env.rank}.npy", mode="w+", dtype=np.float16,
                                             shape=(len(mine), cfg.grid_size ** 2, cfg.feature_dim))
            extract_features([image_dir / n for n in mine], cfg, part, batch_size=batch_size,
                             progress=progress and main, workers=workers, device=device, mirror=mirror)
            part.flush()
            del part
            barrier(env)
            if main:
                _write(folder, image_dir, keep, todo, cfg, lambda out: _join_shards(out, shards, len(todo), env.world_size))
                shutil.rmtree(shards, ignore_errors=True)
            barrier(env)
        else:
            _write(folder, image_dir, keep, todo, cfg, lambda out: extract_features(
                [image_dir / n for n in todo], cfg, out, batch_size=batch_size, progress=progress, workers=workers,
                device=device, mirror=mirror))
    index, feats = _open(folder, cfg)
    return FeatureCache(folder, index["names"], feats)


def _join_shards(out: np.ndarray, shards: Path, n: int, world_size: int) -> None:
    """Rank r encoded rows r, r + world_size, ... of the photos to encode: put them back in order."""
    for r in range(world_size):
        part = np.load(shards / f"rank{r}.npy", mmap_mode="r")
        rows = np.arange(r, n, world_size)
        for s in range(0, len(rows), 1024):
            out[rows[s:s + 1024]] = part[s:s + 1024]


def _write(folder: Path, image_dir: Path, keep: list[str], todo: list[str], cfg: EncoderConfig, fill) -> None:
    """Write the cache folder: the old cache's rows for `keep`, then `fill(rows for todo)`.
    The whole folder appears at once: a killed build leaves only a .tmp folder behind. A cache
    folder that is a link (to a cache kept on another disk, say) is rewritten where it points."""
    if folder.is_symlink():
        folder = folder.resolve()
    if folder.exists() and not folder.is_dir():  # a stray file under the cache's own name: no cache
        folder.unlink()
    old = _open(folder, cfg)
    remove_stale_temps(folder)  # what killed builds left behind (their processes are gone)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        all_names = keep + todo
        shape = (len(all_names), cfg.grid_size ** 2, cfg.feature_dim)
        out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.float16, shape=shape)
        if keep:
            index, feats = old
            rows = {n: i for i, n in enumerate(index["names"])}
            for start in range(0, len(keep), 1024):
                chunk = keep[start:start + 1024]
                out[start:start + len(chunk)] = feats[[rows[n] for n in chunk]]
        fill(out[len(keep):])
        out.flush()
        del out, old
        (tmp / "index.json").write_text(json.dumps({"names": all_names,
                                                    "stats": [_stat(image_dir / n) for n in all_names],
                                                    "encoder": cfg.to_dict()}))
    except BaseException:  # a photo that cannot be read, an interrupt: no half cache stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
