"""Caption datasets: Flickr8k in its two common layouts, with the official or a seeded split."""
from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

SPLITS = ("train", "dev", "test")
_SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
_IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "images")


@dataclass
class ImageRecord:
    """One photo and its reference captions."""

    image: str  # file name relative to the dataset's image folder
    captions: list[str] = field(default_factory=list)
    split: str = "train"


@dataclass
class CaptionDataset:
    """Photos with captions, each assigned to one split."""

    name: str
    image_dir: Path
    records: list[ImageRecord]
    notes: list[str] = field(default_factory=list)  # what loading skipped or assumed

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def image_path(self, record: ImageRecord) -> Path:
        return self.image_dir / record.image


def _find(root: Path, name: str) -> Path | None:
    for p in (root / name, root / "Flickr8k_text" / name):
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


def read_token_file(path: Path) -> dict[str, list[tuple[int, str]]]:
    """`<image>#<n>\\t<caption>` lines -> {image: [(line, caption), ...]}."""
    captions: dict[str, list[tuple[int, str]]] = {}
    with read_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n\r")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            image, hash_, _ = key.rpartition("#")
            if not sep or not hash_ or not image:
                raise DataError("expected '<image>#<n><TAB><caption>'", path, lineno)
            if not caption.strip():
                raise DataError(f"empty caption for {image}", path, lineno)
            captions.setdefault(_clean_image_name(image), []).append((lineno, caption.strip()))
    if not captions:
        raise DataError("no captions found", path)
    return captions


def read_captions_csv(path: Path) -> dict[str, list[tuple[int, str]]]:
    """`image,caption` CSV with a header -> {image: [(line, caption), ...]}."""
    captions: dict[str, list[tuple[int, str]]] = {}
    with read_text(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
                raise DataError("expected the header 'image,caption'", path, 1)
            for row in reader:
                lineno = reader.line_num
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) < 2:
                    raise DataError(f"expected 2 fields (image, caption), found {len(row)}", path, lineno)
                # A caption with unquoted commas splits into several fields: join them back.
                image, caption = row[0].strip(), ",".join(row[1:]).strip()
                if not image:
                    raise DataError("empty image field", path, lineno)
                if not caption:
                    raise DataError(f"empty caption for {image}", path, lineno)
                captions.setdefault(_clean_image_name(image), []).append((lineno, caption))
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


def load_flickr8k(root: str | Path, layout: str = "auto", seed: int = 0,
                  check_images: bool = True) -> CaptionDataset:
    """Load Flickr8k from `root`.

    layout: "token" (Flickr8k.token.txt), "csv" (captions.txt) or "auto" (token if present).
    The official split files are used where present; otherwise a seeded split.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    token, csv_file = _find(root, "Flickr8k.token.txt"), _find(root, "captions.txt")
    if layout == "auto":
        layout = "token" if token else "csv"
    if layout == "token":
        if token is None:
            raise DataError("no Flickr8k.token.txt here or in Flickr8k_text/", root)
        caption_file, captions = token, read_token_file(token)
    elif layout == "csv":
        if csv_file is None:
            raise DataError("no captions.txt here", root)
        caption_file, captions = csv_file, read_captions_csv(csv_file)
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
                assignment[name] = s
        unused = sorted(set(captions) - set(assignment))
        if unused:
            notes.append(f"{len(unused)} captioned image(s) in no split file were left out: {', '.join(unused[:3])}")
    else:
        assignment = seeded_split(list(captions), seed=seed)
        notes.append(f"no official split files: seeded split (seed={seed})")

    image_dir = _image_dir(root)
    records = []
    for name, caps in captions.items():
        if name not in assignment:
            continue
        if check_images and not (image_dir / name).is_file():
            raise DataError(f"image {name} not found in {image_dir}", caption_file, caps[0][0])
        records.append(ImageRecord(name, [c for _, c in caps], assignment[name]))
    records.sort(key=lambda r: (SPLITS.index(r.split), r.image))
    return CaptionDataset("flickr8k", image_dir, records, notes)
