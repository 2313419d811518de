"""What a training run reads: the dataset, its feature caches (the photos and their mirror
images), and the training set held in memory, batched by photo."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from captioner.data.datasets import CaptionDataset, DataOptions, ImageRecord, load_dataset
from captioner.data.features import FeatureCache, build_cache
from captioner.data.vocab import MIRRORED_WORDS, Vocab, tokenize
from captioner.distributed import DistEnv
from captioner.errors import ConfigError, DataError
from captioner.models.encoders import get_encoder_config
from captioner.models.model import ModelConfig, get_model_config
from captioner.training.config import TrainConfig

log = logging.getLogger("captioner.training")


@dataclass
class Prepared:
    """A dataset with its vocab and feature cache, ready to train or evaluate on."""

    dataset: CaptionDataset
    cache: FeatureCache
    mirrored: FeatureCache | None = None  # features of the train photos flipped left to right


def data_options(cfg: TrainConfig) -> DataOptions:
    return DataOptions(layout=cfg.layout, seed=cfg.seed, image_root=cfg.image_root)


def prepare(cfg: TrainConfig, encoder: str | None = None, env: DistEnv | None = None) -> Prepared:
    """Load and check the dataset (any format `load_dataset` reads), then fill (or reuse) the
    feature cache for all its images (`encoder` defaults to that of `cfg.model`). Under torchrun
    (`env`) the ranks share the feature extraction."""
    dataset = load_dataset(cfg.data, cfg.data_format, data_options(cfg))
    for note in dataset.notes:
        log.info("data: %s", note)
    check_trainable(dataset, cfg)
    return Prepared(dataset, cache_features(dataset, cfg, encoder, env), mirror_features(dataset, cfg, encoder, env))


def cache_features(dataset: CaptionDataset, cfg: TrainConfig, encoder: str | None = None,
                   env: DistEnv | None = None, mirror: bool = False) -> FeatureCache:
    """Fill (or reuse) the feature cache of every photo of `dataset`, or with `mirror` that of
    the training photos' mirror images."""
    enc = get_encoder_config(encoder or configured_model(cfg).encoder)
    records = training_records(dataset, cfg) if mirror else dataset.records
    return build_cache(dataset.image_dir, [r.image for r in records], enc,
                       Path(cfg.cache_dir).expanduser(), tag=dataset.name, batch_size=cfg.feature_batch_size,
                       progress=cfg.progress and (env is None or env.is_main), env=env, workers=cfg.feature_workers,
                       mirror=mirror)


def check_trainable(dataset: CaptionDataset, cfg: TrainConfig) -> None:
    """Refuse, before any feature is extracted, a dataset a run cannot learn from: no train or
    dev photos, or captions with too few words the tokenizer keeps (a-z and 0-9: text in other
    scripts is dropped) to make a vocabulary."""
    train, dev = training_records(dataset, cfg), dataset.split("dev")
    if not train or not dev:
        raise DataError(f"training needs train and dev photos; this dataset has {len(train)} train and {len(dev)} "
                        f"dev (give a split column with train and dev rows, or none for a seeded split)", cfg.data)
    counts: dict[str, int] = {}
    for r in train:
        for c in r.captions:
            for w in tokenize(c):
                counts[w] = counts.get(w, 0) + 1
    if sum(n >= cfg.min_word_count for n in counts.values()) < 1:
        raise DataError(f"the train captions hold no word the tokenizer keeps (a-z, 0-9) {cfg.min_word_count} times "
                        f"or more, so there is no vocabulary to learn; captioner trains on English captions",
                        cfg.data)


def training_records(dataset: CaptionDataset, cfg: TrainConfig) -> list[ImageRecord]:
    """The photos a run trains on: the train split (its first `max_train_images`), and the dev
    split too with `train_on_dev`."""
    records = dataset.split("train")
    if cfg.max_train_images:
        records = records[:cfg.max_train_images]
    return records + dataset.split("dev") if cfg.train_on_dev else records


def mirror_features(dataset: CaptionDataset, cfg: TrainConfig, encoder: str | None = None,
                    env: DistEnv | None = None) -> FeatureCache | None:
    """The training photos' mirror-image cache where `cfg.mirror_prob` > 0 (filled if need be), else None."""
    return cache_features(dataset, cfg, encoder, env, mirror=True) if cfg.mirror_prob > 0 else None


class TrainingSet:
    """Train-split images with all their captions, the images' features held in RAM.

    Batches are groups of images with every caption of each (`batch`): an image's regions are
    encoded once per step for all its captions, as self-critical training needs them grouped too.

    With a `mirrored` cache (features of the photos flipped left to right), `mirror` draws
    which photos an epoch sees mirrored: those give their mirror image's features, and
    captions with "left" and "right" swapped.
    """

    def __init__(self, records: list[ImageRecord], cache: FeatureCache, vocab: Vocab, max_len: int,
                 mirrored: FeatureCache | None = None):
        self.vocab = vocab
        self.seqs: list[list[list[int]]] = [[vocab.encode(c, max_len) for c in r.captions] for r in records]
        self.lengths = [max(len(s) for s in seqs) for seqs in self.seqs]  # longest caption per image
        self.captions = sum(len(s) for s in self.seqs)
        # fp16 in RAM once: random batch access without touching the disk
        self.features = torch.from_numpy(np.ascontiguousarray(
            cache.features[cache.rows([r.image for r in records])]))  # (N_images, R, C)
        self.is_mirrored = torch.zeros(len(records), dtype=torch.bool)  # this epoch's mirrored photos
        self.mirror_features = None
        if mirrored is not None:
            self.mirror_features = torch.from_numpy(np.ascontiguousarray(
                mirrored.features[mirrored.rows([r.image for r in records])]))
            ids = {t: i for i, t in enumerate(vocab.tokens)}
            swap = {ids[a]: ids[b] for a, b in MIRRORED_WORDS.items() if a in ids and b in ids}
            self.mirror_seqs = [[[swap.get(t, t) for t in s] for s in seqs] for seqs in self.seqs]

    def mirror(self, prob: float, gen: torch.Generator) -> None:
        """Each photo is seen mirrored until the next call with probability `prob`."""
        if self.mirror_features is None:
            raise ValueError("this training set has no mirrored features")
        self.is_mirrored = torch.rand(len(self), generator=gen) < prob

    def photo_features(self, images: list[int]) -> torch.Tensor:
        """Image indices -> their features (B, R, C) float32, as this epoch sees each photo."""
        feats = self.features[images]
        flips = self.is_mirrored[images]
        if bool(flips.any()):
            feats = torch.where(flips[:, None, None], self.mirror_features[images], feats)
        return feats.float()

    def _captions(self, image: int) -> list[list[int]]:
        return self.mirror_seqs[image] if self.is_mirrored[image] else self.seqs[image]

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, images: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image indices -> features (B_img, R, C) float32, PAD-padded token ids (B, T) of all
        their captions, and each caption's row in the features (B,)."""
        seqs = [(j, s) for j, i in enumerate(images) for s in self._captions(i)]
        rows = torch.tensor([j for j, _ in seqs])
        return self.photo_features(images), self._pad([s for _, s in seqs]), rows

    def _pad(self, seqs: list[list[int]]) -> torch.Tensor:
        """Token id lists -> (B, T) PAD-padded to the longest."""
        tokens = torch.full((len(seqs), max(len(s) for s in seqs)), self.vocab.pad_id, dtype=torch.long)
        for k, seq in enumerate(seqs):
            tokens[k, :len(seq)] = torch.tensor(seq)
        return tokens


def length_bucketed_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffle, sort by length within pools of 50 batches, then shuffle the batches:
    batches hold items of near-equal length, so little compute goes to padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    pool = batch_size * 50
    batches = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s:s + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def images_per_batch(cfg: TrainConfig, data: TrainingSet) -> int:
    """batch_size counts captions; batches hold whole images, so round to images."""
    per_image = max(1, round(data.captions / max(len(data), 1)))
    return max(1, cfg.batch_size // per_image)


def epoch_batches(cfg: TrainConfig, data: TrainingSet, gen: torch.Generator) -> list[list[int]]:
    """One epoch's cross-entropy batches of image indices, bucketed by caption length."""
    return length_bucketed_batches(data.lengths, images_per_batch(cfg, data), gen)


def steps_per_epoch(cfg: TrainConfig, data: TrainingSet) -> int:
    return math.ceil(len(data) / images_per_batch(cfg, data))


def configured_model(cfg: TrainConfig) -> ModelConfig:
    """The model config `cfg.model` names, with its encoder swapped where `cfg.encoder` says so."""
    model_cfg = get_model_config(cfg.model)
    if not cfg.encoder or cfg.encoder == model_cfg.encoder:
        return model_cfg
    try:
        get_encoder_config(cfg.encoder)
    except ValueError as e:
        raise ConfigError(f"config field encoder: {e}") from None
    return replace(model_cfg, name=f"{model_cfg.name}@{cfg.encoder}", encoder=cfg.encoder)
