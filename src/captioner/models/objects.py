"""Novel-object captioning: the encoder's own ImageNet recognition, named through the lexicon,
put into the caption by constrained beam search (Anderson et al., 2017), with words outside the
training vocabulary given their proxy word's weights (Hendricks et al., 2016).

`ObjectNamer(model)` wraps a trained `CaptionModel` without changing it: it holds a copy whose
vocab is grown with the lexicon's words, and the recognizer. With objects off the original model
decodes exactly as before.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from captioner.data.vocab import Vocab
from captioner.inference.decode import Hypotheses, SearchConfig, beam_search, constrained_beam_search
from captioner.models.decoders import WithTunedTop
from captioner.models.lexicon import LexiconEntry, lexicon_words
from captioner.models.recognition import RecognizedObject, Recognizer, name_objects

# Recognised words whose score reaches this are put into the caption (tuned on Flickr8k dev and
# the COCO dev photos: benchmarks/objects.py, docs/objects.md).
DEFAULT_THRESHOLD = 0.4
# Categories that are listed among a photo's objects but never put into its caption: what people
# wear, play with or stand in (a jersey, a ski, a seashore) is rarely a caption's subject, and
# forcing it in lost CIDEr on both dev sets (benchmarks/objects_rules.py, docs/experiments.md).
NOT_INSERTED = frozenset({"clothing", "sports", "landscape"})
COUNT_WORDS = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many",
               "some", "few", "multiple", "lots", "group", "pair", "couple", "bunch"}


def grow_vocab(model: nn.Module, proxies: Mapping[str, str]) -> list[int]:
    """Add words to a `CaptionModel`'s vocab in place; each new word's input embedding and output
    row (weights and bias) start as a copy of its proxy word's (the transfer of Hendricks et al.,
    2016). `proxies`: new word -> an in-vocab word. Words already in the vocab are skipped.
    Works for every decoder of the zoo: it grows each word embedding and output layer the
    decoder holds (ensemble members and tuned tops included). Returns the new words' ids."""
    vocab: Vocab = model.vocab
    index = {t: i for i, t in enumerate(vocab.tokens)}
    new = [w for w in dict.fromkeys(proxies) if w not in index]
    for w in new:
        if proxies[w] not in index:
            raise ValueError(f"proxy {proxies[w]!r} of {w!r} is not in the vocab")
    if not new:
        return []
    V0 = len(vocab)
    for module in model.decoder.modules():
        out = getattr(module, "out", None)
        if out is not None and getattr(out, "out_features", None) == V0 and not isinstance(out.weight, torch.Tensor):
            raise ValueError(f"cannot grow the vocab of a decoder converted for inference ({type(out).__name__}): "
                             "grow it first, then convert it (captioner.inference.precision)")
    src = torch.tensor([index[proxies[w]] for w in new])
    for module in model.decoder.modules():
        emb = getattr(module, "embed", None)
        if isinstance(emb, nn.Embedding) and emb.num_embeddings == V0:
            grown = nn.Embedding(V0 + len(new), emb.embedding_dim, padding_idx=emb.padding_idx)
            grown.weight.data = torch.cat([emb.weight.data, emb.weight.data[src]])
            module.embed = grown
        out = getattr(module, "out", None)
        if out is not None and getattr(out, "out_features", None) == V0:
            out.weight = _cat_rows(out.weight, src)
            if out.bias is not None:
                out.bias = _cat_rows(out.bias, src)
            out.out_features = V0 + len(new)
        bias = getattr(module, "out_bias", None)
        if isinstance(bias, nn.Parameter) and bias.numel() == V0:
            module.out_bias = nn.Parameter(torch.cat([bias.data, bias.data[src]]))
        if getattr(module, "_out_bf16", None) is not None:
            module.bf16_inference()  # a tied output layer kept in bfloat16: re-read the grown embedding
    model.vocab = Vocab(list(vocab.tokens) + new)
    return list(range(V0, V0 + len(new)))


def vocab_rows(model: nn.Module) -> list[nn.Parameter]:
    """The decoder's parameters with one row per vocab word, the ones `grow_vocab` grows: word
    embeddings, output weights and biases (every member's, in an ensemble)."""
    V = len(model.vocab)
    rows: list[nn.Parameter] = []
    for module in model.decoder.modules():
        emb = getattr(module, "embed", None)
        if isinstance(emb, nn.Embedding) and emb.num_embeddings == V:
            rows.append(emb.weight)
        out = getattr(module, "out", None)
        if isinstance(out, nn.Linear) and out.out_features == V:
            rows += [out.weight] + ([out.bias] if out.bias is not None else [])
        bias = getattr(module, "out_bias", None)
        if isinstance(bias, nn.Parameter) and bias.numel() == V:
            rows.append(bias)
    return rows


def _cat_rows(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    grown = torch.cat([t.data, t.data[src]])
    return nn.Parameter(grown, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else grown


@dataclass
class NamedCaptions:
    """What the objects search gives per image: best hypotheses, the recognised objects (best
    first), and the word put into the caption (None: no object was confident enough)."""

    hyps: Hypotheses
    objects: list[list[RecognizedObject]]
    constraint: list[LexiconEntry | None] = field(default_factory=list)
    met: list[bool] = field(default_factory=list)


class ObjectNamer:
    """Recognition + grown-vocab copy of a `CaptionModel` + constrained search."""

    def __init__(self, model: nn.Module, threshold: float = DEFAULT_THRESHOLD, mode: str | None = None,
                 top_k: int = 5):
        """`mode`: how to recognise (`recognition.RECOGNITION_MODES`); None: with the model's
        recognition head where it has one (`CaptionModel.recognition_head`), else "stock"."""
        self.threshold = threshold
        self.top_k = top_k
        self.base = model  # the model's own captions come from it: its vocab as trained
        self.model = copy.deepcopy(model).eval()
        self.base_vocab = len(model.vocab)
        words = lexicon_words()
        proxies: dict[str, str] = {}
        for entry in words.values():
            for tok in {*entry.tokens, *_tokens(entry.plural)}:
                proxies.setdefault(tok, entry.proxy)
        # a model whose vocabulary lacks a word's proxy (a small custom one) cannot name that word
        known = set(model.vocab.tokens)
        grow_vocab(self.model, {w: p for w, p in proxies.items() if p in known})
        self.ids = {t: i for i, t in enumerate(self.model.vocab.tokens)}  # the grown vocab's word -> id
        nameable = set(self.ids)
        self.words = {name: e for name, e in words.items() if set(e.tokens) <= nameable}
        head = getattr(model, "recognition_head", None)
        tuned = isinstance(self.model.decoder, WithTunedTop)
        if mode is None:
            mode = "head" if head is not None and tuned else "stock"
        tuned_top = self.model.decoder.top if tuned else None
        self.recognizer = Recognizer(model.encoder_cfg, mode, tuned_top, head)
        device = next(model.parameters()).device
        self.recognizer.to(device)

    def recognize(self, features: torch.Tensor, regions: torch.Tensor | None = None) -> list[list[RecognizedObject]]:
        """Region features (B, N, C) -> per photo its named objects, best first. `regions`: the
        tuned top's output on them, where the caller has it (not run again then)."""
        return name_objects(self.recognizer(features, regions), top_k=self.top_k)

    def constraints(self, objects: list[list[RecognizedObject]]) -> list[LexiconEntry | None]:
        """The word to put into each caption: the best object, where it reaches the threshold
        and its category is one a caption names (not `NOT_INSERTED`)."""
        chosen = []
        for o in objects:
            entry = self.words.get(o[0].name) if o and o[0].score >= self.threshold else None
            chosen.append(entry if entry is not None and entry.category not in NOT_INSERTED else None)
        return chosen

    def phrase(self, entry: LexiconEntry) -> list[list[int]]:
        """The constraint for an entry: at each position of its phrase the word's token, or its
        plural's where that differs and the model was trained on it (a caption names the object
        in either: `names`). A grown plural is left out: grown from the same proxy as its
        singular, the model cannot tell them apart ("a whales")."""
        plural = _tokens(entry.plural)
        same_start = len(plural) == len(entry.tokens) and plural[:-1] == entry.tokens[:-1]
        out = []
        for i, tok in enumerate(entry.tokens):
            alts = [self.ids[tok]]
            if same_start and plural[i] != tok and self.ids.get(plural[i], self.base_vocab) < self.base_vocab:
                alts.append(self.ids[plural[i]])
            out.append(alts)
        return out

    @torch.no_grad()
    def generate(self, features: torch.Tensor, search: SearchConfig) -> NamedCaptions:
        """Per photo, the best caption that names its confident object (the word or its plural;
        where none can, the best caption), or the model's own caption where it has none; all
        in one search. For a phrase of two or more words the model's own caption is searched
        too and kept where it names the object already: the constrained search lets the
        phrase's first word appear only as the phrase's start ("sea" only in "sea lion")."""
        decoder, own_decoder, inputs, regions = self.model.decoder, self.base.decoder, features, None
        if isinstance(decoder, WithTunedTop):
            # the tuned top runs once: its output feeds the search (on the inner decoders, as
            # WithTunedTop's own init_state would run it again) and a recognition head
            regions = decoder.regions(features)
            decoder, own_decoder, inputs = decoder.inner, own_decoder.inner, regions
        objects = self.recognize(features) if regions is None else self.recognize(features, regions=regions)
        chosen = self.constraints(objects)
        vocab = self.model.vocab
        forced_rows = [b for b, e in enumerate(chosen) if e is not None]
        if not forced_rows:
            # the model's own search, on its own vocab: what the grown copy's constrained search
            # gives without a constraint (grown words barred, the rest renormalised), in fewer ops
            own = beam_search(own_decoder, inputs, vocab.bos_id, vocab.eos_id, vocab.pad_id, search,
                              banned_ids=(vocab.bos_id, vocab.unk_id))
            return NamedCaptions(own, objects, chosen, [False] * len(chosen))
        # For a one-word object the model's own caption, where it names the object, is almost
        # always the final bank's best too, so no separate unconstrained rows are searched. A
        # longer phrase gets them (unless its first word is a grown one, which the model never
        # says unasked), as its first word cannot stand alone in the constrained banks.
        index = self.ids
        own_too = [b for b, e in enumerate(chosen)
                   if e is not None and len(e.tokens) > 1 and index[e.tokens[0]] < self.base_vocab]
        rows = list(range(len(chosen))) + own_too  # every photo, then the own rows of long phrases
        phrases = [self.phrase(e) if e is not None else [] for e in chosen] + [[] for _ in own_too]
        hyps, met = constrained_beam_search(decoder, inputs[rows], vocab.bos_id, vocab.eos_id, vocab.pad_id, search,
                                            constraints=phrases, banned_ids=(vocab.bos_id, vocab.unk_id),
                                            base_vocab=self.base_vocab)
        pick, met = list(range(len(chosen))), [bool(m) for m in met[:len(chosen)]]
        for i, b in enumerate(own_too):
            own = len(chosen) + i
            if names(vocab.decode(hyps.tokens[own, 0].tolist()).split(), chosen[b]):
                pick[b], chosen[b] = own, None  # named already, in the model's own words: as it is
        if own_too:
            hyps = _take(hyps, pick)
        return NamedCaptions(hyps, objects, chosen, met)

    def words_of(self, ids: list[int], entry: LexiconEntry | None) -> list[str]:
        """Token ids -> words, with the article and number made right for the inserted word."""
        words = self.model.vocab.decode(ids).split()
        return fix_grammar(words, entry) if entry is not None else words

    def captions(self, features: torch.Tensor, search: SearchConfig) -> list[str]:
        out = self.generate(features, search)
        return [" ".join(self.words_of(row[0].tolist(), e)) for row, e in zip(out.hyps.tokens, out.constraint)]


def names(words: list[str], entry: LexiconEntry) -> bool:
    """Does a caption (its words) already contain the entry's word or its plural?"""
    for phrase in (entry.tokens, _tokens(entry.plural)):
        n = len(phrase)
        if n and any(words[i:i + n] == phrase for i in range(len(words) - n + 1)):
            return True
    return False


def _tokens(text: str | None) -> list[str]:
    from captioner.data.vocab import tokenize

    return tokenize(text or "")


def _take(hyps: Hypotheses, rows: list[int]) -> Hypotheses:
    index = torch.tensor(rows, dtype=torch.long, device=hyps.tokens.device)
    return Hypotheses(hyps.tokens[index], hyps.scores[index], hyps.logprobs[index], hyps.alphas[index])


def fix_grammar(words: list[str], entry: LexiconEntry) -> list[str]:
    """Make the words before an inserted lexicon phrase agree with it: "a espresso" -> "an
    espresso", "a broccoli" -> "broccoli" (mass noun), "two cat" -> "two cats", "a cats" -> "a
    cat"."""
    phrase = entry.tokens
    n = len(phrase)
    out = list(words)
    plural = _tokens(entry.plural)
    if plural and plural != phrase:  # a plural after "a"/"an": the singular (its article is made right below)
        m = len(plural)
        for i in range(1, len(out) - m + 1):
            if out[i:i + m] == plural and out[i - 1] in ("a", "an"):
                out[i:i + m] = phrase
    i = 0
    while i + n <= len(out):
        if out[i:i + n] != phrase:
            i += 1
            continue
        prev = out[i - 1] if i > 0 else None
        counted = prev in COUNT_WORDS or (i > 1 and out[i - 2] in COUNT_WORDS and prev == "of")
        if plural and counted:
            out[i:i + n] = plural
            i += len(plural)
            continue
        if prev in ("a", "an"):
            if entry.article:
                out[i - 1] = entry.article
            else:
                del out[i - 1]
                i -= 1
        i += n
    return out
