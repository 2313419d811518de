"""What averaging the self-critical stage's epoch weights adds (`captioner average`): score a run's
best.pt and the mean of its SCST epochs' end-of-epoch weights over a few spans, with the run's
dev-tuned search and the same toolkit as `captioner evaluate`, on dev (which decides) and test
(shown for reference), with `captioner compare`'s paired bootstrap beside each difference.

    python benchmarks/scst_average.py --run runs/tm --search runs/tm/length_penalty.json \
        [--epochs-dir RUN/epochs] [--cache-dir RUN/cache] [--data ../shared/data/flickr8k] \
        [--out benchmarks/results/tuned-mirror/scst_average.json] [--readme]
    python benchmarks/scst_average.py --readme-only [--out ...] [--block NAME]
    python benchmarks/scst_average.py --pool A.json B.json [--out POOLED.json] [--readme]

The run must have kept each epoch's weights as `epoch-N.pt` (`--set keep_epochs=true`). The
rule, fixed before the first measurement (commit 11b9416): the default averages its SCST weights
only if the mean of the first three SCST epochs (the three a refit runs) beats best.pt on dev
CIDEr-D by more than `MIN_GAIN` and does not lower dev BLEU-4. The other spans are reported and
do not decide. Writes every model's scores per split, each span's difference from best.pt with
its 95% interval, and the verdict; `--readme` (or `--readme-only`) writes the README's
`scst-average` block (or `--block NAME`) from it. `--pool` applies the second rule (commit
bb24ac3) to the results files of several trajectories: the mean of their deciding spans' dev
CIDEr-D gains must be above `MIN_GAIN`, and no trajectory's average may lower dev BLEU-4; it
writes the verdict and the README's `scst-average-pooled` block. `--soup RUN RUN ...` applies the
third rule (commit 3fc3bbb) to several trajectories from the same cross-entropy weights: the mean of
all of their first three SCST epochs' weights together (a uniform soup) must beat each run's own
best.pt on dev CIDEr-D by more than `MIN_GAIN` and lower neither's dev BLEU-4; the soups of all
their SCST epochs and of their first two are reported and do not decide. It writes the README's
`scst-soup` block.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.models.average import average_checkpoint
from captioner.models.checkpoint import load_checkpoint, write_checkpoint
from captioner.evaluation.compare import compare_files
from readme_blocks import missing_block, replace_block
from recipe_runs import read_history
from setting_runs import SPLITS, score_split

MIN_GAIN = 0.010  # dev CIDEr-D the average must add over best.pt (the project's margin for mirror views)
BLOCK = "scst-average"
POOLED_BLOCK = "scst-average-pooled"
SOUP_BLOCK = "scst-soup"
SHOWN = {"Bleu_4": "BLEU-4", "CIDEr": "CIDEr-D"}


def spans(scst_epochs: list[int]) -> dict[str, list[int]]:
    """The averages scored: the deciding one first (the first three SCST epochs, what a refit with
    three SCST epochs would average), then every SCST epoch and the last three."""
    if len(scst_epochs) < 3:
        raise SystemExit(f"the run has {len(scst_epochs)} SCST epochs; the rule averages the first three")
    out = {}
    for span in (scst_epochs[:3], scst_epochs, scst_epochs[-3:]):
        out.setdefault(f"{span[0]}-{span[-1]}", span)
    return out


def verdict(dev_best: dict, dev_avg: dict, span: str) -> dict:
    gain = dev_avg["CIDEr"] - dev_best["CIDEr"]
    adopt = gain > MIN_GAIN and dev_avg["Bleu_4"] >= dev_best["Bleu_4"]
    return {"span": span, "dev_cider_gain": round(gain, 4), "min_gain": MIN_GAIN, "adopt": bool(adopt)}


def pooled_verdict(results: list[dict]) -> dict:
    """The second rule, on the evidence of several trajectories' results files."""
    gains = [r["rule"]["dev_cider_gain"] for r in results]
    bleu_kept = [r["models"][r["rule"]["span"]]["dev"]["Bleu_4"] >= r["models"]["best"]["dev"]["Bleu_4"]
                 for r in results]
    mean = sum(gains) / len(gains)
    return {"runs": [r["run"] for r in results], "dev_cider_gains": gains, "mean_dev_cider_gain": round(mean, 4),
            "min_gain": MIN_GAIN, "adopt": bool(mean > MIN_GAIN and all(bleu_kept))}


def pooled_block(pooled: dict, source: str) -> str:
    gains = ", ".join(f"`{run}` {gain:+.4f}" for run, gain in zip(pooled["runs"], pooled["dev_cider_gains"]))
    return (f"Both trajectories together (the rule of commit bb24ac3): deciding spans' dev CIDEr-D gains {gains}; "
            f"mean **{pooled['mean_dev_cider_gain']:+.4f}** (the rule asks for more than {pooled['min_gain']:.3f} "
            f"and no lower dev BLEU-4 in either): **{'adopted' if pooled['adopt'] else 'not adopted'}**. "
            f"Source: `{source}`.\n")


def soups(runs_epochs: list[list[int]]) -> dict[str, list[int]]:
    """The soups scored, as {name: [index into the runs' SCST epochs]}: the deciding one first (each
    run's first three SCST epochs, what a refit with three SCST epochs per trajectory would average),
    then every SCST epoch of each, then the first two of each."""
    shortest = min(len(e) for e in runs_epochs)
    if shortest < 3:
        raise SystemExit(f"a run has {shortest} SCST epochs; the rule averages the first three of each")
    return {"first 3 of each": [0, 1, 2], "all of each": list(range(shortest)), "first 2 of each": [0, 1]}


def soup_verdict(dev_bests: list[dict], dev_soup: dict) -> dict:
    """The third rule: the soup against every run's own best.pt."""
    gains = [dev_soup["CIDEr"] - best["CIDEr"] for best in dev_bests]
    adopt = min(gains) > MIN_GAIN and all(dev_soup["Bleu_4"] >= best["Bleu_4"] for best in dev_bests)
    return {"soup": "first 3 of each", "dev_cider_gains": [round(g, 4) for g in gains], "min_gain": MIN_GAIN,
            "adopt": bool(adopt)}


def soup_block(result: dict, source: str) -> str:
    runs = result["runs"]
    head = " | ".join(f"test CIDEr-D − `{r}` best.pt (95% interval)" for r in runs)
    dev_head = " | ".join(f"dev CIDEr-D − `{r}` best.pt (95% interval)" for r in runs)
    lines = [f"| weights | dev BLEU-4 | dev CIDEr-D | {dev_head} | test BLEU-4 | test CIDEr-D | {head} |",
             "|" + "---|" * (5 + 2 * len(runs))]
    dash = " | ".join("–" for _ in runs)
    for i, run in enumerate(runs):
        best = result["models"][f"best {i}"]
        lines.append(f"| `{run}` best.pt (epoch {result['best_epochs'][i]}) | {best['dev']['Bleu_4']:.3f} | "
                     f"{best['dev']['CIDEr']:.3f} | {dash} | {best['test']['Bleu_4']:.3f} | "
                     f"{best['test']['CIDEr']:.3f} | {dash} |")
    for name, members in result["soups"].items():
        m = result["models"][name]
        cells = {s: " | ".join(f"{v['CIDEr']['diff']:+.3f} [{v['CIDEr']['interval'][0]:+.3f}, "
                               f"{v['CIDEr']['interval'][1]:+.3f}]" for v in m["vs_best"][s]) for s in SPLITS}
        epochs = "; ".join(f"{', '.join(map(str, e))}" for e in members)
        lines.append(f"| soup of SCST epochs {epochs} ({name}) | {m['dev']['Bleu_4']:.3f} | {m['dev']['CIDEr']:.3f} "
                     f"| {cells['dev']} | {m['test']['Bleu_4']:.3f} | {m['test']['CIDEr']:.3f} | {cells['test']} |")
    rule = result["rule"]
    gains = ", ".join(f"{g:+.4f}" for g in rule["dev_cider_gains"])
    lines += ["", f"Beam {result['beam_size']}, length penalty {result['length_penalty']}, no-repeat n-gram "
              f"{result['no_repeat_ngram']} for every row; intervals from `captioner compare` (1000 draws, seed 0). "
              f"Deciding soup ({rule['soup']}, the rule of commit 3fc3bbb): dev CIDEr-D gains over each best.pt "
              f"**{gains}** (the rule asks for more than {rule['min_gain']:.3f} over each, and no lower dev BLEU-4): "
              f"**{'adopted' if rule['adopt'] else 'not adopted'}**. Source: `{source}`."]
    return "\n".join(lines) + "\n"


def run_soup(run_dirs: list[str], args: argparse.Namespace, out: Path) -> dict:
    """Score each run's best.pt and the soups of their SCST epochs on dev and test (the third rule)."""
    runs = [Path(r) for r in run_dirs]
    scst = [[h["epoch"] for h in read_history(run) if h["phase"] == "scst"] for run in runs]
    chosen = soups(scst)
    missing = [str(run / "epochs" / f"epoch-{n}.pt") for run, epochs in zip(runs, scst) for n in epochs
               if not (run / "epochs" / f"epoch-{n}.pt").is_file()]
    if missing:
        raise SystemExit(f"no weights kept for SCST epoch(s): {', '.join(missing)} (train with --set keep_epochs=true)")
    args.cache_dir = args.cache_dir or str(runs[0] / "cache")
    args.captions_dir = args.captions_dir or str(runs[0] / "scst-soup")
    search = json.loads(Path(args.search).read_text())
    result = {"runs": [str(r) for r in runs], "beam_size": args.beam_size,
              "length_penalty": search["best_length_penalty"], "no_repeat_ngram": search["best_no_repeat_ngram"],
              "best_epochs": [], "scst_epochs": scst, "soups": {}, "models": {}}
    scored = {}
    for i, run in enumerate(runs):
        model, ckpt = load_checkpoint(run / "best.pt")
        result["best_epochs"].append(ckpt["metrics"].get("epoch"))
        scored[f"best {i}"] = model
    for name, index in chosen.items():
        members = [[epochs[k] for k in index] for epochs in scst]
        result["soups"][name] = members
        path = Path(args.captions_dir) / f"soup-{name.replace(' ', '-')}.pt"
        write_checkpoint(average_checkpoint([run / "epochs" / f"epoch-{n}.pt"
                                             for run, numbers in zip(runs, members) for n in numbers]), path)
        scored[name] = load_checkpoint(path)[0]
    files = {}
    for name, model in scored.items():
        result["models"][name] = {}
        for split in SPLITS:
            result["models"][name][split], files[name, split] = score_split(
                model, split, name.replace(" ", "-"), search, args)
        print(json.dumps({name: result["models"][name]}), flush=True)
    for name in chosen:
        result["models"][name]["vs_best"] = {
            s: [interval(files[f"best {i}", s], files[name, s]) for i in range(len(runs))] for s in SPLITS}
    first = next(iter(chosen))
    result["rule"] = soup_verdict([result["models"][f"best {i}"]["dev"] for i in range(len(runs))],
                                  result["models"][first]["dev"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rule"]))
    return result


def interval(a: Path, b: Path) -> dict:
    """b - a for BLEU-4 and CIDEr-D with its 95% interval (paired bootstrap, 1000 draws, seed 0)."""
    c = compare_files(a, b)
    return {m.metric: {"diff": round(m.b - m.a, 4), "interval": [round(x, 4) for x in m.diff_interval]}
            for m in c.metrics if m.metric in SHOWN}


def readme_block(result: dict, source: str) -> str:
    lines = ["| weights | dev BLEU-4 | dev CIDEr-D | dev CIDEr-D − best.pt (95% interval) | test BLEU-4 | "
             "test CIDEr-D | test CIDEr-D − best.pt (95% interval) |",
             "|---|---|---|---|---|---|---|"]
    best = result["models"]["best"]
    lines.append(f"| best.pt (epoch {result['best_epoch']}, best dev) | {best['dev']['Bleu_4']:.3f} | "
                 f"{best['dev']['CIDEr']:.3f} | – | {best['test']['Bleu_4']:.3f} | "
                 f"{best['test']['CIDEr']:.3f} | – |")
    for span in result["spans"]:
        m = result["models"][span]
        cells = [f"{m['vs_best'][s]['CIDEr']['diff']:+.3f} [{m['vs_best'][s]['CIDEr']['interval'][0]:+.3f}, "
                 f"{m['vs_best'][s]['CIDEr']['interval'][1]:+.3f}]" for s in SPLITS]
        lines.append(f"| mean of epochs {span} | {m['dev']['Bleu_4']:.3f} | {m['dev']['CIDEr']:.3f} | {cells[0]} | "
                     f"{m['test']['Bleu_4']:.3f} | {m['test']['CIDEr']:.3f} | {cells[1]} |")
    rule = result["rule"]
    lines += ["", f"Run `{result['run']}`, beam {result['beam_size']}, length penalty {result['length_penalty']}, "
              f"no-repeat n-gram {result['no_repeat_ngram']} for every row; intervals from `captioner compare` "
              f"(1000 draws, seed 0). Deciding span {rule['span']}: dev CIDEr-D gain "
              f"**{rule['dev_cider_gain']:+.3f}** (the rule asks for more than {rule['min_gain']:.3f} and no lower "
              f"dev BLEU-4): **{'adopted' if rule['adopt'] else 'not adopted'}**. Source: `{source}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="the training run's folder (metrics.jsonl, best.pt)")
    p.add_argument("--search", default=None, help="tune_length_penalty.py's results file for the run")
    p.add_argument("--epochs-dir", default=None, help="where its epoch-N.pt files are (default RUN/epochs)")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default=None, help="feature cache (default RUN/cache)")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--captions-dir", default=None,
                   help="averaged checkpoints and captions (with the references: keep them out of the repo; "
                        "default RUN/scst-average)")
    p.add_argument("--out", default="benchmarks/results/tuned-mirror/scst_average.json")
    p.add_argument("--readme", action="store_true", help=f"also rewrite the README's {BLOCK} block")
    p.add_argument("--readme-only", action="store_true", help="rewrite that block from --out; no run")
    p.add_argument("--block", default=BLOCK, help="the README block to write (one per trajectory)")
    p.add_argument("--pool", nargs="+", default=None, metavar="RESULTS",
                   help="apply the pooled rule to these results files; writes --out and, with --readme, "
                        f"the {POOLED_BLOCK} block")
    p.add_argument("--soup", nargs="+", default=None, metavar="RUN",
                   help="apply the soup rule to these runs (SCST trajectories from the same cross-entropy "
                        f"weights, epochs kept); writes --out and, with --readme, the {SOUP_BLOCK} block")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.soup:
        if len(args.soup) < 2:
            p.error("--soup needs at least two runs")
        if args.search is None:
            p.error("--soup needs --search")
        if args.readme and missing_block(SOUP_BLOCK):
            p.error(missing_block(SOUP_BLOCK))
        result = run_soup(args.soup, args, out)
        if args.readme:
            replace_block(SOUP_BLOCK, soup_block(result, args.out))
        return result
    if args.readme_only and args.block == SOUP_BLOCK:
        result = json.loads(out.read_text())
        replace_block(SOUP_BLOCK, soup_block(result, args.out))
        return result
    if args.pool:
        pooled = pooled_verdict([json.loads(Path(f).read_text()) for f in args.pool])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(pooled, indent=2) + "\n")
        print(json.dumps(pooled))
        if args.readme:
            replace_block(POOLED_BLOCK, pooled_block(pooled, args.out))
        return pooled
    if args.readme_only:
        result = json.loads(out.read_text())
        replace_block(args.block, readme_block(result, args.out))
        return result
    if args.run is None or args.search is None:
        p.error("--run and --search are needed to score (or --readme-only)")
    if args.readme and missing_block(args.block):
        p.error(missing_block(args.block))
    run = Path(args.run)
    epochs_dir = Path(args.epochs_dir or run / "epochs")
    args.cache_dir = args.cache_dir or str(run / "cache")
    args.captions_dir = args.captions_dir or str(run / "scst-average")
    history = read_history(run)
    scst = [h["epoch"] for h in history if h["phase"] == "scst"]
    chosen = spans(scst)
    missing = [str(epochs_dir / f"epoch-{n}.pt") for n in scst if not (epochs_dir / f"epoch-{n}.pt").is_file()]
    if missing:
        p.error(f"no weights kept for SCST epoch(s): {', '.join(missing)} (train with --set keep_epochs=true)")
    search = json.loads(Path(args.search).read_text())
    best_model, best_ckpt = load_checkpoint(run / "best.pt")
    result = {"run": str(run), "beam_size": args.beam_size, "length_penalty": search["best_length_penalty"],
              "no_repeat_ngram": search["best_no_repeat_ngram"], "best_epoch": best_ckpt["metrics"].get("epoch"),
              "scst_epochs": scst, "spans": list(chosen), "models": {}}
    files = {}
    scored = {"best": best_model}
    for span, numbers in chosen.items():
        path = Path(args.captions_dir) / f"average-{span}.pt"
        write_checkpoint(average_checkpoint([epochs_dir / f"epoch-{n}.pt" for n in numbers]), path)
        scored[span] = load_checkpoint(path)[0]
    for name, model in scored.items():
        result["models"][name] = {}
        for split in SPLITS:
            result["models"][name][split], files[name, split] = score_split(model, split, name, search, args)
        print(json.dumps({name: result["models"][name]}), flush=True)
    for span in chosen:
        result["models"][span]["vs_best"] = {s: interval(files["best", s], files[span, s]) for s in SPLITS}
    first = next(iter(chosen))
    result["rule"] = verdict(result["models"]["best"]["dev"], result["models"][first]["dev"], first)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rule"]))
    if args.readme:
        replace_block(args.block, readme_block(result, args.out))
    return result


if __name__ == "__main__":
    main()
