"""Judge a recognition stage (training/recognition_distill.py): a run's best.pt with its head
against the model it started from (BASE, e.g. the previous default).

    PYTHONPATH=src python benchmarks/recognition_stage.py --run RUN_DIR --base BASE.pt [--name NAME]
                                                         [--out benchmarks/results/recognition_stage/NAME.json]

RUN_DIR/best.pt is exported as the default is (fp16, BASE's search settings; the head travels
with it). Then, fp32 and beam 3 throughout:
- recognition: top-1 ImageNet class and top-1 lexicon word of the run's head against the stock
  classifier, on the 80 COCO dev photos and the 1000 Flickr8k test photos (neither trained on);
- COCO dev captions with objects on: BASE recognising with the stock classifier (threshold 0.4),
  the run with its head at thresholds 0.3, 0.4 and 0.5, and with the stock classifier at 0.4;
  the run with objects off; paired bootstrap intervals against BASE (`captioner compare`);
- the README examples' captions and objects (threshold 0.4);
- the captions alone: Flickr8k test CIDEr-D with objects off, BASE against the run, paired bootstrap.
Writes the result JSON; the captions files stay in RUN_DIR/judged/.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import torch

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.evaluation.compare import compare_files
from captioner.evaluation.evaluate import decode_records
from captioner.evaluation.metrics import score_captions
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint
from captioner.models.lexicon import load_lexicon
from captioner.models.recognition import Recognizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
EXAMPLES = ("cat", "coffee", "rocket", "astronaut")


def agreement(probs: torch.Tensor, stock: torch.Tensor) -> dict:
    """Top-1 class and top-1 lexicon word of `probs` against the stock classifier's (N, 1000)."""
    word = torch.tensor([hash(e.word) if e.word is not None else -1 for e in load_lexicon()])
    a, s = probs.argmax(-1), stock.argmax(-1)
    return {"top1_class": round((a == s).float().mean().item(), 4),
            "top1_word": round((word[a] == word[s]).float().mean().item(), 4), "photos": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the stage's run folder (best.pt and its head)")
    ap.add_argument("--base", required=True, help="the checkpoint the stage started from")
    ap.add_argument("--name", default=None, help="the result's name (default: the run folder's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "best.pt").is_file():
        ap.error(f"--run {run}: no best.pt")
    if not Path(args.base).is_file():
        ap.error(f"--base {args.base}: no such checkpoint")
    name = args.name or run.name
    out = Path(args.out or REPO / "benchmarks" / "results" / "recognition_stage" / f"{name}.json")
    judged = run / "judged"
    judged.mkdir(exist_ok=True)
    cache_dir = Path(args.cache_dir).expanduser()

    base, _ = load_checkpoint(args.base)
    model, ckpt = load_checkpoint(run / "best.pt")
    if model.recognition_head is None:
        ap.error(f"--run {run}: best.pt has no recognition head bound to it")
    from captioner.cli import main as cli
    cli(["export", str(run / "best.pt"), str(judged / "model.pt"), "--half", "--length-penalty",
         str(base.length_penalty), "--no-repeat-ngram", str(base.no_repeat_ngram)])
    cand, _ = load_checkpoint(judged / "model.pt")
    base.precision = cand.precision = "fp32"
    result: dict = {"run": str(run), "base": str(args.base), "stage": ckpt.get("metrics", {}).get("recognition_distillation"),
                    "train_config": {k: ckpt["train_config"][k] for k in ckpt["train_config"] if k.startswith("recognition")}}

    def cache_of(root: Path, split: str):
        ds = load_dataset(root, "auto")
        recs = ds.split(split)
        return recs, build_cache(ds.image_dir, [r.image for r in recs], cand.encoder_cfg, cache_dir, tag=ds.name,
                                 progress=False)

    stock = Recognizer(cand.encoder_cfg, "stock")
    with torch.no_grad():
        for label, (root, split) in {"coco dev (80)": (SHARED / "coco-mini-train2017", "all"),
                                     "flickr8k test (1000)": (SHARED / "flickr8k", "test")}.items():
            recs, cache = cache_of(root, split)
            head, ref = [], []
            for i in range(0, len(recs), 50):
                f = cache.get([r.image for r in recs[i:i + 50]])
                head.append(cand.recognition_head(cand.decoder.top(f).mean(1)).softmax(-1))
                ref.append(stock(f))
            result.setdefault("agreement with the stock classifier", {})[label] = agreement(torch.cat(head),
                                                                                            torch.cat(ref))
            print(label, result["agreement with the stock classifier"][label], flush=True)

    recs, cache = cache_of(SHARED / "coco-mini-train2017", "all")
    refs = {r.image: r.captions for r in recs}
    coco: dict = {}

    def caption_coco(label: str, m, objects: bool, threshold: float = 0.4) -> Path:
        if objects:
            m.object_namer(threshold)
        preds = decode_records(m, cache, recs, m.search_config(), objects=objects)
        path = judged / f"coco-{label}.json"
        atomic_write_text(path, json.dumps([{"image": r.image, "caption": preds[r.image], "references": r.captions}
                                            for r in recs], indent=1) + "\n")
        coco[label] = {"CIDEr": round(score_captions(preds, refs, ["CIDEr"])[0]["CIDEr"], 4)}
        print("coco", label, coco[label], flush=True)
        return path

    base_on = caption_coco("base, objects on (stock recognition, 0.4)", base, True)
    caption_coco("base, objects off", base, False)
    for t in (0.3, 0.4, 0.5):
        path = caption_coco(f"run, objects on (its head, {t})", cand, True, t)
        cider = next(x for x in compare_files(base_on, path).metrics if x.metric == "CIDEr")
        coco[f"run, objects on (its head, {t})"]["minus base, 95% interval"] = [round(v, 4) for v in cider.diff_interval]
    caption_coco("run, objects off", cand, False)
    head = cand.recognition_head
    cand.attach_recognition_head(None)
    caption_coco("run, objects on (stock recognition, 0.4)", cand, True)
    cand.attach_recognition_head(head)
    result["coco dev captions, CIDEr"] = coco

    cand.object_namer(0.4)
    photos = [resources.files("captioner") / "examples" / f"{n}.jpg" for n in EXAMPLES]
    cap = Captioner(cand, {"path": str(judged / "model.pt"), "name": name}, precision="fp32")
    result["examples"] = {n: {"caption": c.text, "objects": [o.to_dict() for o in c.objects[:3]]}
                          for n, c in zip(EXAMPLES, cap.caption_features(cap.encode(photos)))}
    print(result["examples"], flush=True)

    recs, cache = cache_of(SHARED / "flickr8k", "test")
    refs = {r.image: r.captions for r in recs}
    files = {}
    for label, m in (("base", base), ("run", cand)):
        preds = decode_records(m, cache, recs, m.search_config(), objects=False)
        files[label] = judged / f"test-{label}.json"
        atomic_write_text(files[label], json.dumps([{"image": r.image, "caption": preds[r.image],
                                                     "references": r.captions} for r in recs], indent=1) + "\n")
    comparison = compare_files(files["base"], files["run"])
    cider = next(x for x in comparison.metrics if x.metric == "CIDEr")
    result["flickr8k test, objects off, CIDEr-D"] = {"base": round(cider.a, 4), "run": round(cider.b, 4),
                                                     "run minus base, 95% interval": [round(v, 4) for v in cider.diff_interval]}
    result["comparison"] = asdict(comparison)
    print(result["flickr8k test, objects off, CIDEr-D"], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
