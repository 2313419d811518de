"""`captioner prepare`'s check of a dataset before any training: photos and captions per split;
missing, unreadable and duplicate photos; empty and over-long captions; caption lengths; and
how much of each split's text the training vocabulary covers."""
from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from captioner.data.datasets import SPLITS, CaptionDataset, Problem, Problems, Where
from captioner.errors import ImageError
from captioner.data.images import load_image, probe_image, read_photo_file
from captioner.distributed import DistEnv, gather_lists, shard
from captioner.data.vocab import Vocab, tokenize

IMAGE_CHECKS = ("decode", "header", "exists")  # most thorough first
ERROR_KINDS = ("malformed", "empty caption", "missing image", "unreadable image", "duplicate image", "split conflict")


def _why(e: ImageError) -> str:
    """An image error in the report's words (the path is in the report's own column)."""
    if e.kind in ("not_found", "not_a_file", "empty"):
        return e.reason
    return f"not a readable image: {e.reason}"


def _check_one(path: Path, mode: str) -> tuple[str | None, str | None]:
    """(what is wrong or None, SHA-1 of the file or None) for one photo, judged by the loader
    that training and captioning use (`images`), so "readable" means the same everywhere."""
    try:
        if mode == "header":
            probe_image(path)
            return None, None
        data = read_photo_file(path)
    except ImageError as e:
        return _why(e), None
    digest = hashlib.sha1(data).hexdigest()
    try:
        load_image(data, name=str(path))
    except ImageError as e:
        return _why(e), digest
    return None, digest


def check_images(dataset: CaptionDataset, mode: str = "decode", workers: int = 4, env: DistEnv | None = None,
                 progress: bool = False) -> tuple[list[Problem], list[list[str]]]:
    """Open every photo (`decode`: decode it fully and hash it; `header`: read its header;
    `exists`: nothing beyond the load's existence check). Returns (unreadable-photo problems,
    groups of photos whose files are byte-identical). Under torchrun each rank checks its share."""
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"image check must be one of {', '.join(IMAGE_CHECKS)}, not {mode!r}")
    if mode == "exists":
        return [], []
    names = shard([r.image for r in dataset.records], env)
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
        results = list(tqdm(pool.map(lambda n: _check_one(dataset.image_dir / n, mode), names), total=len(names),
                            desc=f"check images ({mode})", unit="img", disable=not progress, leave=False))
    mine = [(n, err, digest) for n, (err, digest) in zip(names, results)]
    checked = gather_lists(mine, env)
    problems = Problems(strict=False)
    by_digest: dict[str, list[str]] = {}
    for name, err, digest in sorted(checked):
        if err:
            where = dataset.origins.get(name, Where(str(dataset.image_dir)))
            problems.add("unreadable image", f"image {name} ({dataset.image_dir / name}): {err}", *where, image=name)
        if digest:
            by_digest.setdefault(digest, []).append(name)
    duplicates = sorted(group for group in by_digest.values() if len(group) > 1)
    return problems.items, duplicates


@dataclass
class DatasetReport:
    """What `captioner prepare` prints (and writes as report.json)."""

    name: str
    format: str
    image_dir: str
    image_check: str  # decode, header or exists
    splits: dict[str, dict[str, int]]  # split -> {"images": n, "captions": n}
    problems: list[dict]  # bad records left out: {"kind", "message", "image"}
    problem_counts: dict[str, int]  # kind -> number
    duplicates: list[list[str]]  # photos whose files are byte-identical
    duplicates_across_splits: int  # of those groups, how many span two splits (test photos seen in training)
    max_words: int  # captions longer than this are cut in training
    long_captions: int
    wordless_captions: int  # captions with no word left after tokenising (only punctuation)
    length_histogram: list[list]  # [label, captions] per bin of caption length in words
    vocab: dict  # {"size", "min_count", "coverage": {split: fraction of word tokens in the vocab}}
    notes: list[str] = field(default_factory=list)
    dropped_images: int = 0  # left out of the prepared data (--drop-bad)

    @property
    def errors(self) -> int:
        return sum(self.problem_counts.values())

    def to_dict(self) -> dict:
        return asdict(self)


def _histogram(lengths: list[int], max_words: int, width: int = 5) -> list[list]:
    edges = list(range(1, max_words + 1, width))
    bins = [[f"{lo}-{min(lo + width - 1, max_words)}", 0] for lo in edges]
    counts = [0, *([0] * len(edges)), 0]  # 0 words, the bins, over max_words
    for n in lengths:
        counts[0 if n == 0 else len(edges) + 1 if n > max_words else 1 + (n - 1) // width] += 1
    rows = ([["0", counts[0]]] if counts[0] else []) + [[b[0], c] for b, c in zip(bins, counts[1:-1])]
    return rows + [[f">{max_words}", counts[-1]]]


def build_report(dataset: CaptionDataset, image_problems: list[Problem], duplicates: list[list[str]],
                 image_check: str, min_word_count: int = 5, max_words: int = 30) -> DatasetReport:
    """Counts, problems, caption lengths and vocabulary coverage of a loaded dataset."""
    problems = dataset.problems + image_problems
    splits = {s: {"images": len(rs), "captions": sum(len(r.captions) for r in rs)}
              for s in SPLITS for rs in [dataset.split(s)]}
    words = {s: [tokenize(c) for r in dataset.split(s) for c in r.captions] for s in SPLITS}
    lengths = [len(w) for ws in words.values() for w in ws]
    vocab = Vocab.build((" ".join(w) for w in words["train"]), min_word_count)
    known = set(vocab.tokens)
    coverage = {}
    for s, ws in words.items():
        total = sum(len(w) for w in ws)
        if total:
            coverage[s] = round(sum(t in known for w in ws for t in w) / total, 4)
    split_of = {r.image: r.split for r in dataset.records}
    across = sum(len({split_of.get(n) for n in group} - {None}) > 1 for group in duplicates)
    return DatasetReport(
        name=dataset.name, format=dataset.format, image_dir=str(dataset.image_dir), image_check=image_check,
        splits=splits, problems=[asdict(p) for p in problems], problem_counts=dict(Counter(p.kind for p in problems)),
        duplicates=duplicates, duplicates_across_splits=across, max_words=max_words,
        long_captions=sum(n > max_words for n in lengths), wordless_captions=sum(n == 0 for n in lengths),
        length_histogram=_histogram(lengths, max_words),
        vocab={"size": len(vocab), "min_count": min_word_count, "coverage": coverage}, notes=list(dataset.notes))


def format_report(rep: DatasetReport, max_listed: int = 20) -> str:
    """The report as text for the terminal."""
    lines = [f"dataset {rep.name} ({rep.format}), photos in {rep.image_dir}"]
    lines += [f"note: {n}" for n in rep.notes]
    for s in SPLITS:
        lines.append(f"{s:>5}: {rep.splits[s]['images']:6d} images {rep.splits[s]['captions']:7d} captions")
    c = rep.problem_counts
    checked = {"decode": "opened and decoded", "header": "headers read", "exists": "existence only"}[rep.image_check]
    dups = (f"{len(rep.duplicates)} group(s) of byte-identical files"
            + (f" ({rep.duplicates_across_splits} across splits)" if rep.duplicates else "")
            if rep.image_check == "decode" else "duplicates not looked for (--check-images decode does)")
    lines.append(f"images ({checked}): {c.get('missing image', 0)} missing, "
                 f"{c.get('unreadable image', 0) if rep.image_check != 'exists' else 'unknown'} unreadable, {dups}")
    for group in rep.duplicates[:5]:
        lines.append(f"  duplicate: {', '.join(group)}")
    lines.append(f"captions: {c.get('empty caption', 0)} empty, {rep.wordless_captions} without words, "
                 f"{rep.long_captions} over {rep.max_words} words (cut to {rep.max_words} in training)")
    lines.append("caption length (words):")
    peak = max((n for _, n in rep.length_histogram), default=0) or 1
    for label, n in rep.length_histogram:
        lines.append(f"  {label:>7} {'#' * round(40 * n / peak):<40} {n}")
    cov = ", ".join(f"{s} {v:.1%}" for s, v in rep.vocab["coverage"].items())
    lines.append(f"vocab: {rep.vocab['size']} tokens (min count {rep.vocab['min_count']}); "
                 f"caption words covered: {cov}")
    if rep.problems:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(c.items()))
        lines.append(f"problems: {rep.errors} ({kinds})")
        lines += [f"  {p['message']}" for p in rep.problems[:max_listed]]
        if len(rep.problems) > max_listed:
            lines.append(f"  ... and {len(rep.problems) - max_listed} more (all in report.json with --out)")
    else:
        lines.append("problems: none")
    if rep.dropped_images:
        lines.append(f"dropped: {rep.dropped_images} photo(s) with problems left out of the prepared data")
    return "\n".join(lines)
