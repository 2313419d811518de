"""Self-critical soups: several SCST trajectories from one run's cross-entropy weights, the
shipped weights the mean of all their epochs' weights (docs/experiments.md, "soups")."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from captioner.data.datasets import ImageRecord
from captioner.data.features import FeatureCache
from captioner.distributed import DistEnv, barrier
from captioner.errors import ConfigError
from captioner.files import atomic_write_text
from captioner.models.average import average_checkpoint
from captioner.models.checkpoint import write_checkpoint
from captioner.models.model import CaptionModel
from captioner.training.config import TrainConfig
from captioner.training.validation import validate

log = logging.getLogger("captioner.training")


def soup_members(cfg: TrainConfig, out: Path) -> list[Path]:
    """The epoch files a soup of `cfg.scst_soup` trajectories averages: the run's own SCST epochs,
    then those of each further trajectory, a run of its own in `out/scst-K` (K = 2, 3, ...)."""
    scst = range(1, cfg.scst_epochs + 1)
    return ([out / "epochs" / f"epoch-{cfg.epochs + n}.pt" for n in scst] +
            [out / f"scst-{k}" / "epochs" / f"epoch-{n}.pt" for k in range(2, cfg.scst_soup + 1) for n in scst])


def train_soup(model: CaptionModel, cfg: TrainConfig, out: Path, cache: FeatureCache, dev_recs: list[ImageRecord],
               env: DistEnv, train: Callable[..., dict]) -> float:
    """After the run's own trajectory: train the others from the same cross-entropy weights
    (`best-xe.pt`), each with the next seed, then keep the mean of every trajectory's epoch
    weights as best.pt, scored on dev (`soup.json`). A trajectory already finished, as on
    --resume, is not trained again (`train` is `training.train.train`). Returns the soup's dev CIDEr-D."""
    start = out / "best-xe.pt"
    if not start.is_file():
        raise ConfigError(f"scst_soup: {start} is missing, so the other trajectories cannot start where this "
                          f"one did (the run's cross-entropy weights)")
    for k in range(2, cfg.scst_soup + 1):
        sub = out / f"scst-{k}"
        log.info("scst soup: trajectory %d of %d (seed %d) in %s", k, cfg.scst_soup, cfg.seed + k - 1, sub)
        train(replace(cfg, out=str(sub), epochs=0, scst_soup=1, seed=cfg.seed + k - 1, init_checkpoint=str(start),
                      keep_epochs=True), resume=(sub / "last.pt").is_file())
    members = soup_members(cfg, out)
    missing = [str(p) for p in members if not p.is_file()]
    if missing:
        raise ConfigError(f"scst_soup: epoch weights missing: {', '.join(missing)}")
    soup = average_checkpoint(members)
    model.decoder.load_state_dict(soup["decoder_state"])
    dev = validate(model, cache, dev_recs, cfg, env)
    names = [str(p.relative_to(out)) for p in members]
    if env.is_main:
        write_checkpoint({**soup, "metrics": {"dev": dev, "soup_of": names}}, out / "best.pt")
        atomic_write_text(out / "soup.json", json.dumps({"members": names, "dev": dev}, indent=2) + "\n")
    log.info("scst soup of %d epochs (%d trajectories): dev BLEU-4 %.4f CIDEr %.4f -> %s", len(members),
             cfg.scst_soup, dev["Bleu_4"], dev["CIDEr"], out / "best.pt")
    barrier(env)
    return dev["CIDEr"]
