"""Which recognised objects to put into captions: candidate rules, compared on the dev sets only
(Flickr8k dev and the 80 COCO dev photos). For every photo it decodes the model's own caption and
the caption forced to contain the photo's best recognised object (constrained beam search), scores
both per photo (CIDEr-D, references of that set), then replays each rule's choice per photo.
Writes benchmarks/results/objects_rules.json; docs/experiments.md quotes it.

    PYTHONPATH=src python benchmarks/objects_rules.py
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from captioner.data.datasets import load_dataset
from captioner.data.features import build_cache
from captioner.data.vocab import tokenize
from captioner.evaluation.cider import CiderD
from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.inference.decode import constrained_beam_search
from captioner.models.lexicon import load_lexicon, lexicon_words
from captioner.models.objects import NOT_INSERTED, names

REPO = Path(__file__).resolve().parents[1]
SETS = {"coco-mini/all": (REPO.parent / "shared" / "data" / "coco-mini-train2017", "all"),
        "flickr8k/dev": (REPO.parent / "shared" / "data" / "flickr8k", "dev")}
THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


def per_photo(captioner: Captioner, data: Path, split: str, cache_dir: Path) -> list[dict]:
    """Each photo: best object and score, the model's caption, the forced caption, both CIDEr-D."""
    dataset = load_dataset(data, "auto")
    records = dataset.split(split)
    model = captioner.model
    cache = build_cache(dataset.image_dir, [r.image for r in records], model.encoder_cfg, cache_dir,
                        tag=dataset.name, progress=False)
    namer = model.object_namer()
    vocab = namer.model.vocab
    index = {t: i for i, t in enumerate(vocab.tokens)}
    search = model.search_config()
    rows = []
    for s in range(0, len(records), 100):
        chunk = records[s:s + 100]
        feats = cache.get([r.image for r in chunk])
        own = model.captions(feats, search)
        objects = namer.recognize(feats)
        entries = [namer.words.get(o[0].name) if o else None for o in objects]
        phrases = [[index[t] for t in e.tokens] if e is not None else [] for e in entries]
        hyps, _ = constrained_beam_search(namer.model.decoder, feats, vocab.bos_id, vocab.eos_id, vocab.pad_id,
                                          search, phrases, banned_ids=(vocab.bos_id, vocab.unk_id),
                                          base_vocab=namer.base_vocab)
        for b, r in enumerate(chunk):
            e = entries[b]
            forced = " ".join(namer.words_of(hyps.tokens[b, 0].tolist(), e)) if e is not None else own[b]
            rows.append({"image": r.image, "own": own[b], "forced": forced, "refs": r.captions,
                         "word": e.word if e else None, "category": e.category if e else None,
                         "score": objects[b][0].score if objects[b] else 0.0})
    scorer = CiderD({r["image"]: [tokenize(c) for c in r["refs"]] for r in rows})
    for r in rows:
        r["cider_own"] = scorer.score(r["image"], tokenize(r["own"]))
        r["cider_forced"] = scorer.score(r["image"], tokenize(r["forced"]))
    return rows


def rules() -> dict:
    """Rule name -> (row, lexicon entry) -> put the object in?"""
    words = lexicon_words()
    by_category = collections.defaultdict(set)
    for e in load_lexicon():
        if e.word:
            by_category[e.category] |= {w for w in (e.word, e.plural, e.proxy) if w}
    named = lambda r, e: names(r["own"].split(), e)  # noqa: E731
    named_proxy = lambda r, e: named(r, e) or (e.proxy is not None and e.proxy in r["own"].split())  # noqa: E731
    same_category = lambda r, e: any(names(r["own"].split(), words[w]) if w in words else w in r["own"].split()  # noqa: E731
                                     for w in by_category[e.category])
    skip = NOT_INSERTED
    return {
        "always": lambda r, e: True,
        "unless named": lambda r, e: not named(r, e),
        "unless named or its proxy": lambda r, e: not named_proxy(r, e),
        "unless its category is named": lambda r, e: not same_category(r, e),
        "unless named; not sports": lambda r, e: not named(r, e) and e.category != "sports",
        "unless named; not sports, clothing": lambda r, e: not named(r, e) and e.category not in ("sports", "clothing"),
        "unless named; not sports, clothing, landscape (shipped)": lambda r, e: not named(r, e) and e.category not in skip,
        "unless named; not sports, clothing, landscape, dog": lambda r, e: (not named(r, e) and e.category not in skip
                                                                             and e.category != "dog"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default="~/.cache/captioner")
    args = ap.parse_args()
    torch.manual_seed(0)
    captioner = Captioner.load(precision="fp32")
    words = lexicon_words()
    result = {"model": captioner.name, "precision": "fp32", "beam_size": 3, "metric": "CIDEr-D (project scorer)",
              "sets": {}}
    for name, (data, split) in SETS.items():
        rows = per_photo(captioner, data, split, Path(args.cache_dir).expanduser())
        n = len(rows)
        table = {"model alone": round(sum(r["cider_own"] for r in rows) / n, 4)}
        for rule, keep in rules().items():
            for t in THRESHOLDS:
                use = [r["word"] is not None and r["score"] >= t and keep(r, words[r["word"]]) for r in rows]
                score = sum(r["cider_forced"] if u else r["cider_own"] for r, u in zip(rows, use)) / n
                table[f"{rule} @ {t}"] = {"CIDEr": round(score, 4), "photos_changed": sum(use)}
        result["sets"][name] = {"photos": n, "rules": table}
        print(name, json.dumps(table, indent=1), flush=True)
    atomic_write_text(REPO / "benchmarks" / "results" / "objects_rules.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
