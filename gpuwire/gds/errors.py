"""Exceptions raised by :mod:`gpuwire.gds`; every message names the file involved."""
from __future__ import annotations

__all__ = [
    "GdsError",
    "ShortReadError",
    "CorruptFileError",
    "TruncatedFileError",
    "BackendUnavailable",
]


class GdsError(Exception):
    """Base class of the errors raised by gpuwire.gds."""


class ShortReadError(GdsError, EOFError):
    """A read asked for bytes past the end of a file (or the file shrank)."""

    def __init__(self, path: str, offset: int, nbytes: int, got: int, size: int | None = None):
        self.path, self.offset, self.nbytes, self.got, self.size = path, offset, nbytes, got, size
        where = f" (file size {size})" if size is not None else ""
        super().__init__(
            f"short read from {path}: asked for {nbytes} bytes at offset {offset}, "
            f"got {got}{where}"
        )


class CorruptFileError(GdsError, ValueError):
    """A dataset file does not have the layout its format or the dataset requires."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class TruncatedFileError(CorruptFileError):
    """A dataset file is shorter than its header (or record layout) says."""

    def __init__(self, path: str, expected: int, actual: int, what: str = "file size"):
        self.expected, self.actual = expected, actual
        super().__init__(path, f"truncated: {what} should be {expected} bytes, found {actual} bytes")


class BackendUnavailable(GdsError, RuntimeError):
    """The requested read backend cannot run here (missing module or GPU)."""
