"""JSON caption datasets: COCO captions annotation files and Karpathy's split files.

COCO (`annotations/captions_{train,val}{2014,2017}.json`): `images` [{id, file_name}] and
`annotations` [{image_id, caption}]; photos in `{train,val}{2014,2017}/` beside `annotations/`.
A train file's photos go to train; a val file's are split in half, seeded, into dev and test
(the official test sets have no public captions); any other file (a user's own COCO-format set)
gets a seeded split.

Karpathy (`dataset_coco.json`, `dataset_flickr8k.json`, `dataset_flickr30k.json`): `images`
[{filepath?, filename, split, sentences: [{raw, tokens}]}], the splits published results use;
his "val" is our dev and "restval" is training data.
"""
from __future__ import annotations

import re
from pathlib import Path

from captioner.data.datasets import (SPLIT_ALIASES, CaptionDataset, DataOptions, Problems, Where, assemble, peek,
                   pick_image_dir, read_json, register_format, relative_image_path, seeded_split)
from captioner.errors import DataError


def _annotation_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.glob("annotations/captions_*.json")) or sorted(path.glob("captions_*.json"))


def _detect_coco(path: Path) -> bool:
    if path.is_dir():
        return bool(_annotation_files(path))
    if path.suffix.lower() != ".json":
        return False
    head = peek(path)
    return path.name.startswith("captions_") or ('"file_name"' in head and '"sentences"' not in head
                                                 and '"captioner-dataset"' not in head)


def _coco_kind(file: Path) -> str:
    """"train", "val" or "" from an annotation file's name (captions_val2014.json -> val)."""
    m = re.match(r"captions_(train|val)", file.stem)
    return m.group(1) if m else ""


def _read_coco_file(file: Path, problems: Problems) -> tuple[dict[int, str], dict[int, list[tuple[Where, str]]]]:
    """One annotation file -> ({image id: file_name}, {image id: [(record, caption)]})."""
    d = read_json(file)
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise DataError("expected a COCO captions file: an object with 'images' and 'annotations' lists", file)
    if not isinstance(d.get("annotations"), list):
        raise DataError("no 'annotations' list: an image-info file without captions?", file)
    names: dict[int, str] = {}
    seen: dict[str, str] = {}
    for i, im in enumerate(d["images"]):
        record = f"images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            problems.add("malformed", "expected an object with an integer 'id' and a 'file_name'", file, record=record)
            continue
        name = relative_image_path(im["file_name"])
        if name is None:
            problems.add("malformed", f"file_name {im['file_name']!r} must be a relative path inside the image folder",
                         file, record=record)
        elif im["id"] in names:
            problems.add("duplicate image", f"image id {im['id']} is listed twice", file, record=record,
                         image=names[im["id"]])
        elif name in seen:
            problems.add("duplicate image", f"{name} is listed twice (also {seen[name]})", file, record=record,
                         image=name)
        else:
            names[im["id"]] = name
            seen[name] = record
    captions: dict[int, list[tuple[Where, str]]] = {}
    for i, ann in enumerate(d["annotations"]):
        record = f"annotations[{i}]"
        if isinstance(ann, dict) and "id" in ann:
            record += f" (id {ann['id']})"
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int) or not isinstance(ann.get("caption"), str):
            problems.add("malformed", "expected an object with an integer 'image_id' and a 'caption'", file,
                         record=record)
            continue
        if ann["image_id"] not in names:
            problems.add("malformed", f"image_id {ann['image_id']} is not in 'images'", file, record=record)
            continue
        caption = " ".join(ann["caption"].split())  # COCO captions carry stray newlines and spaces
        if not caption:
            problems.add("empty caption", f"empty caption for {names[ann['image_id']]}", file, record=record,
                         image=names[ann["image_id"]])
            continue
        captions.setdefault(ann["image_id"], []).append((Where(str(file), None, record), caption))
    return names, captions


@register_format("coco", "COCO captions JSON (annotations/captions_{train,val}{2014,2017}.json, or one "
                 "such file)", _detect_coco)
def load_coco(path: Path, opts: DataOptions, problems: Problems) -> CaptionDataset:
    files = _annotation_files(path)
    if not files:
        raise DataError("no captions_*.json here or in annotations/", path)
    base = Path(opts.image_root) if opts.image_root else (
        files[0].parent.parent if files[0].parent.name == "annotations" else files[0].parent)
    captions: dict[str, list[tuple[Where, str]]] = {}
    assignment: dict[str, str] = {}
    notes: list[str] = []
    for file in files:
        names, caps = _read_coco_file(file, problems)
        uncaptioned = len(names) - len(caps)
        if uncaptioned:
            notes.append(f"{file.name}: {uncaptioned} image(s) without captions left out")
        # Photos live in a folder named for the file (captions_val2014.json -> val2014/), or beside it.
        sub = file.stem.split("_", 1)[1] if file.stem.startswith("captions_") else ""
        sample = [names[i] for i in list(caps)[:20]]
        folder = pick_image_dir([base / sub, base / "images" / sub, base / "images", base] if sub
                                else [base / "images", base], sample)
        prefix = folder.relative_to(base).as_posix() if folder != base else ""
        local = {f"{prefix}/{names[i]}" if prefix else names[i]: c for i, c in caps.items()}
        for name in local:
            if name in captions:
                problems.add("duplicate image", f"{name} is also captioned in another annotation file", file,
                             image=name)
        local = {n: c for n, c in local.items() if n not in captions}
        captions.update(local)
        kind = _coco_kind(file)
        if kind == "train":
            assignment.update({n: "train" for n in local})
        elif kind == "val":
            assignment.update(seeded_split(list(local), opts.seed, dev_fraction=0.5, test_fraction=0.5))
            notes.append(f"{file.name}: seeded half dev, half test (seed={opts.seed}); "
                         f"for the Karpathy split load dataset_coco.json")
        else:
            assignment.update(seeded_split(list(local), opts.seed, opts.dev_fraction, opts.test_fraction))
            notes.append(f"{file.name}: seeded split (seed={opts.seed})")
    return assemble("coco", base, captions, assignment, opts, problems, notes)


def _detect_karpathy(path: Path) -> bool:
    if path.is_dir():
        return len(list(path.glob("dataset_*.json"))) == 1
    head = peek(path)
    if path.suffix.lower() != ".json" or '"captioner-dataset"' in head[:256]:
        return False
    return path.name.startswith("dataset_") or '"sentences"' in head


@register_format("karpathy", "Karpathy's split files: dataset_coco.json, dataset_flickr8k.json, "
                 "dataset_flickr30k.json", _detect_karpathy)
def load_karpathy(path: Path, opts: DataOptions, problems: Problems) -> CaptionDataset:
    file = path
    if path.is_dir():
        found = sorted(path.glob("dataset_*.json"))
        if len(found) != 1:
            raise DataError("expected one dataset_*.json here; give the file itself", path)
        file = found[0]
    d = read_json(file)
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise DataError("expected Karpathy's format: an object with an 'images' list", file)
    name = str(d.get("dataset") or file.stem.replace("dataset_", "", 1))
    captions: dict[str, list[tuple[Where, str]]] = {}
    assignment: dict[str, str] = {}
    for i, im in enumerate(d["images"]):
        record = f"images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) or not isinstance(im.get("sentences"), list):
            problems.add("malformed", "expected an object with 'filename' and a 'sentences' list", file, record=record)
            continue
        folder = im.get("filepath")
        image = relative_image_path(f"{folder}/{im['filename']}" if folder else im["filename"])
        split = SPLIT_ALIASES.get(str(im.get("split", "")).lower())
        if image is None:
            problems.add("malformed", f"filename {im['filename']!r} must be a relative path", file, record=record)
            continue
        if split is None:
            problems.add("malformed", f"unknown split {im.get('split')!r} for {image}", file, record=record, image=image)
            continue
        if image in captions:
            problems.add("duplicate image", f"{image} is listed twice (also {captions[image][0][0].record})", file,
                         record=record, image=image)
            continue
        caps = []
        for j, s in enumerate(im["sentences"]):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(map(str, s["tokens"]))
            caption = " ".join(raw.split()) if isinstance(raw, str) else ""
            if not caption:
                problems.add("empty caption", f"empty caption for {image}", file, record=f"{record}.sentences[{j}]",
                             image=image)
                continue
            caps.append((Where(str(file), None, record), caption))
        if caps:
            captions[image] = caps
            assignment[image] = split
    base = file.parent
    sample = sorted(captions)[:20]
    image_dir = Path(opts.image_root) if opts.image_root else pick_image_dir(
        [base / "Images", base / "images", base / "flickr30k_images" / "flickr30k_images",
         base / "flickr30k_images", base / "flickr30k-images", base / "Flicker8k_Dataset", base], sample)
    return assemble(name, image_dir, captions, assignment, opts, problems,
                    [f"Karpathy split from {file.name} (val -> dev, restval -> train)"])
