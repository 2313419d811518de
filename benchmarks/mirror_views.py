"""What reading each photo's mirror image too adds (`mirror_views`, test-time augmentation):
score one checkpoint with the setting off and on, with the same search and the same toolkit as
`captioner evaluate`, on dev (which decides) and test (shown for reference).

    python benchmarks/mirror_views.py --checkpoint runs/tuned-mirror/best.pt \
        --search benchmarks/results/tuned-mirror/length_penalty.json [--data ../shared/data/flickr8k] \
        [--cache-dir DIR] [--out benchmarks/results/tuned-mirror/mirror_views.json] [--readme]
    python benchmarks/mirror_views.py --readme-only [--out ...]

`--search` is the dev-tuned search of the checkpoint's recipe (`tune_length_penalty.py`'s file);
both settings decode with it. The rule, fixed before the first measurement (commit message of
the commit that added this script): the default reads mirror images only if, on dev, CIDEr-D
with mirror views beats CIDEr-D without by more than `MIN_GAIN` and BLEU-4 does not fall.
Writes both settings' scores per split, their differences, how many captions changed, and the
rule's verdict; `--readme` (or `--readme-only`, from the results file alone) writes the README's
`mirror-views` block from it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.checkpoint import load_checkpoint
from captioner.evaluate import evaluate
from captioner.model import CaptionModel
from readme_blocks import missing_block, replace_block

MIN_GAIN = 0.010  # dev CIDEr-D the mirror views must add for the default to use them
SPLITS = ("dev", "test")


def verdict(dev_off: dict, dev_on: dict) -> dict:
    """The rule on the two settings' dev scores."""
    gain = dev_on["CIDEr"] - dev_off["CIDEr"]
    adopt = gain > MIN_GAIN and dev_on["Bleu_4"] >= dev_off["Bleu_4"]
    return {"dev_cider_gain": round(gain, 4), "min_gain": MIN_GAIN, "adopt": bool(adopt)}


def readme_block(result: dict, source: str) -> str:
    """The README's quote of a results file: both settings on both splits, and the rule."""
    lines = ["| mirror views | dev BLEU-4 | dev CIDEr-D | test BLEU-4 | test METEOR | test ROUGE-L | test CIDEr-D |",
             "|---|---|---|---|---|---|---|"]
    for setting in ("off", "on"):
        dev, test = result["dev"][setting], result["test"][setting]
        lines.append(f"| {setting} | {dev['Bleu_4']:.3f} | {dev['CIDEr']:.3f} | {test['Bleu_4']:.3f} | "
                     f"{test['METEOR']:.3f} | {test['ROUGE_L']:.3f} | {test['CIDEr']:.3f} |")
    rule = result["rule"]
    changed = ", ".join(f"{result[s]['captions_changed']} of {result[s]['captions']} {s} captions"
                        for s in SPLITS)
    lines += ["", f"`{result['checkpoint']}`, beam {result['beam_size']}, length penalty {result['length_penalty']}, "
              f"no-repeat n-gram {result['no_repeat_ngram']} for both settings; mirror views changed {changed}. "
              f"Dev CIDEr-D gain **{rule['dev_cider_gain']:+.3f}** (the rule asks for more than "
              f"{rule['min_gain']:.3f} and no lower dev BLEU-4): "
              f"**{'adopted' if rule['adopt'] else 'not adopted'}**. "
              f"Source: `{source}`."]
    return "\n".join(lines) + "\n"


def score(model: CaptionModel, views: bool, split: str, search: dict,
          args: argparse.Namespace) -> tuple[dict, dict]:
    """One setting's toolkit scores on `split` and its captions ({image: caption})."""
    model.mirror_views = views
    cfg = model.search_config(args.beam_size, 25, 1, search["best_length_penalty"], search["best_no_repeat_ngram"])
    out = Path(args.captions_dir) / f"captions-{split}-{'on' if views else 'off'}.json"
    scores, notes = evaluate(model, args.data, split, cfg, cache_dir=args.cache_dir, captions_out=out,
                             progress=False)
    for note in notes:
        print(f"note: {note}")
    captions = {row["image"]: row["caption"] for row in json.loads(out.read_text())}
    return {k: round(v, 4) for k, v in scores.items()}, captions


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--search", default=None, help="tune_length_penalty.py's results file for this recipe")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--captions-dir", default="runs/mirror_views",
                   help="where each setting's captions go (with the references: keep them out of the repo)")
    p.add_argument("--out", default="benchmarks/results/tuned-mirror/mirror_views.json")
    p.add_argument("--readme", action="store_true", help="also rewrite the README's mirror-views block")
    p.add_argument("--readme-only", action="store_true", help="rewrite that block from --out; no run")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.readme_only:
        result = json.loads(out.read_text())
        replace_block("mirror-views", readme_block(result, args.out))
        return result
    if args.checkpoint is None or args.search is None:
        p.error("--checkpoint and --search are needed to score (or --readme-only)")
    if args.readme and missing_block("mirror-views"):  # say so now, not after the scoring
        p.error(missing_block("mirror-views"))
    search = json.loads(Path(args.search).read_text())
    model, _ = load_checkpoint(args.checkpoint)
    result = {"checkpoint": args.checkpoint, "beam_size": args.beam_size,
              "length_penalty": search["best_length_penalty"], "no_repeat_ngram": search["best_no_repeat_ngram"]}
    for split in SPLITS:
        (off, caps_off), (on, caps_on) = (score(model, v, split, search, args) for v in (False, True))
        changed = sum(caps_off[k] != caps_on[k] for k in caps_off)
        result[split] = {"off": off, "on": on, "gain": {k: round(on[k] - off[k], 4) for k in off},
                         "captions_changed": changed, "captions": len(caps_off)}
        print(json.dumps({split: result[split]["gain"], "captions_changed": changed}), flush=True)
    result["rule"] = verdict(result["dev"]["off"], result["dev"]["on"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rule"]))
    if args.readme:
        replace_block("mirror-views", readme_block(result, args.out))
    return result


if __name__ == "__main__":
    main()
