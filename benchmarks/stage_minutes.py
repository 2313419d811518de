"""Where a retrain's minutes went, stage by stage, and on which CPU: the README's
`stage-minutes` block.

    python benchmarks/stage_minutes.py [FOLDER ...] [--readme]

Each FOLDER is a run's files as `benchmarks/results/<name>/` keeps them (default: `default` and
`refit-one-trajectory`): `timing.json` (retrain_default.sh's wall-clock minutes), `metrics.jsonl`
(each epoch's logged train and validation seconds), `scst-K/metrics.jsonl` for a soup's further
trajectories, and `lscpu.txt`. Minutes of different CPU models do not compare; the table names
each run's CPU so that they are not compared by accident.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from readme_blocks import missing_block, replace_block

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BLOCK = "stage-minutes"


def logged_minutes(metrics: Path, phase: str) -> float:
    """Minutes the log gives one phase ("xe" or "scst"): each epoch's train plus validation seconds."""
    epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return sum(e.get("train_seconds", 0) + e.get("val_seconds", 0) for e in epochs
               if e.get("phase", "xe") == phase) / 60


def cpu(lscpu: Path) -> str:
    """'NAME (family F, model M)' from saved `lscpu` output, or 'unknown CPU'."""
    if not lscpu.is_file():
        return "unknown CPU"
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in lscpu.read_text().splitlines() if ":" in line)}
    family = f" (family {fields['CPU family']}, model {fields.get('Model', '?')})" if fields.get("CPU family") else ""
    return (fields.get("Model name") or "unknown CPU") + family


def stages(folder: Path) -> dict:
    """One run's minutes: extraction and retrain (wall clock), cross-entropy and each SCST trajectory (logged)."""
    timing = json.loads((folder / "timing.json").read_text())
    trajectories = [logged_minutes(folder / "metrics.jsonl", "scst")]
    trajectories += [logged_minutes(sub / "metrics.jsonl", "scst")
                     for sub in sorted(folder.glob("scst-*"), key=lambda p: int(p.name.split("-")[1]))]
    return {"run": folder.name, "cpu": cpu(folder / "lscpu.txt"), "prepare": timing["prepare_minutes"],
            "xe": round(logged_minutes(folder / "metrics.jsonl", "xe"), 1),
            "scst": [round(m, 1) for m in trajectories], "retrain": timing["retrain_minutes"]}


def block(rows: list[dict]) -> str:
    lines = ["| run | CPU | feature extraction | cross-entropy epochs (logged) | each SCST trajectory (logged) "
             "| retrain (wall clock) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['cpu']} | {r['prepare']} | {r['xe']} | "
                     f"{' + '.join(str(m) for m in r['scst'])} | **{r['retrain']}** |")
    lines += ["", "Minutes. Logged minutes are each epoch's train and validation seconds in the run's "
              "`metrics.jsonl` (a soup's further trajectories in `scst-K/metrics.jsonl`); the retrain is "
              "`retrain_default.sh`'s wall clock (`timing.json`), which also holds loading, the soup's "
              "averaging and scoring. Written by `benchmarks/stage_minutes.py`."]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", type=Path,
                   default=[RESULTS / "default", RESULTS / "refit-one-trajectory"])
    p.add_argument("--readme", action="store_true", help=f"rewrite the README's {BLOCK} block")
    args = p.parse_args(argv)
    if args.readme and missing_block(BLOCK):
        p.error(missing_block(BLOCK))
    for folder in args.folders:
        for name in ("timing.json", "metrics.jsonl"):
            if not (folder / name).is_file():
                p.error(f"{folder / name}: missing (a run folder as benchmarks/results/<name>/ keeps it)")
    rows = [stages(folder) for folder in args.folders]
    text = block(rows)
    if args.readme:
        replace_block(BLOCK, text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
