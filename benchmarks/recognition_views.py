"""Recognition from more than the whole photo: the ImageNet classifier was trained on centred
crops, and the captioner's photos are squashed whole, so an object in the middle of a busy scene
(a rocket between its launch towers) loses to the scene. Each rule averages the classifier's
probabilities over views of the stock top's 7x7 output: the whole grid (what ships) and centre
windows of it. A window costs one pooled `_fc` (1280 x 1000), under 1% of the encoder.

Dev sets only choose (the 80 COCO dev photos and Flickr8k dev, objects on, the shipped insertion
rule, thresholds 0.4 (shipped) to 0.6); Flickr8k test is scored for the shipped rule and the best rule only, to
report. fp32, beam 3, the project's captions scored by the COCO toolkit's CIDEr-D, with a paired
bootstrap of each rule against the shipped one.

    PYTHONPATH=src python benchmarks/recognition_views.py [--out benchmarks/results/recognition_views.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.evaluation.compare import paired_bootstrap, photo_stats
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models import recognition

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEV_SETS = {"coco-mini/all": (SHARED / "coco-mini-train2017", "all"),
            "flickr8k/dev": (SHARED / "flickr8k", "dev")}
TEST_SET = {"flickr8k/test": (SHARED / "flickr8k", "test")}
# windows (first row/column, one past the last) on the 7x7 grid, each a square of it
WHOLE, CENTRE5, CENTRE3 = (0, 7), (1, 6), (2, 5)
VIEWS = {"whole": (WHOLE,),
         "whole + centre 5x5": (WHOLE, CENTRE5),
         "whole + centre 3x3": (WHOLE, CENTRE3),
         "whole + centre 5x5 + centre 3x3": (WHOLE, CENTRE5, CENTRE3)}
# views x insertion threshold; the first is what ships. A first round at 0.4 alone chose none
# (every window lost more than 0.005 on Flickr8k dev); the thresholds above 0.4 came after it.
THRESHOLDS = (0.4, 0.5, 0.6)
RULES = {f"{v} @ {t}": (w, t) for v, w in VIEWS.items() for t in THRESHOLDS}
# fixed before the run: adopt the rule with the best COCO dev score among those that score above
# the shipped one on COCO dev and lose at most 0.005 on Flickr8k dev; none: the shipped one stays
RULE = "COCO dev above the shipped; Flickr8k dev at most 0.005 below; best COCO dev among those"


def views_forward(windows):
    """A `Recognizer.forward` that averages the probabilities of the given windows."""
    def forward(self, features, regions=None):
        regions = self.regions(features, regions)
        side = self.cfg.grid_size
        grid = regions.view(regions.size(0), side, side, -1)
        probs = [self.fc(grid[:, lo:hi, lo:hi].mean((1, 2))).softmax(-1) for lo, hi in windows]
        return torch.stack(probs).mean(0)
    return torch.no_grad()(forward)


def captions(captioner: Captioner, cache, images: list[str]) -> dict[str, str]:
    model = captioner.model
    search = model.search_config()
    out = {}
    for s in range(0, len(images), 50):
        chunk = images[s:s + 50]
        out.update(zip(chunk, model.captions(cache.get(chunk), search, objects=True)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recognition_views.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    captioner = Captioner.load(precision="fp32")
    model = captioner.model
    shipped_forward = recognition.Recognizer.forward
    shipped_threshold = model.object_namer().threshold
    assert shipped_threshold == RULES[next(iter(RULES))][1]
    result = {"model": captioner.name, "precision": "fp32", "beam_size": 3, "rule": RULE,
              "views": {k: [list(w) for w in v] for k, v in VIEWS.items()}, "sets": {}}
    photos = {}

    def run(name, data, split, rules):
        dataset = load_dataset(data, "auto")
        records = dataset.split(split)
        images = [r.image for r in records]
        refs = {r.image: r.captions for r in records}
        cache = build_cache(dataset.image_dir, images, model.encoder_cfg, Path(args.cache_dir).expanduser(),
                            tag=dataset.name, progress=False)
        sets = {}
        for rule in rules:
            started = time.perf_counter()
            windows, threshold = RULES[rule]
            recognition.Recognizer.forward = views_forward(windows)
            model.object_namer().threshold = threshold
            try:
                sets[rule] = captions(captioner, cache, images)
            finally:
                recognition.Recognizer.forward = shipped_forward
                model.object_namer().threshold = shipped_threshold
            print(f"{name} {rule}: {time.perf_counter() - started:.0f} s", flush=True)
        stats = photo_stats(list(sets.values()), refs)
        base = stats[0]
        entry = {"photos": len(images), "rules": {}}
        for rule, st, caps in zip(sets, stats, sets.values()):
            (cider,) = [m for m in paired_bootstrap(base, st) if m.metric == "CIDEr"]
            entry["rules"][rule] = {"CIDEr": round(cider.b, 4),
                                    "difference": round(cider.b - cider.a, 4),
                                    "interval": [round(x, 4) for x in cider.diff_interval],
                                    "captions_changed": sum(caps[i] != sets[rules[0]][i] for i in images)}
        result["sets"][name] = entry
        photos[name] = sets
        print(name, json.dumps(entry["rules"], indent=1), flush=True)

    from captioner.data.images import example_photos
    result["readme_examples"] = {}
    for rule, windows in VIEWS.items():
        recognition.Recognizer.forward = views_forward(windows)
        try:
            for path in example_photos():
                c = captioner.caption(path)
                result["readme_examples"].setdefault(path.name, {})[rule] = {
                    "caption": c.text, "objects": [o.to_dict() for o in c.objects[:3]]}
        finally:
            recognition.Recognizer.forward = shipped_forward
    print(json.dumps(result["readme_examples"], indent=1), flush=True)
    for name, (data, split) in DEV_SETS.items():
        run(name, data, split, list(RULES))
    coco, f8k = (result["sets"][k]["rules"] for k in DEV_SETS)
    shipped = next(iter(RULES))
    passing = [r for r in RULES if r != shipped and coco[r]["CIDEr"] > coco[shipped]["CIDEr"]
               and f8k[r]["CIDEr"] >= f8k[shipped]["CIDEr"] - 0.005]
    chosen = max(passing, key=lambda r: coco[r]["CIDEr"]) if passing else shipped
    result["chosen"] = chosen
    for name, (data, split) in TEST_SET.items():
        run(name, data, split, [shipped] + ([chosen] if chosen != shipped else []))
    for name, sets in photos.items():
        result["sets"][name]["examples"] = [
            {"image": i, **{r: c[i] for r, c in sets.items()}}
            for i in sorted(sets[shipped]) if any(c[i] != sets[shipped][i] for c in sets.values())][:40]
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
