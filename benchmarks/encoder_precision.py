"""What a bfloat16 frozen encoder costs in quality (`encoder_precision`): score one checkpoint with
its encoder in fp32 and in bf16, with the same search and the same toolkit as `captioner
evaluate`, on dev (which decides) and test (shown for reference).

    python benchmarks/encoder_precision.py --checkpoint runs/tuned-mirror/best.pt \
        --search benchmarks/results/tuned-mirror/length_penalty.json [--data ../shared/data/flickr8k] \
        [--cache-dir DIR] [--captions-dir runs/encoder_precision] \
        [--out benchmarks/results/tuned-mirror/encoder_precision.json] [--readme]
    python benchmarks/encoder_precision.py --readme-only [--out ...] [--speed-dir DIR]

`--search` is the dev-tuned search of the checkpoint's recipe (`tune_length_penalty.py`'s file).
The rule, fixed before the first measurement (commit f0a7cd4): the default's encoder runs in
bf16 only if, on dev, the 95% paired-bootstrap interval of (bf16 - fp32) (`captioner compare`,
1000 draws, seed 0) has its lower end above -`CIDER_MARGIN` for CIDEr-D and above
-`BLEU_MARGIN` for BLEU-4: no worse than fp32 beyond those margins. Writes both settings' scores
per split, the intervals, how many captions changed and the rule's verdict; `--readme` (or
`--readme-only`, from the results file alone) writes the README's `encoder-precision` block,
with what each setting costs from the timing files in `--speed-dir`: `latency.py
--encoder-precision P --out DIR/latency-default-encoder-P-ROUND.json` and `serve_load.py --model
<the default exported with encoder precision P> --out DIR/serve_load-P.json`.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from captioner.evaluation.compare import compare_files
from captioner.inference.precision import native_bf16
from readme_blocks import missing_block, replace_block
from setting_runs import SPLITS, captions, load_run, parser, score_split

CIDER_MARGIN, BLEU_MARGIN = 0.010, 0.005  # how much worse than fp32 bf16 may be, at most, on dev
PRECISIONS = ("fp32", "bf16")
BLOCK = "encoder-precision"
REPO = Path(__file__).resolve().parents[1]
SPEED_DIR = REPO / "benchmarks" / "results" / "encoder-precision"


def shown(path: Path) -> str:
    """A path as the README names it: from the repository's root where it lies inside."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def stages(load: dict, mode: str) -> str:
    """A load test's encoder and search time per photo in `mode`, at the thread count its summary
    shows (the mean over that count's rounds)."""
    runs = load["runs"][f"{mode}@{load['summary'][mode]['server_threads']}"]
    encode, search = (sum(r[f"{s}_ms_per_photo"] for r in runs) / len(runs) for s in ("encode", "search"))
    return f"{encode:.1f} + {search:.1f}"


def speed_lines(folder: Path) -> list[str]:
    """The timing files' figures as two tables: one photo and a batch of 8 per setting
    (`latency-default-encoder-SETTING-ROUND.json`), and each load test of `captioner serve` in the
    order they ran (`serve_load-ROUND-SETTING.json`); none where the folder lacks them."""
    latency_rows, load_rows = [], []
    for setting in PRECISIONS:
        latency = [json.loads(f.read_text()) for f in sorted(folder.glob(f"latency-default-encoder-{setting}-*.json"))]
        if latency:
            latency_rows.append(f"| {setting} | {', '.join(str(d['caption_beam3_ms']) for d in latency)} | "
                                f"{', '.join(str(d['encoder_batch8_ms_per_image']) for d in latency)} |")
    for path in sorted(folder.glob("serve_load-*-*.json")):
        load = json.loads(path.read_text())
        batched, single = load["summary"]["batched"], load["summary"]["one_at_a_time"]
        load_rows.append(f"| {path.stem.rsplit('-', 1)[1]} | {path.name} | {stages(load, 'batched')} | "
                         f"{stages(load, 'one_at_a_time')} | "
                         f"{batched['throughput_rps']} / {single['throughput_rps']} | "
                         f"{batched['throughput_rps'] / single['throughput_rps']:.2f}x |")
    lines = []
    if latency_rows:
        lines += ["", "| encoder | one photo, beam 3 (ms, each round) "
                  "| encoder per photo in batches of 8 (ms, each round) |",
                  "|---|---|---|", *latency_rows]
    if load_rows:
        lines += ["", "| encoder | `captioner serve` load test | batched: encoder + search per photo (ms) "
                  "| one at a time: encoder + search per photo (ms) | batched / one at a time (requests/s) "
                  "| throughput ratio |", "|---|---|---|---|---|---|", *load_rows]
    if lines:
        lines += ["", f"The default's own weights, timed on one machine (`{shown(folder)}/`): `latency.py` alternating "
                  "the settings for two rounds; `serve_load.py` (each mode at its best thread count, the time per "
                  "photo from the server's counters) for each setting in turn."]
    return lines


def verdict(dev_intervals: dict) -> dict:
    """The rule on dev's intervals of (bf16 - fp32), {metric: (low, high)}."""
    cider_low, bleu_low = dev_intervals["CIDEr"][0], dev_intervals["Bleu_4"][0]
    adopt = cider_low > -CIDER_MARGIN and bleu_low > -BLEU_MARGIN
    return {"dev_cider_low": round(cider_low, 4), "dev_bleu4_low": round(bleu_low, 4),
            "cider_margin": CIDER_MARGIN, "bleu4_margin": BLEU_MARGIN, "adopt": bool(adopt)}


def readme_block(result: dict, source: str, speed_dir: Path | None = None) -> str:
    """The README's quote of a results file: both settings on both splits, the intervals and the rule."""
    lines = ["| encoder | dev BLEU-4 | dev CIDEr-D | test BLEU-4 | test METEOR | test ROUGE-L | test CIDEr-D |",
             "|---|---|---|---|---|---|---|"]
    for setting in PRECISIONS:
        dev, test = result["dev"][setting], result["test"][setting]
        lines.append(f"| {setting} | {dev['Bleu_4']:.3f} | {dev['CIDEr']:.3f} | {test['Bleu_4']:.3f} | "
                     f"{test['METEOR']:.3f} | {test['ROUGE_L']:.3f} | {test['CIDEr']:.3f} |")
    rule = result["rule"]

    def gap(split: str, metric: str) -> str:
        low, high = result[split]["interval"][metric]
        return f"{split} {metric.replace('Bleu_4', 'BLEU-4').replace('CIDEr', 'CIDEr-D')} [{low:+.3f}, {high:+.3f}]"

    changed = ", ".join(f"{result[s]['captions_changed']} of {result[s]['captions']} {s} captions" for s in SPLITS)
    intervals = "; ".join(gap(s, m) for s in SPLITS for m in ("CIDEr", "Bleu_4"))
    lines += ["", f"`{result['checkpoint']}`, beam {result['beam_size']}, length penalty {result['length_penalty']}, "
              f"no-repeat n-gram {result['no_repeat_ngram']} for both; bf16 changed {changed}. 95% intervals of "
              f"bf16 − fp32 ({result['resamples']} paired draws over photos): {intervals}. The rule asks dev's lower "
              f"ends to stay above −{rule['cider_margin']:.3f} (CIDEr-D) and −{rule['bleu4_margin']:.3f} (BLEU-4); "
              f"they are {rule['dev_cider_low']:+.4f} and {rule['dev_bleu4_low']:+.4f}: "
              f"**{'adopted' if rule['adopt'] else 'not adopted'}**. Source: `{source}`."]
    if speed_dir is not None:
        lines += speed_lines(speed_dir)
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = parser(__doc__, BLOCK, "runs/encoder_precision", "benchmarks/results/tuned-mirror/encoder_precision.json")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--speed-dir", type=Path, default=SPEED_DIR, help="the timing files the block quotes")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.readme_only:
        result = json.loads(out.read_text())
        replace_block(BLOCK, readme_block(result, args.out, args.speed_dir))
        return result
    if args.readme and missing_block(BLOCK):  # say so now, not after the scoring
        p.error(missing_block(BLOCK))
    model, search, result = load_run(p, args)
    result.update(native_bf16=native_bf16(), resamples=args.resamples)
    for split in SPLITS:
        (fp32, fp32_file), (bf16, bf16_file) = (score_split(model, split, s, search, args, encoder_precision=s)
                                                for s in PRECISIONS)
        comparison = compare_files(fp32_file, bf16_file, args.resamples, seed=0)
        caps = [captions(f) for f in (fp32_file, bf16_file)]
        result[split] = {"fp32": fp32, "bf16": bf16, "captions": len(caps[0]),
                         "captions_changed": sum(caps[0][k] != caps[1][k] for k in caps[0]),
                         "interval": {m.metric: [round(x, 4) for x in m.diff_interval] for m in comparison.metrics},
                         "comparison": [asdict(m) for m in comparison.metrics]}
        print(json.dumps({split: result[split]["interval"], "captions_changed": result[split]["captions_changed"]}),
              flush=True)
    result["rule"] = verdict(result["dev"]["interval"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rule"]))
    if args.readme:
        replace_block(BLOCK, readme_block(result, args.out, args.speed_dir))
    return result


if __name__ == "__main__":
    main()
