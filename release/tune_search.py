"""Pick the beam-ranking length penalty and n-gram blocking on the dev split (never on test).

    python release/tune_search.py --checkpoint runs/default/best.pt \
        [--data ../shared/data/flickr8k] [--cache-dir DIR] [--out runs/default/length_penalty.json]

Decodes the dev photos with beam 3 for each setting and keeps the one with the best CIDEr-D;
`captioner export --length-penalty --no-repeat-ngram` then ships it inside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.models.checkpoint import load_checkpoint
from captioner.data.datasets import load_flickr8k
from captioner.inference.decode import SearchConfig
from captioner.data.features import build_cache
from captioner.evaluation.metrics import score_captions
from captioner.evaluation.evaluate import decode_records

PENALTIES = (0.0, 0.25, 0.5, 0.75, 1.0)
NO_REPEAT = (0, 3)  # no-repeat-trigram blocking off / on


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, _ = load_checkpoint(args.checkpoint)
    ds = load_flickr8k(args.data)
    dev = ds.split("dev")
    cache = build_cache(ds.image_dir, [r.image for r in dev], model.encoder_cfg,
                        Path(args.cache_dir).expanduser(), tag=ds.name, progress=False)
    refs = {r.image: r.captions for r in dev}
    table = []
    for nr in NO_REPEAT:
        for lp in PENALTIES:
            search = SearchConfig(beam_size=args.beam_size, length_penalty=lp, no_repeat_ngram=nr)
            preds = decode_records(model, cache, dev, search)
            scores, _ = score_captions(preds, refs, ["Bleu_4", "ROUGE_L", "CIDEr"])
            words = sum(len(c.split()) for c in preds.values()) / len(preds)
            table.append({"length_penalty": lp, "no_repeat_ngram": nr, **scores, "mean_words": round(words, 2)})
            print(json.dumps(table[-1]), flush=True)
    best = max(table, key=lambda row: row["CIDEr"])
    result = {"split": "dev", "beam_size": args.beam_size, "best_length_penalty": best["length_penalty"],
              "best_no_repeat_ngram": best["no_repeat_ngram"], "table": table}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("best")}))
    return best["length_penalty"]


if __name__ == "__main__":
    main()
