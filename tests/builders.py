"""Tiny datasets in every format captioner reads, built from generated photos."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import COLORS, SHAPES, make_photo

KINDS = [(c, s) for c in COLORS for s in SHAPES]  # 6 kinds of photo


def captions_for(color: str, shape: str) -> list[str]:
    return [f"a {color} {shape} .", f"A {color} {shape} on a plain background", f"the {shape} is {color}",
            f"a {color} {shape}", f"one {color} {shape} ."]


def photos(folder: Path, n_per_kind: int = 2, prefix: str = "", start: int = 0) -> list[tuple[str, list[str]]]:
    """Generated photos in `folder`: [(file name, its five captions)], every kind n times."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n_per_kind):
        for j, (color, shape) in enumerate(KINDS):
            i = start + k * len(KINDS) + j
            name = f"{prefix}{i:05d}_{color}{shape}.jpg"
            make_photo(folder / name, color, shape, seed=i)
            out.append((name, captions_for(color, shape)))
    return out


def make_flickr30k(root: Path, n_per_kind: int = 2, layout: str = "csv") -> tuple[Path, list]:
    """Kaggle's layout: flickr30k_images/results.csv + flickr30k_images/flickr30k_images/*.jpg
    (or the original results_20130124.token beside the photos folder)."""
    pics = photos(root / "flickr30k_images" / "flickr30k_images", n_per_kind)
    if layout == "csv":
        lines = ["image_name| comment_number| comment"]
        lines += [f"{name}| {j}| {c}" for name, caps in pics for j, c in enumerate(caps)]
        (root / "flickr30k_images" / "results.csv").write_text("\n".join(lines) + "\n")
    else:
        lines = [f"{name}#{j}\t{c}" for name, caps in pics for j, c in enumerate(caps)]
        (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    return root, pics


def make_coco(root: Path, year: int = 2014, n_train: int = 2, n_val: int = 2) -> tuple[Path, dict]:
    """annotations/captions_{train,val}YEAR.json with train{YEAR}/ and val{YEAR}/ photo folders."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    made = {}
    ann_id = 1
    for part, n, start in (("train", n_train, 0), ("val", n_val, 1000)):
        folder = f"{part}{year}"
        prefix = f"COCO_{folder}_" if year == 2014 else ""
        pics = photos(root / folder, n, prefix=prefix, start=start)
        images, annotations = [], []
        for k, (name, caps) in enumerate(pics):
            images.append({"id": start + k, "file_name": name, "width": 64, "height": 64})
            for c in caps:
                annotations.append({"image_id": start + k, "id": ann_id, "caption": c + "\n"})
                ann_id += 1
        path = root / "annotations" / f"captions_{folder}.json"
        path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
        made[part] = (path, [(f"{folder}/{name}", caps) for name, caps in pics])
    return root, made


def make_karpathy(root: Path, dataset: str = "coco", n_per_kind: int = 3) -> tuple[Path, list]:
    """dataset_{dataset}.json: for coco with filepath (val2014/...), else photos in Images/."""
    folder = root / ("val2014" if dataset == "coco" else "Images")
    pics = photos(folder, n_per_kind)
    splits = ["train", "restval", "val", "test"]
    images = []
    for i, (name, caps) in enumerate(pics):
        entry = {"filename": name, "imgid": i, "split": splits[i % len(splits)],
                 "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": 5 * i + j}
                               for j, c in enumerate(caps)]}
        if dataset == "coco":
            entry["filepath"] = "val2014"
        images.append(entry)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path, pics


def make_manifest(root: Path, kind: str = "csv", n_per_kind: int = 3, with_split: bool = True) -> tuple[Path, list]:
    """photos/<name> and a manifest (manifest.csv or manifest.jsonl) naming them relative to root."""
    pics = photos(root / "photos", n_per_kind)
    split_of = {name: ("train", "train", "dev", "test")[i % 4] if n_per_kind >= 3 else "train"
                for i, (name, _) in enumerate(pics)}
    if kind == "csv":
        lines = ["image,caption" + (",split" if with_split else "")]
        for name, caps in pics:
            for c in caps:
                lines.append(f'photos/{name},"{c}"' + (f",{split_of[name]}" if with_split else ""))
        path = root / "manifest.csv"
        path.write_text("\n".join(lines) + "\n")
    else:
        rows = [{"image": f"photos/{name}", "captions": caps, **({"split": split_of[name]} if with_split else {})}
                for name, caps in pics]
        path = root / "manifest.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [(f"photos/{name}", caps, split_of[name]) for name, caps in pics]


def write_unchecked(ckpt: dict, path: Path) -> None:
    """A crafted checkpoint as an attacker would write it: a fresh checksum, none of the checks
    `write_checkpoint` makes (it refuses what the loader would)."""
    from captioner.models.checkpoint import atomic_torch_save, content_checksum

    atomic_torch_save({**ckpt, "checksum": content_checksum(ckpt)}, path)
