"""Photos from disk to encoder input in parallel: a DataLoader whose worker processes decode
and preprocess while the main process runs the model. A photo that cannot be read comes back
as an error for its index, so one bad file never stops or reorders the others."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from captioner.models.encoders import EncoderConfig, preprocess

Loaded = tuple[int, "torch.Tensor | None", "str | None"]  # (index into paths, (3, S, S) input or None, error)


class ImageFiles(Dataset):
    """Paths -> (index, preprocessed photo, None) or (index, None, what went wrong);
    `mirror` flips every photo left to right (for augmented training features)."""

    def __init__(self, paths: Sequence[Path], cfg: EncoderConfig, mirror: bool = False):
        self.paths = list(paths)
        self.cfg = cfg
        self.mirror = mirror

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Loaded:
        try:
            x = preprocess(self.paths[i], self.cfg)
            return i, x.flip(-1) if self.mirror else x, None
        except Exception as e:  # ImageError names the file; anything else is named here
            message = str(e)
            return i, None, message if str(self.paths[i]) in message else f"{self.paths[i]}: {message}"


def _keep_list(items: list[Loaded]) -> list[Loaded]:
    return items


def load_batches(paths: Sequence[Path], cfg: EncoderConfig, batch_size: int = 16, workers: int = 0,
                 mirror: bool = False) -> Iterator[list[Loaded]]:
    """Batches of loaded photos, in order; `workers` > 0 loads in that many worker processes."""
    loader = DataLoader(ImageFiles(paths, cfg, mirror), batch_size=batch_size, num_workers=workers,
                        collate_fn=_keep_list, prefetch_factor=4 if workers else None)
    yield from loader
