"""Did a rerun reproduce a run? Compare two model files tensor by tensor, and optionally the
per-epoch scores (metrics.jsonl) and test scores (test_scores.json) of their two run folders.

    python benchmarks/same_run.py runs/default/model-fp16.pt src/captioner/weights/default.pt \
        [--runs runs/default benchmarks/results/default] [--out benchmarks/results/default/rerun/same_run.json]
    python benchmarks/same_run.py --epochs-only runs/tm benchmarks/results/tuned-mirror/mirror-views-run

Timings (`*_seconds`) are left out of the per-epoch comparison: they are the one thing a rerun
is not expected to repeat. `--epochs-only` compares two run folders' per-epoch records alone, for runs
whose model files were not kept. Prints and writes a JSON report; exits 1 when anything compared differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from recipe_runs import read_history


def weights(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "decoder_state" not in state:
        raise SystemExit(f"{path}: not a captioner model file (no decoder_state)")
    return state["decoder_state"]


def compare_weights(a: str, b: str) -> dict:
    wa, wb = weights(a), weights(b)
    differ = sorted(k for k in set(wa) | set(wb)
                    if k not in wa or k not in wb or wa[k].dtype != wb[k].dtype or not torch.equal(wa[k], wb[k]))
    return {"tensors": len(wa), "parameters": sum(t.numel() for t in wa.values()), "differ": differ}


def epochs(run: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.endswith("_seconds")} for h in read_history(run)]


def epochs_differ(a: Path, b: Path) -> tuple[list[int], list[int]]:
    """(epochs in each run, the 1-based epochs whose records differ or one run lacks)."""
    ea, eb = epochs(a), epochs(b)
    return [len(ea), len(eb)], [i + 1 for i in range(max(len(ea), len(eb)))
                                if i >= len(ea) or i >= len(eb) or ea[i] != eb[i]]


def compare_runs(a: Path, b: Path) -> dict:
    counts, differ = epochs_differ(a, b)
    test = [json.loads((run / "test_scores.json").read_text()) for run in (a, b)]
    return {"epochs": counts, "epochs_differ": differ, "test_scores_equal": test[0] == test[1],
            "test": test[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a", nargs="?")
    p.add_argument("model_b", nargs="?")
    p.add_argument("--runs", nargs=2, metavar=("RUN_A", "RUN_B"), help="the two run folders")
    p.add_argument("--epochs-only", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare only these two run folders' per-epoch records (no model files)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.epochs_only:
        counts, differ = epochs_differ(*map(Path, args.epochs_only))
        report = {"folders": args.epochs_only, "epochs": counts, "epochs_differ": differ, "same": not differ}
        return _report(report, args.out)
    if args.model_a is None or args.model_b is None:
        p.error("two model files are needed (or --epochs-only RUN_A RUN_B)")
    report = {"models": [args.model_a, args.model_b], "weights": compare_weights(args.model_a, args.model_b)}
    same = not report["weights"]["differ"]
    if args.runs:
        report["runs"] = {"folders": args.runs, **compare_runs(Path(args.runs[0]), Path(args.runs[1]))}
        same = same and not report["runs"]["epochs_differ"] and report["runs"]["test_scores_equal"]
    report["same"] = same
    return _report(report, args.out)


def _report(report: dict, out: str | None) -> dict:
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["same"] else 1)
