"""Where a caption's time goes with named objects on: per stage, one photo and batches.

    python benchmarks/objects_search.py [--repeats 20] [--out benchmarks/results/objects_search.json]

For each example photo alone, and for batches of 4, 8 and 16 (the examples in turn), times the
stages of `Captioner.caption` with objects on, each the median of `--repeats` calls, per photo:
the photo's read and resize (`preprocess`, one photo only), the frozen encoder (`encode`, the
server's chunk of 4), the tuned top (`tuned_top`), recognition (`recognize`), the model's own
search alone (`own_search`, objects off) and the whole objects search (`objects_search`: tuned
top, recognition, the own and the forced captions). Stages run one after another, so contention
lands on all of them alike only roughly: read the milliseconds against each other within a run.
Run it with kernels held to AVX2 as benchmarks/latency.py says for figures about such CPUs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from latency import cpu_info

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):  # warm-up: the frozen modules plan their kernels on first calls
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="calls per stage (default 20)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "objects_search.json"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    captioner = Captioner.load()
    namer = captioner.model.object_namer()
    search = captioner.model.search_config()
    decoder = namer.model.decoder
    photos = sorted((REPO / "examples").glob("*.jpg"))
    runs = {ph.stem: [ph] for ph in photos}
    runs.update({f"batch of {b}": (photos * 4)[:b] for b in (4, 8, 16)})
    rows = {}
    with torch.no_grad():
        for name, batch in runs.items():
            pixels = torch.stack([captioner.preprocess(ph) for ph in batch])
            feats = captioner.encode_pixels(pixels, chunk=4)
            regions = decoder.regions(feats)
            stages = {"preprocess": lambda: captioner.preprocess(batch[0])} if len(batch) == 1 else {}
            stages.update({
                "encode": lambda: captioner.encode_pixels(pixels, chunk=4),
                "tuned_top": lambda: decoder.regions(feats),
                "recognize": lambda: namer.recognize(feats, regions=regions),
                "own_search": lambda: captioner.model.generate(feats, search),
                "objects_search": lambda: namer.generate(feats, search),
            })
            n = len(batch)
            rows[name] = {stage: round(median_ms(fn, args.repeats) / n, 2) for stage, fn in stages.items()}
            if n == 1:
                out = namer.generate(feats, search)
                rows[name]["object"] = out.objects[0][0].name if out.objects[0] else None
                rows[name]["forced"] = out.constraint[0] is not None
            print(name, rows[name], flush=True)
    result = {"precision": captioner.precision, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "unit": "ms per photo, median of the repeats", "cpu": cpu_info(), "stages": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
