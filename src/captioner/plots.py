"""Figures: where the model looked for each word."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .api import Caption
from .encoders import ImageInput, load_image


def attention_overlay(image: Image.Image, weights: np.ndarray, size: int = 224) -> np.ndarray:
    """Blend one (grid, grid) attention map over the photo: (size, size, 3) uint8."""
    photo = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32)
    w = weights / max(float(weights.max()), 1e-8)
    heat = np.asarray(Image.fromarray((w * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                      dtype=np.float32)[..., None] / 255.0
    return (photo * (0.25 + 0.75 * heat)).clip(0, 255).astype(np.uint8)


def save_attention_figure(image: ImageInput, caption: Caption, path: str | Path, cols: int = 5) -> Path:
    """One panel per word: the photo lit where the decoder attended for that word."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if caption.attention is None or not caption.words:
        raise ValueError("this caption carries no attention maps")
    img = load_image(image)
    panels = len(caption.words) + 1
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    axes = np.ravel(axes)
    axes[0].imshow(img.resize((224, 224)))
    axes[0].set_title("photo", fontsize=9)
    for i, (word, w) in enumerate(zip(caption.words, caption.attention), 1):
        axes[i].imshow(attention_overlay(img, w))
        axes[i].set_title(word, fontsize=10)
    fig.suptitle(caption.text, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
