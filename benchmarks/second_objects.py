"""Would a second constraint word help? How often the classifier offers one.

    python benchmarks/second_objects.py [--out benchmarks/results/second_objects.json]

Anderson et al. (2017) got their best novel-object results with two constraint words from
disjoint categories. For each photo of the COCO dev set and Flickr8k dev whose best object would
be put into a caption missing it (score >= the threshold, a category captions name), this counts how often the
second-best object is from another category, also captionable, and scores at least 0.1, 0.2 or
0.3. fp32, the shipped model. docs/experiments.md quotes it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.data.datasets import load_dataset
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.objects import NOT_INSERTED

REPO = Path(__file__).resolve().parents[1]
SETS = {"coco-mini/all": (REPO.parent / "shared" / "data" / "coco-mini-train2017", "all"),
        "flickr8k/dev": (REPO.parent / "shared" / "data" / "flickr8k", "dev")}
LEVELS = (0.1, 0.2, 0.3)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "second_objects.json"))
    args = p.parse_args(argv)
    captioner = Captioner.load(precision="fp32")
    namer = captioner.model.object_namer()
    result = {"threshold": namer.threshold, "sets": {}}
    for name, (folder, split) in SETS.items():
        dataset = load_dataset(folder, "auto")
        photos = [dataset.image_dir / r.image for r in dataset.split(split)]
        confident, second = 0, {str(t): 0 for t in LEVELS}
        for s in range(0, len(photos), 32):
            feats = captioner.encode(photos[s:s + 32])
            objects = namer.recognize(feats)
            for first, entry in zip(objects, namer.constraints(objects)):
                if entry is None:
                    continue
                confident += 1
                other = namer.words.get(first[1].name) if len(first) > 1 else None
                if other is None or other.category in NOT_INSERTED or other.category == entry.category:
                    continue
                for t in LEVELS:
                    second[str(t)] += first[1].score >= t
        result["sets"][name] = {"photos": len(photos), "best_object_confident": confident,
                                "second_object_of_another_category_at_least": second}
        print(name, result["sets"][name], flush=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
