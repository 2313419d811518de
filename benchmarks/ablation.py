"""What the default recipe's learning-rate schedule and label smoothing do: its cross-entropy
stage trained again with one setting changed at a time, then a short self-critical (SCST) stage
from each variant's best weights, since the shipped model's score comes out of SCST.

    python benchmarks/ablation.py [--variants recipe,no-warmup,no-decay,label-smoothing]
        [--config configs/flickr8k-tuned-mirror.json] [--recipe-run runs/tuned-mirror]
        [--scst-epochs 2] [--data ../shared/data/flickr8k] [--cache-dir runs/tuned-mirror/cache]
        [--runs runs/ablation] [--results benchmarks/results/ablation.json] [--block ablation]
        [--no-readme] [--force]

Each variant is the train-only recipe with the overrides in VARIANTS: its cross-entropy stage
as the recipe runs it (same seed, epochs and early stopping, no SCST) into RUNS/NAME/xe, then
`--scst-epochs` SCST epochs from that stage's best weights into RUNS/NAME/scst (every variant's
the same way, `init_checkpoint`, so they differ only in where SCST starts). Dev chooses, as it
chose the recipe: the best dev CIDEr-D of each stage is the variant's figure. Both stages' best
weights are also scored on test with the plain beam 3 (as `scst_gain.py` does), for reference.

`--recipe-run` takes the recipe's cross-entropy stage from a finished run of the recipe (the
default's train-only run) instead of training it again: that stage does not depend on the SCST
settings, and its config is checked against the recipe first. Rows are kept in the results
file, each naming its recipe (one recipe per file: another is refused); a variant already there
is skipped unless --force.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from readme_blocks import missing_block, replace_block
from recipe_runs import differences, load_rows, logged_minutes, read_history, recipe_of, save_rows
from scst_gain import score

from captioner.training.config import NOT_LEARNED, load_train_config
from captioner.training.train import train

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ablation.json"
# one setting changed from the recipe per variant (the recipe's own values are in its config)
VARIANTS = {
    "recipe": [],
    "no-warmup": ["warmup_steps=0"],
    "no-decay": ["final_lr_ratio=1.0"],
    "label-smoothing": ["label_smoothing=0.1"],
}
# what a finished run of the recipe may differ in and still stand for its cross-entropy stage:
# where it lives and how it reports, and every self-critical setting
XE_WHERE = NOT_LEARNED | {f for f in load_train_config(None).to_dict() if f.startswith("scst_")}


def stage_config(args: argparse.Namespace, name: str, stage: str, extra: list[str]):
    return load_train_config(args.config, [f"data={args.data}", f"out={Path(args.runs) / name / stage}",
                                           f"cache_dir={args.cache_dir}", "progress=false",
                                           *VARIANTS[name], *extra])


def check_recipe_run(run: Path, args: argparse.Namespace) -> None:
    """A run stands for the recipe's cross-entropy stage only if it learned it the same way."""
    what = differences(run, stage_config(args, "recipe", "xe", []).to_dict(), XE_WHERE)
    if what:
        raise SystemExit(f"{run / 'config.json'}: its cross-entropy stage is not the recipe {args.config}'s: {what}")
    if not (run / "best-xe.pt").is_file():
        raise SystemExit(f"{run}: no best-xe.pt (a run without an SCST stage keeps it as best.pt)")


def best_of(history: list[dict], phase: str) -> dict:
    epochs = [h for h in history if h.get("phase", "xe") == phase]
    best = max(epochs, key=lambda h: h["dev"]["CIDEr"])
    return {"best_dev_CIDEr": best["dev"]["CIDEr"], "best_dev_Bleu_4": best["dev"]["Bleu_4"],
            "best_epoch": best["epoch"], "epochs": len(epochs), "dev_CIDEr": [h["dev"]["CIDEr"] for h in epochs],
            "logged_minutes": logged_minutes(epochs)}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    t = time.time()
    plain = argparse.Namespace(data=args.data, split="test", beam_size=3, cache_dir=args.cache_dir)
    if name == "recipe" and args.recipe_run:
        xe_run, xe_weights = Path(args.recipe_run), Path(args.recipe_run) / "best-xe.pt"  # checked in main
    else:
        cfg = stage_config(args, name, "xe", ["scst_epochs=0"])
        xe_run, xe_weights = Path(cfg.out), Path(cfg.out) / "best.pt"
        train(cfg, resume=(xe_run / "last.pt").is_file())
    cfg = stage_config(args, name, "scst", ["epochs=0", f"scst_epochs={args.scst_epochs}",
                                            f"init_checkpoint={xe_weights}"])
    scst_run = Path(cfg.out)
    train(cfg, resume=(scst_run / "last.pt").is_file())
    return {"variant": name, "config": args.config, "overrides": VARIANTS[name], "xe_run": str(xe_run),
            "scst_run": str(scst_run),
            "xe": {**best_of(read_history(xe_run), "xe"), "test": score(str(xe_weights), plain)["test"]},
            "scst": {**best_of(read_history(scst_run), "scst"), "test": score(str(scst_run / "best.pt"), plain)["test"]},
            "wall_minutes": round((time.time() - t) / 60, 1)}


def readme_block(rows: list[dict]) -> str:
    """The README block of one recipe's rows (each names it in its "config")."""
    config = recipe_of(rows, "rows")
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows = sorted(rows, key=lambda r: order.get(r["variant"], len(order)))
    base = next((r for r in rows if r["variant"] == "recipe"), None)
    lines = ["| variant | changed | best dev CIDEr-D, cross-entropy (epoch) | best dev CIDEr-D after SCST (epoch) | "
             "dev CIDEr-D after SCST vs recipe | test CIDEr-D, cross-entropy | test CIDEr-D after SCST | "
             "test BLEU-4 after SCST |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xe, scst = r["xe"], r["scst"]
        changed = ", ".join(f"`{o}`" for o in r["overrides"]) or "nothing (the recipe)"
        versus = f"{scst['best_dev_CIDEr'] - base['scst']['best_dev_CIDEr']:+.3f}" if base and r is not base else "–"
        lines.append(f"| {r['variant']} | {changed} | {xe['best_dev_CIDEr']:.3f} ({xe['best_epoch']} of "
                     f"{xe['epochs']}) | {scst['best_dev_CIDEr']:.3f} ({scst['best_epoch']} of "
                     f"{scst['epochs']}) | {versus} | "
                     f"{xe['test']['CIDEr']:.3f} | {scst['test']['CIDEr']:.3f} | {scst['test']['Bleu_4']:.3f} |")
    return "\n".join(lines) + (
        f"\n\nRecipe `{config}` (train split; dev chooses), one seed per row: each variant's cross-entropy "
        f"stage, then SCST from its best weights, each stage's best dev epoch kept; test with the plain beam 3.\n")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/flickr8k-tuned-mirror.json")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--recipe-run", default=None, help="a finished run of the recipe, for its cross-entropy stage")
    p.add_argument("--scst-epochs", type=int, default=2)
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--runs", default="runs/ablation")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--block", default="ablation", help="the README block to rewrite")
    p.add_argument("--no-readme", action="store_true", help="leave the README's block alone")
    p.add_argument("--force", action="store_true", help="rerun variants already in the results file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    missing = None if args.no_readme else missing_block(args.block)  # before hours of training, not after
    if missing:
        p.error(f"--block {args.block}: {missing}")
    if load_train_config(args.config).train_on_dev:
        p.error(f"--config {args.config}: a refit recipe (train_on_dev) trains on dev, which must choose here; "
                f"give the train-only recipe it refits")
    recipe = stage_config(args, "recipe", "xe", []).to_dict()
    for name in names:
        if name != "recipe" and stage_config(args, name, "xe", [f"out={recipe['out']}"]).to_dict() == recipe:
            p.error(f"--variants {name}: changes nothing in the recipe ({', '.join(VARIANTS[name])}); "
                    f"it is the recipe's own setting")
    if args.scst_epochs < 1:
        p.error("--scst-epochs: at least 1 (the comparison is made after SCST)")
    if args.recipe_run:
        if not (Path(args.recipe_run) / "config.json").is_file():
            p.error(f"--recipe-run {args.recipe_run}: no config.json there (not a run folder)")
        check_recipe_run(Path(args.recipe_run), args)
    results = Path(args.results)
    rows = load_rows(results, args.config)
    for name in names:
        if args.force or name not in {r["variant"] for r in rows}:
            row = run_variant(name, args)
            rows = [r for r in rows if r["variant"] != name] + [row]
            save_rows(results, rows, row)
    block = readme_block(rows)
    if not args.no_readme:
        replace_block(args.block, block)
    print(block)
    return rows


if __name__ == "__main__":
    main()
