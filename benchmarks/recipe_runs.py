"""The README's table of full-recipe runs beside the default: other architectures or encoders
trained with a whole recipe (cross-entropy, then SCST), scored like the shipped model.

    python benchmarks/recipe_runs.py [--readme]

Each folder `benchmarks/results/<name>/` holds the small output files of one run, copied from
its run folder after `benchmarks/retrain_default.sh` (or `captioner train` followed by
`benchmarks/ship_default.sh`) and `benchmarks/scst_gain.py`:
`config.json`, `metrics.jsonl`, `test_scores.json` (dev-tuned search, beam 3),
`length_penalty.json`, and where present `timing.json` (retrain minutes, extraction included),
`scst_gain.json` (cross-entropy start vs SCST end on test, plain beam 3) and `latency.json`
(`benchmarks/latency.py --model <exported model> --out ...`: one photo, beam 3, median; every
`latency*.json` is shown, e.g. also `latency-bf16.json` from `--precision bf16`). The default
model itself is in the results block above; this table is read from those files only.

An ensemble's folder holds `ensemble.json` (`{"members": [<run folder names>]}`) instead of a
config and a log, beside its own `length_penalty.json`, `test_scores.json` and `latency.json`;
its minutes are its members' added up.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from readme_blocks import replace_block

from captioner.training.config import load_train_config
from captioner.models.model import get_model_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUN_FILES = ("config.json", "metrics.jsonl", "test_scores.json", "length_penalty.json")


def load_ensemble(folder: Path) -> dict:
    """An ensemble's figures: its own search and scores, its members' epochs and minutes."""
    spec = json.loads((folder / "ensemble.json").read_text())
    members = [load_run(folder.parent / name) for name in spec["members"]]
    missing = [name for name, m in zip(spec["members"], members) if m is None]
    if missing:
        raise SystemExit(f"{folder / 'ensemble.json'}: member run folder(s) {', '.join(missing)} not found "
                         f"beside it")
    search = json.loads((folder / "length_penalty.json").read_text())
    chosen = next(row for row in search["table"] if row["length_penalty"] == search["best_length_penalty"]
                  and row.get("no_repeat_ngram", 0) == search["best_no_repeat_ngram"])
    run = {"name": folder.name, "model": " + ".join(m["model"] for m in members),
           "encoder": members[0]["encoder"],
           "epochs": ", ".join(f"{m['xe_epochs']}+{m['scst_epochs']}" for m in members),
           "dev_cider": f"{chosen['CIDEr']:.3f} (tuned search)",
           "test": json.loads((folder / "test_scores.json").read_text()),
           "minutes": " + ".join(str(m.get("retrain_minutes", m["train_minutes_logged"])) for m in members)
                      + " (members')"}
    run["latency"] = latencies(folder)
    return run


def latencies(folder: Path) -> str:
    """'ms (precision)' from each latency*.json in `folder` (latency.py's output), or '–'."""
    found = []
    for f in sorted(folder.glob("latency*.json")):
        lat = json.loads(f.read_text())
        found.append(f"{lat['caption_beam3_ms']} ({lat.get('precision', 'fp32')})")
    return "; ".join(found) or "–"


def model_config(model: str):
    """A run's model: a registered name, or a model config file given relative to the repo
    (e.g. `configs/models/show-attend-tell-tied.json`), as the recipes are run from its root."""
    if model.endswith(".json") and not Path(model).is_absolute():
        model = str(REPO / model)
    return get_model_config(model)


def differences(run: Path, recipe: dict, ignore: set[str]) -> str:
    """The settings, outside `ignore`, in which a finished run's config.json differs from the
    resolved `recipe` ("field=run's value (recipe recipe's value), ..."); empty where none do."""
    # a field added since the run was made took its default there (new fields keep the old behaviour)
    used = {**load_train_config(None).to_dict(), **json.loads((run / "config.json").read_text())}
    return ", ".join(f"{k}={used.get(k)!r} (recipe {recipe[k]!r})"
                     for k in sorted(recipe) if k not in ignore and used.get(k) != recipe[k])


def recipe_of(rows: list[dict], results: str | Path) -> str | None:
    """The one recipe (its "config") every row of a benchmark's results file was trained with;
    None for no rows. A file mixing recipes is refused: its rows would not compare."""
    configs = sorted({r.get("config", "(not recorded)") for r in rows})
    if len(configs) > 1:
        raise SystemExit(f"{results}: rows of more than one recipe ({', '.join(configs)}); "
                         f"give each recipe its own --results file")
    return configs[0] if configs else None


def load_rows(results: Path, config: str) -> list[dict]:
    """A benchmark's kept rows (none if the file is not there yet), refused if they are of
    another recipe than `config`: new rows could not be compared with them."""
    rows = json.loads(results.read_text()) if results.is_file() else []
    kept = recipe_of(rows, results)
    if kept not in (None, config):
        raise SystemExit(f"{results}: its rows are of the recipe {kept}, not {config}; "
                         f"give this recipe a results file of its own (--results)")
    return rows


def save_rows(results: Path, rows: list[dict], row: dict) -> None:
    """Write the rows (a new `row` among them) as soon as it is measured, and print it."""
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(row), flush=True)


def read_history(folder: Path) -> list[dict]:
    """A run's per-epoch records (its metrics.jsonl)."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def logged_minutes(history: list[dict]) -> float:
    """The log's own per-epoch seconds: training plus dev decoding, extraction not included."""
    return round(sum(h.get("train_seconds", 0) + h.get("val_seconds", 0) for h in history) / 60, 1)


def load_run(folder: Path) -> dict | None:
    """One run's figures, or None when `folder` is not a run's output folder."""
    if (folder / "ensemble.json").is_file():
        return load_ensemble(folder)
    if not all((folder / f).is_file() for f in RUN_FILES):
        return None
    cfg = json.loads((folder / "config.json").read_text())
    history = read_history(folder)
    best = max(history, key=lambda h: h["dev"]["CIDEr"])
    search = json.loads((folder / "length_penalty.json").read_text())
    model = model_config(cfg["model"])
    run = {"name": folder.name, "model": model.name, "encoder": cfg.get("encoder") or model.encoder,
           "xe_epochs": sum(h.get("phase", "xe") == "xe" for h in history),
           "scst_epochs": sum(h.get("phase") == "scst" for h in history),
           "best_dev_cider": best["dev"]["CIDEr"], "best_epoch": best["epoch"],
           "test": json.loads((folder / "test_scores.json").read_text()),
           "length_penalty": search["best_length_penalty"], "no_repeat_ngram": search["best_no_repeat_ngram"],
           "train_minutes_logged": logged_minutes(history)}
    if cfg.get("scst_soup", 1) > 1:  # SCST trajectories averaged: say how many, beside the run's own
        run["epochs"] = f"{run['xe_epochs']}+{cfg['scst_soup']}×{run['scst_epochs']} (soup)"
    if cfg.get("train_on_dev"):  # a refit has trained on dev: its dev scores judge nothing
        run["dev_cider"] = "– (refit: dev trained on)"
    if (folder / "timing.json").is_file():
        run["retrain_minutes"] = json.loads((folder / "timing.json").read_text())["retrain_minutes"]
    run["latency"] = latencies(folder)
    if (folder / "scst_gain.json").is_file():
        gain = json.loads((folder / "scst_gain.json").read_text())
        run["scst_gain"] = {"xe": gain["cross_entropy"]["test"]["CIDEr"], "scst": gain["scst"]["test"]["CIDEr"],
                            "gain": gain["gain"]["CIDEr"]}
    return run


def markdown(runs: list[dict]) -> str:
    lines = ["| run | model | encoder | epochs (XE+SCST) | best dev CIDEr-D | test BLEU-4 | test METEOR | "
             "test ROUGE-L | test CIDEr-D | SCST gain on test (CIDEr-D, plain beam 3) | minutes | caption ms (beam 3) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        t = r["test"]
        gain = (f"{r['scst_gain']['xe']:.3f} → {r['scst_gain']['scst']:.3f} (**{r['scst_gain']['gain']:+.3f}**)"
                if "scst_gain" in r else "–")
        minutes = r.get("minutes") or (f"{r['retrain_minutes']} retrain" if "retrain_minutes" in r
                                       else f"{r['train_minutes_logged']} training (log)")
        epochs = r.get("epochs") or f"{r['xe_epochs']}+{r['scst_epochs']}"
        dev = r.get("dev_cider") or f"{r['best_dev_cider']:.3f} (epoch {r['best_epoch']})"
        lines.append(f"| {r['name']} | {r['model']} | {r['encoder']} | {epochs} | "
                     f"{dev} | {t['Bleu_4']:.3f} | {t['METEOR']:.3f} | "
                     f"{t['ROUGE_L']:.3f} | {t['CIDEr']:.3f} | {gain} | {minutes} | {r['latency']} |")
    return "\n".join(lines) + "\n"


def write_readme(block: str, readme: Path = REPO / "README.md") -> None:
    replace_block("runs", block, readme)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of run output folders")
    p.add_argument("--readme", action="store_true", help="rewrite the README's runs block")
    args = p.parse_args()
    runs = [r for f in sorted(args.results.iterdir()) if f.is_dir() and (r := load_run(f))]
    block = markdown(runs)
    print(block, end="")
    if args.readme:
        write_readme(block)


if __name__ == "__main__":
    main()
