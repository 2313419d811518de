"""How test quality grows with the number of training photos: a recipe trained on the first N
training photos for several N, each scored on the whole test split; writes the README block.

    python benchmarks/learning_curve.py [--sizes 750,1500,3000] [--full-run runs/default]
        [--config configs/flickr8k-tuned-mirror.json] [--data ../shared/data/flickr8k]
        [--cache-dir runs/default/cache] [--runs runs/learning-curve]
        [--results benchmarks/results/learning_curve.json] [--target 0.65] [--block learning-curve]
        [--no-readme] [--force]

Each size trains the recipe unchanged (`max_train_images=N`: the first N photos of the train
split, all their captions; the vocabulary is built from those captions) into RUNS/nN. Dev, used
for early stopping and choosing the best epoch, and test stay whole. `--full-run` adds a run of
the same recipe on the whole train split that already exists (the shipped default's
`retrain_default.sh` run), scored the same way instead of training it again; its config is
checked against the recipe first. A refit recipe (`train_on_dev`) is refused: its runs would
train on dev too; give the train-only recipe it refits (the default's: flickr8k-tuned-mirror.json).

Both ends of each run are scored with the plain beam search (beam 3, length penalty 1, no n-gram
blocking, as `scst_gain.py` does): the best cross-entropy weights (`best-xe.pt`) and the final
model (`best.pt`). A line fitted to test CIDEr-D against log2(N) gives the gain per doubling of
the training photos over the measured range, and where that line would reach `--target`. Rows
are kept in the results file, each naming its recipe (one recipe per file: another is refused);
a size already there is skipped unless --force, so the sizes can be run a few at a time.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from readme_blocks import missing_block, replace_block
from recipe_runs import differences, load_rows, logged_minutes, read_history, recipe_of, save_rows
from scst_gain import score

from captioner.training.config import NOT_LEARNED, TrainConfig, load_train_config
from captioner.data.datasets import load_dataset
from captioner.training.train import data_options, train

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "learning_curve.json"
# what a size's run may differ in from the recipe: where it lives and how it reports, and its subset
WHERE = NOT_LEARNED | {"max_train_images", "init_checkpoint"}


def row_for(run: Path, train_images: int, args: argparse.Namespace) -> dict:
    """Both ends of a run scored on test with the plain beam 3, as scst_gain.py scores them."""
    plain = argparse.Namespace(data=args.data, split="test", beam_size=3, cache_dir=args.cache_dir)
    xe = score(str(run / "best-xe.pt"), plain)["test"] if (run / "best-xe.pt").is_file() else None
    final = score(str(run / "best.pt"), plain)
    return {"train_images": train_images, "config": args.config, "run": str(run), "vocab": final["vocab"],
            "best_dev_CIDEr": final["selected_on_dev"]["dev"]["CIDEr"],
            "best_epoch": final["selected_on_dev"].get("epoch"),
            "xe_test": xe, "test": final["test"], "logged_minutes": logged_minutes(read_history(run))}


def check_full_run(run: Path, args: argparse.Namespace) -> TrainConfig:
    """The full run must be the recipe itself, on the whole train split; gives its config."""
    recipe = load_train_config(args.config, [f"data={args.data}"]).to_dict()
    cfg = load_train_config(run / "config.json", [f"data={args.data}"])
    what = differences(run, recipe, WHERE) or (cfg.max_train_images and "a train subset")
    if what:
        raise SystemExit(f"{run / 'config.json'}: not the recipe {args.config} on all train photos: {what}")
    return cfg


def train_size(n: int, args: argparse.Namespace) -> dict:
    out = Path(args.runs) / f"n{n}"
    cfg = load_train_config(args.config, [f"data={args.data}", f"out={out}", f"cache_dir={args.cache_dir}",
                                          f"max_train_images={n}", "progress=false"])
    t = time.time()  # train() checks the data and fills any missing features itself
    train(cfg, resume=(out / "last.pt").is_file())
    row = row_for(out, n, args)
    row["wall_minutes"] = round((time.time() - t) / 60, 1)
    return row


def fit(rows: list[dict]) -> dict | None:
    """Least-squares line through (log2 N, test CIDEr-D)."""
    if len(rows) < 2:
        return None
    xs = [math.log2(r["train_images"]) for r in rows]
    ys = [r["test"]["CIDEr"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"cider_per_doubling": round(slope, 4), "intercept": round(my - slope * mx, 4)}


def photos_for(line: dict, cider: float) -> int | None:
    """Where the fitted line reaches `cider` (an extrapolation past the measured range); None
    where it never does (a line that does not rise), or only past 2 ** 40 photos."""
    if line["cider_per_doubling"] <= 0:
        return None
    doublings = (cider - line["intercept"]) / line["cider_per_doubling"]
    if doublings >= 40:
        return None
    photos = 2 ** doublings
    return int(round(photos, -2) if photos >= 1000 else round(photos))


def readme_block(rows: list[dict], target: float = 0.65) -> str:
    """The README block of one recipe's rows (each names it in its "config")."""
    config = recipe_of(rows, "rows")
    rows = sorted(rows, key=lambda r: r["train_images"])
    lines = ["| train photos | vocabulary | best dev CIDEr-D | test CIDEr-D, cross-entropy | test BLEU-4, final | "
             "test CIDEr-D, final | SCST gain | minutes (logged) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xe = r["xe_test"]["CIDEr"] if r["xe_test"] else None
        xe_text, gain = (f"{xe:.3f}", f"{r['test']['CIDEr'] - xe:+.3f}") if xe is not None else ("–", "–")
        lines.append(f"| {r['train_images']} | {r['vocab']} | {r['best_dev_CIDEr']:.3f} | {xe_text} | "
                     f"{r['test']['Bleu_4']:.3f} | {r['test']['CIDEr']:.3f} | {gain} | {r['logged_minutes']} |")
    text = "\n".join(lines) + "\n"
    line = fit(rows)
    if line:
        text += (f"\nRecipe `{config}`, test split, plain beam 3. A line through test CIDEr-D against "
                 f"log2(train photos) rises **{line['cider_per_doubling']:+.3f} per doubling** of the "
                 f"training photos over {rows[0]['train_images']}–{rows[-1]['train_images']}.")
        photos = photos_for(line, target)
        reach = f"never reaches {target:.2f}" if photos is None else f"reaches {target:.2f} at about {photos} photos"
        text += f" Extended past them (an extrapolation), it {reach}.\n"
    return text


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/flickr8k-tuned-mirror.json")
    p.add_argument("--sizes", default="750,1500,3000", help="train photos per run, comma-separated")
    p.add_argument("--full-run", default=None, help="a finished run of the recipe on the whole train split")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--runs", default="runs/learning-curve")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--target", type=float, default=0.65, help="test CIDEr-D to extrapolate the line to")
    p.add_argument("--block", default="learning-curve", help="the README block to rewrite (one per recipe)")
    p.add_argument("--no-readme", action="store_true", help="leave the README's block alone")
    p.add_argument("--force", action="store_true", help="rerun sizes already in the results file")
    args = p.parse_args(argv)
    missing = None if args.no_readme else missing_block(args.block)  # before hours of training, not after
    if missing:
        p.error(f"--block {args.block}: {missing}")
    if load_train_config(args.config).train_on_dev:
        p.error(f"--config {args.config}: a refit recipe (train_on_dev) trains on dev too; give the "
                f"train-only recipe it refits")
    if args.full_run and not (Path(args.full_run) / "config.json").is_file():
        p.error(f"--full-run {args.full_run}: no config.json there (not a run folder)")
    results = Path(args.results)
    rows = load_rows(results, args.config)

    def keep(row: dict) -> None:
        nonlocal rows
        rows = [r for r in rows if r["train_images"] != row["train_images"]] + [row]
        rows.sort(key=lambda r: r["train_images"])
        save_rows(results, rows, row)

    done = {r["train_images"] for r in rows}
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        if args.force or n not in done:
            keep(train_size(n, args))
    if args.full_run:
        run = Path(args.full_run)
        cfg = check_full_run(run, args)
        n = len(load_dataset(cfg.data, cfg.data_format, data_options(cfg)).split("train"))
        if args.force or n not in done:
            keep(row_for(run, n, args))
    block = readme_block(rows, args.target)
    if not args.no_readme:
        replace_block(args.block, block)
    print(block)
    return rows


if __name__ == "__main__":
    main()
