"""Server side of remote gds reads: the gpuwire server reads files into a session's memory.

``gpuwire serve --data-root DIR`` (repeatable) names the directories clients may
read from; the RPC calls ``gwFileRead``, ``gwFileReadV``, ``gwFileStat`` and
``gwFileBackend`` (spec ids 60-63) land in :class:`FileService`, one per server
session, created at the session's first file call. It depends on nothing of the
RPC layer: it gets the executor session (``es``) and uses its CUDA-named methods
(``cuStreamSynchronize``, ``cuEventCreate``/``Record``/``Synchronize``, ``copy_htod``,
``host_alloc``/``host_free``) or, on the CPU executor, ``es.view``; the asynchronous
GPU engine also calls ``cuda.bindings.driver`` itself, with the session's context
(``es.ctx``), device (``es.devh``) and raw stream handles (``es._s``).

Paths from clients are resolved by :class:`~gpuwire.gds.roots.DataRoots`: a relative
path is looked up under each root in ``--data-root`` order (the first root holding
it wins), an absolute path must lie inside a root; ``..`` escapes and symlinks
leading out are refused, and so is every path when no root is configured.

Engines (``mode``, with ``order`` in :meth:`FileService.describe`):

* ``posix-host`` (CPU executor, ``order=host``): the entries of a call are split into
  pieces of at most ``gds_staging_bytes`` and ``preadv``'d straight into the session's
  host-memory "device" by the session's read workers (``gds_threads`` threads), in
  parallel; the call returns when they are done (the CPU executor's streams are
  host-ordered: the next call sees the bytes).
* ``posix+h2d`` with ``order=stream-wait`` (GPU executor, the default): the call does
  not wait for the read. On the dispatch thread it opens and checks every file and
  range (errors raise at once), records an event E on the call's stream S, and queues
  on S a ``cuStreamWaitValue32`` on a flag in pinned host memory mapped to the device;
  then it hands the pieces to the read workers and returns. A worker waits for E (the
  work queued on S before the read is done, so nothing still uses the destination),
  ``pread``s into its own pinned buffer and copies with ``cuMemcpyHtoDAsync`` on its
  own non-blocking stream; when every piece of the call is in place, the last worker
  stores the flag's value and S goes on: later work on S sees the data. A read that
  fails records the error first (reported at the session's next sync, by
  :meth:`FileService.take_error`, naming the file) and releases the flag all the same.
  Consecutive file calls on one stream with nothing queued between them and no
  destination byte written twice share one E and run together; entries of one call
  that overwrite each other run in order. This is what kvikio's compatibility mode
  does (pread into pinned bounce buffers, then H2D), on streams of our own: kvikio's
  own copies run on a blocking (``CU_STREAM_DEFAULT``) stream, which waits for the
  legacy NULL stream, and the NULL stream may itself be waiting for the read (a
  consumer on stream 0 waiting for a batch's event): a deadlock. Where stream memory
  operations do not work (a probe at the first read: the stream must wait for the
  flag and go on when the host stores it) or ``gds_remote_async`` is off, the
  synchronous engines below run instead (``order=sync``).
* ``kvikio-compat`` / ``kvikio-gds`` (``order=sync``; with ``gds_backend=kvikio`` on the
  server, and always for kvikio-gds, since cuFile DMA is not ours to order): ``CuFile.pread`` into the device pointer with
  ``gds_threads`` / ``gds_task_size``, after synchronizing the call's stream; the call
  returns once the data is in place. Requests under ``SMALL_READ_BYTES`` take the
  staging path below instead (per-call overhead dominates tiny reads).
* ``posix+h2d`` with ``order=sync`` (no kvikio, or ``gds_backend=posix``, and no
  asynchronous engine): ``pread`` into two pinned staging buffers
  (``gds_staging_bytes`` each) and ``cuMemcpyHtoDAsync`` on the call's stream.

Each worker task (up to ``gds_task_size`` bytes: many small files) is one C call
(``gpuwire._files``, cffi_src/gw_files.c, GIL released): the preads and, on the GPU,
the copies and stream syncs run with no Python between pieces; CUDA entry points come
from ``dlopen("libcuda.so.1")``. The per-file work before that is C too
(``gw_ft_plan``, one call per request list: the table of validated paths, opens and
their /proc/self/fd check, range and destination checks, task split; see
:meth:`FileService._plan_c`); Python resolves a path only at its first use, when its
real path stops opening, and at reopens of paths reached through a symlink. Entries
of at least 1 MiB whose range is not in the page cache are read with O_DIRECT
(``gds_direct``, docs/gds.md "Cold reads").

Session end (:meth:`FileService.close`, before the session's memory and context go):
reads not started are dropped, running ones stop after their current piece, every
flag is released (no stream waits forever), the workers exit and free their buffers.

Errors are Python exceptions naming the path; the server maps them to CUresults
(:func:`error_code`): outside the roots / no roots / not readable ->
CUDA_ERROR_NOT_PERMITTED, missing -> CUDA_ERROR_FILE_NOT_FOUND, short read or a bad
request list -> CUDA_ERROR_INVALID_VALUE, other OS errors ->
CUDA_ERROR_OPERATING_SYSTEM.
"""
from __future__ import annotations

import ctypes
import os
import queue
import struct
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from .. import settings
from . import _settings  # noqa: F401  (registers GPUWIRE_GDS_*)
from ._files import FileCache
from .errors import BackendUnavailable, ShortReadError
from .roots import DataRoots, OutsideDataRootsError

try:   # the per-piece loop in C (cffi_src/gw_files.c), GIL released; Python below if not built
    from .._files import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - the package builds it
    _ffi = _lib = None

__all__ = ["FileService", "pack_reads", "unpack_reads", "error_code", "SMALL_READ_BYTES"]

#: kvikio engine: requests smaller than this go through pinned staging + async H2D.
SMALL_READ_BYTES = 64 << 10

_MAX_IO = 0x7FFFF000
_ENTRY = struct.Struct("<QQQI")      # dst, file offset, nbytes, path index
_U32 = struct.Struct("<I")
MAX_READS = 1 << 20                  # entries in one gwFileReadV

# CUresult values (the driver's numbering; kept here so this module needs no RPC import)
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_FILE_NOT_FOUND = 301
CUDA_ERROR_OPERATING_SYSTEM = 304
CUDA_ERROR_NOT_PERMITTED = 800


# ----------------------------------------------------------------------------- wire format of gwFileReadV

def pack_reads(reads: Sequence[Tuple[str, int, int, int]]) -> bytes:
    """The ``requests`` blob of ``gwFileReadV`` for ``[(path, offset, nbytes, dst)]``.

    Layout (little-endian): ``u32 npaths``, then per path ``u32 len`` + UTF-8 bytes,
    then one ``<QQQI`` entry per read: destination address, file offset, byte
    count, index into the path table. A path repeated across reads is sent once.
    """
    index: dict = {}
    table: List[bytes] = []
    ents = bytearray()
    for path, offset, nbytes, dst in reads:
        p = os.fsencode(path)
        k = index.get(p)
        if k is None:
            k = index[p] = len(table)
            table.append(p)
        ents += _ENTRY.pack(int(dst), int(offset), int(nbytes), k)
    out = bytearray(_U32.pack(len(table)))
    for p in table:
        out += _U32.pack(len(p)) + p
    return bytes(out + ents)


def unpack_reads(blob: Any, count: int) -> List[Tuple[str, int, int, int]]:
    """Inverse of :func:`pack_reads`; ``ValueError`` for a malformed list."""
    mv = memoryview(blob).cast("B")
    n = mv.nbytes
    if count > MAX_READS:
        raise ValueError(f"gwFileReadV: {count} reads in one call (at most {MAX_READS})")
    if n < 4:
        raise ValueError("gwFileReadV: request list shorter than its path count")
    (npaths,) = _U32.unpack_from(mv, 0)
    off = 4
    paths: List[str] = []
    for i in range(npaths):
        if n - off < 4:
            raise ValueError(f"gwFileReadV: path {i} of {npaths} missing")
        (ln,) = _U32.unpack_from(mv, off)
        off += 4
        if n - off < ln:
            raise ValueError(f"gwFileReadV: path {i} runs past the request list")
        paths.append(os.fsdecode(bytes(mv[off:off + ln])))
        off += ln
    if n - off != count * _ENTRY.size:
        raise ValueError(f"gwFileReadV: {n - off} bytes of entries for {count} reads "
                         f"(expected {count * _ENTRY.size})")
    out = []
    for _ in range(count):
        dst, offset, nbytes, k = _ENTRY.unpack_from(mv, off)
        off += _ENTRY.size
        if k >= npaths:
            raise ValueError(f"gwFileReadV: path index {k} of {npaths} paths")
        out.append((paths[k], offset, nbytes, dst))
    return out


def decode_path(blob: Any) -> str:
    """A path string argument as the server receives it (bytes, NUL-terminated)."""
    raw = blob.read() if hasattr(blob, "read") else bytes(blob)
    raw = bytes(raw)
    if raw.endswith(b"\0"):
        raw = raw[:-1]   # the terminator; a NUL inside the path is refused, never truncated at
    if b"\0" in raw:
        raise PermissionError(f"refused {os.fsdecode(raw)!r}: NUL byte in the path")
    return os.fsdecode(raw)


def error_code(e: BaseException) -> int:
    """The CUresult the server returns for a failed file call (see the module docstring)."""
    if isinstance(e, (OutsideDataRootsError, PermissionError)):
        return CUDA_ERROR_NOT_PERMITTED
    if isinstance(e, FileNotFoundError):
        return CUDA_ERROR_FILE_NOT_FOUND
    if isinstance(e, (ShortReadError, ValueError, OverflowError)):
        return CUDA_ERROR_INVALID_VALUE
    return CUDA_ERROR_OPERATING_SYSTEM


def error_text(e: BaseException) -> str:
    """The message of a failed file call (the path is in it)."""
    if isinstance(e, OSError) and not isinstance(e, OutsideDataRootsError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e)


# ----------------------------------------------------------------------------- helpers

def _pread_full(fd: int, view: memoryview, offset: int, path: str, size: int) -> int:
    want, done = len(view), 0
    while done < want:
        n = os.preadv(fd, [view[done:done + min(want - done, _MAX_IO)]], offset + done)
        if n == 0:
            raise ShortReadError(path, offset, want, done, size)
        done += n
    return done


class _Open:
    """An open file of a session: descriptor, size at open, and the kvikio handle if any."""

    __slots__ = ("fd", "cufile")

    def __init__(self, fd: int, cufile: Any = None):
        self.fd, self.cufile = fd, cufile


class _DevBuf:
    """A raw device range for kvikio (``__cuda_array_interface__``, no cupy needed)."""

    __slots__ = ("ptr", "nbytes")

    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes = ptr, nbytes

    @property
    def __cuda_array_interface__(self):
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "strides": None, "version": 3}


class _Staging:
    """Two pinned host buffers (from the executor) and an event each; reads fill one while
    the other's H2D copies run. Every read gets its own async copy from where it landed."""

    def __init__(self, es: Any, nbytes: int):
        self.es, self.nbytes = es, nbytes
        self.ptr: List[int] = []
        self.view: List[memoryview] = []
        self.event: List[Any] = []
        try:
            for _ in range(2):
                p = int(es.host_alloc(nbytes, 0))
                self.ptr.append(p)
                self.view.append(memoryview((ctypes.c_ubyte * nbytes).from_address(p)).cast("B"))
                self.event.append(es.cuEventCreate(0, 2))   # CU_EVENT_DISABLE_TIMING
        except BaseException:
            self.close()
            raise
        self.busy = [False, False]
        self.k = 0
        self.fill = 0

    def _switch(self, stream: Any) -> None:
        es, k = self.es, self.k
        es.cuEventRecord(self.event[k], stream)
        self.busy[k] = True
        self.k = k ^ 1
        self.fill = 0
        if self.busy[self.k]:
            es.cuEventSynchronize(self.event[self.k])
            self.busy[self.k] = False

    def add(self, fd: int, path: str, size: int, offset: int, nbytes: int, dst: int, stream: Any) -> None:
        """pread ``nbytes`` at ``offset`` and queue their copy to ``dst`` on ``stream``."""
        done = 0
        while done < nbytes:
            if self.fill == self.nbytes:
                self._switch(stream)
            m = min(self.nbytes - self.fill, nbytes - done)
            k, f = self.k, self.fill
            _pread_full(fd, self.view[k][f:f + m], offset + done, path, size)
            self.es.copy_htod(dst + done, self.ptr[k] + f, m, stream)
            self.fill += m
            done += m

    def end(self, stream: Any) -> None:
        """After a call: the current buffer's copies are marked (its reuse waits for them)."""
        if self.fill:
            self._switch(stream)

    def close(self) -> None:
        es = self.es
        for k, ev in enumerate(self.event):
            try:
                es.cuEventSynchronize(ev)
                es.cuEventDestroy(ev)
            except Exception:
                pass
        for p in self.ptr:
            try:
                es.host_free(p)
            except Exception:
                pass
        self.event, self.ptr, self.view = [], [], []


# ----------------------------------------------------------------------------- asynchronous reads

_NSLOTS = 4096                 # release flags of the GPU engine (reads in flight at once)
_WAIT_GEQ = 0                  # CU_STREAM_WAIT_VALUE_GEQ
_CU_STREAM_NON_BLOCKING = 1
_MEMHOSTALLOC_PORTABLE_DEVICEMAP = 0x3


def _ck(r: Any, what: str) -> Any:
    """Unpack a cuda.bindings result; OSError naming the call on failure."""
    err = r[0]
    try:
        code = int(err)
    except (TypeError, ValueError):
        code = int(getattr(err, "value", 999))
    if code:
        raise OSError(f"{what} failed (CUresult {code})")
    return r[1] if len(r) == 2 else (None if len(r) == 1 else tuple(r[1:]))


def _named(e: OSError, path: str, offset: int, nbytes: int) -> OSError:
    """An OSError of a read that names the file (pread's own errors carry no path)."""
    if isinstance(e, ShortReadError) or e.filename is not None:
        return e
    if e.errno is not None:
        return OSError(e.errno, f"{e.strerror} (reading {nbytes} bytes at offset {offset})", path)
    return OSError(f"{e} (reading {path}: {nbytes} bytes at offset {offset})")


def _overlaps(ranges: List[Tuple[int, int]]) -> bool:
    """Whether any two of the [lo, hi) ranges overlap (they are sorted here)."""
    ranges.sort()
    for (a0, a1), (b0, _b1) in zip(ranges, ranges[1:]):
        if b0 < a1:
            return True
    return False


def _any_overlap(sorted_a: List[Tuple[int, int]], sorted_b: List[Tuple[int, int]]) -> bool:
    i = j = 0
    while i < len(sorted_a) and j < len(sorted_b):
        a0, a1 = sorted_a[i]
        b0, b1 = sorted_b[j]
        if a0 < b1 and b0 < a1:
            return True
        if a1 <= b1:
            i += 1
        else:
            j += 1
    return False


class _Group:
    """Reads that may run at the same time: consecutive file calls on one stream with
    nothing else queued between them and no destination byte written twice. They share
    one gate (an event recorded on the stream before the first of them)."""

    __slots__ = ("event", "refs", "ranges", "skey", "seq")

    def __init__(self, event: Any, skey: Any, seq: int):
        self.event, self.refs, self.ranges, self.skey, self.seq = event, 0, [], skey, seq


class _Job:
    """One gwFileRead / gwFileReadV in flight: its tasks, held files, release flag, error."""

    __slots__ = ("call", "held", "left", "error", "group", "slot", "target", "gate_ok", "done", "seq")

    def __init__(self, call: str, held: list, ntasks: int, group: Optional[_Group], seq: int = 0):
        self.call, self.held, self.left, self.group, self.seq = call, held, ntasks, group, max(0, seq)
        self.error: Optional[BaseException] = None
        self.slot, self.target, self.gate_ok, self.done = -1, 0, False, False


class _Worker:
    """Per worker thread of the GPU engine: a non-blocking stream and a pinned buffer."""

    __slots__ = ("stream", "ptr", "view", "cap", "st", "sh")

    def __init__(self):
        self.stream, self.ptr, self.view, self.cap = None, 0, None, 0
        self.sh: Optional[int] = None   # the stream's raw handle, for the C loop
        self.st = _ffi.new("gw_fr_status_t *") if _ffi is not None else None


_PIECE = struct.Struct("<QQQiIiI")   # gw_fr_piece_t: dst, file offset, nbytes, fd, tag, bfd, flags


class _Task:
    """Pieces for one worker call: ``buf`` holds ``n`` packed ``gw_fr_piece_t`` (dst,
    offset, nbytes, fd, tag); ``names[tag]`` is ``(path, size)`` of the piece's file
    (shared by the tasks of a call; errors name the file)."""

    __slots__ = ("buf", "n", "names")

    def __init__(self, names: list):
        self.buf, self.n, self.names = bytearray(), 0, names

    def unpack(self) -> List[Tuple[int, str, int, int, int, int]]:
        """``[(fd, path, size, offset, nbytes, dst)]`` (the Python loop and the tests)."""
        out = []
        for k in range(self.n):
            dst, off, n, fd, tag = _PIECE.unpack_from(self.buf, k * _PIECE.size)[:5]
            path, size = self.names[tag]
            out.append((fd, path, size, off, n, dst))
        return out

    def ptr(self) -> Any:
        """The pieces as a ``gw_fr_piece_t *`` for the C loop."""
        return _ffi.from_buffer("gw_fr_piece_t[]", self.buf)

    def piece(self, i: int) -> Tuple[int, int, int, int, int]:
        return _PIECE.unpack_from(self.buf, i * _PIECE.size)[:5]

    def name(self, tag: int) -> Tuple[str, int]:
        return self.names[tag]


class _CPlan:
    """A request list planned by the C file table (``gw_ft_plan``): the pieces, the tasks,
    the merged destination intervals; it holds its files open until :meth:`close`."""

    __slots__ = ("ft", "p")

    def __init__(self, ft: Any, p: Any):
        self.ft, self.p = ft, p

    def name(self, tag: int) -> Tuple[str, int]:
        p = self.p
        return os.fsdecode(_ffi.unpack(p.path[tag], p.path_len[tag])), int(p.size[tag])

    def tasks(self) -> List["_CTask"]:
        ts = self.p.task_start
        return [_CTask(self, ts[k], ts[k + 1] - ts[k]) for k in range(self.p.ntasks)]

    def ranges(self) -> List[Tuple[int, int]]:
        p = self.p
        r = _ffi.unpack(p.ranges, 2 * p.nranges) if p.nranges else []
        return list(zip(r[0::2], r[1::2]))

    def close(self) -> None:
        """Release the files (closing idle ones beyond gds_max_open_files) and the plan."""
        p, self.p = self.p, None
        if p is not None:
            _lib.gw_ft_plan_free(self.ft, p)


class _CTask:
    """A task of a :class:`_CPlan`: pieces ``[start, start + n)`` of its list."""

    __slots__ = ("plan", "start", "n")

    def __init__(self, plan: _CPlan, start: int, n: int):
        self.plan, self.start, self.n = plan, start, n

    def ptr(self) -> Any:
        return self.plan.p.pieces + self.start

    def piece(self, i: int) -> Tuple[int, int, int, int, int]:
        q = self.plan.p.pieces[self.start + i]
        return q.dst, q.offset, q.nbytes, q.fd, q.tag

    def name(self, tag: int) -> Tuple[str, int]:
        return self.plan.name(tag)

    def unpack(self) -> List[Tuple[int, str, int, int, int, int]]:
        """As :meth:`_Task.unpack`, with the buffered descriptor (the Python loops read into
        unaligned places: no O_DIRECT there)."""
        out = []
        pieces = self.plan.p.pieces
        for i in range(self.n):
            q = pieces[self.start + i]
            path, size = self.name(q.tag)
            out.append((q.bfd, path, size, q.offset, q.nbytes, q.dst))
        return out


def _plan(entries: Sequence[Tuple[Any, str, int, int, int]], chunk: int, serial: bool) -> List[_Task]:
    """Split ``[(handle, path, offset, nbytes, dst)]`` into tasks of at most ``chunk`` bytes
    (pieces of one entry may go to different tasks); ``serial``: one task, in order."""
    names = [(path, h.size) for h, path, _o, _n, _d in entries]
    tasks: List[_Task] = []
    cur = _Task(names)
    used = 0
    pack = _PIECE.pack
    for tag, (h, _path, off, n, dst) in enumerate(entries):
        fd = h.fd
        if used + n <= chunk or serial and n <= chunk:   # the common case: the whole entry
            cur.buf += pack(dst, off, n, fd, tag, fd, 0)
            cur.n += 1
            used += n
            if not serial and used >= chunk:
                tasks.append(cur)
                cur, used = _Task(names), 0
            continue
        pos = 0
        while pos < n:
            m = min(n - pos, chunk - used) if not serial else min(n - pos, chunk)
            cur.buf += pack(dst + pos, off + pos, m, fd, tag, fd, 0)
            cur.n += 1
            pos += m
            used += m
            if not serial and used >= chunk:
                tasks.append(cur)
                cur, used = _Task(names), 0
    if cur.n:
        tasks.append(cur)
    return tasks


def _task_error(t: _Task, st: Any) -> Optional[BaseException]:
    """The exception for a failed C task (None when cancelled: the session is closing)."""
    kind = st.kind
    if kind == _lib.GW_FR_CANCELLED:
        return None
    dst, off, n, fd, tag = t.piece(max(0, int(st.index)))
    path, size = t.name(tag)
    if kind == _lib.GW_FR_EOF:
        return ShortReadError(path, off, n, int(st.got), size)
    if kind == _lib.GW_FR_OS:
        return OSError(st.err, f"{os.strerror(st.err)} (reading {n} bytes at offset {off})", path)
    what = _ffi.string(st.what).decode(errors="replace")
    if kind == _lib.GW_FR_CUDA:
        return OSError(f"{what} failed (CUresult {st.err}) (reading {path}: {n} bytes at offset {off})")
    return OSError(f"{what} (reading {path}: {n} bytes at offset {off}; "
                   f"{_ffi.string(_lib.gw_fr_cuda_error()).decode(errors='replace')})")


# ----------------------------------------------------------------------------- the service

class FileService:
    """File reads of one server session into its device (or host-"device") memory.

    Reads run on a pool of worker threads of the session (``gds_threads`` of them,
    started at the first read), so the session's dispatch loop goes on with the
    client's next calls while they run; see the module docstring for the ordering.
    """

    def __init__(self, roots: Sequence[str], es: Any, backend: Optional[str] = None):
        self.roots = DataRoots(roots)
        self.es = es
        self.reads = 0
        self.bytes = 0
        self._kvikio = None
        self._staging: Optional[_Staging] = None
        self.kvikio_settings: dict = {}
        self.small_bytes = SMALL_READ_BYTES
        self.host = hasattr(es, "view")  # the CPU executor: device memory is host memory here
        self.requested = (backend or settings.get("gds_backend")).lower()
        if self.host:
            self.mode, self.detail = "posix-host", "preadv into the CPU executor's host-memory device"
            if _lib is not None and hasattr(es, "va_base"):
                self.detail = "pread into the CPU executor's host-memory device (per-task C loop, gpuwire._files)"
        else:
            self.mode, self.detail = self._pick_gpu_engine(backend)
        self._real: dict = {}   # client path -> real path of its last open (reopens after eviction)
        self._tls = threading.local()   # the C open's out-buffers, per thread
        self._root_exact = frozenset(os.fsencode(r) for r in self.roots.roots)
        self._root_prefixes = tuple(os.fsencode(r.rstrip(os.sep) + os.sep) for r in self.roots.roots)
        self._files = FileCache(self._open, self._close, settings.get("gds_max_open_files"))
        self._stream_legacy = es.special_stream(1) if hasattr(es, "special_stream") else None
        # -- the asynchronous engine (started at the first read)
        # gds_backend=kvikio asks for kvikio itself: its synchronous engine (see the docstring)
        self.async_wanted = (bool(settings.get("gds_remote_async")) and self.mode != "kvikio-gds"
                             and self.requested != "kvikio")
        self.order = "host" if self.host else ("stream-wait" if self.async_wanted else "sync")
        self.workers = max(1, int(settings.get("gds_threads")) or 8)
        # pieces of at most gds_task_size (kvikio's unit: the same parallelism), in a pinned
        # buffer of gds_staging_bytes per worker
        task = int(settings.get("gds_task_size")) or (4 << 20)
        self.chunk = max(64 << 10, min(int(settings.get("gds_staging_bytes")), task))
        self._cv = threading.Condition()
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._wstate: List[_Worker] = []
        self._inflight: set = set()
        self._errors: List[Tuple[str, BaseException, int]] = []
        self._error_later = 0
        self._closing = False
        self._cancel = _ffi.new("int *") if _ffi is not None else [0]   # C loops stop at close
        # the C loop of the CPU executor preads to the destination address: it must lie in the
        # session's memory (the server checked the allocation; this keeps direct callers in too)
        self._host_lo = self._host_hi = None
        if self.host and _lib is not None and hasattr(es, "va_base"):
            self._host_lo, self._host_hi = int(es.va_base), int(es.va_base) + int(es.va_size)
        # the C loop of the GPU engine needs libcuda's entry points (dlopen, no link-time CUDA)
        self._c_gpu = not self.host and _lib is not None and _lib.gw_fr_cuda_load() == 0
        self._group: Optional[_Group] = None
        # the C file table (gw_ft_*): per-file planning of the asynchronous and host engines
        # in C, paths validated once and remembered (see _plan_c); None: the Python planner
        self._ft = None
        self.direct = "off"
        self.max_open = int(settings.get("gds_max_open_files"))
        if _lib is not None and (self.host or self.async_wanted) and settings.get("gds_c_plan"):
            rb = b"".join(os.fsencode(r) + b"\0" for r in self.roots.roots)
            self._ft = _lib.gw_ft_new(rb, len(rb), len(self.roots.roots), max(1, self.max_open))
            if self._ft == _ffi.NULL:
                self._ft = None
            else:   # cold ranges of large entries through O_DIRECT (setting gds_direct)
                self.direct = str(settings.get("gds_direct"))
                _lib.gw_ft_set_direct(self._ft, {"off": 0, "auto": 1, "on": 2}[self.direct], int(self.host))
        self._gpu_ready: Optional[bool] = None   # None: not set up yet
        self._d = None
        self._flags: Any = None
        self._flags_host = 0
        self._flags_dev = 0
        self._targets: List[int] = []
        self._free_slots: List[int] = []
        self._free_events: List[Any] = []
        self._all_events: List[Any] = []
        self._wait_wrap = False
        self.mem_ops_attrs: dict = {}
        self.jobs = 0            # asynchronous jobs started (tests and stats)
        self.overlapped = 0      # jobs that joined a running group (ran alongside the one before)

    def _pick_gpu_engine(self, backend: Optional[str]) -> Tuple[str, str]:
        want = (backend or settings.get("gds_backend")).lower()
        if want in ("auto", "kvikio"):
            try:
                import kvikio
            except ImportError as e:
                if want == "kvikio":
                    raise BackendUnavailable(f"gds_backend=kvikio on the server, but kvikio is not "
                                             f"importable there ({e})") from None
            else:
                from .backends import apply_kvikio_settings, kvikio_mode

                self._kvikio = kvikio
                self.kvikio_settings = apply_kvikio_settings()
                return kvikio_mode(kvikio)
        return "posix+h2d", "pread into pinned staging, cuMemcpyHtoDAsync on the call's stream"

    # -- files
    def _open_checked(self, path: str) -> Tuple[int, Optional[int]]:
        """A descriptor of ``path`` inside the roots, and its size where known. The first
        open resolves the path (DataRoots.open_fd: realpath, opened beneath its root); reopens of an
        evicted file open the remembered real path and check the opened descriptor's /proc
        link instead, which is as strict (what was opened must lie inside a root) and far
        cheaper: with gpuwire._files, open + readlink + fstat are one C call (GIL released;
        the real path opened beneath its root, following nothing: gw_fr_open_beneath)
        and only the prefix check against the roots runs here."""
        real = self._real.get(path)
        if real is not None:
            if _lib is not None:
                tl = self._tls
                try:
                    link, plen, psz = tl.bufs
                except AttributeError:
                    link, plen, psz = tl.bufs = (_ffi.new("char[]", 4096), _ffi.new("int64_t *"),
                                                 _ffi.new("uint64_t *"))
                # beneath its root, following nothing: a directory swapped for a symlink
                # since is refused before what it leads to is opened (then resolved again)
                root = max((r for r in self._root_exact if real == r or real.startswith(r.rstrip(b"/") + b"/")),
                           key=len, default=b"")
                fd = _lib.gw_fr_open_beneath(root, real, link, 4096, plen, psz) if root else -1
                if fd >= 0:
                    n = plen[0]
                    if n >= 0:   # what was opened must lie in a root (DataRoots.contains, on bytes)
                        b = _ffi.unpack(link, n)
                        ok = b.startswith(self._root_prefixes) or b in self._root_exact
                    if n >= 0 and not ok:
                        os.close(fd)
                        self._real.pop(path, None)
                        raise OutsideDataRootsError(path, self.roots.roots, "changed while opening")
                    return fd, int(psz[0])
                self._real.pop(path, None)  # gone or changed: resolve again (and fail by name)
            else:
                try:
                    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    self._real.pop(path, None)
                else:
                    try:
                        self.roots.check_fd(fd, path)
                    except BaseException:
                        os.close(fd)
                        self._real.pop(path, None)
                        raise
                    return fd, None
        fd = self.roots.open_fd(path)
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = None
        if real is not None and len(self._real) < 1 << 20:
            self._real[path] = os.fsencode(real)
        return fd, None

    def _open(self, path: str) -> tuple:
        fd, size = self._open_checked(path)
        obj = _Open(fd)
        if self._kvikio is not None and not (self.async_wanted and self._gpu_ready is not False):
            try:  # reopen the checked descriptor itself: no second path lookup, no symlink race
                obj.cufile = self._kvikio.CuFile(f"/proc/self/fd/{fd}", "r")
            except Exception:
                obj.cufile = None  # reads of this file take the staging path
        return (obj, fd) if size is None else (obj, fd, size)

    @staticmethod
    def _close(obj: _Open) -> None:
        if obj.cufile is not None:
            try:
                obj.cufile.close()
            except Exception:
                pass
        try:
            os.close(obj.fd)
        except OSError:
            pass

    def stat(self, path: str) -> int:
        """Size of ``path`` (opened, so an unreadable file fails here as it would on read)."""
        if self._ft is not None and self._async_engine():   # the table the reads use: one open
            plan = self._plan_c(pack_reads([(path, 0, 0, 0)]), 1, "gwFileStat")
            try:
                return os.fstat(_lib.gw_ft_plan_fd(self._ft, plan.p, 0)).st_size
            finally:
                plan.close()
        h = self._files.acquire(path)
        try:
            return h.refresh_size()
        finally:
            h.close()

    def describe(self) -> str:
        """``key=value; ...``: mode, detail, kvikio settings, roots, order (stream-wait,
        sync or host), workers, and the device's stream memory operation attributes."""
        if not self.host and self.async_wanted and self._gpu_ready is None:
            self._setup_gpu()
        parts = [f"mode={self.mode}", "detail=" + self.detail.replace("; ", ", ")]
        if self.kvikio_settings:
            parts.append("kvikio=" + ",".join(f"{k}:{v}" for k, v in self.kvikio_settings.items()))
        parts.append("roots=" + os.pathsep.join(self.roots.roots))
        parts.append(f"order={self.order}")
        parts.append(f"plan={'c' if self._ft is not None else 'python'}; direct={self.direct}")
        parts.append(f"workers={self.workers if self.order != 'sync' else 0}")
        if self.mem_ops_attrs:
            parts.append("memops=" + ",".join(f"{k.replace('CU_DEVICE_ATTRIBUTE_', '')}:{v}"
                                              for k, v in self.mem_ops_attrs.items()))
        return "; ".join(parts)

    # -- reads
    def read(self, dst: int, path: str, offset: int, nbytes: int, stream: Any, seq: int = -1) -> None:
        self.read_many([(path, offset, nbytes, dst)], stream, seq, call="gwFileRead")

    def read_many(self, reads: Sequence[Tuple[str, int, int, int]], stream: Any, seq: int = -1,
                  call: str = "gwFileReadV") -> None:
        """``[(path, offset, nbytes, dst)]``; destinations were range-checked by the caller.

        Every file is opened and every range checked before a byte is written (those
        errors raise here). The bytes are then read by the worker pool: on the CPU
        executor before this returns (its streams are host-ordered), on the GPU ordered
        on ``stream`` (see the module docstring); a read failing there is reported by
        :meth:`take_error` at the session's next sync. ``seq``: the session's call
        number of this call (consecutive reads on a stream may run together)."""
        if not self._async_engine():
            self._read_gpu(reads, stream)
            return
        if self._ft is not None:
            blob = pack_reads(reads)
            self._read_planned(blob, len(reads), stream, seq, call, None)
            return
        held: list = []
        acquire, check, lo, hi = self._files.acquire, self._check, self._host_lo, self._host_hi
        try:
            entries = []
            for path, offset, nbytes, dst in reads:
                h = acquire(path)
                held.append(h)
                check(h, path, offset, nbytes)
                if nbytes:
                    if lo is not None and not (lo <= dst and dst + nbytes <= hi):
                        raise ValueError(f"{call}: destination {dst:#x}+{nbytes} for {path} is outside "
                                         f"the session's memory")
                    entries.append((h, path, offset, nbytes, dst))
        except BaseException:
            for h in held:
                h.close()
            raise
        ranges = [(dst, dst + n) for _h, _p, _o, n, dst in entries]
        serial = len(ranges) > 1 and _overlaps(ranges)   # an entry overwrites another: in order
        tasks = _plan(entries, self.chunk, serial)
        self.reads += len(entries)
        self.bytes += sum(e[3] for e in entries)
        self._dispatch(call, held, tasks, ranges, stream, seq)

    def _async_engine(self) -> bool:
        """Whether reads go to the read workers (host or stream-wait engine), not _read_gpu."""
        if self.host:
            return True
        if not self.async_wanted:
            return False
        if self._gpu_ready is None:
            self._setup_gpu()
        return bool(self._gpu_ready)

    def read_packed(self, blob: Any, count: int, stream: Any, seq: int = -1, call: str = "gwFileReadV",
                    check_dst: Optional[Callable[[int, int, str], None]] = None) -> None:
        """A ``gwFileReadV`` request list as it came (:func:`pack_reads`'s format).

        ``check_dst(ptr, n, what)`` raises for a destination range outside the session's
        memory (the server's devptr check). With the C file table the per-file work runs
        in C (:meth:`_plan_c`) and ``check_dst`` sees the merged destination intervals
        (entries landing back to back: one check), each entry's own range only where an
        interval spans several allocations; without it the list is unpacked here."""
        if self._ft is None or not self._async_engine():
            reads = unpack_reads(blob, count)
            if check_dst is not None:
                for _p, _o, n, dst in reads:
                    check_dst(dst, n, f"{call}: destination")
            self.read_many(reads, stream, seq, call)
            return
        self._read_planned(blob, count, stream, seq, call, check_dst)

    def _read_planned(self, blob: Any, count: int, stream: Any, seq: int, call: str,
                      check_dst: Optional[Callable[[int, int, str], None]]) -> None:
        plan = self._plan_c(blob, count, call)
        try:
            ranges = plan.ranges()
            if check_dst is not None:
                self._check_intervals(ranges, blob, count, call, check_dst)
            p = plan.p
            self.reads += int(p.nentries)
            self.bytes += int(p.nbytes)
            tasks = plan.tasks()
        except BaseException:
            plan.close()
            raise
        self._dispatch(call, [plan], tasks, ranges, stream, seq)

    @staticmethod
    def _check_intervals(ranges, blob, count, call, check_dst) -> None:
        what = f"{call}: destination"
        for lo, hi in ranges:
            try:
                check_dst(lo, hi - lo, what)
            except Exception:
                break      # maybe back to back across two allocations: each entry decides
        else:
            return
        for _p, _o, n, dst in unpack_reads(blob, count):
            if n:
                check_dst(dst, n, what)

    def _plan_c(self, blob: Any, count: int, call: str) -> _CPlan:
        """Plan a request list in C (gw_ft_plan, GIL released). Paths the table does not
        know yet (first use, or their remembered real path stopped opening) are resolved
        here with :class:`DataRoots` (``..``, symlinks leading out, missing files: raised
        by name) and taught to the table, then the list is planned again. Every open in
        C checks the opened descriptor's /proc/self/fd link against the roots."""
        if count > MAX_READS:
            raise ValueError(f"{call}: {count} reads in one call (at most {MAX_READS})")
        ft = self._ft
        src = _ffi.from_buffer(blob)
        lo, hi = (self._host_lo, self._host_hi) if self._host_lo is not None else (0, 0)
        for attempt in range(4):
            p = _lib.gw_ft_plan(ft, src, len(src), count, self.chunk, lo, hi)
            if p == _ffi.NULL:
                raise MemoryError(f"{call}: out of memory planning {count} reads")
            kind = p.kind
            if kind == _lib.GW_FT_OK:
                return _CPlan(ft, p)
            plan = _CPlan(ft, p)
            try:
                if kind == _lib.GW_FT_NEED:
                    p_n = int(p.npaths)
                    names = [_ffi.unpack(p.path[i], p.path_len[i]) for i in (p.need[k] for k in range(p.nneed))]
                else:
                    raise self._plan_error(plan, blob, count, call)
            finally:
                plan.close()
            for raw in names:
                path = os.fsdecode(raw)
                real = os.fsencode(self.roots.resolve(path))   # raises naming the path
                r = _lib.gw_ft_learn(ft, raw, len(raw), real, len(real), int(real == self._direct_name(raw)))
                if r < 0:
                    raise OSError(-r, f"{os.strerror(-r)} (remembering the path)", path)
        raise OSError(f"{call}: {path!r} and others of the call's {p_n} paths kept changing while "
                      f"opening, or more distinct paths than the session's path table holds")

    def _direct_name(self, raw: bytes) -> bytes:
        """Where ``raw`` lies without following anything: under the first root (relative)
        or itself (absolute). Equal to its real path: the path is *direct* (gw_ft_learn)."""
        if raw.startswith(b"/"):
            return raw
        return self._root_prefixes[0] + raw if self._root_prefixes else b""

    def _plan_error(self, plan: _CPlan, blob: Any, count: int, call: str) -> BaseException:
        p = plan.p
        kind = p.kind
        if kind == _lib.GW_FT_BADREQ:
            unpack_reads(blob, count)       # raises ValueError naming what is wrong
            return ValueError(f"{call}: malformed request list")
        if kind == _lib.GW_FT_NOMEM:
            return MemoryError(f"{call}: out of memory planning {count} reads")
        path, size = plan.name(p.bad_path)
        if kind == _lib.GW_FT_OS:
            return OSError(p.err, os.strerror(p.err), path)
        if kind == _lib.GW_FT_OUTSIDE:
            return OutsideDataRootsError(path, self.roots.roots, "changed while opening")
        if kind == _lib.GW_FT_NOTREG:
            return OSError(f"{path!r} is not a regular file")
        off, n = int(p.bad_offset), int(p.bad_nbytes)
        if kind == _lib.GW_FT_EOF:
            return ShortReadError(path, off, n, max(0, size - off), size)
        if kind == _lib.GW_FT_BADDST:
            return ValueError(f"{call}: destination {int(p.bad_dst):#x}+{n} for {path} is outside "
                              f"the session's memory")
        return OSError(f"{call}: planning failed (kind {kind}) at {path}")

    def file_stats(self) -> dict:
        """Counters of the C file table: ``opens`` (files opened), ``open`` (descriptors
        held now), ``paths`` (known paths), ``resolves`` (paths resolved by Python)."""
        if self._ft is None:
            return {"opens": self._files.opens, "open": len(self._files), "paths": len(self._real), "resolves": 0,
                    "direct_entries": 0, "direct_bytes": 0}
        out = _ffi.new("uint64_t[6]")
        _lib.gw_ft_stats(self._ft, out)
        return {"opens": int(out[0]), "open": int(out[1]), "paths": int(out[2]), "resolves": int(out[3]),
                "direct_entries": int(out[4]), "direct_bytes": int(out[5])}

    def set_max_open(self, n: int) -> None:
        """Idle open files kept (both file caches of the session)."""
        self.max_open = max(1, int(n))
        self._files.max_open = self.max_open
        if self._ft is not None:
            _lib.gw_ft_set_max_open(self._ft, self.max_open)

    def _dispatch(self, call: str, held: list, tasks: list, ranges: List[Tuple[int, int]],
                  stream: Any, seq: int) -> None:
        """Hand a planned call's tasks to the read workers (``held``: what to close when done)."""
        if not tasks:
            for h in held:
                h.close()
            return
        self._start_workers()
        if self.host:
            job = _Job(call, held, len(tasks), None, seq)
            with self._cv:
                self._inflight.add(job)
                self.jobs += 1
            for t in tasks:
                self._q.put((job, t))
            with self._cv:   # host-ordered: the next call sees the bytes
                while not job.done:
                    self._cv.wait()
            return
        self._submit_gpu(call, held, tasks, ranges, stream, seq)

    def _submit_gpu(self, call: str, held: list, tasks: List[list], ranges: List[Tuple[int, int]],
                    stream: Any, seq: int) -> None:
        es = self.es
        skey = getattr(stream, "ptr", id(stream)) if stream is not None else 0
        sranges = sorted(ranges)
        with self._cv:
            g = self._group
            join = (g is not None and g.refs > 0 and seq >= 0 and g.seq == seq - 1 and g.skey == skey
                    and not _any_overlap(g.ranges, sranges))
            if not join:
                g = None
            else:
                g.refs += 1          # held: its event cannot be recycled under us
            while not self._free_slots:
                if self._closing:
                    raise OSError(f"{call}: the session is closing")
                self._cv.wait(1.0)   # 4096 reads in flight: wait for one to finish
            slot = self._free_slots.pop()
        try:
            if g is None:
                with self._cv:
                    ev = self._free_events.pop() if self._free_events else None
                if ev is None:
                    ev = es.cuEventCreate(0, 2)      # CU_EVENT_DISABLE_TIMING
                    self._all_events.append(ev)
                es.cuEventRecord(ev, stream)         # the gate: work queued on the stream so far
                g = _Group(ev, skey, seq)
                g.refs = 1
            else:
                self.overlapped += 1
            self._targets[slot] = target = (self._targets[slot] + 1) & 0xFFFFFFFF or 1
            self._wait_value(es._s(stream), self._flags_dev + 4 * slot, target)
        except BaseException:
            with self._cv:
                self._free_slots.append(slot)
                self._unref(g)
            for h in held:
                h.close()
            raise
        job = _Job(call, held, len(tasks), g, seq)
        job.slot, job.target = slot, target
        with self._cv:
            g.ranges = sorted(g.ranges + sranges) if g.ranges else sranges
            g.seq = seq
            self._group = g
            self._inflight.add(job)
            self.jobs += 1
        for t in tasks:
            self._q.put((job, t))

    def _wait_value(self, stream_h: Any, addr: int, value: int) -> None:
        d = self._d
        if not self._wait_wrap:
            try:
                _ck(d.cuStreamWaitValue32(stream_h, addr, value, _WAIT_GEQ), "cuStreamWaitValue32")
                return
            except TypeError:
                self._wait_wrap = True
        _ck(d.cuStreamWaitValue32(stream_h, d.CUdeviceptr(addr), d.cuuint32_t(value), _WAIT_GEQ),
            "cuStreamWaitValue32")

    def _unref(self, g: Optional[_Group]) -> None:
        """(under the lock) a job of group ``g`` is done with its gate."""
        if g is None:
            return
        g.refs -= 1
        if g.refs <= 0:
            self._free_events.append(g.event)
            if self._group is g:
                self._group = None

    # -- the GPU engine's setup
    def _setup_gpu(self) -> None:
        """Release flags in pinned mapped host memory and a probe of cuStreamWaitValue32;
        any failure leaves the synchronous path (order=sync, the reason in detail)."""
        self._gpu_ready = False
        why = None
        try:
            from cuda.bindings import driver as d
        except ImportError as e:
            why = f"cuda.bindings not importable ({e})"
        else:
            self._d = d
            try:
                why = self._probe(d)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
        if why is None:
            self._gpu_ready = True
            self.mode = "posix+h2d"
            was = f" ({self.detail} found, not used: see docs/gds.md)" if self._kvikio is not None else ""
            self.detail = (f"{self.workers} worker threads: pread into pinned buffers and cuMemcpyHtoDAsync on "
                           f"their own non-blocking streams, ordered on the call's stream by "
                           f"cuStreamWaitValue32 on a host-mapped flag{was}; {self._loop_text()}")
        else:
            self.order = "sync"
            self.detail += f" (synchronous: stream memory operations unusable: {why})"
            self._free_flags()

    def _loop_text(self) -> str:
        if self._c_gpu:
            return "per-task C loop (gpuwire._files)"
        why = "gpuwire._files not built" if _lib is None else _ffi.string(_lib.gw_fr_cuda_error()).decode()
        return f"Python loop ({why})"

    def _probe(self, d: Any) -> Optional[str]:
        """None when a stream really waits for a flag this process writes; else why not."""
        es = self.es
        for n in dir(d.CUdevice_attribute):   # reported in detail; the probe below decides
            if "CAN_USE_STREAM_MEM_OPS" in n or "CAN_USE_STREAM_WAIT_VALUE" in n:
                try:
                    self.mem_ops_attrs[n] = int(_ck(d.cuDeviceGetAttribute(getattr(d.CUdevice_attribute, n),
                                                                           es.devh), n))
                except (OSError, TypeError, ValueError):
                    pass
        self._flags_host = int(_ck(d.cuMemHostAlloc(4 * _NSLOTS, _MEMHOSTALLOC_PORTABLE_DEVICEMAP),
                                   "cuMemHostAlloc"))
        self._flags = (ctypes.c_uint32 * _NSLOTS).from_address(self._flags_host)
        ctypes.memset(self._flags_host, 0, 4 * _NSLOTS)
        self._flags_dev = int(_ck(d.cuMemHostGetDevicePointer(self._flags_host, 0), "cuMemHostGetDevicePointer"))
        self._targets = [0] * _NSLOTS
        self._free_slots = list(range(_NSLOTS - 1, 0, -1))   # slot 0: the probe's
        st = _ck(d.cuStreamCreate(_CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        try:
            self._flags[0] = 1
            self._wait_value(st, self._flags_dev, 2)
            r = int(d.cuStreamQuery(st)[0])
            if r == 0:
                self._flags[0] = 2
                return "cuStreamWaitValue32 did not wait"
            if r != 600:   # CUDA_ERROR_NOT_READY: it waits, as it should
                self._flags[0] = 2
                return f"cuStreamQuery after cuStreamWaitValue32: CUresult {r}"
            self._flags[0] = 2                                  # the host releases it ...
            end = time.monotonic() + 5.0
            while True:                                         # ... and the stream goes on
                r = int(d.cuStreamQuery(st)[0])
                if r == 0:
                    break
                if r != 600 or time.monotonic() > end:
                    return f"the stream did not see the host's flag (CUresult {r})"
                time.sleep(0.0005)
        finally:
            d.cuStreamDestroy(st)
        return None

    def _free_flags(self) -> None:
        if self._flags_host and self._d is not None:
            try:
                self._d.cuMemFreeHost(self._flags_host)
            except Exception:
                pass
        self._flags_host, self._flags = 0, None

    # -- workers
    def _start_workers(self) -> None:
        if self._threads:
            return
        for i in range(self.workers):
            w = _Worker()
            th = threading.Thread(target=self._work, args=(w,), name=f"gds-read-{i}", daemon=True)
            self._wstate.append(w)
            self._threads.append(th)
            th.start()

    def _work(self, w: _Worker) -> None:
        init_err: Optional[BaseException] = None
        if not self.host:
            try:
                d = self._d
                _ck(d.cuCtxSetCurrent(self.es.ctx), "cuCtxSetCurrent")
                w.stream = _ck(d.cuStreamCreate(_CU_STREAM_NON_BLOCKING), "cuStreamCreate")
                w.ptr = int(_ck(d.cuMemHostAlloc(self.chunk, 0), "cuMemHostAlloc"))
                w.cap = self.chunk
                w.view = memoryview((ctypes.c_ubyte * self.chunk).from_address(w.ptr)).cast("B")
                try:
                    w.sh = int(w.stream)
                except (TypeError, ValueError):
                    w.sh = None   # the Python loop below
            except BaseException as e:
                init_err = e
        try:
            while True:
                item = self._q.get()
                if item is None:
                    break
                job, pieces = item
                err = init_err
                if err is None and not self._closing:
                    try:
                        if self.host:
                            self._task_host(w, pieces)
                        else:
                            self._task_gpu(w, job, pieces)
                    except BaseException as e:
                        err = e
                self._task_done(job, err)
        finally:
            if not self.host:
                self._worker_free(w)

    def _task_host(self, w: _Worker, t: _Task) -> None:
        if self._host_lo is not None:   # C: pread straight to the destinations, GIL released
            if _lib.gw_fr_read_host(t.ptr(), t.n, self._cancel, w.st):
                e = _task_error(t, w.st)
                if e is not None:
                    raise e
            return
        view = self.es.view
        for fd, path, size, off, n, dst in t.unpack():
            try:
                _pread_full(fd, memoryview(view(dst, n)).cast("B"), off, path, size)
            except OSError as e:
                raise _named(e, path, off, n) from None

    def _task_gpu(self, w: _Worker, job: _Job, t: _Task) -> None:
        d = self._d
        if not job.gate_ok:   # earlier work on the call's stream is done (the destination is free)
            _ck(d.cuEventSynchronize(job.group.event.h), "cuEventSynchronize")
            job.gate_ok = True
        if self._c_gpu and w.sh is not None:   # C: pread to the pinned buffer + H2D, GIL released
            if _lib.gw_fr_read_gpu(t.ptr(), t.n, w.ptr, w.cap,
                                   w.sh, self._cancel, w.st):
                e = _task_error(t, w.st)   # (the C loop synchronized the stream already)
                if e is not None:
                    raise e
            return
        try:
            self._pieces_gpu(w, t.unpack())
        except BaseException:
            try:   # copies already queued still read this worker's buffer: let them finish
                d.cuStreamSynchronize(w.stream)
            except Exception:
                pass
            raise

    def _pieces_gpu(self, w: _Worker, pieces: list) -> None:
        """The Python loop of :meth:`_task_gpu` (where gpuwire._files or libcuda is missing)."""
        d = self._d
        fill = 0
        run_dst = run_src = run_n = 0     # pieces landing back to back go in one copy
        for fd, path, size, off, n, dst in pieces:
            if fill + n > w.cap:
                if run_n:
                    _ck(d.cuMemcpyHtoDAsync(run_dst, w.ptr + run_src, run_n, w.stream), "cuMemcpyHtoDAsync")
                    run_n = 0
                _ck(d.cuStreamSynchronize(w.stream), "cuStreamSynchronize")
                fill = 0
                if self._closing:
                    return
            try:
                _pread_full(fd, w.view[fill:fill + n], off, path, size)
                if run_n and dst == run_dst + run_n and fill == run_src + run_n:
                    run_n += n
                else:
                    if run_n:
                        _ck(d.cuMemcpyHtoDAsync(run_dst, w.ptr + run_src, run_n, w.stream), "cuMemcpyHtoDAsync")
                    run_dst, run_src, run_n = dst, fill, n
            except OSError as e:
                raise _named(e, path, off, n) from None
            fill += n
        if run_n:
            _ck(d.cuMemcpyHtoDAsync(run_dst, w.ptr + run_src, run_n, w.stream), "cuMemcpyHtoDAsync")
        _ck(d.cuStreamSynchronize(w.stream), "cuStreamSynchronize")

    def _task_done(self, job: _Job, err: Optional[BaseException]) -> None:
        with self._cv:
            if err is not None and job.error is None:
                job.error = err
            job.left -= 1
            if job.left > 0:
                return
            # the last task: the error is recorded before the stream is released, so a sync
            # that saw the read complete also sees its error
            if job.error is not None and not self._closing:
                if self._errors:
                    self._error_later += 1
                else:
                    self._errors.append((job.call, job.error, job.seq))
            if job.slot >= 0:
                self._flags[job.slot] = job.target   # the call's stream goes on
                self._free_slots.append(job.slot)
            held, job.held = job.held, []
        for h in held:   # the files are released before the job counts as done
            h.close()
        with self._cv:
            self._unref(job.group)
            self._inflight.discard(job)
            job.done = True
            self._cv.notify_all()

    def _worker_free(self, w: _Worker) -> None:
        d = self._d
        if d is None:
            return
        if w.stream is not None:
            try:
                d.cuStreamSynchronize(w.stream)
                d.cuStreamDestroy(w.stream)
            except Exception:
                pass
        if w.ptr:
            w.view = None
            try:
                d.cuMemFreeHost(w.ptr)
            except Exception:
                pass
        w.stream, w.ptr = None, 0

    # -- what the server asks between calls
    @property
    def busy(self) -> bool:
        """Reads in flight, or an error not yet reported: the session's next sync must be
        answered by the Python server (it carries the error)."""
        return bool(self._inflight or self._errors)

    def take_error(self) -> Optional[Tuple[str, str, int, int, int]]:
        """The first failed asynchronous read not yet reported, as ``(call, message naming
        the path, CUresult, call number, later failures)``; None when there is none."""
        with self._cv:
            if not self._errors:
                return None
            call, e, seq = self._errors.pop(0)
            later, self._error_later = self._error_later, 0
        return call, error_text(e), error_code(e), seq, later

    def quiesce(self, timeout: Optional[float] = None) -> bool:
        """Wait until no read is in flight; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._inflight:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 1.0)
        return True

    @staticmethod
    def _check(h, path: str, offset: int, nbytes: int) -> None:
        if offset + nbytes > h.size and offset + nbytes > h.refresh_size():
            raise ShortReadError(path, offset, nbytes, max(0, h.size - offset), h.size)

    def _read_gpu(self, reads, stream: Any) -> None:
        """The synchronous engine (kvikio-gds, gds_remote_async=0, or no stream memory
        operations): the call's stream is synchronized first (kvikio is not stream-ordered),
        and the call returns once the data is in place. Opens and reads interleave (a
        kvikio read runs while the next file opens); every read issued is waited for, even
        after an error."""
        es = self.es
        s = stream if stream is not None else self._stream_legacy
        held, futs, err, synced, st = [], [], None, False, None
        try:
            for path, offset, nbytes, dst in reads:
                h = self._files.acquire(path)
                held.append(h)
                self._check(h, path, offset, nbytes)
                if not nbytes:
                    continue
                if self._kvikio is not None and h.obj.cufile is not None and nbytes >= self.small_bytes:
                    if not synced:
                        # kvikio is not stream-ordered: earlier work on the stream finishes first
                        es.cuStreamSynchronize(stream)
                        synced = True
                    try:
                        fut = h.obj.cufile.pread(_DevBuf(dst, nbytes), nbytes, offset)
                    except Exception as e:
                        raise OSError(f"kvikio pread of {path} ({nbytes} bytes at offset {offset}) "
                                      f"failed: {e}") from None
                    futs.append((path, offset, nbytes, h.size, fut))
                else:
                    if st is None:
                        st = self._staging
                        if st is None:
                            st = self._staging = _Staging(es, int(settings.get("gds_staging_bytes")))
                    st.add(h.fd, path, h.size, offset, nbytes, dst, s)
                self.reads += 1
                self.bytes += nbytes
        except BaseException as e:
            err = e
        if st is not None:
            try:
                st.end(s)
            except Exception as e:
                err = err or e
        for path, offset, nbytes, size, fut in futs:
            try:
                got = fut.get()
            except Exception as e:
                err = err or OSError(f"kvikio read of {path} ({nbytes} bytes at offset {offset}) failed: {e}")
                continue
            if got != nbytes and err is None:
                err = ShortReadError(path, offset, nbytes, got, size)
        for h in held:
            h.close()
        if err is not None:
            raise err

    def close(self, timeout: float = 60.0) -> None:
        """End of the session: reads not started are dropped, running ones finish their
        current piece; every call's stream is released (nothing waits on a flag forever);
        workers exit and free their buffers. Call before the session's memory and context
        go. Idempotent."""
        with self._cv:
            self._closing = True
            self._cancel[0] = 1
            self._cv.notify_all()
        clean = self.quiesce(timeout)
        if not clean:  # a worker stuck in the driver: release every stream anyway
            with self._cv:
                for job in list(self._inflight):
                    if job.slot >= 0 and self._flags is not None:
                        self._flags[job.slot] = job.target
        for _ in self._threads:
            self._q.put(None)
        for th in self._threads:
            th.join(timeout if clean else 1.0)
        alive = any(th.is_alive() for th in self._threads)
        self._threads = []
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if not alive:
            for ev in self._all_events:
                try:
                    self.es.cuEventDestroy(ev)
                except Exception:
                    pass
            self._all_events, self._free_events = [], []
            self._free_flags()
        if not alive:   # (a stuck worker may still read its descriptors: a closed number is reused)
            self._files.close_all()
        if self._ft is not None and not alive:
            _lib.gw_ft_free(self._ft)
            self._ft = None
