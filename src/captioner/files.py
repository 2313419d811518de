"""Files that are never half-written: write a temp file in the same folder, fsync, rename.

A kill at any moment leaves either the old file or the new one, never a mix; what a killed
writer leaves behind is a temp file named after its process id, which the next writer of
that file removes (`remove_stale_temps`) once that process is gone.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _temp_pid(name: str, stem: str) -> int | None:
    """The writer's pid in a temp name `<stem>.<pid>.<random>.tmp`, `<stem>.tmp<pid>` or
    `<stem>.tmp<pid>-shards` (a distributed build's per-rank parts)."""
    rest = name[len(stem):]
    if rest.startswith(".tmp"):
        pid = rest[4:].removesuffix("-shards")
        return int(pid) if pid.isdigit() else None
    parts = rest.split(".")
    if len(parts) == 4 and parts[0] == "" and parts[1].isdigit() and parts[3] == "tmp":
        return int(parts[1])
    return None


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temp files (or folders) that killed writers of `path` left behind; those of
    live processes are kept. Returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.glob(path.name + ".*"):
        pid = _temp_pid(p.name, path.name)
        if pid is None or pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def remove_stale_temps_in(folder: str | Path) -> list[Path]:
    """`remove_stale_temps` for every file of `folder` that a killed `atomic_write` left behind
    (`<name>.<pid>.<random>.tmp`, its writer gone). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stems = {p.name.rsplit(".", 3)[0] for p in folder.iterdir() if p.name.endswith(".tmp")}
    return [r for stem in sorted(stems) for r in remove_stale_temps(folder / stem)]


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temp file beside `path`, fsync it, then rename it over `path`.
    The file gets the permissions a plain `open(path, "w")` would give (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def repeated_key(pairs: list[tuple[str, object]]) -> str | None:
    """The first key a JSON object gives twice (for `json.loads(object_pairs_hook=...)`), or
    None: with two values, parsers disagree on which counts, and json keeps the last silently."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def json_error_text(e: Exception) -> str:
    """Why `json.loads` failed, in a few words: a RecursionError (arrays nested too deep) or a
    ValueError (bad syntax, an integer of thousands of digits)."""
    return "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0][:200]
