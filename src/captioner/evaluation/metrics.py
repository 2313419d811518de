"""Caption metrics from the standard COCO caption toolkit (pycocoevalcap).

Captions are tokenised with the toolkit's own PTB tokenizer and scored with its own BLEU,
METEOR, ROUGE-L and CIDEr-D scorers, exactly as `COCOEvalCap.evaluate` does, so the numbers
are the toolkit's. Both the tokenizer and METEOR run on Java; without Java the captions are
tokenised in Python the same way and METEOR is left out with a note saying why. SPICE needs
a model download and is never run.
"""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from typing import Mapping, Sequence

from captioner.data.vocab import tokenize

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def java_available() -> bool:
    return shutil.which("java") is not None


def _toolkit():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ImportError("scoring needs the COCO caption toolkit: pip install 'captioner[train]'") from None
    return Bleu, Cider, Meteor, Rouge, PTBTokenizer


@contextmanager
def _java_quiet():
    """The toolkit's Java tokenizer writes a progress line to stderr per call (its process
    inherits our file descriptor 2): point fd 2 at /dev/null while it runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        *_, PTBTokenizer = _toolkit()
        with _java_quiet():
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   metrics: Sequence[str] = METRIC_NAMES) -> tuple[dict[str, float], list[str]]:
    """Score one predicted caption per image against its references.

    Returns ({toolkit metric name: score on the toolkit's 0-1 scale}, notes on what was left out).
    """
    missing = sorted(set(references) - set(predictions))
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no predicted caption, e.g. {missing[0]}")
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {METRIC_NAMES}")
    Bleu, Cider, Meteor, Rouge, _ = _toolkit()
    notes = []
    java = java_available()
    if not java:
        notes.append("Java not found: METEOR not computed; captions tokenised in Python "
                     "instead of the toolkit's Java PTB tokenizer")
    keys = sorted(references)
    gts = _tokenize({k: references[k] for k in keys}, java)
    res = _tokenize({k: [predictions[k]] for k in keys}, java)
    results: dict[str, float] = {}
    if any(m.startswith("Bleu") for m in metrics):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        results.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    if "METEOR" in metrics and java:
        meteor = Meteor()
        try:
            results["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            _close_meteor(meteor)
    if "ROUGE_L" in metrics:
        results["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        results["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {m: results[m] for m in METRIC_NAMES if m in results and m in metrics}, notes


def _close_meteor(meteor) -> None:
    # The toolkit's Meteor keeps a Java process open; end it so none is left behind.
    p = getattr(meteor, "meteor_p", None)
    if p is not None:
        try:
            p.stdin.close()
            p.kill()
            p.wait(timeout=10)
        except Exception as e:  # pragma: no cover - best effort clean-up
            print(f"warning: METEOR process did not close: {e}", file=sys.stderr)
