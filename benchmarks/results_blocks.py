"""docs/results.md's generated blocks: the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`
is written by a release script from its results file, never by hand."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def missing_block(name: str, readme: Path = README) -> str | None:
    """What keeps the block `name` from being rewritten (the README lacks its markers), or None:
    scripts check it before hours of training, not after."""
    start, end = markers(name)
    text = readme.read_text()
    if start in text and end in text[text.find(start):]:
        return None
    return f"{readme.name} has no {start} ... {end} block to rewrite"


def read_block(name: str, readme: Path = README) -> str:
    """The block's current text, without its markers."""
    start, end = markers(name)
    text = readme.read_text()
    return text[text.index(start) + len(start):text.index(end)]


def replace_block(name: str, block: str, readme: Path = README) -> None:
    """Rewrite the block `name` with `block` (the markers stay, each on its own line)."""
    missing = missing_block(name, readme)
    if missing:
        raise SystemExit(f"{readme.parent}/{missing}")
    start, end = markers(name)
    text = readme.read_text()
    i, j = text.index(start) + len(start), text.index(end, text.index(start))
    readme.write_text(text[:i] + "\n" + block.rstrip("\n") + "\n" + text[j:])
