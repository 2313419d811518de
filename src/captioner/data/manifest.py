"""A generic manifest for a user's own photos: CSV or JSONL, photo paths relative to a root.

CSV: a header with the columns `image` and `caption`, and optionally `split`, in any order
(other columns are ignored); one row per caption, so a photo with five captions has five rows.
Quote captions that hold commas: a row with the wrong number of fields is an error, never
re-split. JSONL: one object per line, `{"image": ..., "caption": ...}` or `{"image": ...,
"captions": [...]}`, with an optional `"split"`.

Paths are relative to `image_root` (default: the manifest's folder) and may not leave it.
Splits are train, dev (or val) and test; a manifest without any gets a seeded split, one with
splits must give every photo one, and a photo's rows must agree on it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from captioner.data.datasets import (SPLIT_ALIASES, CaptionDataset, DataOptions, Problems, Where, assemble, read_text,
                   register_format, relative_image_path, seeded_split)
from captioner.errors import DataError
from captioner.files import json_error_text

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
_SUFFIXES = (".csv", ".jsonl", ".ndjson")

Row = tuple[Where, str, list[str], str]  # (where, image as given, captions, split as given or "")


def _manifest_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix.lower() in _SUFFIXES else None
    for name in MANIFEST_NAMES:
        if (path / name).is_file():
            return path / name
    return None


def _csv_rows(file: Path, problems: Problems) -> Iterator[Row]:
    with read_text(file, newline="") as f:
        reader = csv.reader(f)
        rows = iter(reader)
        try:
            header = [h.strip().lower() for h in next(rows, [])]
            if "image" not in header or "caption" not in header:
                raise DataError("expected a header naming the columns image and caption (and optionally split)",
                                file, 1)
            col = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
            end = reader.line_num
            for row in rows:
                lineno, end = end + 1, reader.line_num  # a row starts on the line after the last one ended
                if not any(c.strip() for c in row):
                    continue
                where = Where(str(file), lineno)
                if end > lineno:
                    # An unbalanced quote swallows the lines after it into one field.
                    problems.add("malformed", f"row spans lines {lineno}-{end}: an unbalanced quote?", *where)
                elif len(row) != len(header):
                    problems.add("malformed", f"expected {len(header)} fields ({', '.join(header)}), found "
                                 f"{len(row)}; quote captions that contain commas", *where)
                else:
                    yield where, row[col["image"]], [row[col["caption"]]], row[col["split"]] if "split" in col else ""
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise DataError(f"malformed CSV: {e}", file, reader.line_num) from None


def _jsonl_rows(file: Path, problems: Problems) -> Iterator[Row]:
    with read_text(file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = Where(str(file), lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add("malformed", f"not valid JSON: {e.msg}", *where)
                continue
            except (ValueError, RecursionError) as e:  # a huge integer; arrays nested too deep
                problems.add("malformed", f"not valid JSON: {json_error_text(e)}", *where)
                continue
            caps = obj.get("captions", [obj.get("caption")]) if isinstance(obj, dict) else None
            if not (isinstance(obj, dict) and isinstance(obj.get("image"), str) and isinstance(caps, list)
                    and caps and all(isinstance(c, str) for c in caps) and isinstance(obj.get("split", ""), str)):
                problems.add("malformed", 'expected {"image": str, "caption": str} or {"image": str, "captions": '
                             '[str, ...]}, with an optional "split": str', *where)
                continue
            yield where, obj["image"], caps, obj.get("split", "")


def _detect_manifest(path: Path) -> bool:
    return _manifest_file(path) is not None


@register_format("manifest", "a manifest of your own photos: CSV (image,caption[,split]) or JSONL", _detect_manifest)
def load_manifest(path: Path, opts: DataOptions, problems: Problems) -> CaptionDataset:
    file = _manifest_file(path)
    if file is None:
        raise DataError(f"no manifest here: give a .csv or .jsonl file, or a folder with {' or '.join(MANIFEST_NAMES)}",
                        path)
    rows = _csv_rows(file, problems) if file.suffix.lower() == ".csv" else _jsonl_rows(file, problems)
    captions: dict[str, list[tuple[Where, str]]] = {}
    splits: dict[str, str] = {}
    unsplit: dict[str, Where] = {}  # photos seen in a row without a split: its first such row
    conflicted: set[str] = set()
    for where, raw, caps, raw_split in rows:
        image = relative_image_path(raw)
        if image is None:
            problems.add("malformed", f"image path {raw!r} must be relative to the image root and stay inside it",
                         *where)
            continue
        split = SPLIT_ALIASES.get(raw_split.strip().lower()) if raw_split.strip() else ""
        if split is None:
            problems.add("malformed", f"unknown split {raw_split!r} for {image}; use train, dev (or val) or test",
                         *where, image=image)
            continue
        if split and splits.setdefault(image, split) != split:
            problems.add("split conflict", f"{image} is in split {splits[image]} on an earlier row and {split} here",
                         *where, image=image)
            conflicted.add(image)
            continue
        if not split:
            unsplit.setdefault(image, where)
        for caption in caps:
            caption = " ".join(caption.split())
            if not caption:
                problems.add("empty caption", f"empty caption for {image}", *where, image=image)
            else:
                captions.setdefault(image, []).append((where, caption))
    if not captions and not problems.items:
        raise DataError("no captions found", file)
    notes = []
    if splits:
        for image, where in unsplit.items():
            if image not in splits:
                problems.add("split conflict", f"{image} has no split, while other rows give one: give every row "
                             f"a split, or none", *where, image=image)
        assignment = {n: s for n, s in splits.items() if n not in conflicted}
    else:
        assignment = seeded_split(list(captions), opts.seed, opts.dev_fraction, opts.test_fraction)
        notes.append(f"no split column: seeded split (seed={opts.seed})")
    root = Path(opts.image_root) if opts.image_root else file.parent
    return assemble(file.stem, root, captions, assignment, opts, problems, notes)
