"""Is one model's caption set better than another's, or within the test set's noise?

A paired bootstrap over photos (Koehn, 2004): the photos of a split are drawn again, with
replacement, many times; each draw scores both caption sets on the same photos with the
toolkit's formulas, and the spread of the differences gives an interval for the gain. It
reads the per-photo caption files `captioner evaluate` writes (`captions-SPLIT.json`).

What is resampled, so the figures match the toolkit's on the whole split:
- BLEU-1..4: the toolkit's corpus BLEU from per-photo n-gram counts and lengths (the closest
  reference length), summed over the drawn photos;
- ROUGE-L and CIDEr-D: the mean of the toolkit's per-photo scores. CIDEr-D's document
  frequencies stay those of the whole split's references.
METEOR is left out: the toolkit's corpus METEOR comes from its Java program's pooled
statistics, which are not the mean of its per-photo scores, so no draw can be scored without
running it again.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.errors import DataError, OptionError
from captioner.evaluation.metrics import _toolkit, _tokenize, java_available

BOOTSTRAP_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")
_NGRAMS = 4
RESAMPLES = (100, 100_000)  # fewer draws give no interval; more add nothing but time and memory
_CHUNK_CELLS = 10_000_000  # drawn photo indices held at once (80 MB): draws are scored chunk by chunk
# the toolkit's guards against an empty n-gram count (pycocoevalcap BleuScorer.compute_score)
_TINY, _SMALL = 1e-15, 1e-9


@dataclass
class CaptionSet:
    """One model's captions of a split, from a file `captioner evaluate` wrote."""

    path: str
    captions: dict[str, str]  # image -> the model's caption
    references: dict[str, list[str]]  # image -> its reference captions


@dataclass
class PhotoStats:
    """What each metric needs from each photo, rows in the order of `images`."""

    images: list[str]
    bleu: np.ndarray  # (N, 2 + 2 * 4): test length, closest reference length, guessed n-grams, correct n-grams
    rouge: np.ndarray  # (N,) the toolkit's per-photo ROUGE-L
    cider: np.ndarray  # (N,) the toolkit's per-photo CIDEr-D


@dataclass
class MetricComparison:
    metric: str
    a: float  # on the whole split
    b: float
    a_interval: tuple[float, float]  # each set's own interval, for the scale of its noise
    b_interval: tuple[float, float]
    diff_interval: tuple[float, float]  # of b - a
    b_better: float  # share of draws in which b scores higher than a


@dataclass
class Comparison:
    a: str
    b: str
    photos: int
    resamples: int
    seed: int
    confidence: float
    metrics: list[MetricComparison]
    notes: list[str]


def read_caption_set(path: str | Path) -> CaptionSet:
    """Read a per-photo captions file, naming the file and the entry of anything wrong."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("captions file not found", path) from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, a huge integer
        raise DataError(f"not a JSON captions file ({str(e)[:200]})", path) from None
    except RecursionError:
        raise DataError("not a JSON captions file (nested too deeply)", path) from None
    except OSError as e:
        raise DataError(f"cannot read the captions file ({e.strerror or e})", path) from None
    if not isinstance(rows, list) or not rows:
        raise DataError("expected a non-empty JSON list of {image, caption, references} entries, "
                        "as `captioner evaluate --captions-out` writes", path)
    captions, references = {}, {}
    for i, row in enumerate(rows):
        where = f"entry {i}"
        if not isinstance(row, dict):
            raise DataError("not an object", path, record=where)
        image, caption, refs = row.get("image"), row.get("caption"), row.get("references")
        if not isinstance(image, str) or not image:
            raise DataError("'image' must be a non-empty string", path, record=where)
        where = f"entry {i} ({image})"
        if not isinstance(caption, str):
            raise DataError("'caption' must be a string", path, record=where)
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise DataError("'references' must be a non-empty list of non-empty strings", path, record=where)
        if not any(re.search(r"\w", r) for r in refs):  # CIDEr's document frequencies need a word
            raise DataError("'references' hold no words (only punctuation or symbols)", path, record=where)
        if image in captions:
            raise DataError("the photo appears twice in this file", path, record=where)
        captions[image], references[image] = caption, refs
    return CaptionSet(str(path), captions, references)


def check_paired(a: CaptionSet, b: CaptionSet) -> None:
    """Both sets must caption the same photos against the same references."""
    only_a, only_b = sorted(set(a.captions) - set(b.captions)), sorted(set(b.captions) - set(a.captions))
    if only_a or only_b:
        which = (f"{len(only_a)} photo(s) only in {a.path}, e.g. {only_a[0]}" if only_a else
                 f"{len(only_b)} photo(s) only in {b.path}, e.g. {only_b[0]}")
        raise DataError(f"the two files do not caption the same photos: {which}", b.path)
    for image in a.captions:
        if sorted(a.references[image]) != sorted(b.references[image]):
            raise DataError(f"its references for {image} differ from those in {a.path}: "
                            "the files were scored on different datasets", b.path)


def photo_stats(caption_sets: list[dict[str, str]], references: dict[str, list[str]]) -> list[PhotoStats]:
    """Each caption set's share of every resampled metric, photo by photo.

    The sets caption the photos of `references`; they are tokenised as the toolkit does, the
    references once for all of them.
    """
    _, Cider, _, Rouge, _ = _toolkit()
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    java = java_available()
    images = sorted(references)
    tokenised = _tokenize({k: references[k] for k in images}, java)
    # the toolkit's per-photo scores come in its dicts' key order: fix it to `images`
    gts = {k: tokenised[k] for k in images}
    out = []
    for captions in caption_sets:
        tokenised = _tokenize({k: [captions[k]] for k in images}, java)
        res = {k: tokenised[k] for k in images}
        bleu = np.zeros((len(images), 2 + 2 * _NGRAMS))
        for i, image in enumerate(images):
            scorer = BleuScorer(n=_NGRAMS)
            scorer += (res[image][0], gts[image])
            comps = scorer.ctest[0]
            reflen = scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])
            bleu[i] = [comps["testlen"], reflen, *comps["guess"], *comps["correct"]]
        _, rouge = Rouge().compute_score(gts, res)
        _, cider = Cider().compute_score(gts, res)
        out.append(PhotoStats(images, bleu, np.asarray(rouge, dtype=float), np.asarray(cider, dtype=float)))
    return out


def corpus_scores(stats: PhotoStats, draws: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of the photos drawn, one per row of `draws` (R, K) of row indices."""
    # how often each draw holds each photo: sums over the draws become one matrix product, with
    # no (R, K, columns) copy of the statistics (which a 5000-photo split would make large)
    counts = np.stack([np.bincount(d, minlength=len(stats.images)) for d in draws]).astype(float)  # (R, N)
    totals = counts @ stats.bleu  # (R, 2 + 2 * 4)
    testlen, reflen = totals[:, 0], totals[:, 1]
    guess, correct = totals[:, 2:2 + _NGRAMS], totals[:, 2 + _NGRAMS:]
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    log_precision = np.cumsum(np.log((correct + _TINY) / (guess + _SMALL)), axis=1)  # (R, 4)
    scores = {f"Bleu_{k + 1}": np.exp(log_precision[:, k] / (k + 1)) * brevity for k in range(_NGRAMS)}
    scores["ROUGE_L"] = counts @ stats.rouge / draws.shape[1]
    scores["CIDEr"] = counts @ stats.cider / draws.shape[1]
    return scores


def paired_bootstrap(a: PhotoStats, b: PhotoStats, resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> list[MetricComparison]:
    """Intervals for each set's scores and for b - a, from the same draws of photos."""
    if a.images != b.images:
        raise ValueError("the two sets' photos differ; pair them first (check_paired)")
    n = len(a.images)
    whole = np.arange(n)[None, :]
    full_a, full_b = corpus_scores(a, whole), corpus_scores(b, whole)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)  # chunks of one stream: the same draws as a single (resamples, n) call
    parts: tuple[list, list] = ([], [])  # each chunk's scores of a and of b
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        parts[0].append(corpus_scores(a, draws))
        parts[1].append(corpus_scores(b, draws))
    drawn_a, drawn_b = ({m: np.concatenate([p[m] for p in ps]) for m in BOOTSTRAP_METRICS} for ps in parts)
    tail = 100 * (1 - confidence) / 2

    def interval(x: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(x, [tail, 100 - tail])
        return float(low), float(high)

    return [MetricComparison(m, float(full_a[m][0]), float(full_b[m][0]), interval(drawn_a[m]), interval(drawn_b[m]),
                             interval(drawn_b[m] - drawn_a[m]), float(np.mean(drawn_b[m] > drawn_a[m])))
            for m in BOOTSTRAP_METRICS]


def compare_files(a_path: str | Path, b_path: str | Path, resamples: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> Comparison:
    """Read two captions files of one split and compare them by a paired bootstrap."""
    if not RESAMPLES[0] <= resamples <= RESAMPLES[1]:
        raise OptionError(f"--resamples must be at least {RESAMPLES[0]} draws for an interval and at most "
                          f"{RESAMPLES[1]} (more only take time), not {resamples}")
    if seed < 0:
        raise OptionError(f"--seed must be 0 or more, not {seed}")
    if not 0.5 <= confidence < 1:
        raise OptionError(f"--confidence must be in [0.5, 1), not {confidence}")
    a, b = read_caption_set(a_path), read_caption_set(b_path)
    check_paired(a, b)
    notes = ["METEOR is not resampled (its corpus score is pooled inside the toolkit's Java program)"]
    if not java_available():
        notes.append("Java not found: captions tokenised in Python instead of the toolkit's Java PTB tokenizer")
    metrics = paired_bootstrap(*photo_stats([a.captions, b.captions], a.references), resamples, seed, confidence)
    return Comparison(a.path, b.path, len(a.captions), resamples, seed, confidence, metrics, notes)


def format_comparison(c: Comparison) -> str:
    pct = round(100 * c.confidence)
    lines = [f"a: {c.a}", f"b: {c.b}",
             f"{c.photos} photos, paired bootstrap over photos, {c.resamples} draws (seed {c.seed}), "
             f"{pct}% intervals",
             f"{'metric':<8} {'a':>6} {'b':>6} {'b - a':>7}  {f'{pct}% interval of b - a':<24} b higher in"]
    for m in c.metrics:
        low, high = m.diff_interval
        lines.append(f"{m.metric:<8} {m.a:6.3f} {m.b:6.3f} {m.b - m.a:+7.3f}  "
                     f"{f'[{low:+.3f}, {high:+.3f}]':<24} {100 * m.b_better:.0f}% of draws")
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)
