"""Fine-tune a served model on the corrections its users gave, into a candidate that is checked
before it is written: it cannot make the model worse without saying so.

    captioner finetune --db captioner.db --checkpoint default --out models/v2.pt

1. The corrections are grouped by photo and split, by photo and with a fixed seed, into the
   photos it learns from and a check set it never trains on (`check_fraction`, at least one).
2. Words of the corrections that the vocab lacks and that occur at least `min_word_count`
   times join the vocab (`grow_vocab`, the named-objects transfer): a new word starts from its
   ImageNet-lexicon proxy, or else from the <unk> row.
3. The recipe the base was made with: cross-entropy on the corrections mixed with replayed
   original training photos (features only for the photos used, from the feature cache), which
   trains only the new words' rows (cross-entropy on the rest would undo the base's
   self-critical gains), then a short self-critical stage (CIDEr-D reward) of the whole decoder
   with the corrections as references.
4. Before and after, the check set and the base's dev split are captioned as served (named
   objects on unless `objects` is off) and scored (CIDEr-D),
   with a paired bootstrap interval of the difference (`captioner compare`'s). A model worse
   on dev beyond noise (the interval entirely below 0) is refused and nothing is written,
   unless `force`. The model is written in the base's precision (fp16 weights where the base
   has them; its decode precision kept).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from captioner.data.datasets import DataOptions, ImageRecord, load_dataset
from captioner.data.features import FeatureCache, build_cache
from captioner.data.vocab import SPECIALS, tokenize
from captioner.errors import CaptionerError, ConfigError
from captioner.evaluation.compare import paired_bootstrap, photo_stats
from captioner.evaluation.evaluate import decode_records
from captioner.inference.decode import SearchConfig
from captioner.models.checkpoint import MAX_TOKEN_CHARS, load_checkpoint, resolve_checkpoint, save_checkpoint
from captioner.models.encoders import build_encoder, preprocess
from captioner.models.lexicon import lexicon_words
from captioner.models.model import CaptionModel
from captioner.models.objects import grow_vocab, vocab_rows
from captioner.service.feedback import Correction, FeedbackStore
from captioner.training.config import TrainConfig
from captioner.training.crossentropy import autocast, train_epoch
from captioner.training.dataset import TrainingSet, images_per_batch, length_bucketed_batches
from captioner.training.scst import reward_scorer, scst_epoch
from captioner.training.train import adam, param_groups

log = logging.getLogger("captioner.training.finetune")

FALLBACK_PROXY = "<unk>"  # a new word outside the lexicon starts from the row of "a word the model did not know"


class FinetuneRefused(CaptionerError):
    """The candidate is worse on the base's dev split beyond noise; nothing was written."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class FinetuneConfig:
    db: str  # feedback store with the corrected captions and their photos: SQLite file or postgresql:// URL
    out: str  # the new checkpoint
    checkpoint: str = "default"  # the base model: a checkpoint file, or default (the shipped model)
    data: str = "../shared/data/flickr8k"  # the base's dataset: train photos are replayed, dev checks
    data_format: str = "auto"
    layout: str = "auto"  # Flickr8k caption file: token, csv or auto
    image_root: str = ""
    cache_dir: str = "~/.cache/captioner"  # encoder feature caches (only the photos used are encoded)
    check_fraction: float = 0.2  # of the corrected photos, held out as the check set (at least one)
    min_word_count: int = 3  # a new word joins the vocab once the corrections use it this often
    epochs: int = 2  # cross-entropy passes over the mixed set, teaching the new words (none: skipped)
    lr: float = 1e-3  # peak Adam learning rate of the cross-entropy stage (it trains the new words' rows only)
    batch_size: int = 50  # captions per cross-entropy step
    replay_ratio: float = 4.0  # replayed original train photos per corrected photo learnt from
    correction_repeats: int = 3  # copies of each corrected photo per cross-entropy pass
    scst_epochs: int = 3  # self-critical passes after cross-entropy (0 = none)
    scst_lr: float = 5e-5  # constant learning rate of the self-critical stage
    scst_replay_ratio: float = 1.0  # replayed photos per corrected photo in the self-critical stage
    gate_split: str = "auto"  # the base's held-out split the gate scores: dev, test, or auto (see gate_split)
    dev_images: int = 0  # photos of that split the gate scores (0 = all)
    beam_size: int = 3  # the search that scores before and after
    objects: bool = True  # captioned as served: with named objects (the serving default), or the model alone
    max_len: int = 20
    resamples: int = 1000  # bootstrap draws
    confidence: float = 0.95
    force: bool = False  # write the model even where the dev check refuses it
    half: bool = False  # store fp16 weights even where the base has fp32 ones
    max_caption_len: int = 30
    seed: int = 0
    progress: bool = False

    def check(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not (math.isfinite(v) and v <= 1e6):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number (at most 1e6), not {v}")
        for name in ("batch_size", "beam_size", "max_len", "max_caption_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence must be between 0 and 1, not {self.confidence}")
        if not 0 < self.check_fraction < 1:
            raise ConfigError(f"--check-fraction must be between 0 and 1, not {self.check_fraction}")
        if self.min_word_count < 1:
            raise ConfigError(f"--min-word-count must be at least 1, not {self.min_word_count}")
        for name in ("epochs", "scst_epochs", "dev_images", "correction_repeats"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative, not {getattr(self, name)}")
        if self.correction_repeats < 1:
            raise ConfigError("--correction-repeats must be at least 1")
        if self.replay_ratio < 0 or self.scst_replay_ratio < 0:
            raise ConfigError("--replay-ratio must not be negative")
        if not (self.lr > 0 and self.scst_lr > 0):
            raise ConfigError("learning rates must be above 0")
        if self.gate_split not in ("auto", "dev", "test"):
            raise ConfigError(f"--gate-split must be auto, dev or test, not {self.gate_split!r}")
        if not 100 <= self.resamples <= 100_000:
            raise ConfigError(f"--resamples must be 100 to 100000 draws, not {self.resamples}")


@dataclass
class CorrectedPhoto:
    """One photo the users corrected, with every correction it got (its references)."""

    key: str  # "feedback:<sha256 prefix>", its row in the feature table
    image: bytes
    captions: list[str]
    caption_ids: list[str] = field(default_factory=list)  # the served captions they correct (for messages)


def group_by_photo(corrections: list[Correction]) -> list[CorrectedPhoto]:
    """Corrections -> one entry per distinct photo (by its bytes), in a fixed order."""
    photos: dict[str, CorrectedPhoto] = {}
    for c in corrections:
        sha = hashlib.sha256(c.image).hexdigest()
        photo = photos.setdefault(sha, CorrectedPhoto(f"feedback:{sha[:16]}", c.image, []))
        photo.captions.append(c.caption)
        photo.caption_ids.append(c.caption_id)
    return [photos[k] for k in sorted(photos)]


def split_photos(photos: list[CorrectedPhoto], fraction: float, seed: int
                 ) -> tuple[list[CorrectedPhoto], list[CorrectedPhoto]]:
    """(learn from, check set): a seeded split by photo, at least one photo in each."""
    if len(photos) < 2:
        raise ConfigError(f"the corrections cover {len(photos)} photo(s); finetune needs at least 2 (one to learn "
                          f"from, one to check the result on), and gives a usable check only with a few dozen")
    order = list(photos)
    random.Random(seed).shuffle(order)
    n_check = min(len(order) - 1, max(1, round(fraction * len(order))))
    return order[n_check:], order[:n_check]


def lexicon_proxies() -> dict[str, str]:
    """Each single-word lexicon noun (and its plural) -> its proxy word, as the object namer
    grows its vocab (`ObjectNamer`)."""
    out: dict[str, str] = {}
    for entry in lexicon_words().values():
        if entry.proxy is None:
            continue
        for tok in {*entry.tokens, *tokenize(entry.plural or "")}:
            out.setdefault(tok, entry.proxy)
    return out


def new_words(captions: list[str], known: set[str], min_count: int) -> tuple[dict[str, int], dict[str, int]]:
    """Words of `captions` outside `known`: (those used at least `min_count` times, the rarer
    ones), each with its count, most frequent first."""
    counts = Counter(w for c in captions for w in tokenize(c) if w not in known and w not in SPECIALS
                     and len(w) <= MAX_TOKEN_CHARS)
    ordered = sorted(counts, key=lambda w: (-counts[w], w))
    return ({w: counts[w] for w in ordered if counts[w] >= min_count},
            {w: counts[w] for w in ordered if counts[w] < min_count})


def grow_from_corrections(model: CaptionModel, words: list[str]) -> dict[str, str]:
    """Add `words` to the model's vocab; returns word -> the word its rows were copied from.

    A word of the ImageNet lexicon starts from its proxy (zebra from horse, as the object namer
    does); any other from <unk>, the row the model learnt for "a word outside my vocab". Each
    new word's output bias is lowered by log(k + 1), k the new words sharing its proxy, so the
    new words start less likely than their proxy and the base's captions barely move until
    training teaches them."""
    known = set(model.vocab.tokens)
    lexicon = lexicon_proxies()
    proxies = {w: lexicon[w] if lexicon.get(w) in known else FALLBACK_PROXY for w in words}
    ids = grow_vocab(model, proxies)
    if not ids:
        return {}
    share = Counter(proxies.values())
    offset = torch.tensor([math.log(share[proxies[w]] + 1) for w in words])
    with torch.no_grad():
        for rows in vocab_rows(model):
            if rows.dim() == 1:  # an output bias
                rows[ids] -= offset
    return proxies


@contextlib.contextmanager
def only_new_rows(model: CaptionModel, first_new: int):
    """Train only the new words' rows (ids >= `first_new`): their input embeddings and output
    weights and biases. Every other weight stays as the base has it, since cross-entropy undoes
    what self-critical training gained (batch-norm statistics never train: `TunedTop` stays in
    eval mode)."""
    rows = vocab_rows(model)
    keep = {id(p) for p in rows}
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def old_rows_held(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:first_new] = 0
        return grad

    hooks = [p.register_hook(old_rows_held) for p in rows]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def encode_photos(model: CaptionModel, photos: list[CorrectedPhoto], batch: int = 8
                  ) -> tuple[np.ndarray, list[CorrectedPhoto]]:
    """The corrected photos' region features (fp16, as the cache holds them), from the same
    frozen encoder and preprocessing as the feature cache; photos that cannot be read are
    skipped with a warning."""
    encoder = build_encoder(model.encoder_cfg).eval()
    feats, ok, pixels = [], [], []

    def flush() -> None:
        if pixels:
            feats.append(encoder(torch.stack(pixels)).float().numpy().astype(np.float16))
            pixels.clear()

    for photo in photos:
        try:
            pixels.append(preprocess(photo.image, model.encoder_cfg, name=photo.key))
            ok.append(photo)
        except CaptionerError as e:
            log.warning("skipping a stored photo that cannot be read (%d correction(s), of caption(s) %s): %s",
                        len(photo.captions), ", ".join(photo.caption_ids[:3]), e)
        if len(pixels) == batch:
            flush()
    flush()
    return (np.concatenate(feats) if feats else np.zeros((0,), np.float16)), ok


def _captions(model: CaptionModel, table: FeatureCache, records: list[ImageRecord], search: SearchConfig,
              cfg: FinetuneConfig) -> dict[str, str]:
    return decode_records(model, table, records, search, progress=cfg.progress, objects=cfg.objects)


def compare_captions(before: dict[str, str], after: dict[str, str], records: list[ImageRecord],
                     cfg: FinetuneConfig) -> dict:
    """CIDEr-D before and after on `records`, with the paired bootstrap interval of after - before."""
    refs = {r.image: r.captions for r in records}
    a, b = photo_stats([before, after], refs)
    m = next(x for x in paired_bootstrap(a, b, cfg.resamples, cfg.seed, cfg.confidence) if x.metric == "CIDEr")
    return {"photos": len(records), "before": m.a, "after": m.b, "diff": m.b - m.a,
            "diff_interval": list(m.diff_interval), "after_better_share": m.b_better}


def gate_split(ckpt: dict, asked: str = "auto") -> tuple[str, str]:
    """(the split the gate scores, why): the base's dev split, unless the base was refit on
    train + dev (`train_on_dev`, as the shipped model is): dev is then part of what it learnt
    (the shipped model scores 1.13 CIDEr-D there, 0.66 on test) and cannot show harm, so the
    gate scores test, the one split the base never saw."""
    refit = bool(ckpt.get("train_config", {}).get("train_on_dev", False))
    if asked != "auto":
        return asked, "asked for" + (" (the base was trained on dev too)" if refit and asked == "dev" else "")
    if refit:
        return "test", "the base was refit on train + dev, so test is the split it never saw"
    return "dev", "the base's dev split"


def describes_photos(captions: dict[str, str], records: list[ImageRecord], cfg: FinetuneConfig,
                     shifts: int = 3) -> dict:
    """Do the corrections describe their photos? The base's caption of each corrected photo is
    scored (CIDEr-D) against the photo's own corrections and against other photos' ones (the
    captions shifted by 1..`shifts` places, a fixed pairing); corrections that describe their
    photos match the base's caption of the same photo better, beyond noise (paired bootstrap
    over photos). Corrections shuffled across photos do not."""
    refs = {r.image: r.captions for r in records}
    keys = sorted(refs)
    n = len(keys)
    shifted = [{k: captions[keys[(i + s) % n]] for i, k in enumerate(keys)} for s in range(1, min(shifts, n - 1) + 1)]
    stats = photo_stats([{k: captions[k] for k in keys}, *shifted], refs)
    own, others = stats[0].cider, np.mean([st.cider for st in stats[1:]], axis=0)
    diff = own - others  # (n,)
    draws = np.random.default_rng(cfg.seed).integers(0, n, size=(cfg.resamples, n))
    tail = 100 * (1 - cfg.confidence) / 2
    low, high = np.percentile(diff[draws].mean(1), [tail, 100 - tail])
    return {"photos": n, "own": float(own.mean()), "others": float(others.mean()), "diff": float(diff.mean()),
            "diff_interval": [float(low), float(high)]}


def gate_verdict(gate: dict, split: str, dataset: str, confidence: float) -> str | None:
    """The refusal message where the candidate is worse on the gate's split beyond noise (the
    interval of the difference entirely below 0), else None."""
    lo, hi = gate["diff_interval"]
    if hi >= 0:
        return None
    return (f"refused: the finetuned model is worse on {dataset} {split} beyond noise (CIDEr-D {gate['before']:.3f} "
            f"-> {gate['after']:.3f}, {round(100 * confidence)}% interval of the difference [{lo:+.3f}, {hi:+.3f}] "
            f"over {gate['photos']} photos)")


def _fp16(ckpt: dict) -> bool:
    return any(v.dtype == torch.float16 for v in ckpt["decoder_state"].values() if v.is_floating_point())


def finetune(cfg: FinetuneConfig) -> dict:
    """Learn from the store's corrections; write `cfg.out` unless the dev check refuses it.
    Returns the report; raises `FinetuneRefused` (carrying it) where the model got worse."""
    cfg.check()
    started = time.time()
    base_path = resolve_checkpoint(cfg.checkpoint)
    if Path(cfg.out).resolve() == base_path.resolve():
        raise ConfigError(f"--out {cfg.out} would overwrite the base checkpoint; choose a new file")
    store = FeedbackStore(cfg.db, create=False)
    try:
        corrections = store.corrections()
    finally:
        store.close()
    if not corrections:
        raise ConfigError(f"{store.name}: no corrected captions to learn from yet")
    model, ckpt = load_checkpoint(base_path)  # float32 weights, trained as such
    photos = group_by_photo(corrections)
    stored = len(photos)
    feats, photos = encode_photos(model, photos)
    learn, check = split_photos(photos, cfg.check_fraction, cfg.seed)
    if len(check) < 5:
        log.warning("the check set has %d photo(s): its scores say little; more corrections give a better check",
                    len(check))

    dataset = load_dataset(cfg.data, cfg.data_format, DataOptions(layout=cfg.layout, seed=cfg.seed,
                                                                  image_root=cfg.image_root))
    gate, gate_why = gate_split(ckpt, cfg.gate_split)
    train_recs, dev_recs = dataset.split("train"), dataset.split(gate)
    if cfg.dev_images:
        dev_recs = dev_recs[:cfg.dev_images]
    if not train_recs or not dev_recs:
        raise ConfigError(f"{cfg.data}: the base's dataset needs train and {gate} photos (found {len(train_recs)} "
                          f"and {len(dev_recs)})")
    rng = random.Random(cfg.seed)
    replay = rng.sample(train_recs, min(len(train_recs), math.ceil(cfg.replay_ratio * len(learn))))
    scst_replay = replay[:min(len(replay), math.ceil(cfg.scst_replay_ratio * len(learn)))]
    # features only for the photos used: the cache encodes those it lacks and keeps the rest
    cache = build_cache(dataset.image_dir, [r.image for r in replay + dev_recs], model.encoder_cfg,
                        Path(cfg.cache_dir).expanduser(), tag=dataset.name, progress=cfg.progress)
    names = [r.image for r in replay + dev_recs] + [p.key for p in photos]
    table = FeatureCache(cache.path, names, np.concatenate(
        [np.asarray(cache.features[cache.rows([r.image for r in replay + dev_recs])]), feats]))
    learn_recs = [ImageRecord(p.key, p.captions) for p in learn]
    check_recs = [ImageRecord(p.key, p.captions) for p in check]

    search = SearchConfig(beam_size=cfg.beam_size, max_len=cfg.max_len, length_penalty=model.length_penalty,
                          no_repeat_ngram=model.no_repeat_ngram)
    log.info("scoring the base on %d check and %d %s photos (%s)", len(check_recs), len(dev_recs), gate, gate_why)
    before_all = _captions(model, table, learn_recs + check_recs, search, cfg)
    before_check = {r.image: before_all[r.image] for r in check_recs}
    relevance = describes_photos(before_all, learn_recs + check_recs, cfg)
    report: dict = {"base": str(cfg.checkpoint), "out": str(cfg.out), "store": store.name,
                    "corrections": sum(len(p.captions) for p in photos), "photos": len(photos),
                    "unreadable_photos": stored - len(photos),
                    "learn_photos": len(learn), "check_photos": len(check), "relevance": relevance,
                    "confidence": cfg.confidence, "dataset": dataset.name, "gate_split": gate, "gate_why": gate_why,
                    "objects": cfg.objects}
    if relevance["diff_interval"][0] <= 0 and not cfg.force:
        lo, hi = relevance["diff_interval"]
        report.update(refused=True, seconds=round(time.time() - started, 1))
        raise FinetuneRefused(
            f"refused: the corrections do not look like descriptions of their photos: the base's captions match a "
            f"photo's own corrections no better than other photos' (CIDEr-D {relevance['own']:.3f} vs "
            f"{relevance['others']:.3f}, {round(100 * cfg.confidence)}% interval of the difference [{lo:+.3f}, "
            f"{hi:+.3f}] over {relevance['photos']} photos); nothing trained or written (--force trains anyway)",
            report)
    before_dev = _captions(model, table, dev_recs, search, cfg)

    known = set(model.vocab.tokens)
    grow, rare = new_words([c for p in learn for c in p.captions], known, cfg.min_word_count)
    proxies = grow_from_corrections(model, list(grow))
    if proxies:
        log.info("vocab %d -> %d words: %s", len(known), len(model.vocab), ", ".join(list(proxies)[:20]))

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tcfg = TrainConfig(data=cfg.data, cache_dir=cfg.cache_dir, seed=cfg.seed, lr=cfg.lr, batch_size=cfg.batch_size,
                       max_caption_len=cfg.max_caption_len, warmup_steps=1, final_lr_ratio=0.1,
                       progress=cfg.progress, epochs=cfg.epochs, scst_lr=cfg.scst_lr, scst_epochs=cfg.scst_epochs)
    losses, rewards = [], []
    if cfg.epochs and proxies:  # no new words: nothing for cross-entropy to teach
        optimizer = adam(param_groups(model, tcfg), cfg.lr, tcfg)
        data = TrainingSet(replay + learn_recs * cfg.correction_repeats, table, model.vocab, cfg.max_caption_len)
        per_batch = images_per_batch(tcfg, data)
        total, step = math.ceil(len(data) / per_batch) * cfg.epochs, 0
        with only_new_rows(model, len(known)):
            for epoch in range(1, cfg.epochs + 1):
                batches = length_bucketed_batches(data.lengths, per_batch, gen)
                loss, step = train_epoch(model, optimizer, data, batches, step, total, tcfg,
                                         f"finetune {epoch}/{cfg.epochs}")
                losses.append(loss)
                log.info("cross-entropy on the new words' rows %d/%d: loss %.3f", epoch, cfg.epochs, loss)
    if cfg.scst_epochs:
        sc_recs = learn_recs + scst_replay
        data = TrainingSet(sc_recs, table, model.vocab, cfg.max_caption_len)
        cider = reward_scorer([r.captions for r in sc_recs])
        optimizer = adam(param_groups(model, tcfg), cfg.scst_lr, tcfg)
        per_step = max(1, tcfg.scst_batch_size // tcfg.scst_samples)
        for epoch in range(1, cfg.scst_epochs + 1):
            order = torch.randperm(len(data), generator=gen).tolist()
            batches = [order[i:i + per_step] for i in range(0, len(order), per_step)]
            reward, _ = scst_epoch(model, optimizer, data, batches, cider, tcfg, autocast(tcfg),
                                   f"scst {epoch}/{cfg.scst_epochs}")
            rewards.append(reward)
            log.info("self-critical %d/%d: reward %.3f", epoch, cfg.scst_epochs, reward)
    model.eval()
    # recognise as the candidate will be served: a recognition head made for the base's top no
    # longer fits the trained top and is not written with the candidate, so the stock classifier
    # (training already dropped the namer built from the base's weights: CaptionModel.train)
    model.attach_recognition_head(None)
    after_check = _captions(model, table, check_recs, search, cfg)
    after_dev = _captions(model, table, dev_recs, search, cfg)

    report.update({
        "replayed_photos": len(replay),
        "scst_replayed_photos": len(scst_replay) if cfg.scst_epochs else 0,
        "vocab": {"before": len(known), "after": len(model.vocab), "new_words": proxies,
                  "below_min_count": dict(list(rare.items())[:50]), "min_word_count": cfg.min_word_count},
        "train_loss": losses, "scst_reward": rewards,
        "check": compare_captions(before_check, after_check, check_recs, cfg),
        "gate": compare_captions(before_dev, after_dev, dev_recs, cfg),
    })
    verdict = gate_verdict(report["gate"], gate, dataset.name, cfg.confidence)
    report["refused"] = verdict is not None and not cfg.force
    report["seconds"] = round(time.time() - started, 1)
    if report["refused"]:
        raise FinetuneRefused(f"{verdict}; nothing written to {cfg.out} (--force writes it anyway)", report)
    provenance = {"base": str(cfg.checkpoint), "base_metrics": ckpt.get("metrics", {}),
                  "config": {**asdict(cfg), "db": store.name},  # never a database password
                  "corrections": report["corrections"], "new_words": proxies}
    half = _fp16(ckpt) or cfg.half
    save_checkpoint(cfg.out, model, metrics={"finetune": {"check": report["check"], "gate": report["gate"]}},
                    extra={"finetune": provenance}, half=half)
    report["written"], report["half"] = True, half
    return report
