"""Datasets of record files: fixed-size binary records and .npy arrays.

A dataset is a list of :class:`Shard` files (one large file or many), each holding
``nrecords`` records of ``record_nbytes`` bytes starting at ``data_offset``. A flat
record index maps to ``(shard, byte offset)`` through :meth:`RecordFiles.locate`.
Layout problems (size not a multiple of the record, truncated .npy, dtype or shape
differing between shards) raise errors that name the offending file.
"""
from __future__ import annotations

import ast
import glob as _glob
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._files import check_regular, int_arg
from .errors import CorruptFileError, TruncatedFileError

__all__ = [
    "Shard",
    "RecordFiles",
    "RecordDataset",
    "NpyDataset",
    "NpyHeader",
    "parse_npy_header",
    "expand_paths",
]

PathsArg = Union[str, "os.PathLike[str]", Iterable[Union[str, "os.PathLike[str]"]]]

NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Shard:
    """One file of a dataset."""

    path: str
    data_offset: int   # byte offset of record 0
    nrecords: int
    size: int          # file size in bytes when the dataset was opened


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _expand_one(item) -> List[str]:
    text = os.fspath(item)
    if _is_glob(text) and not os.path.exists(text):
        found = sorted(p for p in _glob.glob(text) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"no files match {text!r}")
        return found
    if os.path.isdir(text):
        found = sorted(os.path.join(text, n) for n in os.listdir(text)
                       if os.path.isfile(os.path.join(text, n)))
        if not found:
            raise FileNotFoundError(f"directory {text!r} holds no files")
        return found
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset file not found: {text!r}") from None
    check_regular(mode, text)   # a FIFO is refused by name (it would read as 0 records, or block)
    return [text]


def expand_paths(paths_or_glob: PathsArg) -> List[str]:
    """Absolute file paths from a path, a glob pattern, a directory or a list of those."""
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    out: List[str] = []
    for item in items:
        out.extend(os.path.abspath(p) for p in _expand_one(item))
    if not out:
        raise FileNotFoundError("a dataset needs at least one file")
    return out


class RecordFiles:
    """Common part of the datasets: shards, record geometry and index mapping."""

    def __init__(self, shards: Sequence[Shard], record_nbytes: int, dtype, record_shape: Tuple[int, ...]):
        if record_nbytes <= 0:
            raise ValueError(f"record size must be > 0 bytes, got {record_nbytes}")
        self.shards: List[Shard] = list(shards)
        self.record_nbytes = int(record_nbytes)
        self.dtype = np.dtype(dtype)
        self.record_shape = tuple(int(d) for d in record_shape)
        counts = np.array([s.nrecords for s in self.shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self._data_offsets = np.array([s.data_offset for s in self.shards], dtype=np.int64)

    @property
    def paths(self) -> List[str]:
        return [s.path for s in self.shards]

    @property
    def nbytes(self) -> int:
        """Bytes of record data in the dataset."""
        return len(self) * self.record_nbytes

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def shard_ranges(self) -> List[Tuple[int, int]]:
        """``[(first record, end record)]`` of each shard, in flat indices."""
        return [(int(a), int(b)) for a, b in zip(self._starts, self._ends)]

    def locate_many(self, indices) -> Tuple[np.ndarray, np.ndarray]:
        """(shard numbers, byte offsets in those shards) of flat record ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"record index out of range 0..{n - 1}")
        shard = np.searchsorted(self._ends, idx, side="right")
        offsets = self._data_offsets[shard] + (idx - self._starts[shard]) * self.record_nbytes
        return shard, offsets

    def locate(self, index: int) -> Tuple[str, int]:
        """(path, byte offset) of record ``index``."""
        if index < 0:
            index += len(self)
        shard, off = self.locate_many([index])
        return self.shards[int(shard[0])].path, int(off[0])

    def read_record(self, index: int) -> np.ndarray:
        """One record read with plain file I/O (a convenience for checks, not the fast path)."""
        path, off = self.locate(index)
        with open(path, "rb") as f:
            f.seek(off)
            raw = f.read(self.record_nbytes)
        if len(raw) != self.record_nbytes:
            raise TruncatedFileError(path, off + self.record_nbytes, off + len(raw), "the file size")
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.record_shape)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.shards)} file(s), {len(self)} records of "
                f"{self.record_shape} {self.dtype})")


def _record_geometry(record_bytes: int, dtype, record_shape) -> Tuple[np.dtype, Tuple[int, ...]]:
    dt = np.dtype(np.uint8 if dtype is None else dtype)
    if record_shape is None:
        if record_bytes % dt.itemsize:
            raise ValueError(f"record of {record_bytes} bytes is not a whole number of {dt} items")
        return dt, (record_bytes // dt.itemsize,)
    shape = tuple(int_arg("record_shape dimension", d, 1) for d in record_shape)
    if math.prod(shape) * dt.itemsize != record_bytes:
        raise ValueError(f"record shape {shape} of {dt} is not {record_bytes} bytes")
    return dt, shape


class RecordDataset(RecordFiles):
    """Files of fixed-size binary records.

    ``record_bytes`` per record, after an optional ``header_bytes`` per file. Records
    are raw ``uint8`` unless ``dtype`` (and optionally ``record_shape``) says what they
    hold. A file whose payload is not a whole number of records raises
    :class:`CorruptFileError` naming it.
    """

    def __init__(self, paths_or_glob: PathsArg, record_bytes: int, dtype=None,
                 record_shape: Optional[Sequence[int]] = None, header_bytes: int = 0):
        record_bytes = int_arg("record_bytes", record_bytes, 1)
        header_bytes = int_arg("header_bytes", header_bytes, 0)
        dt, shape = _record_geometry(record_bytes, dtype, record_shape)
        shards = [self._shard(p, record_bytes, header_bytes) for p in expand_paths(paths_or_glob)]
        super().__init__(shards, record_bytes, dt, shape)

    @staticmethod
    def _shard(path: str, record_bytes: int, header_bytes: int, size: Optional[int] = None) -> Shard:
        """``size``: the file size when known (a remote dataset asks the server); else stat."""
        header_bytes = int_arg("header_bytes", header_bytes, 0)
        if size is None:
            size = os.stat(path).st_size
        payload = size - header_bytes
        if payload < 0:
            raise TruncatedFileError(path, header_bytes, size, f"the {header_bytes}-byte header")
        if payload % record_bytes:
            raise CorruptFileError(
                path,
                f"size {size} bytes is not a whole number of {record_bytes}-byte records "
                f"({payload // record_bytes} records and {payload % record_bytes} bytes left over"
                + (f", after a {header_bytes}-byte header)" if header_bytes else ")"),
            )
        return Shard(path, header_bytes, payload // record_bytes, size)


# --------------------------------------------------------------------------- .npy


@dataclass(frozen=True)
class NpyHeader:
    """What a .npy header says: version, dtype, shape and where the data starts."""

    version: Tuple[int, int]
    dtype: np.dtype
    shape: Tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def data_nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _descr_to_dtype(path: str, descr) -> np.dtype:
    def tuplify(d):
        if isinstance(d, list):
            return [tuple(tuplify(x) for x in f) if isinstance(f, (list, tuple)) else f for f in d]
        return d

    try:
        dt = np.dtype(descr if isinstance(descr, str) else tuplify(descr))
    except (TypeError, ValueError) as e:
        raise CorruptFileError(path, f"bad dtype descr {descr!r} in .npy header: {e}") from None
    if dt.hasobject:
        raise CorruptFileError(path, f"object dtype {descr!r} cannot be read as raw records")
    if not dt.isnative and dt.itemsize > 1:
        raise CorruptFileError(path, f"non-native byte order {descr!r} is not supported")
    return dt


def _parse_header_dict(path: str, text: str) -> dict:
    try:
        d = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        # TypeError: an unhashable key ({[]: 1}); RecursionError / MemoryError: deep nesting
        raise CorruptFileError(path, f"unreadable .npy header {text.strip()[:200]!r}: "
                                     f"{type(e).__name__}: {e}") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise CorruptFileError(path, f".npy header must be a dict with descr, fortran_order, shape: {text.strip()!r}")
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and x >= 0 for x in shape):
        raise CorruptFileError(path, f"bad shape {shape!r} in .npy header")
    if not isinstance(d["fortran_order"], bool):
        raise CorruptFileError(path, f"bad fortran_order {d['fortran_order']!r} in .npy header")
    return d


#: The longest .npy header parsed (numpy's ``max_header_size`` guards ``np.load`` the same
#: way, with 10000 bytes): a corrupt length field must not make a reader read gigabytes.
MAX_HEADER_BYTES = 1 << 20


def parse_npy_header(path: str, f=None, max_header_size: int = MAX_HEADER_BYTES) -> NpyHeader:
    """Parse the header of a .npy file (format versions 1.0, 2.0 and 3.0).

    ``f``: a binary file-like object positioned at the start of the file (e.g. the
    first bytes of a remote file in a ``BytesIO``); default: ``path`` is opened. A
    header longer than ``max_header_size`` bytes raises :class:`CorruptFileError`
    before it is read. A subarray dtype (``('<f4', (2,))``) is folded into the shape,
    as numpy does.
    """
    path = os.fspath(path)
    if f is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            check_regular(os.fstat(fd).st_mode, path)   # a FIFO must not block the read
        except BaseException:
            os.close(fd)
            raise
        with open(fd, "rb") as fh:
            return parse_npy_header(path, fh)
    pre = f.read(len(NPY_MAGIC) + 2)
    if len(pre) < len(NPY_MAGIC) + 2 or pre[:len(NPY_MAGIC)] != NPY_MAGIC:
        if NPY_MAGIC.startswith(pre) or pre.startswith(NPY_MAGIC):
            raise TruncatedFileError(path, len(NPY_MAGIC) + 2, len(pre), "the .npy preamble")
        raise CorruptFileError(path, "not a .npy file (bad magic)")
    major, minor = pre[-2], pre[-1]
    if major not in (1, 2, 3):
        raise CorruptFileError(path, f"unsupported .npy format version {major}.{minor}")
    fmt, lensize = ("<H", 2) if major == 1 else ("<I", 4)
    raw_len = f.read(lensize)
    if len(raw_len) < lensize:
        raise TruncatedFileError(path, len(pre) + lensize, len(pre) + len(raw_len), "the .npy preamble")
    (hlen,) = struct.unpack(fmt, raw_len)
    if hlen > max_header_size:
        raise CorruptFileError(path, f".npy header length {hlen} bytes exceeds the limit of "
                                     f"{max_header_size} bytes (corrupt length field?)")
    raw = f.read(hlen)
    start = len(pre) + lensize
    if len(raw) < hlen:
        raise TruncatedFileError(path, start + hlen, start + len(raw), "the .npy preamble and header")
    try:
        text = raw.decode("utf8" if major >= 3 else "latin1")
    except UnicodeDecodeError as e:
        raise CorruptFileError(path, f"undecodable .npy header: {e}") from None
    d = _parse_header_dict(path, text)
    dt, shape = _descr_to_dtype(path, d["descr"]), d["shape"]
    if dt.subdtype is not None:   # ('<f4', (2,)): numpy reads it as shape + (2,) of '<f4'
        base, sub = dt.subdtype
        dt, shape = base, tuple(shape) + tuple(sub)
    return NpyHeader((major, minor), dt, shape, d["fortran_order"], start + hlen)


class NpyDataset(RecordFiles):
    """.npy arrays whose first axis indexes records; many shards or one large file.

    Every shard must have the same dtype and the same shape after the first axis;
    Fortran-ordered arrays are refused (their records are not contiguous); a file
    shorter (or longer) than its header says raises an error naming it.
    """

    def __init__(self, paths_or_glob: PathsArg):
        shards: List[Shard] = []
        first: Optional[Tuple[str, NpyHeader]] = None
        for path in expand_paths(paths_or_glob):
            hdr = parse_npy_header(path)
            self._check_header(path, hdr)
            if first is None:
                first = (path, hdr)
            else:
                self._check_same(path, hdr, *first)
            shards.append(self._shard(path, hdr))
        assert first is not None
        hdr = first[1]
        record_shape = hdr.shape[1:]
        super().__init__(shards, math.prod(record_shape) * hdr.dtype.itemsize, hdr.dtype, record_shape)

    @staticmethod
    def _check_header(path: str, hdr: NpyHeader) -> None:
        if hdr.fortran_order:
            raise CorruptFileError(path, "Fortran-ordered arrays are not supported (records would not be contiguous)")
        if not hdr.shape:
            raise CorruptFileError(path, "0-d array: a dataset file needs a first axis of records")
        if math.prod(hdr.shape[1:]) * hdr.dtype.itemsize == 0:
            raise CorruptFileError(path, f"records of shape {hdr.shape[1:]} {hdr.dtype} are empty")

    @staticmethod
    def _check_same(path: str, hdr: NpyHeader, first_path: str, first: NpyHeader) -> None:
        if hdr.dtype != first.dtype:
            raise CorruptFileError(path, f"dtype {hdr.dtype} differs from {first.dtype} of {first_path}")
        if hdr.shape[1:] != first.shape[1:]:
            raise CorruptFileError(
                path, f"record shape {hdr.shape[1:]} differs from {first.shape[1:]} of {first_path}"
            )

    @staticmethod
    def _shard(path: str, hdr: NpyHeader, size: Optional[int] = None) -> Shard:
        if size is None:
            size = os.stat(path).st_size
        expected = hdr.data_offset + hdr.data_nbytes
        if size < expected:
            raise TruncatedFileError(
                path, expected, size, f"the file size (header says shape {hdr.shape} of {hdr.dtype})"
            )
        if size > expected:
            raise CorruptFileError(
                path, f"{size - expected} bytes after the data (header: shape {hdr.shape} {hdr.dtype}, "
                f"expected file size {expected} bytes, found {size})",
            )
        return Shard(path, hdr.data_offset, hdr.shape[0], size)
