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

import json
from pathlib import Path

from readme_blocks import missing_block, replace_block
from setting_runs import SPLITS, captions, load_run, parser, score_split

MIN_GAIN = 0.010  # dev CIDEr-D the mirror views must add for the default to use them
BLOCK = "mirror-views"


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


def main(argv=None) -> dict:
    p = parser(__doc__, BLOCK, "runs/mirror_views", "benchmarks/results/tuned-mirror/mirror_views.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.readme_only:
        result = json.loads(out.read_text())
        replace_block(BLOCK, readme_block(result, args.out))
        return result
    if args.readme and missing_block(BLOCK):  # say so now, not after the scoring
        p.error(missing_block(BLOCK))
    model, search, result = load_run(p, args)
    for split in SPLITS:
        scored = []
        for views in (False, True):
            model.mirror_views = views
            scored.append(score_split(model, split, "on" if views else "off", search, args))
        (off, off_file), (on, on_file) = scored
        caps_off, caps_on = captions(off_file), captions(on_file)
        changed = sum(caps_off[k] != caps_on[k] for k in caps_off)
        result[split] = {"off": off, "on": on, "gain": {k: round(on[k] - off[k], 4) for k in off},
                         "captions_changed": changed, "captions": len(caps_off)}
        print(json.dumps({split: result[split]["gain"], "captions_changed": changed}), flush=True)
    result["rule"] = verdict(result["dev"]["off"], result["dev"]["on"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rule"]))
    if args.readme:
        replace_block(BLOCK, readme_block(result, args.out))
    return result


if __name__ == "__main__":
    main()
