"""Read backends: byte ranges of files into device (or host) buffers.

Every backend is a :class:`Reader`:

* ``read_into(src, offset, nbytes, dst, dst_offset=0, stream=None) -> int`` reads
  ``src[offset:offset+nbytes]`` into ``dst[dst_offset:dst_offset+nbytes]`` (``dst`` is
  a flat byte buffer from :meth:`Reader.alloc`); ``src`` is a path or a
  :class:`FileHandle` from :meth:`Reader.open`. A file shorter than asked raises
  :class:`ShortReadError` naming file, offset and sizes.
* ``read_batch(requests, dst, stream=None)`` does several ``(src, offset, nbytes,
  dst_offset)`` reads, in parallel where the backend can.
* ``alloc(nbytes)``, ``mode`` (``"kvikio-gds"``, ``"kvikio-compat"``, ``"posix+h2d"``,
  ``"posix-host"``), ``device`` (``"cuda"`` or ``"host"``) and the stream/event hooks
  the :class:`~gpuwire.gds.loader.DataLoader` uses (``new_stream``, ``record_event``,
  ``wait_event``, ``host_wait``...). A remote backend implements the same surface.

When ``read_into`` returns, the data is in ``dst`` in *stream order*: work queued on
``stream`` afterwards sees it. Backends with ``stream_ordered = False`` (kvikio) have
finished writing when they return; ``posix+h2d`` has queued its copies on ``stream``.

cupy and kvikio are imported lazily: this module imports, and :class:`HostReader`
works, on a machine without either.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import settings
from . import _settings  # noqa: F401  (registers GPUWIRE_GDS_*)
from ._files import FileCache, FileHandle, close_fd, int_arg, open_fd
from .errors import BackendUnavailable, ShortReadError

__all__ = [
    "Reader",
    "HostReader",
    "PosixH2DReader",
    "KvikioReader",
    "FileHandle",
    "select_reader",
    "backend_status",
    "gpu_status",
    "kvikio_status",
    "apply_kvikio_settings",
]

Source = Union[str, "os.PathLike[str]", FileHandle]
Request = Tuple[Source, int, int, int]  # (src, file offset, nbytes, dst offset)

# One read(2) moves at most this much on Linux; larger requests are looped anyway.
_MAX_IO = 0x7FFFF000

#: KvikioReader: requests smaller than this go through pinned staging and gathered H2D
#: copies instead of one kvikio pread each (per-call overhead dominates tiny reads).
SMALL_READ_BYTES = 64 << 10


# --------------------------------------------------------------------------- probes

_probe_lock = threading.RLock()
_probes: dict = {}


def _probe(name: str, fn) -> Tuple[bool, str]:
    with _probe_lock:
        if name not in _probes:
            try:
                _probes[name] = fn()
            except Exception as e:  # any failure means "not usable here", with the reason
                _probes[name] = (False, f"{type(e).__name__}: {e}")
        return _probes[name]


def _gpu_probe() -> Tuple[bool, str]:
    try:
        import cupy
    except ImportError as e:
        return False, f"cupy is not installed ({e})"
    n = cupy.cuda.runtime.getDeviceCount()
    if n < 1:
        return False, "no CUDA device"
    return True, f"{n} CUDA device(s)"


def gpu_status() -> Tuple[bool, str]:
    """(usable, reason): whether cupy imports and sees a CUDA device."""
    return _probe("gpu", _gpu_probe)


def _kvikio_probe() -> Tuple[bool, str]:
    ok, why = gpu_status()
    if not ok:
        return False, why
    try:
        import kvikio  # noqa: F401
    except ImportError as e:
        return False, f"kvikio is not installed ({e})"
    return True, f"kvikio {getattr(kvikio, '__version__', '?')}"


def kvikio_status() -> Tuple[bool, str]:
    """(usable, reason): whether kvikio imports and a GPU works."""
    return _probe("kvikio", _kvikio_probe)


def backend_status() -> dict:
    """``{kind: (usable, reason)}`` for ``kvikio``, ``posix`` and ``host``."""
    return {"kvikio": kvikio_status(), "posix": gpu_status(), "host": (True, "always available")}


# --------------------------------------------------------------------------- base


class Reader:
    """Base class of the read backends (see the module docstring)."""

    mode: str = "?"
    device: str = "host"        # where alloc() puts buffers: "cuda" or "host"
    stream_ordered: bool = True  # read_into's writes are ordered on the given stream

    def __init__(self, max_open: Optional[int] = None, roots=None):
        """``roots``: optional :class:`~gpuwire.gds.roots.DataRoots`; paths outside are refused."""
        if max_open is None:
            max_open = settings.get("gds_max_open_files")
        self._roots = roots
        self._files = FileCache(self._open_file, self._close_file, max_open)
        self.allocated_bytes = 0

    # -- files
    def _open_file(self, path: str) -> tuple:
        return open_fd(path, self._roots)

    def _close_file(self, obj: Any) -> None:
        close_fd(obj)

    def _path(self, src) -> str:
        path = os.fspath(src)
        if self._roots is not None:
            path = self._roots.resolve(path)
        return path

    def open(self, path) -> FileHandle:
        """Open (or reuse) ``path``; the handle stays open until ``handle.close()``."""
        return self._files.acquire(self._path(path))

    def _acquire(self, src: Source) -> Tuple[FileHandle, bool]:
        if isinstance(src, FileHandle):
            return src, False
        return self._files.acquire(self._path(src)), True

    @staticmethod
    def _check_range(h: FileHandle, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0:
            raise ValueError(f"{h.path}: negative offset {offset} or size {nbytes}")
        if offset + nbytes > h.size and offset + nbytes > h.refresh_size():
            raise ShortReadError(h.path, offset, nbytes, max(0, h.size - offset), h.size)

    @staticmethod
    def _check_dst(dst, dst_offset: int, nbytes: int) -> None:
        if dst_offset < 0 or dst_offset + nbytes > dst.nbytes:
            raise ValueError(
                f"destination too small: {nbytes} bytes at offset {dst_offset} "
                f"into a buffer of {dst.nbytes} bytes"
            )

    # -- reads
    def read_into(self, src: Source, offset: int, nbytes: int, dst, dst_offset: int = 0,
                  stream=None) -> int:
        """Read ``nbytes`` at ``offset`` of ``src`` into ``dst[dst_offset:]``; returns bytes read."""
        return self.read_batch([(src, offset, nbytes, dst_offset)], dst, stream)

    def read_batch(self, requests: Iterable[Request], dst, stream=None) -> int:
        """Run several reads into ``dst``; returns the total bytes read."""
        total = 0
        for src, offset, nbytes, dst_offset in requests:
            h, owned = self._acquire(src)
            try:
                self._check_range(h, offset, nbytes)
                self._check_dst(dst, dst_offset, nbytes)
                total += self._read_one(h, offset, nbytes, dst, dst_offset, stream)
            finally:
                if owned:
                    h.close()
        return total

    def _read_one(self, h: FileHandle, offset: int, nbytes: int, dst, dst_offset: int, stream) -> int:
        raise NotImplementedError

    # -- memory
    def alloc(self, nbytes: int):
        """A flat uint8 destination buffer of ``nbytes`` on this reader's device."""
        raise NotImplementedError

    @staticmethod
    def view(buf, nbytes: int, dtype, shape: Sequence[int]):
        """Typed view of the first ``nbytes`` of a flat byte buffer (no copy)."""
        return buf[:nbytes].view(dtype).reshape(tuple(shape))

    def to_host(self, arr) -> np.ndarray:
        """A numpy copy of an array on this reader's device (for checks and tests)."""
        return np.array(arr, copy=True)

    # -- streams and events (no-ops on the host: reads are complete when they return)
    def bind_thread(self) -> None:
        """Called once in each worker thread before it reads (selects the device)."""

    def new_stream(self):
        return None

    def current_stream(self):
        return None

    def record_event(self, stream, event=None):
        """An event completing after the work queued on ``stream`` so far (``event`` is reused)."""
        return None

    def wait_event(self, stream, event) -> None:
        """Make future work on ``stream`` wait for ``event`` (no host wait)."""

    def host_wait(self, event) -> None:
        """Block the calling thread until ``event`` has completed."""

    def synchronize(self, stream=None) -> None:
        """Block until everything queued on ``stream`` (or the device) is done."""

    # -- lifetime
    @property
    def open_files(self) -> int:
        return len(self._files)

    @property
    def files_opened(self) -> int:
        """How many times a file was actually opened (cache misses)."""
        return self._files.opens

    def close(self) -> None:
        self._files.close_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self.mode}>"


def _pread_full(fd: int, view: memoryview, offset: int, path: str, size_hint: int) -> int:
    """pread until ``view`` is full; a premature end of file raises ShortReadError."""
    want = len(view)
    done = 0
    while done < want:
        try:
            n = os.preadv(fd, [view[done:done + min(want - done, _MAX_IO)]], offset + done)
        except OSError as e:  # pread's own errors carry no path: name the file
            if e.filename is not None or e.errno is None:
                raise
            raise type(e)(e.errno, f"{e.strerror} (reading {want} bytes at offset {offset})", path) from None
        if n == 0:
            raise ShortReadError(path, offset, want, done, size_hint)
        done += n
    return done


def _host_bytes(arr) -> memoryview:
    a = np.asarray(arr)
    if not a.flags.c_contiguous:
        raise ValueError("host destination must be C-contiguous")
    return memoryview(a.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------- host


class HostReader(Reader):
    """POSIX preadv straight into numpy arrays: the CPU path (CI, the CPU executor).

    ``capacity`` (bytes) optionally bounds what :meth:`alloc` hands out, to model a
    small "device" in tests.
    """

    mode = "posix-host"
    device = "host"
    stream_ordered = True

    def __init__(self, max_open: Optional[int] = None, roots=None, capacity: Optional[int] = None):
        super().__init__(max_open, roots)
        self.capacity = capacity

    def alloc(self, nbytes: int) -> np.ndarray:
        nbytes = int_arg("nbytes", nbytes, 0)
        if self.capacity is not None and self.allocated_bytes + nbytes > self.capacity:
            raise MemoryError(
                f"host device capacity {self.capacity} exceeded: {self.allocated_bytes} "
                f"allocated, {nbytes} more asked"
            )
        self.allocated_bytes += nbytes
        return np.empty(nbytes, dtype=np.uint8)

    def _read_one(self, h, offset, nbytes, dst, dst_offset, stream) -> int:
        mv = _host_bytes(dst)[dst_offset:dst_offset + nbytes]
        return _pread_full(h.fd, mv, offset, h.path, h.size)


# --------------------------------------------------------------------------- cupy helpers


class _CupyMixin:
    """Device buffers, streams and events through cupy (imported on construction)."""

    device = "cuda"

    def _init_cupy(self) -> None:
        ok, why = gpu_status()
        if not ok:
            raise BackendUnavailable(f"{type(self).__name__} needs a GPU: {why}")
        import cupy

        self._cp = cupy
        self.device_id = cupy.cuda.Device().id

    def alloc(self, nbytes: int):
        nbytes = int_arg("nbytes", nbytes, 0)
        cp = self._cp
        with cp.cuda.Device(self.device_id):
            buf = cp.empty(nbytes, dtype=cp.uint8)
        self.allocated_bytes += nbytes
        return buf

    def to_host(self, arr) -> np.ndarray:
        return self._cp.asnumpy(arr)

    def bind_thread(self) -> None:
        self._cp.cuda.Device(self.device_id).use()

    def new_stream(self):
        with self._cp.cuda.Device(self.device_id):
            return self._cp.cuda.Stream(non_blocking=True)

    def current_stream(self):
        return self._cp.cuda.get_current_stream()

    def record_event(self, stream, event=None):
        if event is None:
            event = self._cp.cuda.Event(disable_timing=True)
        event.record(stream if stream is not None else self._cp.cuda.get_current_stream())
        return event

    def wait_event(self, stream, event) -> None:
        if event is not None:
            (stream if stream is not None else self._cp.cuda.get_current_stream()).wait_event(event)

    def host_wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def synchronize(self, stream=None) -> None:
        if stream is None:
            self._cp.cuda.Device(self.device_id).synchronize()
        else:
            stream.synchronize()


# --------------------------------------------------------------------------- posix + H2D


class _Staging:
    """Two pinned host buffers with an event each: pread into one while the other copies."""

    def __init__(self, cupy, nbytes: int):
        self.nbytes = nbytes
        self.mem = [cupy.cuda.alloc_pinned_memory(nbytes) for _ in range(2)]
        self.ptr = [m.ptr for m in self.mem]
        self.view = [memoryview(np.frombuffer(m, dtype=np.uint8, count=nbytes)) for m in self.mem]
        self.event = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
        self.busy = [False, False]
        self.next = 0


class _StagingPool:
    """Staging pairs shared by the threads of one reader (made on first use)."""

    def __init__(self, cupy, device_id: int, nbytes: int):
        self._cp, self._dev, self.nbytes = cupy, device_id, nbytes
        self._free: List[_Staging] = []
        self._lock = threading.Lock()

    def take(self) -> _Staging:
        with self._lock:
            if self._free:
                return self._free.pop()
        with self._cp.cuda.Device(self._dev):
            return _Staging(self._cp, self.nbytes)

    def give(self, st: _Staging) -> None:
        with self._lock:
            self._free.append(st)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for st in free:
            for ev in st.event:
                ev.synchronize()


class _Gather:
    """Fills staging buffers with reads whose destinations are contiguous, and copies a
    buffer to the device (one cudaMemcpyAsync) when it is full or the next read lands
    elsewhere. Many small records of a batch thus become a few large copies."""

    def __init__(self, st: _Staging, dptr: int, stream, memcpy, kind: int):
        self.st, self.dptr, self.stream, self.sptr = st, dptr, stream, stream.ptr
        self.memcpy, self.kind = memcpy, kind
        self.fill = 0        # bytes staged in the current buffer
        self.dst_start = 0   # where they go
        self.k = st.next

    def _begin(self, dst_offset: int) -> None:
        st = self.st
        self.k = st.next
        if st.busy[self.k]:
            st.event[self.k].synchronize()  # the copy that last used this buffer is done
            st.busy[self.k] = False
        self.dst_start = dst_offset

    def add(self, h: FileHandle, offset: int, nbytes: int, dst_offset: int) -> int:
        st, done = self.st, 0
        while done < nbytes:
            here = dst_offset + done
            if self.fill and (self.dst_start + self.fill != here or self.fill == st.nbytes):
                self.flush()
            if self.fill == 0:
                self._begin(here)
            n = min(st.nbytes - self.fill, nbytes - done)
            _pread_full(h.fd, st.view[self.k][self.fill:self.fill + n], offset + done, h.path, h.size)
            self.fill += n
            done += n
        return done

    def flush(self) -> None:
        if not self.fill:
            return
        st, k = self.st, self.k
        self.memcpy(self.dptr + self.dst_start, st.ptr[k], self.fill, self.kind, self.sptr)
        st.event[k].record(self.stream)
        st.busy[k] = True
        st.next = k ^ 1
        self.fill = 0


class PosixH2DReader(_CupyMixin, Reader):
    """pread into pinned staging buffers, then async H2D copies on the caller's stream.

    Staging is double-buffered: while one buffer is copied to the device, the next
    reads go into the other. Reads whose destinations follow each other (the records
    of a batch, shuffled or not) are gathered into one buffer and copied with one
    ``cudaMemcpyAsync``. Each thread that reads takes a staging pair from a pool (so
    the DataLoader's workers read in parallel).
    """

    mode = "posix+h2d"
    stream_ordered = True

    def __init__(self, staging_bytes: Optional[int] = None, max_open: Optional[int] = None, roots=None):
        Reader.__init__(self, max_open, roots)
        self._init_cupy()
        self.staging_bytes = int(staging_bytes or settings.get("gds_staging_bytes"))
        self._staging = _StagingPool(self._cp, self.device_id, self.staging_bytes)
        self._memcpy = self._cp.cuda.runtime.memcpyAsync
        self._h2d = self._cp.cuda.runtime.memcpyHostToDevice

    def read_batch(self, requests: Iterable[Request], dst, stream=None) -> int:
        st = self._staging.take()
        try:
            return self._read_batch_staged(requests, dst, stream, st)
        finally:
            self._staging.give(st)

    def _read_batch_staged(self, requests, dst, stream, st: _Staging) -> int:
        if stream is None:
            stream = self._cp.cuda.get_current_stream()
        g = _Gather(st, dst.data.ptr, stream, self._memcpy, self._h2d)  # pointers once per batch
        total = 0
        for src, offset, nbytes, dst_offset in requests:
            h, owned = self._acquire(src)
            try:
                self._check_range(h, offset, nbytes)
                self._check_dst(dst, dst_offset, nbytes)
                total += g.add(h, offset, nbytes, dst_offset)
            finally:
                if owned:
                    h.close()
        g.flush()
        return total

    def close(self) -> None:
        self._staging.close()
        super().close()


# --------------------------------------------------------------------------- kvikio


def _nvidia_fs_loaded() -> bool:
    return os.path.exists("/proc/driver/nvidia-fs") or os.path.isdir("/sys/module/nvidia_fs")


def _kvikio_compat(kvikio) -> bool:
    """Whether kvikio runs in its compatibility mode, across kvikio API generations."""
    d = kvikio.defaults
    pref = getattr(d, "is_compat_mode_preferred", None)  # >= 25.04: resolves AUTO
    if callable(pref):
        try:
            return bool(pref())
        except Exception:
            pass
    getter = getattr(d, "get", None)
    try:
        v = getter("compat_mode") if callable(getter) else d.compat_mode()
    except Exception:
        v = d.compat_mode()
    if isinstance(v, (bool, np.bool_)):  # <= 24.10 returned a bool
        return bool(v)
    name = str(getattr(v, "name", v)).upper()
    if name.endswith("ON"):
        return True
    if name.endswith("OFF"):
        return False
    return not _nvidia_fs_loaded()  # AUTO without a resolver: cuFile needs nvidia-fs


def kvikio_mode(kvikio=None) -> Tuple[str, str]:
    """(mode, detail): ``"kvikio-gds"`` only where cuFile runs with nvidia-fs."""
    if kvikio is None:
        import kvikio
    if _kvikio_compat(kvikio):
        return "kvikio-compat", "kvikio compatibility mode: POSIX reads through pinned bounce buffers"
    if not _nvidia_fs_loaded():
        return "kvikio-compat", "cuFile without nvidia-fs: cuFile's own compatibility mode"
    return "kvikio-gds", "cuFile GPUDirect Storage (nvidia-fs loaded)"


def _kvikio_get(d, name: str, old_getters: Sequence[str]):
    getter = getattr(d, "get", None)
    if callable(getter):
        try:
            return getter(name)
        except Exception:
            pass
    for g in old_getters:
        fn = getattr(d, g, None)
        if callable(fn):
            return fn()
    return None


def apply_kvikio_settings(threads: Optional[int] = None, task_size: Optional[int] = None) -> dict:
    """Apply gds_threads / gds_task_size (or the given values) to kvikio.defaults.

    0 leaves kvikio's own value. Works with the ``defaults.set`` API (>= 25.04) and
    the older ``num_threads_reset`` / ``task_size_reset`` one. Returns the values now
    in effect.
    """
    import kvikio.defaults as d

    threads = settings.get("gds_threads") if threads is None else int(threads)
    task_size = settings.get("gds_task_size") if task_size is None else int(task_size)
    cur_threads = _kvikio_get(d, "num_threads", ("get_num_threads", "num_threads"))
    cur_task = _kvikio_get(d, "task_size", ("task_size",))
    want = {}
    if threads and threads != cur_threads:
        want["num_threads"] = threads
    if task_size and task_size != cur_task:
        want["task_size"] = task_size
    if want:
        setter = getattr(d, "set", None)
        if callable(setter):
            try:
                setter(dict(want))
                want = {}
            except (TypeError, ValueError, KeyError):
                pass
        if "num_threads" in want:
            d.num_threads_reset(want["num_threads"])
        if "task_size" in want:
            d.task_size_reset(want["task_size"])
    return {
        "num_threads": _kvikio_get(d, "num_threads", ("get_num_threads", "num_threads")),
        "task_size": _kvikio_get(d, "task_size", ("task_size",)),
    }


#: KvikioReader: requests of at least this size may use Direct I/O (setting gds_direct).
DIRECT_MIN_BYTES = 1 << 20


def page_residency(fd: int, offset: int, nbytes: int) -> Optional[Tuple[int, int]]:
    """``(cached pages, pages)`` of ``fd[offset:offset+nbytes]`` (mmap + mincore, no read);
    None where it cannot be told (gpuwire._files not built, mmap refused)."""
    try:
        from .._files import ffi, lib
    except ImportError:
        return None
    r, t = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.gw_fr_resident(fd, offset, nbytes, r, t) != 0:
        return None
    return int(r[0]), int(t[0])


def _kvikio_direct_known(kvikio) -> bool:
    """kvikio has the auto_direct_io_read setting (>= 25.08)."""
    d = getattr(kvikio, "defaults", None)
    try:
        d.get("auto_direct_io_read")
        return callable(getattr(d, "set", None))
    except Exception:
        return False


def _kvikio_set_direct(kvikio, flag: bool) -> None:
    try:
        kvikio.defaults.set({"auto_direct_io_read": bool(flag)})
    except Exception:
        pass


class KvikioReader(_CupyMixin, Reader):
    """kvikio ``CuFile.pread`` into cupy buffers: cuFile GDS or kvikio's compat mode.

    ``mode`` says which is in use (``"kvikio-gds"`` / ``"kvikio-compat"``) and
    ``mode_detail`` why. All kvikio reads of a batch are issued before any is waited
    for, so kvikio's thread pool runs them in parallel. Requests smaller than
    ``small_bytes`` (default :data:`SMALL_READ_BYTES`) are read like posix+h2d
    instead -- pread into pinned staging, gathered, copied on ``stream`` -- while the
    large ones run in kvikio's pool: per-call overhead dominates tiny reads, and GDS
    itself sends reads under its threshold through a bounce buffer. kvikio writes
    device memory outside CUDA stream order, so ``stream_ordered`` is False: callers
    that reuse a buffer wait on the host for its consumers first.
    """

    stream_ordered = False

    def __init__(self, threads: Optional[int] = None, task_size: Optional[int] = None,
                 max_open: Optional[int] = None, roots=None, small_bytes: Optional[int] = None,
                 staging_bytes: Optional[int] = None, direct: Optional[str] = None):
        ok, why = kvikio_status()
        if not ok:
            raise BackendUnavailable(f"kvikio backend unavailable: {why}")
        Reader.__init__(self, max_open, roots)
        self._init_cupy()
        import kvikio

        self._kvikio = kvikio
        self.kvikio_settings = apply_kvikio_settings(threads, task_size)
        self.mode, self.mode_detail = kvikio_mode(kvikio)
        # Direct I/O for cold reads (compat mode only: cuFile GDS does its own DMA)
        want = str(settings.get("gds_direct") if direct is None else direct).lower()
        self.direct = want if self.mode == "kvikio-compat" and _kvikio_direct_known(kvikio) else "off"
        self.kvikio_settings["direct"] = self.direct
        self.direct_batches = 0      # batches read with Direct I/O (stats, tests)
        self.small_bytes = int(SMALL_READ_BYTES if small_bytes is None else small_bytes)
        self._staging = _StagingPool(self._cp, self.device_id,
                                     int(staging_bytes or settings.get("gds_staging_bytes")))

    def _open_file(self, path: str) -> tuple:
        # refuse what is not a regular file (a FIFO would block CuFile's open) by name first
        close_fd(open_fd(path, self._roots)[0])
        if self.direct != "off":   # CuFile opens its O_DIRECT descriptor only with the flag on
            _kvikio_set_direct(self._kvikio, True)
        f = self._kvikio.CuFile(path, "r")
        fd = f.fileno()  # the descriptor without O_DIRECT: small reads use it, and kvikio's buffered ones
        try:   # one struct file shared by kvikio's threads: its readahead must not take them for random
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (OSError, AttributeError):
            pass
        return f, fd

    def _want_direct(self, big: list) -> bool:
        """Direct I/O for this batch? ``big``: its kvikio requests ``(handle, offset, nbytes)``.
        ``auto``: when less than half of the pages looked at are cached (:func:`page_residency`
        samples 16 pages of a request, 1-3 us each; at most 4 requests, spread over the batch)."""
        if self.direct == "on":
            return True
        if self.direct != "auto" or not big:
            return False
        resident = total = 0
        step = max(1, len(big) // 4)
        for h, offset, nbytes in big[::step][:4]:
            r = page_residency(h.fd, offset, nbytes)
            if r is None:
                return False
            resident += r[0]
            total += r[1]
        return total > 0 and resident * 2 < total

    def _close_file(self, obj) -> None:
        try:
            obj.close()
        except Exception:
            pass

    def read_batch(self, requests: Iterable[Request], dst, stream=None) -> int:
        held, futures, err, total = [], [], None, 0
        gather, st = None, None
        try:
            checked = []
            for src, offset, nbytes, dst_offset in requests:
                h, owned = self._acquire(src)
                if owned:
                    held.append(h)
                self._check_range(h, offset, nbytes)
                self._check_dst(dst, dst_offset, nbytes)
                if nbytes:
                    checked.append((h, offset, nbytes, dst_offset))
            if self.direct != "off":
                # kvikio reads the global flag when each task runs: set once per batch (another
                # thread's batch running meanwhile may take this one's choice: speed, not data)
                # (every batch: opening a file above turned the flag on)
                big = [(h, o, n) for h, o, n, _d in checked if n >= DIRECT_MIN_BYTES]
                d = bool(big) and self._want_direct(big)
                _kvikio_set_direct(self._kvikio, d)
                self.direct_batches += d
            for h, offset, nbytes, dst_offset in checked:
                if nbytes >= self.small_bytes:
                    part = dst[dst_offset:dst_offset + nbytes]
                    futures.append((h, offset, nbytes, self._pread(h, part, nbytes, offset)))
                else:
                    if gather is None:
                        st = self._staging.take()
                        s = stream if stream is not None else self._cp.cuda.get_current_stream()
                        gather = _Gather(st, dst.data.ptr, s, self._cp.cuda.runtime.memcpyAsync,
                                         self._cp.cuda.runtime.memcpyHostToDevice)
                    total += gather.add(h, offset, nbytes, dst_offset)
            if gather is not None:
                gather.flush()
        except BaseException as e:  # still wait for what was issued: never leave a read running
            err = e
        for h, offset, nbytes, fut in futures:
            try:
                total += self._finish(h, offset, nbytes, fut)
            except Exception as e:
                err = err or e
        if st is not None:
            self._staging.give(st)
        for h in held:
            h.close()
        if err is not None:
            raise err
        return total

    def close(self) -> None:
        self._staging.close()
        super().close()

    def _pread(self, h: FileHandle, part, nbytes: int, offset: int):
        try:
            return h.obj.pread(part, nbytes, offset)
        except Exception as e:
            raise OSError(f"kvikio pread of {h.path} ({nbytes} bytes at offset {offset}) failed: {e}") from e

    @staticmethod
    def _finish(h: FileHandle, offset: int, nbytes: int, fut) -> int:
        try:
            got = fut.get()
        except Exception as e:
            raise OSError(f"kvikio read of {h.path} ({nbytes} bytes at offset {offset}) failed: {e}") from e
        if got != nbytes:
            raise ShortReadError(h.path, offset, nbytes, got, h.size)
        return got


# --------------------------------------------------------------------------- selection


def select_reader(kind: Optional[str] = None, **kwargs) -> Reader:
    """A reader of ``kind`` (``auto``, ``kvikio``, ``posix``, ``host``; None: gds_backend).

    ``auto`` takes kvikio if it imports and a GPU works, else posix+h2d if cupy sees a
    GPU, else the host reader. An explicit kind that cannot run raises
    :class:`BackendUnavailable` with the reason.
    """
    from ._settings import _backend

    kind = _backend(kind if kind is not None else settings.get("gds_backend"))
    if kind == "auto":
        if kvikio_status()[0]:
            kind = "kvikio"
        elif gpu_status()[0]:
            kind = "posix"
        else:
            kind = "host"
    if kind == "kvikio":
        return KvikioReader(**kwargs)
    if kind == "posix":
        return PosixH2DReader(**kwargs)
    return HostReader(**kwargs)
