"""Errors that name what was wrong: the file, the line, the field."""
from __future__ import annotations

from pathlib import Path


class CaptionerError(Exception):
    """Base class for every error captioner raises on purpose."""


class DataError(CaptionerError):
    """Bad dataset input: a malformed line or record, a missing image, an empty caption.

    `line` names a line of a text file, `record` an entry of a JSON file (e.g. "annotations[17]").
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 record: str | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.record = record
        self.message = message
        where = ""
        if self.path is not None:
            where = self.path + (f", line {line}" if line is not None else "") + \
                (f", {record}" if record is not None else "") + ": "
        super().__init__(where + message)


class ImageError(CaptionerError):
    """An image that cannot be read or decoded. `kind` says which way, for callers that map
    it (the server to an HTTP status): not_found, not_a_file, empty, unsupported,
    too_many_pixels, too_many_scans (a JPEG too costly to decode) or undecodable."""

    KINDS = ("not_found", "not_a_file", "empty", "unsupported", "too_many_pixels", "too_many_scans",
             "undecodable")

    def __init__(self, message: str, path: str | Path | None = None, kind: str = "undecodable"):
        self.path = str(path) if path is not None else None
        self.kind = kind
        self.reason = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class OptionError(CaptionerError):
    """A caller's option outside the range it may take (names the option and the range)."""


class CheckpointError(CaptionerError):
    """A file that is not a loadable captioner checkpoint."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(CaptionerError):
    """A config file or override that does not fit the config's fields."""
