"""A reference-counted LRU cache of open files, shared by the read backends.

Readers must not open a file per read, and must never close a descriptor another
thread is reading from: an entry is only closed when no caller holds it.
"""
from __future__ import annotations

import errno
import operator
import os
import stat
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

__all__ = ["FileHandle", "FileCache"]


class FileHandle:
    """An open file of a reader: ``path``, ``size`` (bytes, at open) and the backend object.

    Handles returned by :meth:`Reader.open` keep the file open until :meth:`close`.
    """

    __slots__ = ("path", "size", "obj", "fd", "_refs", "_cache")

    def __init__(self, path: str, size: int, obj: Any, fd: int, cache: "FileCache"):
        self.path, self.size, self.obj, self.fd = path, size, obj, fd
        self._refs = 0
        self._cache = cache

    def refresh_size(self) -> int:
        """Re-read the size from the open descriptor (the file may have grown or shrunk)."""
        self.size = os.fstat(self.fd).st_size
        return self.size

    def close(self) -> None:
        """Release this handle; the file is closed once no reader uses it and it is evicted."""
        self._cache.release(self)

    def __enter__(self) -> "FileHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FileHandle({self.path!r}, size={self.size})"


class FileCache:
    """Open files keyed by path, at most ``max_open`` of them unused at a time.

    ``opener(path) -> (obj, fd)`` (or ``(obj, fd, size)``) opens one file; ``closer(obj)``
    closes it. Files in use (held by a caller) are never closed; the unused ones are kept in least recently
    released order and closed from the oldest once more than ``max_open`` are open, so
    eviction costs the same however many files are held (a vectored read of thousands
    of files holds them all until it is done).
    """

    def __init__(self, opener: Callable[[str], tuple], closer: Callable[[Any], None], max_open: int):
        self._opener, self._closer, self.max_open = opener, closer, max(1, int(max_open))
        self._lock = threading.Lock()
        self._open: "dict[str, FileHandle]" = {}
        self._idle: "OrderedDict[str, FileHandle]" = OrderedDict()   # refs == 0, oldest first
        self.opens = 0  # how many times a file was actually opened (for tests and stats)

    def acquire(self, path: str) -> FileHandle:
        with self._lock:
            h = self._open.get(path)
            if h is not None:
                if h._refs == 0:
                    self._idle.pop(path, None)
                h._refs += 1
                return h
        got = self._opener(path)  # outside the lock: opening can be slow
        obj, fd = got[0], got[1]
        size = got[2] if len(got) > 2 else os.fstat(fd).st_size   # an opener may know it
        with self._lock:
            h = self._open.get(path)
            if h is not None:  # another thread opened it meanwhile: keep theirs
                if h._refs == 0:
                    self._idle.pop(path, None)
                h._refs += 1
                dup = obj
            else:
                h = FileHandle(path, size, obj, fd, self)
                h._refs = 1
                self._open[path] = h
                self.opens += 1
                dup = None
            victims = self._evict_locked()
        if dup is not None:
            self._closer(dup)
        for v in victims:
            self._closer(v.obj)
        return h

    def release(self, h: FileHandle) -> None:
        with self._lock:
            if h._refs <= 0:
                return
            h._refs -= 1
            if h._refs == 0 and self._open.get(h.path) is h:
                self._idle[h.path] = h
            victims = self._evict_locked()
        for v in victims:
            self._closer(v.obj)

    def _evict_locked(self) -> list:
        victims = []
        idle = self._idle
        while len(self._open) > self.max_open and idle:
            path, h = idle.popitem(last=False)
            del self._open[path]
            victims.append(h)
        return victims

    def __len__(self) -> int:
        return len(self._open)

    def close_all(self) -> None:
        with self._lock:
            handles = list(self._open.values())
            self._open.clear()
            self._idle.clear()
        for h in handles:
            self._closer(h.obj)


def open_fd(path: str, roots=None) -> tuple:
    """Default opener: a read-only descriptor (both the object and the fd) and its size.

    Opened with ``O_NONBLOCK`` (a FIFO cannot block the open) and refused unless it is a
    regular file (a directory raises ``IsADirectoryError``, a FIFO or device ``OSError``,
    both naming ``path``). With ``roots`` (:class:`~gpuwire.gds.roots.DataRoots`), ``path``
    (a real path inside a root) is opened beneath its root following no symlink
    (:meth:`DataRoots.open_fd`)."""
    if roots is not None:
        fd = roots.open_fd(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return fd, fd, os.fstat(fd).st_size
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        check_regular(st.st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, fd, st.st_size


def int_arg(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (an integral float is fine; 2.5, "x" or a value
    below ``minimum`` raise, naming ``name``): arguments are checked up front, not
    truncated or left to fail later."""
    try:
        i = operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            i = int(value)
        else:
            raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if i < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return i


def check_regular(mode: int, path) -> None:
    """Raise (naming ``path``) unless ``mode`` (an ``st_mode``) is a regular file's."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory, not a file", os.fspath(path))
    raise OSError(f"{os.fspath(path)!r} is not a regular file (a FIFO, socket or device is refused)")


def close_fd(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
