"""Data roots: the only directories a server will open files under (``--data-root DIR``).

Dependency-free (standard library only) so the server can use it anywhere::

    roots = DataRoots(["/data/a", "/data/b"])
    real = roots.resolve("train/shard-000.bin")   # relative: looked up under each root
    fd = roots.open_fd("/data/a/x.npy")            # resolve + open, re-checked after open

A path is accepted when its *real* path (all symlinks and ``..`` resolved) lies
inside the real path of one of the roots. ``..`` escapes, absolute paths elsewhere and
symlinks whose target leaves the roots raise :class:`OutsideDataRootsError` (a
``PermissionError``); a path inside the roots that does not exist raises
``FileNotFoundError``. Paths outside the roots are refused before their existence is
looked at, so a client cannot probe the rest of the file system.
"""
from __future__ import annotations

import os
import stat
from typing import Iterable, List, Optional

__all__ = ["DataRoots", "OutsideDataRootsError"]


class OutsideDataRootsError(PermissionError):
    """A path resolves outside every configured data root."""

    def __init__(self, path: str, roots: List[str], why: str = "resolves outside the data roots"):
        self.path, self.roots = path, list(roots)
        shown = ", ".join(self.roots) if self.roots else "(none configured; use --data-root DIR)"
        super().__init__(f"refused {path!r}: {why}; data roots: {shown}")


def _within(real: str, root: str) -> bool:
    """``real`` (absolute, normalized: a realpath or a /proc/self/fd link) lies in ``root``
    (a realpath). A string prefix check at a separator: the per-file hot path of readers."""
    if real == root:
        return True
    sep = os.sep
    return real.startswith(root if root.endswith(sep) else root + sep)


class DataRoots:
    """A set of directories files may be read from."""

    def __init__(self, roots: Iterable[str]):
        self.roots: List[str] = []
        for r in roots:
            r = os.fspath(r)
            real = os.path.realpath(r)
            if not os.path.isdir(real):
                raise FileNotFoundError(f"data root {r!r} is not an existing directory")
            if real not in self.roots:
                self.roots.append(real)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def __repr__(self) -> str:
        return f"DataRoots({self.roots!r})"

    def contains(self, path: str) -> bool:
        """Whether ``path`` (already real, absolute) lies inside a root."""
        return any(_within(path, r) for r in self.roots)

    def _candidates(self, path: str) -> List[str]:
        if os.path.isabs(path):
            return [path]
        return [os.path.join(r, path) for r in self.roots]

    def resolve(self, path, must_exist: bool = True) -> str:
        """The real absolute path of ``path`` if it lies inside a root.

        A relative ``path`` is looked up under each root in turn (the first root where
        it exists wins). Raises :class:`OutsideDataRootsError` for paths leaving the
        roots, ``FileNotFoundError`` for missing files (when ``must_exist``) and
        ``IsADirectoryError`` for directories.
        """
        text = os.fspath(path)
        if not isinstance(text, str):
            text = os.fsdecode(text)
        if not text or "\x00" in text:
            raise OutsideDataRootsError(text, self.roots, "empty path or NUL byte")
        if not self.roots:
            raise OutsideDataRootsError(text, self.roots, "no data roots are configured")
        inside: Optional[str] = None
        for cand in self._candidates(text):
            real = os.path.realpath(cand)
            if not self.contains(real):
                continue
            if os.path.exists(real):
                return self._check_kind(text, real, must_exist)
            inside = inside or real
        if inside is None:
            raise OutsideDataRootsError(text, self.roots)
        if must_exist:
            raise FileNotFoundError(f"no such file under the data roots: {text!r}")
        return inside

    @staticmethod
    def _check_kind(text: str, real: str, must_exist: bool) -> str:
        if must_exist and os.path.isdir(real):
            raise IsADirectoryError(f"{text!r} is a directory, not a file")
        return real

    def open_fd(self, path, flags: int = os.O_RDONLY) -> int:
        """Resolve ``path`` and open it; the opened file is checked again (no symlink races).

        The real path is opened beneath its root without following anything
        (:meth:`open_beneath`): a directory swapped for a symlink after the resolve is
        refused before what it leads to is opened. Only regular files are accepted
        (``O_NONBLOCK``: a FIFO cannot block the open), and where ``/proc/self/fd`` exists
        the descriptor's path must still be inside a root.
        """
        real = self.resolve(path)
        try:
            fd = self.open_beneath(real, flags | getattr(os, "O_NONBLOCK", 0))
        except (NotADirectoryError, OutsideDataRootsError) as e:
            raise OutsideDataRootsError(os.fspath(path), self.roots, "changed while opening") from e
        except OSError as e:
            if e.errno == getattr(os, "ELOOP", -1):
                raise OutsideDataRootsError(os.fspath(path), self.roots, "changed while opening") from e
            if e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None   # named by the client's path
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{os.fspath(path)!r} is not a regular file")
            self.check_fd(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_beneath(self, real: str, flags: int = os.O_RDONLY) -> int:
        """Open ``real`` (a real path inside a root, as :meth:`resolve` gives) component by
        component from the root's directory, each with ``O_NOFOLLOW``: a symlink met on the
        way raises (``ELOOP`` / ``NotADirectoryError``) without being followed, and ``.`` /
        ``..`` components are refused."""
        root = max((r for r in self.roots if _within(real, r)), key=len, default=None)
        if root is None:
            raise OutsideDataRootsError(real, self.roots)
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        parts = [c for c in real[len(root):].split(os.sep) if c]
        if not parts:
            raise IsADirectoryError(f"{real!r} is a data root, not a file")
        if any(c in (".", "..") for c in parts):
            raise OutsideDataRootsError(real, self.roots, "'.' or '..' in a resolved path")
        dfd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow | cloexec)
        try:
            for c in parts[:-1]:
                nfd = os.open(c, getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | nofollow
                              | cloexec, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            return os.open(parts[-1], flags | nofollow | cloexec, dir_fd=dfd)
        finally:
            os.close(dfd)

    def check_fd(self, fd: int, path) -> None:
        """Refuse an open descriptor whose file lies outside the roots (``/proc/self/fd``'s
        link names what was really opened; one readlink, where /proc exists)."""
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if not real.startswith("/") or not self.contains(real):
            raise OutsideDataRootsError(os.fspath(path), self.roots, "changed while opening")
