"""What the benchmarks that score one checkpoint with a setting off and on share (`mirror_views.py`,
`encoder_precision.py`): their command line, loading the checkpoint with its recipe's dev-tuned
search, and scoring one split as `captioner evaluate` does, keeping the captions for `captioner
compare`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.models.checkpoint import load_checkpoint
from captioner.evaluation.evaluate import evaluate
from captioner.models.model import CaptionModel

SPLITS = ("dev", "test")  # dev decides, test is shown for reference


def parser(doc: str, block: str, captions_dir: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--search", default=None, help="tune_length_penalty.py's results file for this recipe")
    p.add_argument("--data", default="../shared/data/flickr8k")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--captions-dir", default=captions_dir,
                   help="where each setting's captions go (with the references: keep them out of the repo)")
    p.add_argument("--out", default=out)
    p.add_argument("--readme", action="store_true", help=f"also rewrite the README's {block} block")
    p.add_argument("--readme-only", action="store_true", help="rewrite that block from --out; no run")
    return p


def load_run(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[CaptionModel, dict, dict]:
    """The checkpoint, its recipe's search, and the results file's header saying both."""
    if args.checkpoint is None or args.search is None:
        p.error("--checkpoint and --search are needed to score (or --readme-only)")
    search = json.loads(Path(args.search).read_text())
    model, _ = load_checkpoint(args.checkpoint)
    header = {"checkpoint": args.checkpoint, "beam_size": args.beam_size,
              "length_penalty": search["best_length_penalty"], "no_repeat_ngram": search["best_no_repeat_ngram"]}
    return model, search, header


def score_split(model: CaptionModel, split: str, setting: str, search: dict, args: argparse.Namespace,
                **evaluate_kwargs) -> tuple[dict, Path]:
    """One setting's toolkit scores on `split`, with the recipe's search, and its captions file."""
    cfg = model.search_config(args.beam_size, 25, 1, search["best_length_penalty"], search["best_no_repeat_ngram"])
    out = Path(args.captions_dir) / f"captions-{split}-{setting}.json"
    scores, notes = evaluate(model, args.data, split, cfg, cache_dir=args.cache_dir, captions_out=out,
                             progress=False, **evaluate_kwargs)
    for note in notes:
        print(f"note: {note}")
    return {k: round(v, 4) for k, v in scores.items()}, out


def captions(path: Path) -> dict[str, str]:
    """{image: caption} of a captions file."""
    return {row["image"]: row["caption"] for row in json.loads(Path(path).read_text())}
