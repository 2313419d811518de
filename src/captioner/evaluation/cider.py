"""CIDEr-D as a reward: the toolkit's formula with document frequencies fixed on a corpus.

`pycocoevalcap`'s Cider recomputes document frequencies from whatever references it is handed,
so scoring one sampled caption at a time would be meaningless and slow. Self-critical training
needs thousands of scores per step against the same training references, so this scorer
counts the reference n-grams once (Vedantam et al., 2015; CIDEr-D: clipped counts, Gaussian
length penalty with sigma 6, times 10) and then scores a caption in microseconds. With the
document frequencies taken from the scored references themselves it gives the toolkit's
number exactly (a test checks it).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Mapping, Sequence

NGram = tuple[str, ...]
Vector = list[dict[NGram, float]]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D of candidate captions against fixed references, n-grams up to `n`."""

    def __init__(self, references: Mapping[Hashable, Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        """`references`: {key: [tokenised reference, ...]}; document frequencies come from them."""
        self.n, self.sigma = n, sigma
        df: Counter = Counter()
        ref_counts = {}
        for key, refs in references.items():
            counts = [_ngrams(r, n) for r in refs]
            ref_counts[key] = counts
            df.update(set(g for c in counts for g in c))
        self._log_docs = math.log(float(len(references)))
        self._df = df
        self._refs = {key: [self._vector(c) for c in counts] for key, counts in ref_counts.items()}

    def _vector(self, counts: Counter) -> tuple[Vector, list[float], int]:
        vec: Vector = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (self._log_docs - math.log(max(1.0, self._df.get(gram, 0.0))))
            vec[k][gram] = w
            norm[k] += w * w
            if k == 0:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, key: Hashable, words: Sequence[str]) -> float:
        """CIDEr-D (toolkit scale, about 0-10) of one tokenised caption against `key`'s references."""
        vec, norm, length = self._vector(_ngrams(words, self.n))
        refs = self._refs[key]
        total = [0.0] * self.n
        for rvec, rnorm, rlength in refs:
            penalty = math.exp(-((length - rlength) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                ref_k = rvec[k]
                val = sum(min(w, ref_k[g]) * ref_k[g] for g, w in vec[k].items() if g in ref_k)
                if norm[k] != 0 and rnorm[k] != 0:
                    val /= norm[k] * rnorm[k]
                total[k] += val * penalty
        return sum(total) / self.n / len(refs) * 10.0

    def scores(self, keys: Sequence[Hashable], captions: Sequence[Sequence[str]]) -> list[float]:
        return [self.score(k, c) for k, c in zip(keys, captions)]


def corpus_cider(predictions: Mapping[Hashable, Sequence[str]],
                 references: Mapping[Hashable, Sequence[Sequence[str]]]) -> float:
    """Mean CIDEr-D of tokenised predictions, document frequencies from these references."""
    scorer = CiderD(references)
    return sum(scorer.score(k, predictions[k]) for k in references) / max(len(references), 1)

