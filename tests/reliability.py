"""Counts the reliability suite keeps while it runs (inputs tried, faults injected, requests
sent, failures seen), printed at the end of the session by conftest's summary hook."""
from __future__ import annotations

from collections import Counter

COUNTS: Counter = Counter()
LABELS = {"inputs": "inputs tried", "faults": "faults injected", "requests": "requests sent",
          "failures": "failures"}


def count(kind: str, n: int = 1) -> None:
    """Add `n` to a counter: inputs, faults, requests or failures."""
    if kind not in LABELS:
        raise KeyError(f"unknown reliability counter {kind!r}; known: {', '.join(LABELS)}")
    COUNTS[kind] += n
