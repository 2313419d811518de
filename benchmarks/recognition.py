"""Recognition for the tuned encoder: cost and agreement with the stock classifier of the three
recognition modes (`models.recognition`):

- stock: the stock top (blocks 11-15 + head) and `_fc` on the cached block-11 input (the stock
  classifier itself);
- tuned: `_fc` on the tuned top's pooled output;
- head: the shipped recognition head (release/recognition_head.py) on the tuned top's pooled output.

Cost: FLOPs (torch.utils.flop_counter, no timing noise) against the encoder's (the frozen bottom
that makes the cache), and measured time, interleaved round by round (medians): recognition alone
against the encoder (traced and frozen, as the Captioner runs it), and a whole caption (encoder +
beam 3, the default precision) with objects off, on with stock recognition and on with the head.
The tuned top runs for the caption anyway; "tuned" and "head" reuse its output, so their extra cost
is one pooled linear layer.
Agreement: top-1 ImageNet class and top-1 lexicon word against the stock classifier on the COCO
dev photos (80) and Flickr8k dev (1,000). Writes benchmarks/results/recognition.json.

    PYTHONPATH=src python benchmarks/recognition.py [--rounds 15] [--cache-dir ~/.cache/captioner]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, load_recognition_head, resolve_checkpoint
from captioner.models.encoders import build_encoder, frozen_encoder
from captioner.models.objects import DEFAULT_THRESHOLD
from captioner.models.recognition import Recognizer, name_objects

REPO = Path(__file__).resolve().parents[1]
SETS = {"coco-mini/all": (REPO.parent / "shared" / "data" / "coco-mini-train2017", "all"),
        "flickr8k/dev": (REPO.parent / "shared" / "data" / "flickr8k", "dev")}
EXAMPLES = ("cat", "coffee", "rocket", "astronaut")


def flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    ap.add_argument("--head", default=None,
                    help="a recognition head file (release/recognition_head.py --out); default: the shipped sidecar")
    args = ap.parse_args()
    path = resolve_checkpoint(None)
    model, ckpt = load_checkpoint(path)
    if args.head:
        model.attach_recognition_head(load_recognition_head(args.head, ckpt.get("checksum")))
    if model.recognition_head is None:
        raise SystemExit(f"error: {path}: no recognition head next to it; pass --head (release/recognition_head.py)")
    cfg = model.encoder_cfg
    top = model.decoder.top
    modes = {"stock": Recognizer(cfg, "stock"), "tuned": Recognizer(cfg, "tuned", top),
             "head": Recognizer(cfg, "head", top, model.recognition_head)}
    encoder = build_encoder(cfg)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    feats = encoder(x)
    regions = top(feats)
    frozen = frozen_encoder(encoder)  # as the Captioner runs it (traced, batch norm folded)
    out: dict = {"checkpoint": path.name, "head": Path(args.head).name if args.head else "sidecar",
                 "threshold": DEFAULT_THRESHOLD, "torch_threads": torch.get_num_threads()}
    enc = flops(encoder, x)
    out["flops"] = {"encoder": enc, "tuned_top (runs for the caption anyway)": flops(top, feats),
                    "stock": flops(modes["stock"], feats), "tuned": flops(modes["tuned"], feats, regions),
                    "head": flops(modes["head"], feats, regions)}
    out["flops_over_encoder"] = {k: round(out["flops"][k] / enc, 4) for k in ("stock", "tuned", "head")}

    # time, interleaved: each round times every variant once, in turn
    times: dict[str, list[float]] = {"encoder": [], "stock": [], "head": []}
    for _ in range(args.rounds):
        times["encoder"].append(timed(frozen, x))
        times["stock"].append(timed(modes["stock"], feats))
        times["head"].append(timed(modes["head"], feats, regions))
    med = {k: statistics.median(v) for k, v in times.items()}
    out["recognition_ms_median"] = {k: round(v * 1e3, 3) for k, v in med.items()}
    out["recognition_time_over_encoder"] = {k: round(med[k] / med["encoder"], 4) for k in ("stock", "head")}

    # a whole caption, one photo at a time: objects off, on with the stock classifier, on with the head
    info = {"path": str(path), "name": ckpt["model"]["name"]}
    stock_model, _ = load_checkpoint(path)
    stock_model.attach_recognition_head(None)
    caps = {"on, head": Captioner(model, info, precision="auto"),
            "on, stock": Captioner(stock_model, info, precision="auto")}
    from importlib import resources
    photos = [resources.files("captioner") / "examples" / f"{n}.jpg" for n in EXAMPLES]
    pixels = [caps["on, head"].preprocess(p)[None] for p in photos]
    def caption(cap: Captioner, objects: bool):
        return lambda px: cap.caption_features(cap.encode_pixels(px), objects=objects)

    runs = {"off": caption(caps["on, head"], False), "on, stock": caption(caps["on, stock"], True),
            "on, head": caption(caps["on, head"], True)}
    for run in runs.values():  # warm-up: traced encoders, namers
        run(pixels[0])
    ctimes: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(max(1, args.rounds // 3)):
        for px in pixels:
            for k, run in runs.items():
                ctimes[k].append(timed(run, px))
    cmed = {k: statistics.median(v) for k, v in ctimes.items()}
    out["caption_precision"] = caps["on, head"].precision
    out["caption_ms_median"] = {k: round(v * 1e3, 2) for k, v in cmed.items()}
    out["caption_time_over_objects_off"] = {k: round(cmed[k] / cmed["off"], 3) for k in ("on, stock", "on, head")}

    # agreement with the stock classifier
    cache_dir = Path(args.cache_dir).expanduser()
    out["agreement"] = {}
    for name, (root, split) in SETS.items():
        dataset = load_dataset(root, "auto")
        names = [r.image for r in dataset.split(split)]
        cache = build_cache(dataset.image_dir, names, cfg, cache_dir, tag=dataset.name, progress=False)
        probs: dict[str, list[torch.Tensor]] = {k: [] for k in modes}
        for i in range(0, len(names), 50):
            f = cache.get(names[i:i + 50])
            r = top(f)
            for k, m in modes.items():
                probs[k].append(m(f, r))
        p = {k: torch.cat(v) for k, v in probs.items()}
        words = {k: name_objects(v, 1) for k, v in p.items()}
        ref = words["stock"]
        confident = [i for i, w in enumerate(ref) if w[0].score >= DEFAULT_THRESHOLD]
        row = {"photos": len(names), "stock_confident_photos": len(confident)}

        def chosen(w):  # the word put into the caption at the default threshold, or None
            return w[0].name if w[0].score >= DEFAULT_THRESHOLD else None

        for k in ("tuned", "head"):
            row[k] = {"top1_class": round(float((p[k].argmax(-1) == p["stock"].argmax(-1)).float().mean()), 4),
                      "top1_word": round(sum(a[0].name == b[0].name for a, b in zip(words[k], ref)) / len(names), 4),
                      # where the stock classifier is confident enough to constrain the caption
                      "top1_word_where_stock_confident": round(
                          sum(words[k][i][0].name == ref[i][0].name for i in confident) / max(1, len(confident)), 4),
                      # the same word constrained (or none), each at the default threshold
                      "same_constraint": round(sum(chosen(a) == chosen(b) for a, b in zip(words[k], ref))
                                               / len(names), 4)}
        row["mean_top1_word_score"] = {k: round(sum(w[0].score for w in v) / len(names), 4) for k, v in words.items()}
        out["agreement"][name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))
    atomic_write_text(REPO / "benchmarks" / "results" / "recognition.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
