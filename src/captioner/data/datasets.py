"""Caption datasets behind one interface: Flickr8k, Flickr30k, COCO captions, Karpathy's split
files, a generic manifest, and captioner's own prepared form.

`load_dataset(path)` finds the format (or takes `format=`) and reads it into a `CaptionDataset`:
photos named relative to one image folder, each with its captions and a split. A bad record (a
malformed line, an empty caption, a missing photo) raises a `DataError` naming the file and the
line or record (`strict`, for training and evaluation), or is kept as a `Problem` for
`captioner prepare`'s report. Either way it is left out whole: captions are keyed by the photo
their own record names, so one bad record never moves captions onto another photo.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, NamedTuple

from captioner.files import atomic_write_text, json_error_text
from captioner.errors import DataError

SPLITS = ("train", "dev", "test")
# Split names as datasets spell them -> ours (Karpathy's "restval" is extra training data).
SPLIT_ALIASES = {"train": "train", "training": "train", "restval": "train", "dev": "dev", "val": "dev",
                 "valid": "dev", "validation": "dev", "test": "test", "testing": "test"}
_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
_IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images")


@dataclass
class ImageRecord:
    """One photo and its reference captions."""

    image: str  # path relative to the dataset's image folder, "/"-separated
    captions: list[str] = field(default_factory=list)
    split: str = "train"


class Where(NamedTuple):
    """Where a record came from: a file and its line (text) or record (JSON)."""

    path: str
    line: int | None = None
    record: str | None = None


@dataclass
class Problem:
    """A bad record found while loading or checking a dataset."""

    kind: str  # malformed, empty caption, missing image, unreadable image, duplicate image, split conflict
    message: str  # names the file and the line or record
    image: str | None = None  # the photo it concerns, where known


class Problems:
    """Where loaders report bad records: raised at once (strict) or collected for a report."""

    def __init__(self, strict: bool = True):
        self.strict = strict
        self.items: list[Problem] = []

    def add(self, kind: str, message: str, path: str | Path | None = None, line: int | None = None,
            record: str | None = None, image: str | None = None) -> None:
        error = DataError(message, path, line, record)
        if self.strict:
            raise error
        self.items.append(Problem(kind, str(error), image))


@dataclass
class CaptionDataset:
    """Photos with captions, each assigned to one split."""

    name: str  # also names its feature cache folder
    image_dir: Path
    records: list[ImageRecord]
    notes: list[str] = field(default_factory=list)  # what loading skipped or assumed
    problems: list[Problem] = field(default_factory=list)  # bad records left out (non-strict loading)
    format: str = ""  # the format it was read from
    origins: dict[str, Where] = field(default_factory=dict, repr=False)  # photo -> its first caption's record

    def split(self, name: str) -> list[ImageRecord]:
        """The records of one split; "all" gives every record."""
        if name == "all":
            return list(self.records)
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)} or all")
        return [r for r in self.records if r.split == name]

    def image_path(self, record: ImageRecord) -> Path:
        return self.image_dir / record.image

    def without(self, images: set[str]) -> "CaptionDataset":
        """The same dataset with these photos left out."""
        return replace(self, records=[r for r in self.records if r.image not in images])


@dataclass
class DataOptions:
    """How to read a dataset; every field has a default that suits the standard layouts."""

    layout: str = "auto"  # Flickr8k/Flickr30k caption file: token, csv or auto (token where present)
    seed: int = 0  # seeds the split of data that comes without one
    image_root: str = ""  # folder that image paths are relative to; "" = found beside the caption file
    dev_fraction: float = 0.125  # of the photos, for a seeded split
    test_fraction: float = 0.125
    check_images: bool = True  # every photo must exist (one stat each; decoding is prepare's check)


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset format: how to recognise it, and how to read it."""

    name: str
    description: str
    detect: Callable[[Path], bool]  # does this file or folder look like this format?
    load: Callable[[Path, DataOptions, Problems], CaptionDataset]


FORMATS: dict[str, DatasetFormat] = {}
# Auto-detection tries formats in this order; a folder that several match takes the first.
_DETECT_ORDER = ("prepared", "flickr8k", "flickr30k", "coco", "karpathy", "manifest")


def register_format(name: str, description: str, detect: Callable[[Path], bool]):
    """Decorator: register a loader `(path, options, problems) -> CaptionDataset` as a format."""
    def wrap(load: Callable[[Path, DataOptions, Problems], CaptionDataset]):
        FORMATS[name] = DatasetFormat(name, description, detect, load)
        return load
    return wrap


def formats() -> dict[str, DatasetFormat]:
    """Every registered format (each format's module registers itself when `captioner.data` is
    imported)."""
    return FORMATS


def detect_format(path: str | Path) -> tuple[str, list[str]]:
    """The format a path holds, and the other formats it also looks like."""
    path = Path(path)
    if not path.exists():
        raise DataError("dataset folder not found" if not path.suffix else "dataset file not found", path)
    known = formats()
    order = [n for n in _DETECT_ORDER if n in known] + [n for n in known if n not in _DETECT_ORDER]
    hits = [n for n in order if known[n].detect(path)]
    if not hits:
        raise DataError(f"no known dataset layout here; formats: {', '.join(order)} "
                        f"(see `captioner prepare --help`)", path)
    return hits[0], hits[1:]


def load_dataset(path: str | Path, format: str = "auto", options: DataOptions | None = None,
                 strict: bool = True, **option_values) -> CaptionDataset:
    """Read a dataset from a file or folder in any registered format (`format="auto"` detects it).

    `options` (or its fields as keywords: layout, seed, image_root, ...) say how. With `strict`
    the first bad record raises a DataError; otherwise bad records are left out and listed in
    the dataset's `problems`.
    """
    path = Path(path)
    opts = replace(options or DataOptions(), **option_values)
    known = formats()
    notes = []
    if format == "auto":
        format, others = detect_format(path)
        if others:
            notes.append(f"read as {format}; it also looks like {', '.join(others)} (choose with --format)")
    elif format not in known:
        raise DataError(f"unknown dataset format {format!r}; choose one of {', '.join(known)}")
    elif not path.exists():
        raise DataError("dataset folder not found" if not path.suffix else "dataset file not found", path)
    problems = Problems(strict)
    dataset = known[format].load(path, opts, problems)
    dataset.notes[:0] = notes
    dataset.problems = problems.items
    dataset.format = format
    return dataset


def data_options(values: dict) -> DataOptions:
    """The DataOptions fields among `values` (e.g. a TrainConfig's dict)."""
    names = {f.name for f in fields(DataOptions)}
    return DataOptions(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Shared by the loaders

def seeded_split(names: list[str], seed: int = 0, dev_fraction: float = 0.125,
                 test_fraction: float = 0.125) -> dict[str, str]:
    """Deterministic split of image names: same names and seed, same split."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_dev, n_test = round(len(order) * dev_fraction), round(len(order) * test_fraction)
    split = {n: "dev" for n in order[:n_dev]}
    split.update({n: "test" for n in order[n_dev:n_dev + n_test]})
    split.update({n: "train" for n in order[n_dev + n_test:]})
    return split


def relative_image_path(raw: str) -> str | None:
    """A photo's path as given -> "/"-separated and relative, or None if it is absolute or
    climbs out of the image folder with "..": paths stay inside the dataset's image folder."""
    text = raw.strip().replace("\\", "/")
    if not text or text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def pick_image_dir(candidates: list[Path], sample: list[str]) -> Path:
    """The first candidate folder holding one of the sample photos; else the first that exists."""
    existing = [d for d in candidates if d.is_dir()]
    for d in existing:
        if any((d / name).is_file() for name in sample[:20]):
            return d
    return existing[0] if existing else candidates[-1]


def assemble(name: str, image_dir: Path, captions: dict[str, list[tuple[Where, str]]],
             assignment: dict[str, str], opts: DataOptions, problems: Problems,
             notes: list[str] | None = None) -> CaptionDataset:
    """Photos with their captions and splits -> a CaptionDataset sorted by split and name; a
    photo missing from `image_dir` is a problem named by its first caption's record."""
    records, origins = [], {}
    for image, caps in captions.items():
        split = assignment.get(image)
        if split is None:
            continue
        first = caps[0][0]
        if opts.check_images and not (image_dir / image).is_file():
            problems.add("missing image", f"image {image} not found in {image_dir}", *first, image=image)
            continue
        records.append(ImageRecord(image, [c for _, c in caps], split))
        origins[image] = first
    records.sort(key=lambda r: (SPLITS.index(r.split), r.image))
    return CaptionDataset(name, image_dir, records, list(notes or []), origins=origins)


def peek(path: Path, size: int = 65536) -> str:
    """The first bytes of a file as text (to recognise a JSON format without parsing it all)."""
    try:
        with open(path, "rb") as f:
            return f.read(size).decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_text(path: Path, newline: str | None = None) -> io.StringIO:
    """A UTF-8 text file (a leading byte-order mark dropped) to iterate by line; bytes that are
    not UTF-8 are a DataError naming the file and line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: byte {data[e.start]:#04x} cannot be decoded", path,
                        data[:e.start].count(b"\n") + 1) from None
    return io.StringIO(text, newline=newline)


def read_json(path: Path) -> object:
    """A JSON file, with errors that name the file and line."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", path, e.lineno) from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; arrays nested too deep
        raise DataError(f"not a JSON file captioner reads: {json_error_text(e)}", path) from None


# ---------------------------------------------------------------------------------------------
# Flickr8k: Flickr8k.token.txt (+ official split files) or captions.txt

def _find(root: Path, name: str, subdirs: tuple[str, ...] = ("Flickr8k_text",)) -> Path | None:
    for p in (root / name, *(root / d / name for d in subdirs)):
        if p.is_file():
            return p
    return None


def _image_dir(root: Path) -> Path:
    for d in _IMAGE_DIRS:
        if (root / d).is_dir():
            return root / d
    return root


def _clean_image_name(name: str) -> str:
    # Flickr8k.token.txt files some captions under "<photo>.jpg.1": the same photo.
    if name.endswith(".jpg.1"):
        return name[:-2]
    return name


def read_token_file(path: Path, problems: Problems | None = None) -> dict[str, list[tuple[int, str]]]:
    """`<image>#<n>\\t<caption>` lines -> {image: [(line, caption), ...]}."""
    problems = problems or Problems()
    captions: dict[str, list[tuple[int, str]]] = {}
    with read_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            image, hash_, _ = key.rpartition("#")
            if not sep or not hash_ or not image:
                problems.add("malformed", "expected '<image>#<n><TAB><caption>'", path, lineno)
                continue
            image = _clean_image_name(image.strip())
            if relative_image_path(image) != image:
                problems.add("malformed", f"image path {image[:100]!r} is absolute or climbs out of the image folder",
                             path, lineno)
                continue
            if not caption.strip():
                problems.add("empty caption", f"empty caption for {image}", path, lineno, image=image)
                continue
            captions.setdefault(image, []).append((lineno, caption.strip()))
    if not captions:
        raise DataError("no captions found", path)
    return captions


def read_captions_csv(path: Path, problems: Problems | None = None) -> dict[str, list[tuple[int, str]]]:
    """`image,caption` CSV with a header -> {image: [(line, caption), ...]}."""
    problems = problems or Problems()
    captions: dict[str, list[tuple[int, str]]] = {}
    with read_text(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
                raise DataError("expected the header 'image,caption'", path, 1)
            end = reader.line_num
            for row in reader:
                lineno, end = end + 1, reader.line_num  # a row starts on the line after the last one ended
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) < 2:
                    problems.add("malformed", f"expected 2 fields (image, caption), found {len(row)}", path, lineno)
                    continue
                # A caption with unquoted commas splits into several fields: join them back.
                image, caption = _clean_image_name(row[0].strip()), ",".join(row[1:]).strip()
                if not image:
                    problems.add("malformed", "empty image field", path, lineno)
                elif relative_image_path(image) != image:
                    problems.add("malformed", f"image path {image[:100]!r} is absolute or climbs out of the image "
                                              f"folder", path, lineno)
                elif end > lineno or "\n" in caption:
                    # An unbalanced quote swallows the lines after it into this caption.
                    problems.add("malformed", f"caption spans lines {lineno}-{end}: an unbalanced quote?", path,
                                 lineno, image=image)
                elif not caption:
                    problems.add("empty caption", f"empty caption for {image}", path, lineno, image=image)
                else:
                    captions.setdefault(image, []).append((lineno, caption))
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise DataError(f"malformed CSV: {e}", path, reader.line_num) from None
    if not captions:
        raise DataError("no captions found", path)
    return captions


def read_split_file(path: Path) -> list[str]:
    names = []
    with read_text(path) as f:
        for line in f:
            if line.strip():
                names.append(_clean_image_name(line.strip()))
    return names


def _flickr8k_root(path: Path) -> Path:
    """A caption file given directly -> its dataset folder."""
    if path.is_file():
        path = path.parent
        if path.name == "Flickr8k_text":
            path = path.parent
    return path


def _detect_flickr8k(path: Path) -> bool:
    if path.is_file():
        return path.name in ("Flickr8k.token.txt", "captions.txt")
    return bool(_find(path, "Flickr8k.token.txt") or _find(path, "captions.txt"))


@register_format("flickr8k", "Flickr8k: Flickr8k.token.txt + Flickr_8k.*Images.txt, or captions.txt; "
                 "with Images/", _detect_flickr8k)
def _load_flickr8k(path: Path, opts: DataOptions, problems: Problems) -> CaptionDataset:
    root = _flickr8k_root(path)
    token, csv_file = _find(root, "Flickr8k.token.txt"), _find(root, "captions.txt")
    layout = opts.layout
    if path.is_file() and layout == "auto":
        layout = "token" if path.name == "Flickr8k.token.txt" else "csv"
    if layout == "auto":
        layout = "token" if token else "csv"
    if layout == "token":
        if token is None:
            raise DataError("no Flickr8k.token.txt here or in Flickr8k_text/", root)
        caption_file, captions = token, read_token_file(token, problems)
    elif layout == "csv":
        if csv_file is None:
            raise DataError("no captions.txt here", root)
        caption_file, captions = csv_file, read_captions_csv(csv_file, problems)
    else:
        raise DataError(f"unknown layout {layout!r}; choose token, csv or auto")

    notes: list[str] = []
    split_paths = {s: _find(root, f) for s, f in _SPLIT_FILES.items()}
    if all(split_paths.values()):
        assignment = {}
        for s, p in split_paths.items():
            for name in read_split_file(p):
                if name not in captions:
                    raise DataError(f"split file lists {name}, which has no caption in {caption_file.name}", p)
                if name in assignment and assignment[name] != s:
                    problems.add("split conflict", f"{name} is listed in the {assignment[name]} and the {s} split "
                                                   f"files", p, image=name)
                assignment[name] = s
        unused = sorted(set(captions) - set(assignment))
        if unused:
            notes.append(f"{len(unused)} captioned image(s) in no split file were left out: {', '.join(unused[:3])}")
    else:
        assignment = seeded_split(list(captions), opts.seed, opts.dev_fraction, opts.test_fraction)
        notes.append(f"no official split files: seeded split (seed={opts.seed})")
    image_dir = Path(opts.image_root) if opts.image_root else _image_dir(root)
    where = {name: [(Where(str(caption_file), line), c) for line, c in caps] for name, caps in captions.items()}
    return assemble("flickr8k", image_dir, where, assignment, opts, problems, notes)


def load_flickr8k(root: str | Path, layout: str = "auto", seed: int = 0,
                  check_images: bool = True) -> CaptionDataset:
    """Load Flickr8k from `root`.

    layout: "token" (Flickr8k.token.txt), "csv" (captions.txt) or "auto" (token if present).
    The official split files are used where present; otherwise a seeded split.
    """
    return load_dataset(root, "flickr8k", layout=layout, seed=seed, check_images=check_images)


# ---------------------------------------------------------------------------------------------
# Flickr30k: results.csv ("image_name| comment_number| comment", as on Kaggle) or the original
# results_20130124.token; no official split (Karpathy's dataset_flickr30k.json gives the usual one).

_F30K_DIRS = ("", "flickr30k_images", "flickr30k")
_F30K_CAPTIONS = ("results_20130124.token", "results.csv")


def read_results_csv(path: Path, problems: Problems | None = None
                     ) -> tuple[dict[str, list[tuple[int, str]]], list[int]]:
    """Flickr30k's `image_name| comment_number| comment` file -> ({image: [(line, caption)]},
    lines repaired). Read line by line, never with CSV quoting, so a stray quote cannot swallow
    the lines after it. Kaggle's copy has a line whose comment number and caption lost their
    separator (`2199200615.jpg| 4   A dog runs across the grass .`): it is split again, and
    reported as repaired."""
    problems = problems or Problems()
    captions: dict[str, list[tuple[int, str]]] = {}
    repaired: list[int] = []
    with read_text(path) as f:
        header = f.readline()
        if [h.strip().lower() for h in header.split("|")][:3] != ["image_name", "comment_number", "comment"]:
            raise DataError("expected the header 'image_name| comment_number| comment'", path, 1)
        for lineno, line in enumerate(f, 2):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            parts = line.split("|")
            image = parts[0].strip()
            if len(parts) >= 3:
                number, caption = parts[1].strip(), "|".join(parts[2:]).strip()
            elif len(parts) == 2 and re.match(r"^\s*\d+\s+\S", parts[1]):
                number, caption = parts[1].split(None, 1)
                caption = caption.strip()
                repaired.append(lineno)
            else:
                problems.add("malformed", "expected 'image_name| comment_number| comment'", path, lineno)
                continue
            if not image or not number.isdigit():
                problems.add("malformed", f"expected an image name and a comment number, found "
                             f"{image!r} and {number!r}", path, lineno)
            elif not caption:
                problems.add("empty caption", f"empty caption for {image}", path, lineno, image=image)
            else:
                captions.setdefault(image, []).append((lineno, caption))
    if not captions:
        raise DataError("no captions found", path)
    return captions, repaired


def _flickr30k_files(path: Path) -> tuple[Path, dict[str, Path]]:
    """(dataset folder, {layout: caption file}) for a folder or a caption file given directly."""
    if path.is_file():
        root = path.parent.parent if path.parent.name in ("flickr30k_images", "flickr30k") else path.parent
        return root, {"token" if path.suffix == ".token" else "csv": path}
    found = {}
    for name, layout in zip(_F30K_CAPTIONS, ("token", "csv")):
        for d in _F30K_DIRS:
            if (path / d / name).is_file():
                found[layout] = path / d / name
                break
    return path, found


def _detect_flickr30k(path: Path) -> bool:
    if path.is_file():
        return path.name in _F30K_CAPTIONS
    return bool(_flickr30k_files(path)[1])


@register_format("flickr30k", "Flickr30k: results.csv ('|'-separated, as on Kaggle) or "
                 "results_20130124.token; with flickr30k_images/", _detect_flickr30k)
def _load_flickr30k(path: Path, opts: DataOptions, problems: Problems) -> CaptionDataset:
    root, files = _flickr30k_files(path)
    layout = opts.layout if opts.layout != "auto" else ("token" if "token" in files else "csv")
    if layout not in ("token", "csv"):
        raise DataError(f"unknown layout {layout!r}; choose token, csv or auto")
    if layout not in files:
        raise DataError(f"no {_F30K_CAPTIONS[layout == 'csv']} here or in flickr30k_images/", root)
    caption_file = files[layout]
    notes = []
    if layout == "token":
        captions = read_token_file(caption_file, problems)
    else:
        captions, repaired = read_results_csv(caption_file, problems)
        if repaired:
            notes.append(f"{len(repaired)} line(s) of {caption_file.name} had the comment number run into the "
                         f"caption and were split again: line(s) {', '.join(map(str, repaired[:5]))}")
    assignment = seeded_split(list(captions), opts.seed, opts.dev_fraction, opts.test_fraction)
    notes.append(f"Flickr30k has no official split: seeded split (seed={opts.seed}); "
                 f"for Karpathy's split load dataset_flickr30k.json")
    sample = sorted(captions)[:20]
    image_dir = Path(opts.image_root) if opts.image_root else pick_image_dir(
        [root / "flickr30k_images" / "flickr30k_images", root / "flickr30k_images", root / "flickr30k-images",
         root / "Images", root / "images", root], sample)
    where = {name: [(Where(str(caption_file), line), c) for line, c in caps] for name, caps in captions.items()}
    return assemble("flickr30k", image_dir, where, assignment, opts, problems, notes)


# ---------------------------------------------------------------------------------------------
# Prepared: what `captioner prepare --out DIR` writes, read back as it was checked

PREPARED_FILE = "dataset.json"
PREPARED_FORMAT = "captioner-dataset"
PREPARED_VERSION = 1


def prepared_dict(dataset: CaptionDataset) -> dict:
    """The dataset as plain data: name, image folder and records (splits and captions)."""
    return {"format": PREPARED_FORMAT, "version": PREPARED_VERSION, "name": dataset.name,
            "image_dir": str(Path(dataset.image_dir).resolve()),
            "records": [{"image": r.image, "split": r.split, "captions": r.captions} for r in dataset.records]}


def save_prepared(dataset: CaptionDataset, folder: str | Path) -> Path:
    """Write the dataset to folder/dataset.json (atomically); `load_dataset(folder)` reads it back."""
    d = prepared_dict(dataset)
    head = json.dumps({k: v for k, v in d.items() if k != "records"}, ensure_ascii=False)[:-1]
    rows = ",\n".join(json.dumps(r, ensure_ascii=False) for r in d["records"])
    path = Path(folder) / PREPARED_FILE
    atomic_write_text(path, f'{head}, "records": [\n{rows}\n]}}\n')
    return path


def _detect_prepared(path: Path) -> bool:
    file = path / PREPARED_FILE if path.is_dir() else path
    return file.is_file() and f'"{PREPARED_FORMAT}"' in peek(file, 256)


@register_format("prepared", "what `captioner prepare --out DIR` wrote (DIR/dataset.json)", _detect_prepared)
def _load_prepared(path: Path, opts: DataOptions, problems: Problems) -> CaptionDataset:
    file = path / PREPARED_FILE if path.is_dir() else path
    d = read_json(file)
    if not isinstance(d, dict) or d.get("format") != PREPARED_FORMAT:
        raise DataError(f"not a prepared captioner dataset (no 'format': '{PREPARED_FORMAT}')", file)
    if not isinstance(d.get("version"), int) or d["version"] > PREPARED_VERSION:
        raise DataError(f"prepared-dataset version {d.get('version')!r} is newer than this captioner reads", file)
    if not opts.image_root and not (isinstance(d.get("image_dir"), str) and d["image_dir"]):
        raise DataError("field image_dir: expected the photos' folder as text (or give --image-root)", file)
    if not isinstance(d.get("records", []), list):
        raise DataError("field records: expected a list of {image, split, captions} records", file)
    image_dir = Path(opts.image_root or d["image_dir"])
    captions: dict[str, list[tuple[Where, str]]] = {}
    assignment = {}
    for i, r in enumerate(d.get("records", [])):
        record = f"records[{i}]"
        if not (isinstance(r, dict) and isinstance(r.get("image"), str) and r.get("split") in SPLITS
                and isinstance(r.get("captions"), list) and r["captions"]
                and all(isinstance(c, str) and c.strip() for c in r["captions"])):
            problems.add("malformed", "expected image, split (train/dev/test) and non-empty captions", file,
                         record=record)
            continue
        image = relative_image_path(r["image"])
        if image is None:
            problems.add("malformed", f"image path {r['image'][:100]!r} is absolute or climbs out of the image "
                                      f"folder", file, record=record)
            continue
        if image in captions:
            problems.add("duplicate image", f"{image} is listed twice (also {captions[image][0][0].record})",
                         file, record=record)
            continue
        captions[image] = [(Where(str(file), None, record), c) for c in r["captions"]]
        assignment[image] = r["split"]
    return assemble(str(d.get("name", "prepared")), image_dir, captions, assignment, opts, problems)
