"""The `Captioner` facade: the one object the CLI, server and web app use."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from captioner.models.checkpoint import (LENGTH_PENALTY, MAX_NO_REPEAT_NGRAM, default_model_path,  # noqa: F401
                                         load_checkpoint, resolve_checkpoint)
from captioner.models.decoders import fuse_for_inference
from captioner.models.encoders import Encoder, build_encoder, frozen_encoder, preprocess
from captioner.distributed import resolve_device
from captioner.errors import OptionError
from captioner.data.images import ImageInput, ImageLimits
from captioner.models.model import CaptionModel
from captioner.models.recognition import RecognizedObject
from captioner.inference.precision import apply_precision, resolve_precision

# Bounds on what any caller may ask of a search: decoding cost grows with both.
MAX_BEAM_SIZE = 64
MAX_DECODE_LEN = 200  # words


@dataclass
class Caption:
    """One image's caption, with what a user needs to trust or show it."""

    text: str
    score: float  # length-normalised log-probability of the caption (higher is better)
    words: list[str]
    attention: np.ndarray | None = None  # (len(words), grid, grid) weights; each map sums to 1
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # next-best (text, score)
    # what the encoder's ImageNet classifier recognises, named through the lexicon, best first
    # (empty with objects off)
    objects: list[RecognizedObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"caption": self.text, "score": self.score,
                "alternatives": [{"caption": t, "score": s} for t, s in self.alternatives],
                "objects": [o.to_dict() for o in self.objects]}


class Captioner:
    """Photo in, caption out. `Captioner.load()` gives the shipped default model."""

    def __init__(self, model: CaptionModel, info: dict | None = None, device: str = "cpu",
                 limits: ImageLimits | None = None, precision: str | None = "fp32", lean: bool = True,
                 objects: bool = True):
        """`objects`: name recognised objects in captions and list them (`Caption.objects`) unless
        a call says otherwise. `precision`: "fp32", "bf16" or "int8" (the decoder's matrix products on bfloat16 or
        per-channel int8 weights, see `captioner.inference.precision`), or None/"auto": fp32 for
        a model that asks for it (`model.precision`, as exported), else bf16 where the CPU does
        bf16 natively and int8 on other CPUs. `lean`: search on fused decoder weights and a
        traced, frozen encoder and object recognizer (same captions, fewer and larger kernels;
        `fuse_for_inference`, `encoders.freeze`); False runs the modules as trained. The model is changed in place:
        its weights stay as they are, the fused copies are held apart and dropped if trained."""
        device = resolve_device(device)
        self.model = model.eval().to(device)
        self.info = info or {}
        self.device = torch.device(device)
        self.limits = limits or ImageLimits()  # which photos it opens: pixel cap, formats
        self.precision = resolve_precision(precision, model.precision, self.device)
        self.lean = lean
        # the object namer's grown-vocab copy is made from the trained weights, before they are
        # fused or converted (an int8 layer has no rows to grow), then converted the same way
        namer = self.model.object_namer()
        for decoder in (self.model.decoder, namer.model.decoder):
            if lean:
                fuse_for_inference(decoder)  # before the precision: the fused weights convert too
            apply_precision(decoder, self.precision)
        if lean:
            namer.recognizer.freeze()
        self._encoder: Encoder | torch.jit.ScriptModule | None = None
        self._encoder_lock = threading.Lock()  # a server's model workers may ask for it at once
        self.objects = objects

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu",
             limits: ImageLimits | None = None, precision: str | None = "auto", lean: bool = True,
             objects: bool = True) -> "Captioner":
        """A saved model: a checkpoint file, or None / "default" for the shipped model."""
        if path is not None and not isinstance(path, (str, Path)):
            raise OptionError(f"expected a checkpoint path or \"default\", not {type(path).__name__}")
        if path is not None and not str(path):
            raise OptionError("the checkpoint path is empty: give a file, or \"default\" for the shipped model")
        path = resolve_checkpoint(path)
        model, ckpt = load_checkpoint(path)
        info = {"path": str(path), "name": ckpt["model"]["name"], "metrics": ckpt.get("metrics", {})}
        return cls(model, info, device, limits, precision, lean, objects)

    @property
    def encoder(self) -> Encoder | torch.jit.ScriptModule:
        """The frozen encoder (traced and frozen when `lean`), built on first use: loading a
        checkpoint stays cheap."""
        with self._encoder_lock:
            if self._encoder is None:
                encoder = build_encoder(self.model.encoder_cfg).to(self.device)
                self._encoder = frozen_encoder(encoder) if self.lean else encoder
            return self._encoder

    @property
    def name(self) -> str:
        return self.info.get("name", self.model.cfg.name)

    @property
    def max_len(self) -> int:
        """The most words a caption may be asked to have (the decoder's positions may bound it)."""
        return min(MAX_DECODE_LEN, getattr(self.model.decoder, "max_words", MAX_DECODE_LEN))

    def check_search(self, beam_size: int = 3, max_len: int = 25, n_best: int = 1,
                     temperature: float | None = None, top_p: float | None = None, *,
                     length_penalty: float | None = None, no_repeat_ngram: int | None = None,
                     seed: int | None = None) -> None:
        """Raise `OptionError` naming the first search option of the wrong type or outside its
        range (the ranges a checkpoint's own search settings are held to). A `top_p` other than
        1 (or None) without a `temperature` is refused, not ignored: nucleus sampling applies to
        sampling only, and beam search would silently drop it; so is a `seed`."""
        def bad(option: str, value, allowed: str) -> OptionError:
            return OptionError(f"{option} {value!r} is out of range: {allowed}")

        def whole(option: str, value, low: int, high: int, allowed: str) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise bad(option, value, allowed)

        def number(option: str, value, low: float, high: float, allowed: str) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high:
                raise bad(option, value, allowed)

        whole("beam_size", beam_size, 1, MAX_BEAM_SIZE, f"a whole number 1 to {MAX_BEAM_SIZE}")
        whole("max_len", max_len, 1, self.max_len, f"a whole number 1 to {self.max_len} words for this model")
        most = beam_size if temperature is None else MAX_BEAM_SIZE
        whole("n_best", n_best, 1, most, f"1 to the beam size ({beam_size})" if temperature is None
              else f"1 to {MAX_BEAM_SIZE}")
        if length_penalty is not None:
            number("length_penalty", length_penalty, *LENGTH_PENALTY,
                   f"a finite number {LENGTH_PENALTY[0]:g} to {LENGTH_PENALTY[1]:g}")
        if no_repeat_ngram is not None:
            whole("no_repeat_ngram", no_repeat_ngram, 0, MAX_NO_REPEAT_NGRAM, f"0 (off) to {MAX_NO_REPEAT_NGRAM}")
        if temperature is not None:
            number("temperature", temperature, 0, 100, "a finite number 0 to 100")
        if seed is not None:
            whole("seed", seed, 0, 2 ** 63 - 1, "a whole number 0 to 2**63 - 1")
            if temperature is None:
                raise OptionError("seed applies to sampling only: give a temperature too, or leave the seed out")
        if top_p is None:
            return
        number("top_p", top_p, 0, 1, "above 0, at most 1")
        if top_p == 0:
            raise bad("top_p", top_p, "above 0, at most 1")
        if temperature is None and top_p != 1:
            raise bad("top_p", top_p, "it applies to sampling only: give a temperature too (1.0 samples "
                                      "from the model's own distribution), or leave top_p out for beam search")

    def preprocess(self, image: ImageInput, name: str | None = None) -> torch.Tensor:
        """One photo -> this model's encoder input (3, S, S), exactly as in training; raises
        `ImageError` (naming the photo, or `name`) for anything it cannot open within
        `self.limits`. A server can run this in its request threads and batch only `encode_pixels`."""
        return preprocess(image, self.model.encoder_cfg, self.limits, name)

    @torch.no_grad()
    def encode_pixels(self, batch: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Preprocessed photos (B, 3, S, S) -> region features (B, N, C); `chunk` > 0 runs the
        encoder on that many photos at a time (large batches spill the CPU cache)."""
        batch = batch.to(self.device)
        parts = [batch] if chunk <= 0 or batch.size(0) <= chunk else batch.split(chunk)
        feats = [self.encoder(part) for part in parts]
        return (feats[0] if len(feats) == 1 else torch.cat(feats)).float()  # (B, N, C)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Photos -> region features (B, N, C), preprocessed exactly as in training."""
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    @torch.no_grad()
    def caption_features(self, feats: torch.Tensor, beam_size: int = 3, max_len: int = 25,
                         n_best: int = 1, length_penalty: float | None = None,
                         no_repeat_ngram: int | None = None, temperature: float | None = None,
                         top_p: float | None = None, seed: int | None = None, objects: bool | None = None) -> list[Caption]:
        """Region features -> captions. Beam search by default; with a `temperature` the
        captions are sampled instead (n_best of them per image, best first; top_p for
        nucleus sampling, seed for repeatable draws). `objects` (default: `self.objects`): list
        the recognised objects and, in beam search, put a confident one into the caption."""
        self.check_search(beam_size, max_len, n_best, temperature, top_p, length_penalty=length_penalty,
                          no_repeat_ngram=no_repeat_ngram, seed=seed)
        objects = self.objects if objects is None else objects
        if temperature is not None:
            caps = self._sampled(feats, max_len, max(n_best, 1), temperature, 1.0 if top_p is None else top_p,
                                 seed)
            if objects:
                for cap, found in zip(caps, self.model.object_namer().recognize(feats)):
                    cap.objects = found
            return caps
        search = self.model.search_config(beam_size, max_len, n_best, length_penalty, no_repeat_ngram)
        if objects:
            namer = self.model.object_namer()
            named = namer.generate(feats, search)
            hyps = named.hyps
        else:
            named, hyps = None, self.model.generate(feats, search)
        out = []
        for b in range(feats.size(0)):
            rows = [(hyps.tokens[b, k], float(hyps.scores[b, k]), hyps.alphas[b, k]) for k in range(hyps.tokens.size(1))]
            if named is None:
                out.append(self._caption(rows))
            else:
                fix = lambda ids, e=named.constraint[b]: namer.words_of(ids, e)  # noqa: E731
                cap = self._caption(rows, fix)
                cap.objects = named.objects[b]
                out.append(cap)
        return out

    def _sampled(self, feats: torch.Tensor, max_len: int, n: int, temperature: float, top_p: float,
                 seed: int | None) -> list[Caption]:
        gen = torch.Generator(device=feats.device).manual_seed(seed) if seed is not None else None
        drawn = self.model.sample(feats, n=n, temperature=temperature, top_p=top_p, max_len=max_len, generator=gen)
        lengths = (drawn.tokens != self.model.vocab.pad_id).sum(1).clamp(min=1)  # words + EOS
        scores = (drawn.logprobs / lengths).tolist()  # length-normalised, as beam search ranks
        out = []
        for b in range(feats.size(0)):
            rows = [(drawn.tokens[r], scores[r], drawn.alphas[r]) for r in range(b * n, (b + 1) * n)]
            out.append(self._caption(sorted(rows, key=lambda row: -row[1])))
        return out

    def _caption(self, rows: list[tuple[torch.Tensor, float, torch.Tensor]], words_of=None) -> Caption:
        """(tokens, score, alphas) of one image's hypotheses, best first -> Caption; `words_of`
        turns ids into words where the plain vocab's decoding will not do (grown vocab, grammar)."""
        grid = self.model.encoder_cfg.grid_size
        if words_of is None:
            texts = [self.model.vocab.decode(tokens.tolist()) for tokens, _, _ in rows]
        else:
            texts = [" ".join(words_of(tokens.tolist())) for tokens, _, _ in rows]
        words = texts[0].split()
        n_ids = int(((rows[0][0] != self.model.vocab.eos_id) & (rows[0][0] != self.model.vocab.pad_id)).sum())
        # grammar may drop or add a word ("a broccoli" -> "broccoli"): attention keeps one map per
        # emitted token, cut or padded by repeating the last to the words shown
        maps = rows[0][2][:max(n_ids, 1)]
        if maps.size(0) < len(words):
            maps = torch.cat([maps, maps[-1:].expand(len(words) - maps.size(0), -1)])
        attention = maps[:len(words)].float().reshape(len(words), grid, grid).cpu().numpy()
        return Caption(texts[0], rows[0][1], words, attention,
                       [(t, score) for t, (_, score, _) in zip(texts[1:], rows[1:])])

    def caption_batch(self, images: Sequence[ImageInput], **search) -> list[Caption]:
        """Caption several photos in one encoder call and one batched beam search."""
        if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
            raise OptionError("caption_batch takes a list of photos; for one photo call caption()")
        if not images:
            return []
        return self.caption_features(self.encode(images), **search)

    def caption(self, image: ImageInput, **search) -> Caption:
        """Caption one photo (path, bytes or PIL image). Options: beam_size, max_len, n_best,
        length_penalty and no_repeat_ngram (default: the values the model was tuned with); or
        temperature, top_p and seed to sample instead of searching; objects=True/False to name
        recognised objects or not (default: the constructor's `objects`)."""
        return self.caption_batch([image], **search)[0]
