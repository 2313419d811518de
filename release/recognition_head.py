"""Rebuild the recognition head shipped next to a tuned-encoder checkpoint
(`src/captioner/weights/default.recognition.pt` for the shipped model), reproducibly.

The head is one linear layer (1280 -> 1000) on the pooled output of the model's own tuned top
(which the captioner runs anyway), made to agree with the stock EfficientNet-Lite classifier
(the stock top blocks, head and `_fc` on the same cached features). Two candidates, both trained
on the Flickr8k TRAIN photos only (and their mirror images), picked by top-1 word agreement with
the stock classifier on the dev sets (Flickr8k dev and the COCO dev photos, never trained on):

  (a) alignment: ridge regression (closed form) from the tuned top's pooled output to the stock
      top's, then the stock `_fc`, folded into one linear layer; ridge strength chosen on dev;
  (b) distillation: a linear head initialised from `_fc` (or from (a)'s best), trained with
      Adam to match the stock classifier's softmax (KL at temperature T); T and epochs chosen on dev.

Agreement is measured with the head rounded to fp16, as shipped. Writes
benchmarks/results/recognition_head.json, and the head (bound to the checkpoint's content
checksum) as the checkpoint's sidecar where it meets --min-agreement (a loaded checkpoint uses
its sidecar head for recognition), or to --out.

    PYTHONPATH=src python release/recognition_head.py [--checkpoint default] [--out FILE] [--pooled FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.files import atomic_write_text
from captioner.models.checkpoint import (load_checkpoint, recognition_head_path, resolve_checkpoint,
                                         save_recognition_head)
from captioner.models.decoders import WithTunedTop
from captioner.models.objects import DEFAULT_THRESHOLD
from captioner.models.recognition import Recognizer, name_objects

REPO = Path(__file__).resolve().parents[1]
RIDGE = (1e-4, 1e-3, 1e-2, 1e-1)  # ridge strength, relative to the mean eigenvalue of X'X
TEMPERATURES = (1.0, 2.0)
EPOCHS = 20
EVAL_EVERY = 5


@torch.no_grad()
def pooled(model, stock: Recognizer, cache, names: list[str], batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(tuned top's pooled output, stock top's pooled output), each (N, 1280)."""
    xs, ss = [], []
    for i in range(0, len(names), batch):
        f = cache.get(names[i:i + batch])
        xs.append(model.decoder.top(f).mean(1))
        ss.append(stock.top(f).mean(1))
    return torch.cat(xs), torch.cat(ss)


def agreement(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, stock_probs: torch.Tensor) -> dict:
    """Top-1 class and top-1 lexicon word agreement with the stock classifier, fp16-rounded head."""
    probs = F.linear(x, w.half().float(), b.half().float()).softmax(-1)
    words = name_objects(probs, 1)
    ref = name_objects(stock_probs, 1)
    confident = [i for i, r in enumerate(ref) if r[0].score >= DEFAULT_THRESHOLD]
    return {"top1_class": round(float((probs.argmax(-1) == stock_probs.argmax(-1)).float().mean()), 4),
            "top1_word": round(sum(a[0].name == r[0].name for a, r in zip(words, ref)) / len(ref), 4),
            "top1_word_where_stock_confident": round(
                sum(words[i][0].name == ref[i][0].name for i in confident) / max(1, len(confident)), 4)}


def ridge(x: torch.Tensor, s: torch.Tensor, alpha: float, fc) -> tuple[torch.Tensor, torch.Tensor]:
    """S ~ X A + c by ridge regression, folded with `fc`: logits = X (A fc.W') + (c fc.W' + fc.b)."""
    x, s = x.double(), s.double()
    mx, ms = x.mean(0), s.mean(0)
    xc, sc = x - mx, s - ms
    gram = xc.T @ xc
    lam = alpha * gram.diagonal().mean()
    a = torch.linalg.solve(gram + lam * torch.eye(gram.size(0), dtype=gram.dtype), xc.T @ sc)  # (1280, 1280)
    c = ms - mx @ a
    w = fc.weight.double() @ a.T  # (1000, 1280)
    bias = fc.weight.double() @ c + fc.bias.double()
    return w.float(), bias.float()


def distill(x: torch.Tensor, target_logits: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, temperature: float,
            dev: dict, seed: int = 0, batch: int = 256, lr: float = 1e-3):
    """Soft cross-entropy to the stock softmax at `temperature`; yields (epoch, w, b) every EVAL_EVERY epochs."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(w0.size(1), w0.size(0))
    with torch.no_grad():
        head.weight.copy_(w0)
        head.bias.copy_(b0)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    target = (target_logits / temperature).softmax(-1)
    for epoch in range(1, EPOCHS + 1):
        order = torch.randperm(x.size(0), generator=gen)
        for i in range(0, x.size(0), batch):
            idx = order[i:i + batch]
            logp = (head(x[idx]) / temperature).log_softmax(-1)
            loss = -(target[idx] * logp).sum(-1).mean() * temperature ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % EVAL_EVERY == 0:
            yield epoch, head.weight.detach().clone(), head.bias.detach().clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--coco", default=str(REPO.parent / "shared" / "data" / "coco-mini-train2017"))
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    ap.add_argument("--out", default=None,
                    help="write the head here whatever its agreement (an experiment); default: the checkpoint's "
                         "sidecar (recognition_head_path), written only where the head meets --min-agreement")
    ap.add_argument("--min-agreement", type=float, default=0.9,
                    help="mean top-1 word agreement on the dev sets a head needs to be shipped as the sidecar")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "recognition_head.json"))
    ap.add_argument("--no-mirror", action="store_true", help="train on the photos alone, not their mirror images too")
    ap.add_argument("--pooled", default=None,
                    help="a file keeping the tops' pooled outputs between runs (read if it exists, else written)")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_checkpoint(args.checkpoint)
    model, ckpt = load_checkpoint(path)
    if not isinstance(model.decoder, WithTunedTop) or "checksum" not in ckpt:
        raise SystemExit(f"error: {path}: a recognition head is for a checkpoint with one tuned encoder top "
                         "and a content checksum")
    cfg = model.encoder_cfg
    stock = Recognizer(cfg, "stock")
    fc = stock.fc
    cache_dir = Path(args.cache_dir).expanduser()

    def features(root: str, split: str, mirror: bool = False):
        ds = load_dataset(root, "auto")
        names = [r.image for r in ds.split(split)]
        cache = build_cache(ds.image_dir, names, cfg, cache_dir, tag=ds.name, progress=False, mirror=mirror)
        return pooled(model, stock, cache, names)

    saved = Path(args.pooled).expanduser() if args.pooled else None
    if saved is not None and saved.is_file():  # the pooled outputs of an earlier run of this checkpoint
        stored = torch.load(saved, weights_only=True)
        if stored.get("checksum") != ckpt["checksum"] or stored.get("mirror") != (not args.no_mirror):
            raise SystemExit(f"error: {saved}: pooled outputs of another checkpoint or setting; remove it")
        (x, s), devs = stored["train"], stored["devs"]
    else:
        x, s = features(args.data, "train")
        if not args.no_mirror:
            xm, sm = features(args.data, "train", mirror=True)
            x, s = torch.cat([x, xm]), torch.cat([s, sm])
        devs = {"flickr8k/dev": features(args.data, "dev"), "coco-mini/all": features(args.coco, "all")}
        if saved is not None:
            torch.save({"checksum": ckpt["checksum"], "mirror": not args.no_mirror, "train": (x, s),
                        "devs": devs}, saved)
    with torch.no_grad():
        target = fc(s)
        dev = {k: (xd, fc(sd).softmax(-1)) for k, (xd, sd) in devs.items()}

    seen = (x[:2000], target[:2000].softmax(-1))  # training photos: how much a head could fit at all

    def score(w, b) -> dict:
        out = {k: agreement(w, b, xd, pd) for k, (xd, pd) in dev.items()}
        out["mean_top1_word"] = round(sum(v["top1_word"] for v in out.values()) / len(dev), 4)
        out["train (2000 of the photos trained on)"] = agreement(w, b, *seen)
        return out

    result = {"checkpoint": str(path.name), "checkpoint_checksum": ckpt["checksum"], "train_photos": len(x),
              "mirror": not args.no_mirror, "candidates": {}}
    cands = result["candidates"]
    heads = {}
    cands["tuned (_fc on the tuned top)"] = score(fc.weight, fc.bias)
    for alpha in RIDGE:
        w, b = ridge(x, s, alpha, fc)
        name = f"(a) alignment, ridge {alpha:g}"
        heads[name] = (w, b)
        cands[name] = score(w, b)
        print(name, json.dumps(cands[name]), flush=True)
    best_ridge = max((k for k in heads), key=lambda k: cands[k]["mean_top1_word"])
    for init in ("_fc", best_ridge):
        w0, b0 = (fc.weight.detach(), fc.bias.detach()) if init == "_fc" else heads[init]
        for temperature in TEMPERATURES:
            for epoch, w, b in distill(x, target, w0, b0, temperature, dev):
                start = "_fc" if init == "_fc" else "best (a)"
                name = f"(b) distillation from {start}, T {temperature:g}, epoch {epoch}"
                heads[name] = (w, b)
                cands[name] = score(w, b)
                print(name, json.dumps(cands[name]), flush=True)
    best = max((k for k in heads), key=lambda k: cands[k]["mean_top1_word"])
    result["chosen"] = best
    w, b = heads[best]
    result["min_agreement"] = args.min_agreement
    result["meets_min_agreement"] = cands[best]["mean_top1_word"] >= args.min_agreement
    print("chosen:", best, json.dumps(cands[best]))
    out = Path(args.out) if args.out else recognition_head_path(path)
    if args.out or result["meets_min_agreement"]:
        save_recognition_head(out, w, b, ckpt["checksum"], meta={"candidate": best, "dev_agreement": cands[best]})
        result["head_file"] = out.name
        result["head_bytes"] = out.stat().st_size
    else:
        result["head_file"] = None
        print(f"not shipped: mean top-1 word agreement {cands[best]['mean_top1_word']} < {args.min_agreement} "
              f"(--out FILE writes it anyway)")
    atomic_write_text(args.results, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
