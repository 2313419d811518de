"""Caption a large collection of photos into a JSON-lines file.

Photos are loaded and preprocessed in worker processes while the encoder and the batched beam
search run on whole batches. Every caption is one line, written and flushed as soon as its
batch is done, so the file is the progress record: a rerun skips every photo it already
holds, and a kill mid-write leaves at most a cut last line, which the rerun drops and redoes.
Under torchrun each rank captions its share into a part file and rank 0 joins the parts into
the one output; parts left by a killed run are joined on the next run, never twice.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from captioner.inference.api import Captioner
from captioner.files import atomic_write_text
from captioner.distributed import DistEnv, all_sum, barrier, shard
from captioner.errors import DataError
from captioner.data.loading import load_batches

PART = ".part-rank"  # captions.jsonl.part-rank0, ...: one per rank while a distributed run is on


@dataclass
class Photo:
    path: Path  # where to read it
    key: str  # its name in the output: relative to the folder it was found in, or as given


def collect(args: Sequence[str], suffixes: set[str], recursive: bool = False) -> list[Photo]:
    """Files as given; a folder becomes its photos (and its subfolders' with `recursive`), each
    named relative to that folder, so a rerun from elsewhere still recognises them."""
    photos = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            files = sorted(f for f in found if f.suffix.lower() in suffixes and f.is_file())
            photos += [Photo(f, f.relative_to(p).as_posix()) for f in files]
        else:
            photos.append(Photo(p, arg))
    return photos


def read_done(path: Path, repair: bool = False) -> dict[str, dict]:
    """The lines of a captions file, by image. A cut last line (no newline: a kill mid-write,
    so the start of a captions line) is ignored, and with `repair` cut off the file, so that
    photo is captioned again. Every line is checked before anything is cut: a file that is not
    a captions file is refused untouched."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise DataError("not a file, so not a captions file; give a file path to --out", path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("not a captions file (not UTF-8 text); give --out a new file name", path) from None
    done = {}
    for lineno, line in enumerate(text[:end].splitlines(), 1):
        if not line.strip():
            continue
        row = _captions_row(line)
        if row is None:
            raise DataError("not a captions line (JSON with \"image\" and \"caption\" fields); fix or move "
                            "the file", path, lineno)
        done[row["image"]] = row
    cut = text[end:]
    if cut.strip() and not cut.lstrip().startswith('{"image"'):
        raise DataError("its last line is not a captions line (JSON with \"image\" and \"caption\" fields); "
                        "fix or move the file", path, text.count("\n") + 1)
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return done


def _captions_row(line: str) -> dict | None:
    """One captions line as written by `caption_collection`, or None where it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)
    return row if ok else None


def _append(f, rows: list[dict]) -> None:
    if rows:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def join_parts(out: Path) -> int:
    """Append the part files' lines that `out` lacks to `out`, then remove the parts; returns
    the lines added. Run by one process (rank 0) while no rank writes."""
    parts = sorted(out.parent.glob(out.name + PART + "*"))
    if not parts:
        return 0
    done = read_done(out, repair=True)
    added = 0
    with open(out, "a", encoding="utf-8") as f:
        for part in parts:
            rows = [r for k, r in read_done(part).items() if k not in done]
            _append(f, rows)
            done.update((r["image"], r) for r in rows)
            added += len(rows)
    for part in parts:  # only once every line is safely in `out`
        part.unlink()
    return added


def write_alt_text_csv(captions: Path, target: Path) -> int:
    """`image,alt_text` rows from a captions file, sorted by image, written atomically."""
    rows = sorted(read_done(captions).values(), key=lambda r: r["image"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "alt_text"])
    writer.writerows([r["image"], r["caption"]] for r in rows)
    atomic_write_text(target, buf.getvalue())
    return len(rows)


@dataclass
class BulkResult:
    total: int  # photos asked for
    skipped: int  # already in the output from an earlier run
    captioned: int  # captioned by this run (all ranks)
    failed: int  # unreadable photos (reported on stderr; tried again on a rerun)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


def caption_collection(captioner: Captioner, photos: list[Photo], out: str | Path, *, batch_size: int = 16,
                       workers: int = 2, search: dict | None = None, env: DistEnv | None = None,
                       progress: bool = True, alt_text_csv: str | Path | None = None) -> BulkResult:
    """Caption every photo not yet in `out` (JSON lines: image, caption, score, alternatives).

    `workers` processes load photos; `search` holds caption_features options (beam_size, ...).
    Under torchrun (`env`) each rank takes every world_size-th remaining photo."""
    env = env or DistEnv(device=str(captioner.device))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        read_done(out, repair=True)
        join_parts(out)
    barrier(env)
    done = read_done(out)
    todo = [p for p in photos if p.key not in done]
    if len({p.key for p in todo}) < len(todo):
        raise DataError("two photos share a name in the output; caption the folders separately", out)
    mine = shard(todo, env)
    if env.is_main:
        print(f"{len(photos) - len(todo)} of {len(photos)} photo(s) already in {out}; captioning {len(todo)}"
              + (f" on {env.world_size} processes" if env.distributed else ""), file=sys.stderr)
    target = out.with_name(out.name + f"{PART}{env.rank}") if env.distributed else out
    cuda = env.device.startswith("cuda")
    bar = tqdm(total=len(mine), desc="caption" + (f" (rank 0 of {env.world_size})" if env.distributed else ""),
               unit="img", disable=not progress or not env.is_main, dynamic_ncols=True)
    captioned = failed = 0
    started = time.perf_counter()
    with open(target, "a", encoding="utf-8") as f:
        for batch in load_batches([p.path for p in mine], captioner.model.encoder_cfg, batch_size, workers):
            good = [(i, x) for i, x, error in batch if error is None]
            for _, _, error in batch:
                if error is not None:
                    failed += 1
                    tqdm.write(f"error: {error}", file=sys.stderr)
            if good:
                with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                    feats = captioner.encode_pixels(torch.stack([x for _, x in good]))
                caps = captioner.caption_features(feats.float(), **(search or {}))
                _append(f, [{"image": mine[i].key, **c.to_dict()} for (i, _), c in zip(good, caps)])
                captioned += len(good)
            bar.update(len(batch))
    bar.close()
    if env.distributed:
        captioned, failed = (int(v) for v in all_sum(torch.tensor([captioned, failed]), env).tolist())
        barrier(env)
    seconds = time.perf_counter() - started
    if env.is_main:
        if env.distributed:
            join_parts(out)
        if alt_text_csv:
            write_alt_text_csv(out, Path(alt_text_csv))
    return BulkResult(len(photos), len(photos) - len(todo), captioned, failed, seconds)
