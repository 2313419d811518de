"""Datasets (formats, splits, checks), the image loader, the vocabulary and the feature cache."""
# Each format module registers its loader with `datasets.register_format` on import.
from captioner.data import coco, manifest  # noqa: F401
