"""Tokenizer and vocabulary; the vocabulary owns the special tokens."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
MIRRORED_WORDS = {"left": "right", "right": "left"}  # what a photo's mirror image swaps in its captions

# Lower-case words and numbers; punctuation is dropped, as the evaluation toolkit's
# PTB tokenizer does, so training targets and scored captions agree.
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case word tokens, without punctuation."""
    return _WORD.findall(text.lower())


@dataclass
class Vocab:
    """Word <-> id mapping. Ids 0..3 are PAD, BOS, EOS, UNK."""

    tokens: list[str]

    def __post_init__(self) -> None:
        if list(self.tokens[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a vocab must start with the special tokens {SPECIALS}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocab must not repeat a token")
        self._index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocab":
        """Keep words seen at least `min_count` times, most frequent first."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + [w for w in words if w not in SPECIALS])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self._index[PAD]

    @property
    def bos_id(self) -> int:
        return self._index[BOS]

    @property
    def eos_id(self) -> int:
        return self._index[EOS]

    @property
    def unk_id(self) -> int:
        return self._index[UNK]

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Caption -> [BOS, w1..wn, EOS], words cut to `max_len`."""
        words = tokenize(text)
        if max_len is not None:
            words = words[:max_len]
        return [self.bos_id] + [self._index.get(w, self.unk_id) for w in words] + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, stopping at EOS and dropping special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.tokens[i])
        return " ".join(words)

    def mirrored_ids(self) -> list[int]:
        """Each word's id as a caption of the photo's mirror image says it ("left" for "right");
        a word without a mirrored counterpart in the vocab stays itself."""
        return [self._index.get(MIRRORED_WORDS.get(t, t), i) for i, t in enumerate(self.tokens)]

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(list(d["tokens"]))
