"""Train and score each registered architecture x encoder on Flickr8k; write the README table.

    python benchmarks/zoo.py [--models show-tell,show-attend-tell,...] [--encoders efficientnet-lite0,...]
        [--epochs 3] [--scst-epochs 0] [--config configs/flickr8k-frozen.json]
        [--data ../shared/data/flickr8k] [--runs runs/zoo] [--force]
    python benchmarks/zoo.py --retime 3 [--runs runs/zoo]    # time every row's model again, in turn

Each pair trains with one pinned recipe (--config, by default the frozen recipe: the default's
training settings on a frozen encoder, no mirror images) and the given epoch counts (the same
budget for every model) on the train split alone (a refit on dev is switched off: dev chooses
each pair's epoch), is scored by `captioner evaluate`'s code on the 1000 test photos (beam 3),
and timed for one-photo captioning like benchmarks/latency.py. Rows are kept in
benchmarks/results/zoo.json with the recipe they were trained with (a pair already there is
skipped unless --force, so the script can be run a few models at a time), and the README's zoo
block is rewritten from that file beside the published numbers, which are marked as such; it
names the recipe, and any row trained with another one. Feature extraction is timed once per
encoder. Each row's caption time is first taken right after its training; `--retime N` times
all rows' models again, one after another in each of N rounds, and keeps each one's median.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from latency import median_ms
from model_card import REFERENCE, table
from readme_blocks import replace_block

from captioner.inference.api import Captioner
from captioner.training.config import NOT_LEARNED, load_train_config
from captioner.evaluation.evaluate import evaluate
from captioner.models.model import list_models
from captioner.training.train import prepare, train

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "zoo.json"
CONFIG = REPO / "configs" / "flickr8k-frozen.json"
# what a row sets itself, or what does not change what is learned: not part of its recipe
PER_ROW = NOT_LEARNED | {"model", "encoder", "epochs", "scst_epochs"}


def run_pair(name: str, encoder: str, args: argparse.Namespace) -> dict:
    runs = Path(args.runs)
    out = runs / f"{name}@{encoder}"
    overrides = [f"model={name}", f"encoder={encoder}", f"data={args.data}", f"out={out}",
                 f"cache_dir={args.cache_dir}", f"epochs={args.epochs}", f"scst_epochs={args.scst_epochs}",
                 "train_on_dev=false", "progress=false"]
    cfg = load_train_config(args.config, overrides)
    t = time.time()
    prepare(cfg)  # features once per encoder (timed in extraction_minutes)
    extraction = time.time() - t
    t = time.time()
    train(cfg, resume=(out / "last.pt").is_file())
    minutes = (time.time() - t) / 60
    cap = Captioner.load(out / "best.pt")
    search = cap.model.search_config(beam_size=3)
    scores, notes = evaluate(cap.model, args.data, "test", search, cache_dir=args.cache_dir,
                             captions_out=out / "captions-test.json", progress=False)
    latency = caption_ms(cap)
    return {"model": name, "encoder": encoder, "epochs": args.epochs, "scst_epochs": args.scst_epochs,
            "params_millions": round(sum(p.numel() for p in cap.model.decoder.parameters()) / 1e6, 2),
            "train_minutes": round(minutes, 1), "extraction_minutes": round(extraction / 60, 1),
            "caption_beam3_ms": round(latency, 1), "test": scores, "notes": notes,
            "config": config_name(args.config),
            "recipe": {k: v for k, v in cfg.to_dict().items() if k not in PER_ROW}}


def caption_ms(cap: Captioner) -> float:
    """Median over the example photos of the median of 10 beam-3 captions of each."""
    photos = sorted((REPO / "examples").glob("*.jpg"))
    return statistics.median(median_ms(lambda: cap.caption(p, beam_size=3), 10) for p in photos)


def retime(rows: list[dict], runs: Path, rounds: int) -> list[dict]:
    """Time every row's model again, all of them in turn in each round (so a busy spell of the
    machine hits them alike), and keep each row's median over the rounds."""
    files = [runs / f"{r['model']}@{r['encoder']}" / "best.pt" for r in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"--retime: no checkpoint for these rows: {', '.join(missing)} "
                         f"(--runs must be the folder the rows were trained in)")
    models = [Captioner.load(f) for f in files]
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(rounds):
        for i, cap in enumerate(models):
            times[i].append(caption_ms(cap))
    return [{**r, "caption_beam3_ms": round(statistics.median(t), 1), "latency_rounds": rounds}
            for r, t in zip(rows, times)]


def config_name(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def pair_key(row: dict) -> tuple:
    """What a row measured: one model on one encoder with one epoch budget."""
    return row["model"], row["encoder"], row["epochs"], row["scst_epochs"]


def recipe_key(row: dict) -> str:
    """What a row was trained with: its config file and resolved recipe (None where unrecorded)."""
    return json.dumps([row.get("config"), row.get("recipe")], sort_keys=True)


def recipe_note(rows: list[dict]) -> str:
    """One line naming the recipe most rows share, and how any other row's differs from it."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(recipe_key(r), []).append(r)
    main_rows = max(groups.values(), key=len)
    first = main_rows[0]
    recipe = first.get("recipe") or {}
    name = f"`{first['config']}`" if first.get("config") else "an unrecorded recipe"
    line = (f"Every row above: the recipe {name} (seed {recipe.get('seed', '?')}), on the train split alone, "
            "its best dev epoch scored" if len(groups) == 1 else
            f"Most rows above: the recipe {name} (seed {recipe.get('seed', '?')}), on the train split alone, "
            "their best dev epoch scored")
    others = []
    for r in rows:
        if recipe_key(r) == recipe_key(first):
            continue
        theirs = r.get("recipe")
        if theirs is None:
            what = "its recipe was not recorded"
        else:
            diff = sorted(k for k in set(theirs) | set(recipe) if theirs.get(k) != recipe.get(k))
            what = ", ".join(f"{k} {theirs.get(k)}" for k in diff) or f"config {r.get('config')}"
        others.append(f"{r['model']} ({r['encoder']}): {what}")
    return line + (". Trained otherwise: " + "; ".join(others) + "." if others else ".")


def readme_block(rows: list[dict]) -> str:
    scored = [(f"{r['model']} ({r['encoder']}, {r['epochs']}+{r['scst_epochs']} epochs; measured)", r["test"])
              for r in rows]
    extra = "| model | encoder | decoder params (M) | train min | caption ms (beam 3) |\n|---|---|---|---|---|\n"
    extra += "".join(f"| {r['model']} | {r['encoder']} | {r['params_millions']} | {r['train_minutes']} | "
                     f"{r['caption_beam3_ms']} |\n" for r in rows)
    return table(scored + REFERENCE) + "\n" + extra + "\n" + recipe_note(rows) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(list_models()))
    p.add_argument("--encoders", default="efficientnet-lite0")
    p.add_argument("--epochs", type=int, default=3, help="cross-entropy epochs per model")
    p.add_argument("--scst-epochs", type=int, default=0, help="self-critical epochs per model")
    p.add_argument("--config", default=str(CONFIG), help="the recipe every pair trains with")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--runs", default="runs/zoo")
    p.add_argument("--force", action="store_true", help="rerun pairs already in zoo.json")
    p.add_argument("--results", default=str(RESULTS), help="results file (default benchmarks/results/zoo.json)")
    p.add_argument("--no-readme", action="store_true", help="leave the README's table alone")
    p.add_argument("--retime", type=int, default=0, metavar="ROUNDS",
                   help="train nothing: time every row's model again (from --runs), in turn, ROUNDS times")
    args = p.parse_args(argv)
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.is_file() else []
    if args.retime:  # nothing trained
        rows = retime(rows, Path(args.runs), args.retime)
        results.write_text(json.dumps(rows, indent=2) + "\n")
    pairs = [] if args.retime else [(name, encoder) for encoder in filter(None, args.encoders.split(","))
                                    for name in filter(None, args.models.split(","))]
    for name, encoder in pairs:
        key = (name, encoder, args.epochs, args.scst_epochs)
        if not args.force and any(pair_key(r) == key for r in rows):
            continue
        row = run_pair(name, encoder, args)
        rows = [r for r in rows if pair_key(r) != key] + [row]
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    block = readme_block(rows)
    if not args.no_readme:
        replace_block("zoo", block)
    print(block)
    return rows


if __name__ == "__main__":
    main()
