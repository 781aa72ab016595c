"""Remote gds: the gpuwire server reads files into a session's device memory.

The client names files; the server's GPU (or its CPU executor's host-memory
"device") reads them itself, so the bytes never cross the network. Everything
here uses the RPC layer's public API only: a :class:`gpuwire.rpc.Session` and its
generated calls ``gwFileRead`` / ``gwFileReadV`` / ``gwFileStat`` / ``gwFileBackend``
(see docs/gds.md, "Remote reads")::

    s = gpuwire.connect("gpu-box:13371", token=...)
    files = RemoteFiles(s)
    buf = s.alloc(1 << 20)
    files.read(buf, "train/shard-000.bin", offset=0, nbytes=1 << 20, stream=st)  # deferred
    files.check()                        # a sync point: raises RemoteFileNotFoundError & co.

    ds = RemoteRecordDataset(s, ["train/shard-000.bin", ...], record_bytes=4096)
    loader = DataLoader(ds, 256, reader=RemoteReader(s, consumer_stream=st), prefetch=2)
    for batch in loader:                 # RemoteArray: a device pointer in the session
        s.launch(step, grid, block, [batch, len(batch)], stream=st)

Paths are relative to the server's ``--data-root`` directories (looked up in the
order given there) or absolute inside one of them.

Reads are *deferred* calls, ordered on the stream they are given like any CUDA
work: a read starts once the work queued on its stream before it has completed, and
work queued on the stream after it sees the data. The server does not wait for a
read before it runs the session's next calls (its read workers do the reading; see
docs/gds.md "Remote reads"). Errors of reads surface at the next sync point as
:class:`~gpuwire.rpc.DeferredCudaError` whose message names the file (a read still
running then reports at a later one); :meth:`RemoteFiles.check` waits for the
session's work and re-raises them as :class:`RemoteReadError` subclasses, and so do
:class:`RemoteReader`'s sync methods.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..rpc import CudaError
from ._files import int_arg
from .backends import Reader
from .dataset import NpyDataset, RecordDataset, RecordFiles, _record_geometry, parse_npy_header
from .errors import GdsError, TruncatedFileError
from .service import pack_reads

__all__ = [
    "RemoteFiles", "RemoteReader", "RemoteArray", "RemoteRecordDataset", "RemoteNpyDataset",
    "RemoteReadError", "RemoteFileNotFoundError", "RemotePermissionError", "RemoteShortReadError",
]

_NOT_FOUND, _NOT_PERMITTED, _INVALID, _OS_ERROR = 301, 800, 1, 304
_FILE_CALLS = ("gwFileRead", "gwFileReadV", "gwFileStat", "gwFileBackend")


# ----------------------------------------------------------------------------- errors

class RemoteReadError(GdsError, OSError):
    """A remote file call failed; the message is the server's (it names the file).

    ``code``: the CUresult; ``cause``: the RPC exception it came from."""

    def __init__(self, message: str, code: int = 0, cause: Optional[BaseException] = None):
        GdsError.__init__(self, message)
        self.code, self.cause = code, cause

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class RemoteFileNotFoundError(RemoteReadError, FileNotFoundError):
    """No such file under the server's data roots."""


class RemotePermissionError(RemoteReadError, PermissionError):
    """Refused: outside the data roots (``..``, symlink out, absolute elsewhere), no data
    root configured on the server, or not readable by the server."""


class RemoteShortReadError(RemoteReadError, EOFError):
    """The range asked for runs past the end of the file."""


def _translate(e: BaseException, path: Optional[str] = None, roots: Optional[str] = None) -> BaseException:
    """A RemoteReadError for an RPC error of a file call (others are returned unchanged)."""
    call = getattr(e, "call", None)
    code = getattr(e, "result", None)
    if call not in _FILE_CALLS or code is None:
        return e
    text = getattr(e, "call_args", "") or ""
    if ": " in text and text.startswith("gwFile"):
        text = text.split("): ", 1)[-1]  # the server's reason after the rendered call
    if not text:  # a sync call: the reply carries only the code; say what we asked
        what = {_NOT_FOUND: "no such file under the server's data roots",
                _NOT_PERMITTED: "refused by the server: outside its data roots, no data root configured "
                                "(gpuwire serve --data-root DIR) or not readable",
                _INVALID: "invalid request",
                _OS_ERROR: "not a regular file or unreadable on the server"}.get(
                    code, f"failed ({getattr(e, 'name', code)})")
        text = f"{path!r}: {what}" + (f"; server data roots: {roots}" if roots is not None else "")
    cls = {_NOT_FOUND: RemoteFileNotFoundError, _NOT_PERMITTED: RemotePermissionError}.get(code)
    if cls is None:
        cls = RemoteShortReadError if "short read" in text else RemoteReadError
    return cls(f"{call}: {text}", code, e)


def _path_arg(path) -> str:
    """``path`` as a file call's argument; a NUL byte is refused (the wire string would
    end there: ``"a.bin\\0/../x"`` must not name ``a.bin``)."""
    path = os.fspath(path)
    if ("\0" if isinstance(path, str) else b"\0") in path:
        raise RemotePermissionError(f"refused {path!r}: NUL byte in the path", _NOT_PERMITTED)
    return path


# ----------------------------------------------------------------------------- remote memory

class RemoteArray:
    """A typed view of device memory of a session (``int(a)`` is the device address).

    What :class:`RemoteReader` hands out: pass it to ``session.launch`` as a pointer
    argument, or copy it back with :meth:`to_host`. Slicing takes leading records
    (``a[:n]``, step 1); :meth:`view` and :meth:`reshape` reinterpret without copying.
    """

    __slots__ = ("session", "ptr", "dtype", "shape", "owner")

    def __init__(self, session: Any, ptr: int, dtype: Any = np.uint8, shape: Sequence[int] = (0,),
                 owner: Any = None):
        self.session, self.ptr = session, int(ptr)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.owner = owner  # the DeviceBuffer this view lies in (None: not ours)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __index__(self) -> int:
        return self.ptr

    __int__ = __index__

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __repr__(self) -> str:
        return f"<RemoteArray {self.ptr:#x} {self.shape} {self.dtype}>"

    def __getitem__(self, key) -> "RemoteArray":
        if not isinstance(key, slice) or key.step not in (None, 1) or not self.shape:
            raise TypeError("RemoteArray supports only a[start:stop] over the first axis")
        start, stop, _ = key.indices(self.shape[0])
        stop = max(start, stop)
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return RemoteArray(self.session, self.ptr + start * row, self.dtype,
                           (stop - start,) + self.shape[1:], self.owner)

    def view(self, dtype) -> "RemoteArray":
        dt = np.dtype(dtype)
        if self.nbytes % dt.itemsize:
            raise ValueError(f"{self.nbytes} bytes are not a whole number of {dt} items")
        if self.ndim == 1 or not self.shape:
            return RemoteArray(self.session, self.ptr, dt, (self.nbytes // dt.itemsize,), self.owner)
        last = self.shape[-1] * self.dtype.itemsize
        if last % dt.itemsize:
            raise ValueError(f"last axis of {last} bytes is not a whole number of {dt} items")
        return RemoteArray(self.session, self.ptr, dt, self.shape[:-1] + (last // dt.itemsize,), self.owner)

    def reshape(self, *shape) -> "RemoteArray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if -1 in shape:
            known = int(np.prod([d for d in shape if d != -1], dtype=np.int64)) or 1
            shape = tuple(self.size // known if d == -1 else d for d in shape)
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {shape}")
        return RemoteArray(self.session, self.ptr, self.dtype, shape, self.owner)

    def to_host(self, stream: Any = None) -> np.ndarray:
        """A numpy copy (a sync call; with ``stream``, ordered after the work queued on it)."""
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            try:
                if stream is None:
                    self.session.cuMemcpyDtoH(out, self.ptr, self.nbytes)
                else:
                    self.session.cuMemcpyDtoHAsync(out, self.ptr, self.nbytes, stream)
                    self.session.cuStreamSynchronize(stream)
            except Exception as e:
                raise _translate(e) from e
        return out

    def copy_on(self, stream: Any) -> "RemoteArray":
        """A copy in new device memory, queued on ``stream`` (free it with :meth:`free`)."""
        buf = self.session.alloc(max(self.nbytes, 1))
        if self.nbytes:
            self.session.cuMemcpyDtoDAsync(buf.ptr, self.ptr, self.nbytes, stream or 0)
        return RemoteArray(self.session, buf.ptr, self.dtype, self.shape, buf)

    def free(self) -> None:
        """Free the memory of a copy made by :meth:`copy_on` (ring views are the loader's)."""
        if self.owner is not None and getattr(self.owner, "ptr", None) == self.ptr:
            self.owner.free()


# ----------------------------------------------------------------------------- the calls

class RemoteFiles:
    """File calls of a session, with the server's errors turned into :class:`RemoteReadError`."""

    def __init__(self, session: Any):
        self.session = session
        self._info: Optional[Dict[str, str]] = None

    def backend(self) -> Dict[str, str]:
        """How the server reads for this session: ``mode`` (kvikio-compat, kvikio-gds,
        posix+h2d, posix-host), ``detail``, ``kvikio`` settings, ``roots``."""
        if self._info is None:
            try:
                text = self.session.gwFileBackend()
            except Exception as e:
                raise _translate(e) from e
            info = {}
            for part in text.split("; "):
                k, _, v = part.partition("=")
                info[k.strip()] = v
            self._info = info
        return self._info

    @property
    def mode(self) -> str:
        return self.backend().get("mode", "?")

    def stat(self, path) -> int:
        """The size of ``path`` on the server (sync)."""
        path = _path_arg(path)
        try:
            return int(self.session.gwFileStat(path))
        except Exception as e:
            roots = None
            try:
                roots = self.backend().get("roots") or "(none)"
            except Exception:
                pass
            raise _translate(e, path, roots) from e

    def read(self, dst: Any, path, offset: int, nbytes: int, stream: Any = None) -> None:
        """Deferred: the server reads ``path[offset:offset+nbytes]`` into device address ``dst``."""
        if offset < 0 or nbytes < 0:
            raise ValueError(f"{path}: negative offset {offset} or size {nbytes}")
        path = _path_arg(path)
        self.session.gwFileRead(dst, path, offset, nbytes, stream or 0)

    def read_many(self, reads: Sequence[Tuple[Any, int, int, int]], stream: Any = None) -> int:
        """Deferred: ``[(path, offset, nbytes, dst)]`` in one call (one ``gwFileRead`` when
        there is one read). Returns the bytes asked for."""
        reads = [(os.fspath(p), int(o), int(n), int(d)) for p, o, n, d in reads]
        for p, o, n, _d in reads:
            if o < 0 or n < 0:
                raise ValueError(f"{p}: negative offset {o} or size {n}")
        if len(reads) == 1:
            p, o, n, d = reads[0]
            self.session.gwFileRead(d, p, o, n, stream or 0)
        elif reads:
            blob = pack_reads(reads)
            self.session.gwFileReadV(blob, len(blob), len(reads), stream or 0)
        return sum(r[2] for r in reads)

    def read_bytes(self, path, offset: int, nbytes: int) -> bytes:
        """``path[offset:offset+nbytes]`` copied back to the client (headers, checks): sync."""
        path = _path_arg(path)
        if nbytes <= 0:
            return b""
        with self.session.alloc(nbytes) as buf:
            self.read(buf, path, offset, nbytes)
            out = np.empty(nbytes, np.uint8)
            try:
                self.session.cuMemcpyDtoH(out, buf.ptr, nbytes)
            except Exception as e:
                raise _translate(e) from e
        return out.tobytes()

    def check(self) -> None:
        """Waits for the session's work (reads included: ``cuCtxSynchronize``), then raises
        the first failed read as a RemoteReadError."""
        try:
            self.session.synchronize()
        except Exception as e:
            raise _translate(e) from e


# ----------------------------------------------------------------------------- datasets

class RemoteRecordDataset(RecordFiles):
    """:class:`~gpuwire.gds.RecordDataset` over files on the server (sizes from ``gwFileStat``).

    ``paths``: server paths (relative to its data roots), one or a list; no globbing.
    A file whose payload is not a whole number of records raises an error naming it.
    """

    def __init__(self, session: Any, paths, record_bytes: int, dtype=None,
                 record_shape: Optional[Sequence[int]] = None, header_bytes: int = 0):
        files = session if isinstance(session, RemoteFiles) else RemoteFiles(session)
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise FileNotFoundError("a dataset needs at least one file")
        record_bytes = int_arg("record_bytes", record_bytes, 1)
        header_bytes = int_arg("header_bytes", header_bytes, 0)
        dt, shape = _record_geometry(record_bytes, dtype, record_shape)
        shards = [RecordDataset._shard(os.fspath(p), record_bytes, header_bytes, files.stat(p)) for p in paths]
        self.files = files
        super().__init__(shards, record_bytes, dt, shape)

    def read_record(self, index: int) -> np.ndarray:
        path, off = self.locate(index)
        raw = self.files.read_bytes(path, off, self.record_nbytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.record_shape)


class RemoteNpyDataset(RecordFiles):
    """:class:`~gpuwire.gds.NpyDataset` over .npy files on the server: headers are read by
    the server into device memory and copied back (a few KiB per file); the same checks
    (dtype/shape across shards, truncated or oversized files, named)."""

    HEAD = 4096

    def __init__(self, session: Any, paths):
        files = session if isinstance(session, RemoteFiles) else RemoteFiles(session)
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise FileNotFoundError("a dataset needs at least one file")
        shards, first = [], None
        for p in paths:
            p = os.fspath(p)
            size = files.stat(p)
            hdr = self._header(files, p, size)
            NpyDataset._check_header(p, hdr)
            if first is None:
                first = (p, hdr)
            else:
                NpyDataset._check_same(p, hdr, *first)
            shards.append(NpyDataset._shard(p, hdr, size))
        hdr = first[1]
        rshape = hdr.shape[1:]
        self.files = files
        super().__init__(shards, int(np.prod(rshape, dtype=np.int64)) * hdr.dtype.itemsize, hdr.dtype, rshape)

    def _header(self, files: RemoteFiles, path: str, size: int):
        head = files.read_bytes(path, 0, min(size, self.HEAD))
        try:
            return parse_npy_header(path, io.BytesIO(head))
        except TruncatedFileError:
            if len(head) >= size:
                raise
        # a header longer than HEAD bytes (and under parse_npy_header's limit): read as much as
        # its length field says -- unless the file is shorter than that (nothing more is read)
        need = (10 + int.from_bytes(head[8:10], "little") if head[6] == 1
                else 12 + int.from_bytes(head[8:12], "little"))
        if need > size:
            raise TruncatedFileError(path, need, size, "the .npy preamble and header")
        head = files.read_bytes(path, 0, need)
        return parse_npy_header(path, io.BytesIO(head))

    read_record = RemoteRecordDataset.read_record


# ----------------------------------------------------------------------------- the reader

class RemoteReader(Reader):
    """The :class:`~gpuwire.gds.Reader` surface over a session, for the DataLoader.

    Buffers are session allocations (:class:`RemoteArray`), streams and events are the
    session's, reads are ``gwFileReadV`` calls on the slot's stream, flushed at once so
    the server reads ahead while the client goes on. Ordering is all on the server's
    GPU: a slot's stream waits for the consumer's release event before its read, and
    the consumer stream waits for the slot's ready event (``cuStreamWaitEvent``); the
    client never waits on the host. ``consumer_stream``: the stream the consumer's
    launches run on (default: the NULL stream, 0).

    ``mode`` is ``remote:<server engine>``, e.g. ``remote:kvikio-compat``.
    """

    device = "remote"
    stream_ordered = True

    def __init__(self, session: Any, consumer_stream: Any = None, own_session: bool = False):
        Reader.__init__(self, max_open=1, roots=None)
        self.session = session
        self.files = RemoteFiles(session)
        info = self.files.backend()
        self.server_mode = info.get("mode", "?")
        self.mode = f"remote:{self.server_mode}"
        self.mode_detail = info.get("detail", "")
        self.order = info.get("order", "")       # stream-wait, sync or host (docs/gds.md)
        self.workers = info.get("workers", "")
        if info.get("kvikio"):
            self.kvikio_settings = {k: v for k, v in (x.split(":", 1) for x in info["kvikio"].split(","))}
        self.consumer_stream = consumer_stream
        self._own_session = own_session
        self._bufs: List[Any] = []
        self._streams: List[Any] = []
        self._events: List[Any] = []

    def open(self, path):
        raise NotImplementedError("RemoteReader reads by path; the server keeps the files open")

    # -- reads
    def read_batch(self, requests, dst, stream=None) -> int:
        base = int(dst)
        reads = []
        for src, offset, nbytes, dst_offset in requests:
            path = getattr(src, "path", src)
            self._check_dst(dst, dst_offset, nbytes)
            reads.append((path, offset, nbytes, base + dst_offset))
        total = self.files.read_many(reads, stream)
        self.session.flush()  # the server starts reading now, not at the next sync point
        return total

    # -- memory
    def alloc(self, nbytes: int) -> RemoteArray:
        nbytes = int_arg("nbytes", nbytes, 0)
        buf = self.session.alloc(max(nbytes, 1))
        self._bufs.append(buf)
        self.allocated_bytes += nbytes
        return RemoteArray(self.session, buf.ptr, np.uint8, (int(nbytes),), buf)

    def to_host(self, arr) -> np.ndarray:
        return arr.to_host()

    # -- streams and events (all on the server's GPU)
    def new_stream(self):
        st = self.session.stream(1)  # CU_STREAM_NON_BLOCKING
        self._streams.append(st)
        return st

    def current_stream(self):
        return self.consumer_stream

    def record_event(self, stream, event=None):
        if event is None:
            event = self.session.event(2)  # CU_EVENT_DISABLE_TIMING
            self._events.append(event)
        self.session.cuEventRecord(event, stream or 0)
        return event

    def wait_event(self, stream, event) -> None:
        if event is not None:
            self.session.cuStreamWaitEvent(stream or 0, event, 0)

    def host_wait(self, event) -> None:
        if event is not None:
            try:
                event.synchronize()
            except Exception as e:
                raise _translate(e) from e

    def synchronize(self, stream=None) -> None:
        try:
            if stream is None:
                self.session.synchronize()
            else:
                self.session.cuStreamSynchronize(stream)
        except Exception as e:
            raise _translate(e) from e

    def check(self) -> None:
        self.files.check()

    # -- lifetime
    def close(self) -> None:
        """Free the reader's buffers, streams and events. Reads still in flight are
        abandoned: their streams are drained first, and a read error they bring (of data
        nobody will look at, e.g. prefetched batches after a loader stopped on an error) is
        dropped; any other deferred error is raised once everything is freed."""
        if getattr(self.session, "closed", True):
            self._bufs, self._streams, self._events = [], [], []
            return
        other = None
        for st in self._streams:
            try:
                self.session.cuStreamSynchronize(st)
            except CudaError as e:
                if getattr(e, "call", None) not in _FILE_CALLS and other is None:
                    other = e
        for b in self._bufs:
            b.free()
        for e in self._events:
            e.destroy()
        for st in self._streams:
            st.destroy()
        self._bufs, self._streams, self._events = [], [], []
        if self._own_session:
            self.session.close()
        if other is not None:
            raise other

    def __repr__(self) -> str:
        return f"<RemoteReader {getattr(self.session, 'address', '?')} mode={self.mode}>"
