"""Figures: where the model looked for each word."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.inference.api import Caption
from captioner.data.images import ImageInput, load_image


def attention_heat(weights: np.ndarray, size: int = 224) -> np.ndarray:
    """One (grid, grid) attention map, min-max scaled and upsampled to (size, size) in [0, 1]."""
    w = weights - weights.min()
    w = w / max(float(w.max()), 1e-8)
    up = Image.fromarray((w * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


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
    axes[0].imshow(img.resize((224, 224), Image.BICUBIC))
    axes[0].set_title("photo", fontsize=9)
    photo = img.resize((224, 224), Image.BICUBIC)
    for i, (word, w) in enumerate(zip(caption.words, caption.attention), 1):
        axes[i].imshow(photo)
        axes[i].imshow(attention_heat(w), cmap="jet", alpha=0.45)
        axes[i].set_title(f"{word} ({w.max():.2f})", fontsize=9)
    fig.suptitle(caption.text, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _heat_colors(heat: np.ndarray) -> np.ndarray:
    """[0, 1] heat -> RGB in [0, 1] along a blue-cyan-yellow-red ramp (jet-like, no matplotlib)."""
    r = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return np.stack([r, g, b], -1)  # (S, S, 3)


def attention_overlay(image: ImageInput, weights: np.ndarray, size: int = 224, alpha: float = 0.45) -> Image.Image:
    """The photo (squashed to size x size, as the encoder saw it) with one word's attention map
    laid over it in colour."""
    photo = np.asarray(load_image(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    heat = _heat_colors(attention_heat(weights, size))
    return Image.fromarray(((1 - alpha) * photo * 255 + alpha * heat * 255).clip(0, 255).astype(np.uint8))
