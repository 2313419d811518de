"""How much of a score difference is the test set's sampling noise: paired bootstrap intervals.

    python release/intervals.py \
        --pair "mirror views off → on" dev runs/mirror_views/captions-dev-off.json \
               runs/mirror_views/captions-dev-on.json \
        --pair ... [--resamples 1000] [--seed 0] [--out benchmarks/results/intervals.json] [--readme]
    python release/intervals.py --readme-only
    python release/intervals.py --pair ... --out benchmarks/results/intervals-default.json \
        --block intervals-default --readme     # another set of pairs, in a README block of its own

Each `--pair LABEL SPLIT A B` compares two captions files of one split (as `captioner evaluate
--captions-out` writes them; they hold the dataset's references, so they stay out of the repo)
with `captioner compare`'s paired bootstrap over photos. Writes every pair's intervals, for
BLEU-1..4, ROUGE-L and CIDEr-D, and with `--readme` docs/results.md's `intervals` block (BLEU-4 and
CIDEr-D, the metrics of the default's bars). The intervals say how far the photos drawn move a
score; they do not cover a second training's spread (the runs table's seed rows do that).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from captioner.evaluation.compare import compare_files
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # results_blocks
from results_blocks import missing_block, replace_block

BLOCK = "intervals"
SHOWN = {"CIDEr": "CIDEr-D", "Bleu_4": "BLEU-4"}


def readme_block(result: dict, source: str) -> str:
    pct = round(100 * result["confidence"])
    rows = [f"| comparison | split | metric | a | b | b − a | {pct}% interval of b − a | b higher in | "
            f"{pct}% interval of b |",
            "|---|---|---|---|---|---|---|---|---|"]
    for pair in result["pairs"]:
        for m in pair["metrics"]:
            if m["metric"] not in SHOWN:
                continue
            (low, high), (b_low, b_high) = m["diff_interval"], m["b_interval"]
            rows.append(f"| {pair['label']} | {pair['split']} | {SHOWN[m['metric']]} | {m['a']:.3f} | {m['b']:.3f} | "
                        f"{m['b'] - m['a']:+.3f} | [{low:+.3f}, {high:+.3f}] | {100 * m['b_better']:.0f}% of draws | "
                        f"[{b_low:.3f}, {b_high:.3f}] |")
    rows.append("")
    rows.append(f"Paired bootstrap over the split's photos, {result['resamples']} draws (seed {result['seed']}), "
                f"`captioner compare`; source: `{source}`, written by `release/intervals.py`.")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", nargs=4, action="append", default=[], metavar=("LABEL", "SPLIT", "A", "B"),
                   help="a comparison: its label, the split, the baseline's and the candidate's captions files")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--out", default="benchmarks/results/intervals.json")
    p.add_argument("--readme", action="store_true", help="also rewrite docs/results.md's block (--block)")
    p.add_argument("--readme-only", action="store_true", help="rewrite that block from --out; nothing scored")
    p.add_argument("--block", default=BLOCK, help=f"the README block written (default {BLOCK})")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.readme_only:
        result = json.loads(out.read_text())
        replace_block(args.block, readme_block(result, args.out))
        return result
    if not args.pair:
        p.error("give at least one --pair LABEL SPLIT A B (or --readme-only)")
    if args.readme and missing_block(args.block):  # say so now, not after the scoring
        p.error(missing_block(args.block))
    result = {"resamples": args.resamples, "seed": args.seed, "confidence": args.confidence, "pairs": []}
    for label, split, a, b in args.pair:
        comparison = compare_files(a, b, args.resamples, args.seed, args.confidence)
        result["pairs"].append({"label": label, "split": split, "a": a, "b": b, "photos": comparison.photos,
                                "metrics": [asdict(m) for m in comparison.metrics]})
        gains = {m.metric: [round(x, 4) for x in (m.b - m.a, *m.diff_interval)]
                 for m in comparison.metrics if m.metric in SHOWN}
        print(json.dumps({"label": label, "split": split, **gains}), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.readme:
        replace_block(args.block, readme_block(result, args.out))
    return result


if __name__ == "__main__":
    main()
