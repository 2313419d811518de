"""The ImageNet-1k lexicon: the word a caption would use for each of the encoder's 1,000 classes.

Data in the package (`imagenet_lexicon.json`, reviewed by hand): per class index its ImageNet
label, the caption word or phrase (None where a class cannot be named well), its plural, its
indefinite article ("" for mass and plural-only nouns), a coarse category, and a proxy: a
Flickr8k training word whose embedding a new word starts from (Hendricks et al., 2016).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from captioner.data.vocab import tokenize

N_CLASSES = 1000


@dataclass(frozen=True)
class LexiconEntry:
    index: int  # ImageNet-1k class index, the classifier's output order
    imagenet: str  # the class's short ImageNet label
    word: str | None  # the caption word or phrase; None = never named
    plural: str | None
    article: str  # "a", "an", or "" (mass / plural-only noun)
    category: str  # coarse category, e.g. "cat", "food", "vehicle"
    proxy: str | None  # an in-vocabulary word a new word's weights are copied from

    @property
    def tokens(self) -> list[str]:
        """The word as the caption vocabulary tokenises it."""
        return tokenize(self.word or "")


@lru_cache(maxsize=1)
def load_lexicon() -> tuple[LexiconEntry, ...]:
    """The 1,000 entries, in class-index order."""
    text = (resources.files("captioner.models") / "imagenet_lexicon.json").read_text()
    data = json.loads(text)
    entries = tuple(LexiconEntry(**e) for e in data["classes"])
    if len(entries) != N_CLASSES or any(e.index != i for i, e in enumerate(entries)):
        raise ValueError("imagenet_lexicon.json: expected 1000 entries in class-index order")
    return entries


def lexicon_words() -> dict[str, LexiconEntry]:
    """Each distinct caption word -> its first entry (article, plural, proxy agree across entries)."""
    out: dict[str, LexiconEntry] = {}
    for e in load_lexicon():
        if e.word is not None:
            out.setdefault(e.word, e)
    return out
