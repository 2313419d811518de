"""Learning from feedback on out-of-domain photos: COCO corrections sent through the API, then
`captioner finetune --checkpoint default`; writes benchmarks/results/finetune_coco.json.

The 80 photos of coco-mini-train2017 (5 captions each) are split once, by photo (seed 0), into
60 photos whose 300 captions users send as corrections (POST /v1/captions, then POST
/v1/feedback, to an in-process server on a temporary SQLite store) and 20 held-out photos that
stand for "other COCO photos": no correction of theirs is ever sent. Measured in one run:
- base vs finetuned CIDEr-D on the 20 held-out COCO photos (their 5 COCO captions as
  references), with the paired bootstrap interval of the difference (`captioner compare`'s);
- base vs finetuned Flickr8k test CIDEr-D (1,000 photos), with its interval;
- what finetune itself reported (its check set, Flickr8k dev gate, new words, time);
- a harmful update: the same 300 captions shuffled across the 60 photos, sent the same way:
  finetune should refuse it (exit 1, nothing written).
`--finetune-args "..."` passes options to both finetunes (e.g. `--force` trains the harmful one
too); `--skip-harmful` leaves it out (the recipe probes in benchmarks/results/finetune_coco/).

    PYTHONPATH=src nice python benchmarks/finetune_coco.py   # 3-10 min on 2 busy CPU cores
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from captioner.cli import main
from captioner.data.datasets import ImageRecord, load_dataset
from captioner.data.features import build_cache
from captioner.evaluation.compare import paired_bootstrap, photo_stats
from captioner.evaluation.evaluate import decode_records
from captioner.files import atomic_write_text
from captioner.models.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from captioner.training.finetune import grow_from_corrections

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini-train2017"
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
HELD_OUT = 20  # of the 80 COCO photos, never sent as corrections


def split_coco(seed: int = 0, fold: int = 0) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(the photos users correct, the held-out photos), a fixed split by photo; `fold` k holds out
    the k-th block of HELD_OUT photos of the same shuffled order (k = 0: the first split)."""
    records = sorted(load_dataset(COCO, "auto").split("all"), key=lambda r: r.image)
    random.Random(seed).shuffle(records)
    held = records[fold * HELD_OUT:(fold + 1) * HELD_OUT]
    if not held:
        raise ValueError(f"fold {fold}: there are only {len(records) // HELD_OUT} folds of {HELD_OUT} photos")
    return [r for r in records if r not in held], held


def send_corrections(db: Path, folder: Path, photos: list[tuple[Path, list[str]]]) -> int:
    """Each photo captioned once per correction through the API, each caption then corrected;
    returns the corrections acknowledged."""
    from fastapi.testclient import TestClient

    from captioner.service.config import load_serve_config
    from captioner.service.serve import create_app

    cfg = folder / "serve.json"
    (folder / "models").mkdir(exist_ok=True)
    cfg.write_text(json.dumps({"model_dir": "models", "db": str(db), "experiment": {
        "name": "coco", "variants": [{"name": "current", "checkpoint": "default"}]}}))
    sent = 0
    with TestClient(create_app(load_serve_config(cfg))) as client:
        for i, (path, captions) in enumerate(photos):
            image = path.read_bytes()
            for k, text in enumerate(captions):
                r = client.post("/v1/captions", files={"image": (path.name, image, "image/jpeg")},
                                data={"beam_size": "1", "max_len": "16"}, headers={"X-Client-Id": f"user{i}-{k}"})
                r.raise_for_status()
                f = client.post("/v1/feedback", json={"caption_id": r.json()["caption_id"], "correction": text})
                f.raise_for_status()
                sent += 1
    return sent


def run_finetune(args: list[str]) -> tuple[int, dict | None, str]:
    """`captioner finetune ...` in process: (exit code, its JSON report, its stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["finetune", *args])
    lines = out.getvalue().strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return code, report, err.getvalue().strip()


def compare(base: dict[str, str], tuned: dict[str, str], records: list[ImageRecord]) -> dict:
    refs = {r.image: r.captions for r in records}
    a, b = photo_stats([base, tuned], refs)
    m = next(x for x in paired_bootstrap(a, b, 1000, 0, 0.95) if x.metric == "CIDEr")
    return {"photos": len(records), "base": round(m.a, 4), "finetuned": round(m.b, 4), "diff": round(m.b - m.a, 4),
            "diff_interval_95": [round(x, 4) for x in m.diff_interval], "finetuned_better_share": m.b_better}


def score(paths: dict[str, str], data: Path, split: str | list[ImageRecord], cache_dir: Path,
          objects: bool = False) -> tuple[dict[str, dict[str, str]], list[ImageRecord]]:
    """Each model's captions of a split (or of given records) of a dataset: {name: {image: caption}}."""
    dataset = load_dataset(data, "auto")
    records = dataset.split(split) if isinstance(split, str) else split
    out = {}
    for name, path in paths.items():
        model, _ = load_checkpoint(path)
        cache = build_cache(dataset.image_dir, [r.image for r in records], model.encoder_cfg, cache_dir,
                            tag=dataset.name, progress=False)
        out[name] = decode_records(model, cache, records, model.search_config(), objects=objects)
    return out, records


def blends(candidate: Path, weights: list[float]) -> dict[str, str]:
    """WiSE-FT (Wortsman et al., CVPR 2022): the finetuned weights pulled back toward where the
    finetune started (the shipped model with the same new words grown), theta = start + w (tuned -
    start), each written beside `candidate`; {"blend-w": path}."""
    tuned, ckpt = load_checkpoint(candidate)
    start, _ = load_checkpoint(resolve_checkpoint("default"))
    grow_from_corrections(start, list(ckpt["finetune"]["new_words"]))
    assert start.vocab.tokens == tuned.vocab.tokens
    s0 = {k: v.clone() for k, v in start.state_dict().items()}  # load_state_dict writes into the live tensors
    s1 = tuned.state_dict()
    out = {}
    for w in weights:
        start.load_state_dict({k: s0[k] + w * (s1[k] - s0[k]) if s0[k].is_floating_point() else s1[k] for k in s0})
        out[f"blend-{w}"] = str(candidate.with_name(f"blend-{w}.pt"))
        save_checkpoint(out[f"blend-{w}"], start, half=True)
        start.load_state_dict(s0)
    return out


def set_up(args: argparse.Namespace) -> Path:
    """Check the data is there, set threads and logging; the feature cache folder."""
    if not (COCO / "images").is_dir() or not (FLICKR8K / "Images").is_dir():
        sys.exit(f"error: needs {COCO} and {FLICKR8K}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.__stderr__)
    return Path(args.cache_dir).expanduser()


def main_benchmark() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune_coco.json"))
    p.add_argument("--cache-dir", default="~/.cache/captioner")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--finetune-args", default="", help="extra finetune options, e.g. \"--lr 3e-5\"")
    p.add_argument("--skip-harmful", action="store_true", help="leave the harmful update out (recipe probes)")
    p.add_argument("--folds", type=int, default=1,
                   help="K > 1: cross-validate, each block of 20 photos held out in turn (4 covers all 80); "
                        "the held-out captions of every fold are pooled into one comparison over K x 20 photos "
                        "(no harmful update, no Flickr8k test beyond finetune's own gate)")
    p.add_argument("--blends", default="", help="with --folds: also judge WiSE-FT blends of each finetune with its "
                   "start, e.g. 0.25,0.5,0.75 (the finetunes are forced, so every fold has a model to blend)")
    args = p.parse_args()
    if args.blends and args.folds < 2:
        p.error("--blends needs --folds K (K > 1)")
    cache_dir = set_up(args)
    if args.folds > 1:
        return cross_validate(args, cache_dir)
    users, held_out = split_coco()
    coco = load_dataset(COCO, "auto")
    photos = [(coco.image_dir / r.image, r.captions) for r in users]
    result: dict = {"script": "benchmarks/finetune_coco.py", "split": f"fixed by photo, seed 0: {len(users)} COCO "
                    f"photos corrected through the API, {len(held_out)} held out (never sent)",
                    "torch_threads": args.threads, "finetune_args": args.finetune_args}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. the corrections, through the API
        (tmp / "good").mkdir()
        t0 = time.time()
        result["corrections_sent"] = send_corrections(tmp / "good" / "feedback.db", tmp / "good", photos)
        result["api_seconds"] = round(time.time() - t0, 1)
        # 2. finetune --checkpoint default
        candidate = tmp / "good" / "models" / "candidate.pt"
        common = ["--checkpoint", "default", "--data", str(FLICKR8K), "--cache-dir", str(cache_dir), "--no-progress",
                  *args.finetune_args.split()]
        t0 = time.time()
        code, report, err = run_finetune(["--db", str(tmp / "good" / "feedback.db"), "--out", str(candidate), *common])
        result["finetune"] = {"exit_code": code, "seconds": round(time.time() - t0, 1), "error": err or None,
                              "report": report}
        if code == 0:
            # 3. base vs finetuned on the held-out COCO photos and on Flickr8k test
            models = {"base": "default", "finetuned": str(candidate)}
            for objects in (False, True):
                caps, recs = score(models, COCO, held_out, cache_dir, objects=objects)
                result[f"coco_held_out{'_objects_on' if objects else ''}"] = compare(caps["base"], caps["finetuned"],
                                                                                    recs)
            result["coco_held_out_examples"] = [{"image": r.image, "base": caps["base"][r.image],
                                                 "finetuned": caps["finetuned"][r.image],
                                                 "reference": r.captions[0]} for r in recs[:5]]
            caps, recs = score(models, FLICKR8K, "test", cache_dir)
            result["flickr8k_test"] = compare(caps["base"], caps["finetuned"], recs)
        # 4. a harmful update: the same captions, shuffled across the photos
        if args.skip_harmful:
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k not in ("finetune", "coco_held_out_examples")}))
            return
        (tmp / "harm").mkdir()
        rng = random.Random(1)
        order = list(range(len(photos)))
        while any(i == j for i, j in enumerate(order)):
            rng.shuffle(order)
        shuffled = [(photos[i][0], photos[j][1]) for i, j in enumerate(order)]
        send_corrections(tmp / "harm" / "feedback.db", tmp / "harm", shuffled)
        bad = tmp / "harm" / "models" / "candidate.pt"
        t0 = time.time()
        code, report, err = run_finetune(["--db", str(tmp / "harm" / "feedback.db"), "--out", str(bad), *common])
        result["harmful"] = {"exit_code": code, "written": bad.exists(), "error": err or None,
                             "seconds": round(time.time() - t0, 1),
                             **{k: (report or {}).get(k) for k in ("relevance", "check", "gate")}}
    result["bar"] = {"coco_gain_at_least": 0.02, "flickr8k_test_at_least": 0.65}
    if "coco_held_out" in result:
        result["bar"]["coco_gain_met"] = result["coco_held_out"]["diff"] >= 0.02
        result["bar"]["flickr8k_test_met"] = result["flickr8k_test"]["finetuned"] >= 0.65
    result["harmful_refused"] = result["harmful"]["exit_code"] == 1 and not result["harmful"]["written"]
    result["total_seconds"] = round(time.time() - started, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("finetune", "coco_held_out_examples")}, indent=1))


def cross_validate(args: argparse.Namespace, cache_dir: Path) -> None:
    """Each fold: its 60 photos' corrections through the API, `captioner finetune --checkpoint
    default`, then base and finetuned captions of its 20 held-out photos (objects off and on).
    The pooled comparison covers every held-out photo once, captioned by a model that never saw
    its corrections. `--blends`: each blend of each fold's finetune is judged the same way."""
    coco = load_dataset(COCO, "auto")
    weights = [float(w) for w in args.blends.split(",") if w]
    forced = ["--force"] if weights else []
    result: dict = {"script": "benchmarks/finetune_coco.py --folds", "folds": args.folds, "torch_threads": args.threads,
                    "finetune_args": " ".join([args.finetune_args, *forced]).strip(), "per_fold": []}
    pooled: dict = {}
    started = time.time()
    for fold in range(args.folds):
        users, held_out = split_coco(fold=fold)
        photos = [(coco.image_dir / r.image, r.captions) for r in users]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            send_corrections(tmp / "feedback.db", tmp, photos)
            candidate = tmp / "models" / "candidate.pt"
            t0 = time.time()
            code, report, err = run_finetune(["--db", str(tmp / "feedback.db"), "--out", str(candidate), "--checkpoint",
                                              "default", "--data", str(FLICKR8K), "--cache-dir", str(cache_dir),
                                              "--no-progress", *args.finetune_args.split(), *forced])
            row: dict = {"fold": fold, "exit_code": code, "seconds": round(time.time() - t0, 1), "error": err or None,
                         "gate": (report or {}).get("gate"), "check": (report or {}).get("check")}
            if code == 0:
                models = {"base": "default", "finetuned": str(candidate), **blends(candidate, weights)}
                for objects in (False, True):
                    caps, recs = score(models, COCO, held_out, cache_dir, objects=objects)
                    for name in models:
                        if name == "base":
                            continue
                        key = ("coco_held_out" if name == "finetuned" else f"coco_held_out_{name}") \
                            + ("_objects_on" if objects else "")
                        row[key] = compare(caps["base"], caps[name], recs)
                        base, tuned, records = pooled.setdefault(key, ({}, {}, []))
                        base.update(caps["base"])
                        tuned.update(caps[name])
                        records += recs
        result["per_fold"].append(row)
        print(json.dumps(row), flush=True)
    for key, (base, tuned, records) in pooled.items():
        result[key.replace("coco_held_out", "coco_held_out_pooled", 1)] = compare(base, tuned, records)
    result["total_seconds"] = round(time.time() - started, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_fold"}, indent=1))


if __name__ == "__main__":
    main_benchmark()
