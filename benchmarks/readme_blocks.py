"""The README's generated blocks: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`
is written by a benchmark script from its results file, never by hand."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_block(name: str, readme: Path = README) -> str:
    """The block's current text, without its markers."""
    start, end = markers(name)
    text = readme.read_text()
    return text[text.index(start) + len(start):text.index(end)]


def replace_block(name: str, block: str, readme: Path = README) -> None:
    """Rewrite the block `name` with `block` (the markers stay, each on its own line)."""
    start, end = markers(name)
    text = readme.read_text()
    if start not in text or end not in text[text.find(start):]:
        raise SystemExit(f"{readme}: no {start} ... {end} block to rewrite")
    i, j = text.index(start) + len(start), text.index(end, text.index(start))
    readme.write_text(text[:i] + "\n" + block.rstrip("\n") + "\n" + text[j:])
