"""An experiment: recognition by a small branch on the tuned top's block-15 output, the captioner
left exactly as it is.

The stock classifier ends in a 1x1 convolution (320 -> 1280 channels at 7x7), batch norm, swish,
average pooling and `_fc` (1280 -> 1000): under issue 34's 10% of the encoder's FLOPs (counted here
with torch's FLOP counter, against benchmarks/recognition.py's count of the encoder). The captioner's tuned top computes its own block-15 output for every caption anyway, so a
branch of that shape on it (a copy of the stock head and `_fc`, then distilled to the stock
classifier's softmax) would recognise without the stock top and without touching the captions. A
linear head on the tuned top's pooled output agreed 74% (release/recognition_head.py); this asks
whether a per-region nonlinear layer before the pooling does better.

Trained on the Flickr8k TRAIN photos and their mirror images only (the branch needs no captions),
judged on photos it never saw: Flickr8k dev (the epoch is picked there), the 80 COCO dev photos and
the Flickr8k test photos. Agreement is top-1 class and top-1 lexicon word against the stock
classifier, as recognition_head.py measures it (fp16-rounded weights).

`--mixup`: function matching (Beyer et al., CVPR 2022, "Knowledge distillation: A good teacher is
patient and consistent"): each step's views are new mixtures of two training photos' cached block-11
features (weight drawn uniformly), with a random crop of the 14x14 grid resized back, and the stock
classifier scores the very input the branch sees; the teacher runs per step, so an epoch takes
minutes instead of seconds (the result records the run's time).

    PYTHONPATH=src python benchmarks/recognition_branch.py [--epochs 10] [--out benchmarks/results/recognition_branch.json]
    PYTHONPATH=src python benchmarks/recognition_branch.py --mixup --out benchmarks/results/recognition_branch-mixup.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.files import atomic_write_text
from captioner.models.checkpoint import load_checkpoint
from captioner.models.encoders import grid_to_regions, pretrained_backbone, regions_to_grid
from captioner.models.recognition import Recognizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "release"))
from recognition_head import agreement  # noqa: E402  (the same measure as the linear head's)

REPO = Path(__file__).resolve().parents[1]


class Branch(nn.Module):
    """Block-15 output (B, 320, 7, 7) -> ImageNet logits (B, 1000): the stock head's shape."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.conv = copy.deepcopy(backbone._conv_head)
        self.bn = copy.deepcopy(backbone._bn1).eval()  # its statistics stay; its affine learns
        self.act = backbone._swish
        self.fc = copy.deepcopy(backbone._fc)

    def train(self, mode: bool = True) -> "Branch":
        super().train(mode)
        self.bn.eval()
        return self

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


@torch.no_grad()
def teach(model, stock: Recognizer, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached regions -> (the tuned top's block-15 output (B, 320, 7, 7), the stock classifier's probabilities)."""
    x = regions_to_grid(f.float(), model.encoder_cfg)
    for block in model.decoder.top.blocks:
        x = block(x)
    return x, stock(f)


@torch.no_grad()
def block15(model, stock: Recognizer, cache, names: list[str], batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tuned top's block-15 output (N, 320, 7, 7) fp16, the stock classifier's probabilities (N, 1000))."""
    xs, ps = [], []
    for i in range(0, len(names), batch):
        x, probs = teach(model, stock, cache.get(names[i:i + batch]))
        xs.append(x.half())
        ps.append(probs)
    return torch.cat(xs), torch.cat(ps)


@torch.no_grad()
def mixed_views(f: torch.Tensor, cfg, gen: torch.Generator) -> torch.Tensor:
    """New views of cached regions (B, N, C): each row mixed with another row (weight uniform in
    [0, 1]), then a random square crop of its 14x14 grid (half the side or more) resized back."""
    b = f.size(0)
    lam = torch.rand(b, 1, 1, generator=gen)
    partner = torch.randperm(b, generator=gen)
    x = regions_to_grid(lam * f + (1 - lam) * f[partner], cfg)
    side = x.size(-1)
    out = torch.empty_like(x)
    for i in range(b):
        s = int(torch.randint(side // 2, side + 1, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(0, side - s + 1, (2,), generator=gen))
        crop = x[i:i + 1, :, r:r + s, c:c + s]
        out[i:i + 1] = crop if s == side else F.interpolate(crop, size=(side, side), mode="bilinear",
                                                             align_corners=False)
    return grid_to_regions(out, cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco-mini-train2017"))
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--mixup", action="store_true", help="function matching on new mixed, cropped views each step")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recognition_branch.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    model, ckpt = load_checkpoint(args.checkpoint)
    if not model.encoder_cfg.split:
        raise SystemExit(f"error: {args.checkpoint}: not a tuned-encoder checkpoint")
    cfg = model.encoder_cfg
    stock = Recognizer(cfg, "stock")
    cache_dir = Path(args.cache_dir).expanduser()

    def data(root: str, split: str, mirror: bool = False):
        ds = load_dataset(root, "auto")
        names = [r.image for r in ds.split(split)]
        return block15(model, stock, build_cache(ds.image_dir, names, cfg, cache_dir, tag=ds.name, progress=False,
                                                 mirror=mirror), names)

    if args.mixup:
        ds = load_dataset(args.data, "auto")
        names = [r.image for r in ds.split("train")]
        x = torch.cat([build_cache(ds.image_dir, names, cfg, cache_dir, tag=ds.name, progress=False,
                                   mirror=m).get(names).half()
                       for m in (False, True)])  # (2 x 6000, N, C): the train photos and their mirror images
    else:
        x, p = data(args.data, "train")
        xm, pm = data(args.data, "train", mirror=True)
        x, p = torch.cat([x, xm]), torch.cat([p, pm])
    judged = {"flickr8k dev (1000)": data(args.data, "dev"), "coco dev (80)": data(args.coco, "all"),
              "flickr8k test (1000)": data(args.data, "test")}
    branch = Branch(pretrained_backbone(cfg))

    @torch.no_grad()
    def score() -> dict:
        branch.eval()
        out = {}
        for name, (xd, pd) in judged.items():
            pooled = torch.cat([branch.pooled(xd[i:i + 200].float()) for i in range(0, len(xd), 200)])
            out[name] = agreement(branch.fc.weight, branch.fc.bias, pooled, pd)
        return out

    with FlopCounterMode(display=False) as counter:  # one photo's block-15 output through the branch
        branch(judged["coco dev (80)"][0][:1].float())
    measured = REPO / "benchmarks" / "results" / "recognition.json"  # benchmarks/recognition.py's count
    encoder = json.loads(measured.read_text())["flops"]["encoder"] if measured.is_file() else None
    result = {"checkpoint": str(args.checkpoint), "checkpoint_checksum": ckpt.get("checksum"), "train_views": len(x),
              "lr": args.lr, "mixup": args.mixup, "flops": {"branch": counter.get_total_flops(), "encoder (benchmarks/recognition.py)": encoder,
                                       "branch_over_encoder": round(counter.get_total_flops() / encoder, 4)
                                       if encoder else None},
              "epochs": {0: score()}}
    print(0, json.dumps(result["epochs"][0]), flush=True)
    params = [p_ for n, p_ in branch.named_parameters() if not n.startswith("bn.") or n.endswith(("weight", "bias"))]
    opt = torch.optim.Adam(params, lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        branch.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            if args.mixup:
                xb, pb = teach(model, stock, mixed_views(x[idx].float(), cfg, gen))
            else:
                xb, pb = x[idx].float(), p[idx]
            logp = branch(xb).log_softmax(-1)
            loss = -(pb * logp).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        result["epochs"][epoch] = score()
        print(epoch, json.dumps(result["epochs"][epoch]), flush=True)
    best = max(result["epochs"], key=lambda e: result["epochs"][e]["flickr8k dev (1000)"]["top1_word"])
    result["chosen_epoch (best Flickr8k dev top-1 word)"] = best
    result["chosen"] = result["epochs"][best]
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    print("chosen", best, json.dumps(result["chosen"]))
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
