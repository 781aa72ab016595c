"""Pinned host buffers in kernel parameters: found at each launch and mirrored on the server.

With a local GPU a kernel may dereference pinned host memory (``cuMemHostAlloc``,
``cuMemHostRegister``) passed as a parameter. Remotely that address means nothing on
the server, so gpuwire keeps a **mirror** of every pinned region in the session's
device memory and rewrites parameters that point into a region to the mirror at the
same offset. The full story (what is found, what is not, ordering, tracking modes,
free-while-in-flight) is docs/pinned.md; in short:

* ``cuMemHostAlloc`` / ``cuMemHostRegister`` through a session make a :class:`Region`:
  the client memory is page-locked where the OS lets us (mlock), registered with UCX
  (zero-copy sends and receives), given a mirror (a deferred ``cuMemAlloc`` in the
  session's VA range: the client knows its address at once) and entered in the C
  interval registry (``gpuwire._pinned``: sorted array, binary search).
* At each launch the function's parameter layout (cuFuncGetParamInfo, asked once per
  function and cached) gives the 8-byte slots; the C scan rewrites every slot whose
  value lies in a region (interior and one-past-the-end pointers included) to the
  mirror. Slots of another size are never touched. Per-kernel annotations
  (:func:`annotate`) declare pointers inside struct parameters, slots that are
  integers (the false-positive opt-out) and read-only pointers; for modules loaded from
  PTX, parameters the kernel never writes through are found read-only by a conservative
  scan of the PTX (gpuwire/rpc/ptx_access.py, setting ``pinned_ptx_readonly``).
* Before the launch the region's bytes are pushed (``cuMemcpyHtoDAsync`` on the
  launch's stream, zero-copy from the registered region) unless the tracking mode
  says they did not change or the mirror holds newer bytes (a kernel wrote it and
  nothing pulled it yet). After a launch that may write it, the region is *device
  owned*; it is pulled back (``cuMemcpyDtoHAsync`` into the region) right before the
  sync call that lets the client observe it: a synchronize or a completed query of a
  stream that wrote it (or that waited on an event recorded after the write), an
  event synchronize/query, a context synchronize. Copies through gpuwire that read a
  device-owned region read the mirror (``cuMemcpyDtoD``); async copies into a region
  land in the mirror, so later work on the stream sees them (CUDA's ordering).

The hooks are per session and only present while the session has pinned regions:
sessions without pinned memory run the generated stubs untouched.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import weakref
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .. import settings
from .. import transport as t
from . import protocol as P
from .hostmap import span_of
from .protocol import CudaError

settings.register("pinned_track", "auto",
                  settings.one_of("auto", "always", "compare", "explicit", "protect", "written"),
                  "Client: how a pinned region's changes are found before a launch pushes it: 'auto' "
                  "(default: 'written' for regions of 64 KiB or more where the kernel supports it, else "
                  "'compare'), 'written' (the kernel records which pages were written: asynchronous "
                  "userfaultfd write-protection read with PAGEMAP_SCAN, Linux >= 6.7; push the written pages), "
                  "'always' "
                  "(push the whole region at every launch that uses it), 'compare' (diff against a shadow "
                  "copy, push the changed range), 'explicit' (push only after gpuwire wrote it or "
                  "Region.mark_dirty()), 'protect' (opt-in: write-protect the region after each push/pull "
                  "and catch the first host write: through a userfaultfd where allowed, else with a SIGSEGV "
                  "handler, where a syscall writing into a protected region fails with EFAULT; host_alloc "
                  "regions only, others use 'compare'). "
                  "See docs/pinned.md.", layer="rpc")
settings.register("pinned_protect_min", 1 << 20, int,
                  "Client, 'auto' tracking: host_alloc regions of this many bytes or more use 'protect' "
                  "where its userfaultfd backend works: an unchanged launch then costs a flag read, where "
                  "'written' costs an ioctl (H100 hosts, extra µs per unchanged launch at 1 / 16 / 64 MiB: "
                  "written 0.7-3.2 / 3.8-4.5 / 2.2-5.0, protect -0.04-0.76 / -1.7-0.9 / -0.3-2.1). A host store "
                  "then pushes the region whole (below 8 MiB) or its 2 MiB granule. 0: never. "
                  "See docs/pinned.md.", layer="rpc")
settings.register("pinned_protect_uffd", True, bool,
                  "Client, 'protect' tracking: write-protect through a userfaultfd with a handler thread "
                  "where the process may handle kernel-mode faults (a system call may then write into a "
                  "protected region); off, or where not allowed: mprotect and a SIGSEGV handler (such a "
                  "system call fails with EFAULT). Read once, at the first protected region of the process.",
                  layer="rpc")
settings.register("pinned_ptx_readonly", True, bool,
                  "Client: scan the PTX of modules loaded through the session for kernel parameters that are "
                  "never written through (gpuwire/rpc/ptx_access.py) and treat them as read-only: regions "
                  "reached only through them are not pulled back. Conservative; cubin/fatbin are not scanned. "
                  "See docs/pinned.md.", layer="rpc")
settings.register("pinned_threads", 4, int,
                  "Client: threads (this one included) that diff and copy regions of 1 MiB or more for the "
                  "'compare' tracking mode (C pool in gpuwire._pinned); 1: the calling thread only.",
                  layer="rpc")
settings.register("pinned_pull_detect", True, bool,
                  "Client: pull mirrors of regions of pinned_detect_min bytes or more with gwMirrorPull: the "
                  "server keeps a device copy of the bytes the client holds and sends back only the granules "
                  "the kernel changed (cubin/fatbin kernels that did not write a region cost no copy back). "
                  "Costs a second device allocation per region. See docs/pinned.md.", layer="rpc")
settings.register("pinned_detect_min", 64 << 10, int,
                  "Client: regions smaller than this are pulled whole (the server-side diff costs more than it "
                  "saves on a few KiB that travel inline in the reply).", layer="rpc")
settings.register("pinned_pull_granule", 1 << 20, int,
                  "Client: the unit of server-side change detection for pulls (bytes, a multiple of 4096; "
                  "bigger for regions over 64 granules so a pull is at most 64 messages, and at most the "
                  "server's bulk message size).", layer="rpc")
settings.register("pinned_spin_us", 1000, int,
                  "Client: the 'compare' thread pool's workers spin this long (µs) after a job, and from the "
                  "start of a sync call that will copy a pulled region of 1 MiB or more, before they sleep: the "
                  "next diff or copy finds them awake (a wake-up costs tens of µs on a VM). 0: sleep at once. "
                  "Only where the machine has 2 * pinned_threads + 2 cores or more.",
                  layer="rpc")
settings.register("pinned_mlock", True, bool,
                  "Client: page-lock (mlock) pinned regions; when the OS refuses (RLIMIT_MEMLOCK) the "
                  "region stays pageable and Region.locked says so.", layer="rpc")

TRACK_MODES = ("always", "compare", "explicit", "protect", "written")
_UF_MIN = 64 << 10       # 'auto': regions this big use 'written' tracking (smaller: a diff costs ~nothing)
_UF_RUNS = 8             # 'written': a push sends at most this many separate ranges (more: merged)
_UF_GAP = 64 << 10       # ... and ranges closer than this go as one
_WP_GRAN_MIN = 2 << 20   # protect mode: granule size at least (a huge page: unprotecting it keeps it whole)
_WP_GRANS = 1024         # ... and at most this many granules (gw_pinned.c WP_WORDS * 64)
_HOT_MIN = 64 << 10      # compare mode: regions this big stop diffing while rewritten every launch
_HOT_MAX = 64
_HUGE = 2 << 20          # transparent huge page size (shadows of this size or more use them)
_THP_MIN = 1 << 20       # host_alloc of this size or more: whole 2 MiB-aligned huge pages (rounded up)
_MT_MIN = 1 << 20        # regions this big are diffed and copied by the C pool (gw_pinned.c MT_MIN)
_DRAIN_MIN = 16 << 20    # compare regions this big: pulled granules copied to the shadow as they land
_DRAINED = ()            # Region.pulling once _drain received and copied everything
_Q = struct.Struct("<Q")
_PAGE = mmap.PAGESIZE

_ffi = _lib = None
_threads = None


def _c():
    global _ffi, _lib
    if _lib is None:
        try:
            from .. import _pinned
        except ImportError as e:  # pragma: no cover - a build problem
            raise ImportError(f"gpuwire._pinned (the pinned-region registry, cffi_src/build_pinned.py) is not "
                              f"built: {e}; reinstall gpuwire (pip install -e .)") from None
        _ffi, _lib = _pinned.ffi, _pinned.lib
    return _ffi, _lib


_spin = None
_uf_state: Optional[Tuple[bool, str]] = None


def written_support() -> Tuple[bool, str]:
    """Whether 'written' tracking works in this process: (True, "") or (False, why). Probed
    once, end to end (gw_uf_init: userfaultfd in asynchronous write-protect mode and
    PAGEMAP_SCAN, on scratch pages)."""
    global _uf_state
    if _uf_state is None:
        _ffi, lib = _c()
        e = lib.gw_uf_init()
        if e == 0:
            _uf_state = (True, "")
        else:
            why = {errno.ENOSYS: "no userfaultfd system call (kernel config or a seccomp filter)",
                   errno.EPERM: "userfaultfd not permitted (vm.unprivileged_userfaultfd, seccomp)",
                   errno.EOPNOTSUPP: "the kernel has no asynchronous userfaultfd write-protect or no "
                                     "PAGEMAP_SCAN (both need Linux 6.7 or later)"}.get(e, os.strerror(e))
            _uf_state = (False, f"'written' tracking unavailable: {why} (errno {e})")
    return _uf_state


def _pool(lib) -> None:
    global _threads, _spin
    want = max(1, int(settings.get("pinned_threads")))
    if _threads != want:
        _threads = lib.gw_pin_threads(want)
    spin = _spin_us()
    if _spin != spin:
        lib.gw_pin_spin(spin * 1000)
        _spin = spin


def _spin_us() -> int:
    """pinned_spin_us where the machine has the cores for it (twice the pool plus two: the
    program and the transport), else 0: spinning workers on few cores steal the time they save."""
    n = max(1, int(settings.get("pinned_threads")))
    if n < 2 or (os.cpu_count() or 1) < 2 * n + 2:
        return 0
    return max(0, int(settings.get("pinned_spin_us")))


def _huge_map(n: int) -> Tuple[mmap.mmap, np.ndarray, int]:
    """n bytes of anonymous memory, 2 MiB-aligned and advised for transparent huge pages
    where the OS allows (fewer TLB misses): (the mmap, its n-byte view, the span advised)."""
    span = (n + _HUGE - 1) // _HUGE * _HUGE
    mm = mmap.mmap(-1, span + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = int(np.frombuffer(mm, np.uint8, 1).ctypes.data)
    off = (-base) % _HUGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, off, span)
    except OSError:
        pass
    return mm, np.frombuffer(mm, np.uint8, n, offset=off), span


def _shadow(n: int) -> np.ndarray:
    """A compare-mode shadow: big ones are huge-page mmaps (fewer TLB misses in the diff and
    the copies)."""
    if n < _HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(n, np.uint8)
    return _huge_map(n)[1]


def pull_granule(n: int, chunk: int) -> int:
    """The granule of server-side detection for a region of n bytes (0: one message)."""
    g = max(4096, int(settings.get("pinned_pull_granule")), -(-n // 64))
    g = (g + 4095) // 4096 * 4096
    if chunk > 0:
        g = min(g, chunk)
    return 0 if g >= n else g


_MP_LOCK = threading.Lock()


def mirror_parts(n: int, granule: int) -> List[Tuple[int, int]]:
    """(offset, length) of gwMirrorPull's messages, as the server splits them."""
    if granule < 0 or (granule and (n + granule - 1) // granule > (1 << 16)):
        raise ValueError(f"gwMirrorPull: granule {granule} splits {n} B into more than 65536 messages")
    if n == 0:
        return [(0, 0)]
    g = granule or n
    return [(o, min(g, n - o)) for o in range(0, n, g)]


def mirror_pull(s: Any, dstHost: Any, srcDevice: int, refDevice: int, ByteCount: int, granule: int,
                hStream: Any = 0, _reqs: Optional[List[Any]] = None) -> None:
    """gwMirrorPull with one receive per granule (the generated stub posts receives per bulk
    chunk). ``_reqs``: the pinned manager collects the receives itself (it waits for them and
    reads which granules came back); otherwise they are waited like any push, at the sync."""
    if not isinstance(ByteCount, int) or not isinstance(granule, int) or ByteCount < 0:
        raise TypeError("gwMirrorPull: ByteCount and granule must be non-negative ints")
    parts = mirror_parts(ByteCount, granule)
    chunk = int(getattr(s, "_chunk", 0) or 0)
    if chunk and (granule or ByteCount) > chunk:
        raise ValueError(f"gwMirrorPull: granule of {granule or ByteCount} B is larger than the server's bulk "
                         f"message size ({chunk} B)")
    cls = type(s)
    me = threading.get_ident()
    done = []

    def post(buf: Any, n: int) -> int:
        if done or threading.get_ident() != me or n != ByteCount:
            return cls._post_push(s, buf, n)
        done.append(1)
        tag = s._next_out_tag()
        base = t.Buffer(buf, writable=True).ptr if n else 0
        dummy = t.Buffer(bytearray(1), writable=True)
        reqs = [s._lep(tag, k, n).recv_nb(t.Buffer(t.RawBuffer(base + off, ln), writable=True) if ln else dummy,
                                          tag=tag, tag_mask=t.EXACT_TAG) for k, (off, ln) in enumerate(parts)]
        if _reqs is None:
            s._pushes.append((tag, reqs, buf))
        else:
            s._pushes.append((tag, [], buf))      # counted like any push; the caller waits for reqs
            _reqs.extend(reqs)
        return tag
    with _MP_LOCK:      # one patched _post_push at a time (it only serves this thread's call)
        s.__dict__["_post_push"] = post
        try:
            cls.gwMirrorPull(s, dstHost, srcDevice, refDevice, ByteCount, granule, hStream)
        finally:
            s.__dict__.pop("_post_push", None)


def _private_anon(start: int, end: int) -> str:
    """"" when [start, end) is all private anonymous memory of this process (the only memory
    whose writes all go through this process's page tables), else what it is."""
    at = start
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if hi <= at:
                    continue
                if lo > at:
                    break                       # a hole: unmapped memory
                if parts[1][3] != "p" or parts[4] != "0":
                    what = parts[5].strip() if len(parts) > 5 else ""
                    return (f"shared or file-backed memory ({parts[1]} {what or 'anonymous shared'}): writes "
                            f"through another mapping would not be seen")
                at = hi
                if at >= end:
                    return ""
    except OSError as e:
        return f"/proc/self/maps: {e}"
    return f"{at:#x} is not mapped"


def _merge_runs(runs: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Sorted byte ranges with those closer than _UF_GAP joined, at most _UF_RUNS of them."""
    runs = sorted(r for r in runs if r[1] > r[0])
    out: List[Tuple[int, int]] = []
    for lo, hi in runs:
        if out and lo - out[-1][1] < _UF_GAP:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    if len(out) > _UF_RUNS:
        out[_UF_RUNS - 1:] = [(out[_UF_RUNS - 1][0], out[-1][1])]
    return out


def _sid(h: Any) -> int:
    """Stream key: 0 for the legacy default stream (0 / CU_STREAM_LEGACY)."""
    if not h:
        return 0
    v = int(h)
    return 0 if v == P.STREAM_LEGACY else v


# ----------------------------------------------------------------------------- regions

class Region:
    """One pinned client range and its server mirror.

    ``array``: the client bytes (numpy uint8); ``mirror``: the device address of the
    mirror; ``locked``: page-locked; ``track``: how changes are found (see module doc);
    ``device_owned``: a launch that may write it has not been pulled back yet."""
    __slots__ = ("id", "start", "nbytes", "mirror", "array", "kind", "track", "gen", "pushed_gen", "pushed",
                 "shadow", "cshadow", "clive", "dirty", "mr", "keep", "locked", "lock_error", "freed", "wp", "span",
                 "hot", "streak", "ref", "granule", "detect", "dstreak", "dskip", "pulling", "pg", "quiet", "uf", "wpend",
                 "track_note", "wpgran", "__weakref__")

    def __init__(self, rid: int, start: int, nbytes: int, mirror: int, array: np.ndarray, kind: str, track: str):
        self.id, self.start, self.nbytes, self.mirror = rid, start, nbytes, mirror
        self.array, self.kind = array, kind
        self.track = track
        self.gen = 0
        self.pushed_gen = -1
        self.pushed = False
        self.shadow: Optional[np.ndarray] = None
        self.cshadow = self.clive = None       # C pointers of shadow / the region (compare mode)
        self.dirty: Dict[int, int] = {}     # writer stream -> seq of its last possibly-writing launch
        self.mr = None
        self.keep: Any = None
        self.locked = False
        self.lock_error = ""
        self.freed = False
        self.wp = -1                        # protect mode: slot in the C write-protect table
        self.span = nbytes                  # protect mode: bytes covered (whole pages)
        self.hot = 0                        # compare mode: launches left that push whole, no diff
        self.streak = 0                     # compare mode: diffs in a row that found all changed
        self.ref = 0                        # server-side detection: device copy of the client's bytes
        self.granule = 0                    # its unit (bytes; 0: the whole region)
        self.detect = False                 # pulled with server-side detection (ref made at the 1st pull)
        self.dstreak = 0                    # detected pulls in a row that found every granule changed
        self.dskip = 0                      # pulls left that go whole, without the server's diff
        self.pulling: Any = None            # a detected pull in flight: its receive requests, per granule
        self.pg = 0                         # the granule of that pull (0: one message)
        self.quiet = False                  # the last detected pull found nothing changed
        self.uf: Optional[Tuple[int, int]] = None   # written mode: the registered page span (start, len)
        self.wpend: List[Tuple[int, int]] = []      # written mode: writes found before a pull, still to push
        self.track_note = ""                # why the region is not tracked as its setting asked
        self.wpgran = 0                     # protect mode: granule of its write tracking (0: whole region)

    @property
    def device_owned(self) -> bool:
        return bool(self.dirty)

    def mark_dirty(self) -> None:
        """Tell gpuwire the client changed the bytes (the 'explicit' tracking mode)."""
        self.gen += 1

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy ``data`` into the region at ``offset`` and mark it changed."""
        mv = memoryview(data).cast("B")
        if offset < 0 or offset + mv.nbytes > self.nbytes:
            raise ValueError(f"Region.write: {mv.nbytes} B at offset {offset} do not fit {self.nbytes} B")
        self.array[offset:offset + mv.nbytes] = np.frombuffer(mv, np.uint8)
        self.gen += 1

    def __repr__(self):
        return (f"<pinned Region {self.start:#x}+{self.nbytes} mirror {self.mirror:#x} {self.kind} "
                f"track={self.track}{' device-owned' if self.dirty else ''}{' freed' if self.freed else ''}>")


class _Ann:
    __slots__ = ("readonly", "ignore", "struct_ptrs")

    def __init__(self, readonly: Iterable[int] = (), ignore: Iterable[int] = (),
                 struct_ptrs: Optional[Dict[int, Sequence[int]]] = None):
        self.readonly = frozenset(int(i) for i in readonly)
        self.ignore = frozenset(int(i) for i in ignore)
        self.struct_ptrs = {int(k): tuple(int(o) for o in v) for k, v in (struct_ptrs or {}).items()}


class _Func:
    """Per function: the scanned offsets and what each belongs to, and a cache of rewrites."""
    __slots__ = ("offs", "coffs", "param", "readonly", "cache", "version")

    def __init__(self, name: str, layout: List[Tuple[int, int]], ann: Optional[_Ann], version: int,
                 auto_readonly: FrozenSet[int] = frozenset()):
        ffi, _lib = _c()
        ann = ann or _Ann()
        offs: List[int] = []
        param: List[int] = []
        for i, (off, size) in enumerate(layout):
            if i in ann.ignore:
                continue
            if size == 8:
                offs.append(off)
                param.append(i)
            for inner in ann.struct_ptrs.get(i, ()):
                if inner < 0 or inner + 8 > size or inner % 8:
                    raise ValueError(f"kernel {name}: struct pointer offset {inner} is not an aligned 8-byte "
                                     f"slot inside parameter {i} ({size} B)")
                if size != 8:
                    offs.append(off + inner)
                    param.append(i)
        for i in ann.struct_ptrs:
            if i >= len(layout):
                raise ValueError(f"kernel {name}: struct pointer annotation names parameter {i}, the kernel "
                                 f"has {len(layout)}")
        self.offs = offs
        self.coffs = ffi.new("uint32_t[]", offs or [0])
        self.param = param
        self.readonly = ann.readonly | auto_readonly
        self.cache: Dict[bytes, Tuple[bytes, Tuple[int, ...], Tuple[int, ...]]] = {}
        self.version = version


# ----------------------------------------------------------------------------- the manager

_HOOKS = ("cuLaunchKernel", "cuMemcpyHtoD", "cuMemcpyHtoDAsync", "cuMemcpyDtoH", "cuMemcpyDtoHAsync",
          "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize", "cuEventRecord", "cuStreamWaitEvent",
          "cuStreamQuery", "cuEventQuery")
_ENTRY = ("cuMemHostAlloc", "cuMemHostRegister", "cuMemFreeHost", "cuMemHostUnregister")
_ORIG = _HOOKS + _ENTRY + ("cuMemAlloc", "cuMemFree", "cuMemcpyDtoD", "cuMemcpyDtoDAsync", "cuEventCreate",
                           "gwSync", "gwHostUnmap")


class PinnedManager:
    """The pinned regions of one session and the launch/sync hooks that mirror them."""

    def __init__(self, session: Any):
        ffi, lib = _c()
        _pool(lib)
        self.ffi, self.lib = ffi, lib
        self._sref = weakref.ref(session)
        self.reg = ffi.gc(lib.gw_pin_new(), lib.gw_pin_destroy)
        self.regions: Dict[int, Region] = {}
        self.by_start: Dict[int, Region] = {}
        self.next_id = 1
        self.version = 0
        self.funcs: Dict[int, _Func] = {}
        self.ann: Dict[int, _Ann] = {}
        self.pend: Dict[int, Dict[int, Dict[int, int]]] = {}   # stream -> region -> writer -> seq
        self.ev: Dict[int, Tuple[int, Dict[int, Dict[int, int]]]] = {}
        self.seq = 0
        self.cap = 32
        self.hits = ffi.new("gw_pin_hit_t[]", self.cap)
        self.off = ffi.new("uint64_t *")
        self.lohi = ffi.new("size_t[2]")
        self.events: List[int] = []
        self.lock = threading.RLock()
        cls = type(session)
        self.orig = {n: getattr(cls, n) for n in _ORIG}
        self.hooked = False
        self.stats = {"launches": 0, "rewritten": 0, "pushes": 0, "push_bytes": 0, "skipped": 0, "pulls": 0,
                      "pull_bytes": 0, "copies_via_mirror": 0, "mapped": 0, "copies_mapped": 0}
        self.uf_edges: Dict[int, int] = {}      # written mode: first/last page of a region -> its id
        self.ufout = ffi.new("uint64_t[]", 2 * _UF_RUNS)
        self.wpout = ffi.new("uint64_t[]", 2 * _UF_RUNS)
        self.nwp = 0                            # protect mode: regions with a write-protect slot

    # ------------------------------------------------------------------ hooks on/off
    def _hook(self, s: Any) -> None:
        if not self.hooked:
            for n in _HOOKS:
                s.__dict__[n] = getattr(self, "h_" + n)
            self.hooked = True

    def _unhook_if_idle(self, s: Any) -> None:
        if self.hooked and not self.regions and not self.ann:
            for n in _HOOKS:
                s.__dict__.pop(n, None)
            self.hooked = False
            self.pend.clear()
            self.ev.clear()

    # ------------------------------------------------------------------ regions
    def _new_region(self, s: Any, start: int, n: int, array: np.ndarray, kind: str, keep: Any,
                    span: int = 0) -> Region:
        rid = self.next_id
        mirror = self.orig["cuMemAlloc"](s, n)
        R = Region(rid, start, n, mirror, array, kind, str(settings.get("pinned_track")))
        if span:
            R.span = span               # host_alloc: the whole pages it owns
        if R.track == "protect" and kind != "alloc":
            R.track = "compare"     # only host_alloc regions own whole pages (docs/pinned.md)
            R.track_note = "'protect' needs a host_alloc region"
        auto = R.track == "auto"
        if auto:
            R.track = auto_track(n, kind)
        if R.track not in TRACK_MODES:
            self.orig["cuMemFree"](s, mirror)
            raise ValueError(f"GPUWIRE_PINNED_TRACK={R.track!r}: expected 'auto' or one of {', '.join(TRACK_MODES)}")
        R.keep = keep
        st = self.lib.gw_pin_add(self.reg, start, n, mirror, rid)
        if st:
            self.orig["cuMemFree"](s, mirror)
            other = self.find(start) or self.find(start + n - 1)
            raise CudaError(P.CURESULT["CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"], "cuMemHostRegister",
                            f"{start:#x}+{n} overlaps the pinned region {other!r}")
        self.next_id += 1
        if settings.get("pinned_mlock"):
            # (a host_alloc region: all its pages; locking part of a huge page would split it)
            e = self.lib.gw_pin_lock(self.ffi.cast("void *", start), R.span if kind == "alloc" else n)
            R.locked = e == 0
            R.lock_error = "" if e == 0 else f"mlock: errno {e} (RLIMIT_MEMLOCK?): the region stays pageable"
        try:
            R.mr = s._tctx.register(t.RawBuffer(start, n))
        except t.TransportError:
            R.mr = None     # zero-copy needs it; plain sends still work
        if R.track == "protect":
            try:
                self._wp_on(R)
            except RuntimeError as e:
                R.track = "written" if auto else "compare"  # the table is full: track it another way
                R.track_note = str(e)
        if R.track == "written":
            why = self._uf_on(R)
            if why:
                R.track = "compare"     # (unsupported kernel, memory it cannot track, a shared page)
                R.track_note = why
        if R.track == "compare":
            R.shadow = _shadow(n)
        if settings.get("pinned_pull_detect") and n >= max(1, int(settings.get("pinned_detect_min"))):
            # the reference copy is made at the first pull (a region never pulled needs none)
            R.granule = pull_granule(n, int(getattr(s, "_chunk", 0) or 0))
            R.detect = True
        self._enter(s, R)
        return R

    def host_alloc(self, s: Any, bytesize: Any, flags: int = 0) -> int:
        if not isinstance(bytesize, int) or isinstance(bytesize, bool) or bytesize <= 0:
            raise CudaError(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc",
                            f"cuMemHostAlloc: bytesize must be a positive int, got {bytesize!r}")
        if not isinstance(flags, int) or flags & ~0xF:
            raise CudaError(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc", f"cuMemHostAlloc: flags {flags!r}")
        ch = s._hm
        if ch:
            start = self._map_alloc(s, ch, bytesize)
            if start:
                return start
        span = span_of(bytesize)
        if bytesize >= _THP_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
            # huge pages also make write-protecting the region ('written', 'protect') touch few
            # entries: 1 MiB of 4 KiB pages ~24 µs to protect on the CPU box, 4 MiB of huge pages
            # ~2.5 µs (so from 1 MiB the region is rounded up to whole huge pages)
            mm, arr, span = _huge_map(bytesize)
        else:
            # private: write-protecting and unprotecting ('written' tracking) leaves private
            # pages writable; shared anonymous (mmap's default) pages would fault once each after
            mm = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            arr = np.frombuffer(mm, np.uint8, bytesize)
        start = int(arr.ctypes.data)
        with self.lock:
            self._new_region(s, start, bytesize, arr, "alloc", mm, span)
        s._host[start] = arr
        return start

    def _map_alloc(self, s: Any, ch: Any, bytesize: int) -> int:
        """host_alloc on the server's host: a sealed memfd the session maps (gwHostMap), used by
        the GPU in place (docs/pinned.md, "Same-host mapped regions"). 0 when it could not be
        mapped (the region is then mirrored; Session.hostmap_note says why)."""
        from . import hostmap
        cap = int(s.info["hostmap"].get("max_bytes", 0) or 0)    # (a channel means an offer)
        have = sum(R.nbytes for R in self.regions.values() if R.track == "mapped")
        if cap and have + bytesize > cap:
            s.hostmap_note = (f"{bytesize} B more would exceed the server's cap of {cap} B of mapped client "
                              f"memory per session (rpc_hostmap_max_gib; {have} B mapped): mirrored")
            return 0
        try:
            fd, mm = hostmap.make_memfd(bytesize)
        except OSError as e:
            s.hostmap_note = f"memfd: {e}"
            return 0
        try:
            key = ch.send(fd, bytesize)
        except OSError as e:
            mm.close()
            s._hostmap_drop(f"sending the memfd to the server: {e}")
            return 0
        finally:
            os.close(fd)
        try:
            dptr = s.gwHostMap(bytesize, key)
        except CudaError as e:
            mm.close()
            s.hostmap_note = f"{e} (the server's log says why): mirrored"
            return 0
        arr = np.frombuffer(mm, np.uint8, bytesize)
        start = int(arr.ctypes.data)
        with self.lock:
            rid = self.next_id
            R = Region(rid, start, bytesize, int(dptr), arr, "alloc", "mapped")
            R.keep = mm
            R.span = span_of(bytesize)
            if self.lib.gw_pin_add(self.reg, start, bytesize, R.mirror, rid):
                self.orig["gwHostUnmap"](s, R.mirror)
                raise CudaError(P.CURESULT["CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"], "cuMemHostAlloc",
                                f"{start:#x}+{bytesize} overlaps a pinned region")
            self.next_id += 1
            self.stats["mapped"] += 1
            self._enter(s, R)
        s._host[start] = arr
        return start

    def _enter(self, s: Any, R: Region) -> None:
        """A new region, already in the C registry, joins the session's regions (hooks on)."""
        self.regions[R.id] = R
        self.by_start[R.start] = R
        self.version += 1
        self._hook(s)

    def host_register(self, s: Any, p: Any, bytesize: Any, flags: int = 0) -> None:
        if not isinstance(bytesize, int) or isinstance(bytesize, bool) or bytesize <= 0:
            raise CudaError(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostRegister",
                            f"cuMemHostRegister: bytesize must be a positive int, got {bytesize!r}")
        if p is None or (isinstance(p, int) and p == 0):
            raise CudaError(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostRegister", "cuMemHostRegister: NULL pointer")
        keep = None
        if isinstance(p, int):
            start = p
        else:
            b = t.Buffer(p, writable=True)
            if b.nbytes < bytesize:
                raise CudaError(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostRegister",
                                f"cuMemHostRegister: the buffer holds {b.nbytes} B, bytesize is {bytesize}")
            start, keep = b.ptr, p
        arr = np.frombuffer((ctypes.c_uint8 * bytesize).from_address(start), np.uint8)
        with self.lock:
            self._new_region(s, start, bytesize, arr, "register", keep)

    def find(self, addr: int) -> Optional[Region]:
        rid = self.lib.gw_pin_find(self.reg, addr, 0, self.off)
        return self.regions.get(rid) if rid >= 0 else None

    def covers(self, addr: int, n: int) -> bool:
        return bool(self.lib.gw_pin_covers(self.reg, addr, n))

    def release(self, s: Any, R: Region) -> None:
        """cuMemFreeHost / cuMemHostUnregister of a region (deferred free, docs/pinned.md)."""
        with self.lock:
            self.lib.gw_pin_remove(self.reg, R.start)
            self.regions.pop(R.id, None)
            self.by_start.pop(R.start, None)
            self.version += 1
            R.freed = True
            if R.track == "mapped":
                # the server unmaps after the work issued before (its pages live until then)
                self.orig["gwHostUnmap"](s, R.mirror)
                s._host.pop(R.start, None)
                R.keep = None
                self._unhook_if_idle(s)
                return
            R.dirty.clear()          # writes of kernels still in flight are dropped (the memory is going)
            self._wp_off(R)
            self._uf_off(R)
        with s._lock:                # zero-copy sends may still read the region: let them finish
            s._wait_inflight()
        self.orig["cuMemFree"](s, R.mirror)   # ordered after every call issued before (server side)
        if R.ref:
            self.orig["cuMemFree"](s, R.ref)
            R.ref = 0
        self._drop_local(R)
        s._host.pop(R.start, None)
        R.keep = None                # an mmap goes back to the OS when the last view of it goes
        with self.lock:
            self._unhook_if_idle(s)

    def close(self) -> None:
        """The session is closing: unlock and forget every region (the server frees the mirrors
        with the session; an mmap of cuMemHostAlloc goes when the last view of it goes)."""
        with self.lock:
            for R in list(self.regions.values()):
                self._wp_off(R)
                self._uf_off(R)
                self._drop_local(R)
                self.lib.gw_pin_remove(self.reg, R.start)
                R.freed = True
                R.dirty.clear()
                R.keep = None
            self.regions.clear()
            self.by_start.clear()
            self.pend.clear()
            self.ev.clear()
            self.version += 1

    def _drop_local(self, R: Region) -> None:
        """Give back what this process holds for ``R``: its UCX registration and its page lock."""
        if R.mr is not None:
            try:
                R.mr.close()
            except Exception:
                pass
            R.mr = None
        if R.locked:
            self.lib.gw_pin_unlock(self.ffi.cast("void *", R.start), R.span if R.kind == "alloc" else R.nbytes)
            R.locked = False

    # ------------------------------------------------------------------ protect tracking
    def _wp_on(self, R: Region) -> None:
        self.lib.gw_wp_use_uffd(1 if settings.get("pinned_protect_uffd") else 0)
        slot = self.lib.gw_wp_add(R.start, R.span)
        if slot < 0:
            raise RuntimeError(f"pinned tracking 'protect': no write-protect slot for {R!r} ({slot}): too many "
                               f"protected regions (4096) or sigaction failed; use another tracking mode")
        R.wp = slot          # dirty until the first push protects it
        self.nwp += 1
        # large regions: a first write unprotects (and marks) only its granule, so a launch after a
        # sparse host write pushes that granule, not the region; a second write in the same cycle
        # unprotects the whole region (one more fault than whole-region tracking when the host
        # rewrites it all)
        g = _WP_GRAN_MIN
        while g * _WP_GRANS < R.span:
            g *= 2
        R.wpgran = 0
        if R.span >= 4 * g and self.lib.gw_wp_set_granule(slot, g) == 0:
            R.wpgran = g

    def _wp_off(self, R: Region) -> None:
        if R.wp >= 0:
            self.lib.gw_wp_remove(R.wp)
            R.wp = -1
            self.nwp -= 1

    # ------------------------------------------------------------------ written tracking
    def _uf_on(self, R: Region) -> str:
        """Register R's pages for 'written' tracking: "" or why not. Their first and last page
        may hold other data: a page shared with another 'written' region is refused (protecting
        it again after one region's push would hide the other's writes)."""
        ok, why = written_support()
        if not ok:
            return why
        ps = R.start // _PAGE * _PAGE
        pe = -(-(R.start + R.nbytes) // _PAGE) * _PAGE
        if R.kind == "alloc":
            pe = max(pe, R.start + R.span)      # whole huge pages (protecting part of one splits it)
        edges = (ps, pe - _PAGE)
        for p in edges:
            o = self.uf_edges.get(p)
            if o is not None and o != R.id:
                return f"'written' tracking: shares the page {p:#x} with the 'written' region {o}"
        what = "" if R.kind == "alloc" else _private_anon(ps, pe)      # (host_alloc memory is)
        if what:
            return f"'written' tracking: {what}"
        e = self.lib.gw_uf_register(ps, pe - ps)
        if e:
            return f"'written' tracking: the kernel refused to track {ps:#x}+{pe - ps} ({os.strerror(e)})"
        for p in edges:
            self.uf_edges[p] = R.id
        R.uf = (ps, pe - ps)
        R.wpend = []
        R.pushed = False        # the next launch protects and pushes it whole
        return ""

    def _uf_off(self, R: Region) -> None:
        if R.uf is None:
            return
        ps, pl = R.uf
        self.lib.gw_uf_unregister(ps, pl)
        for p in (ps, ps + pl - _PAGE):
            if self.uf_edges.get(p) == R.id:
                del self.uf_edges[p]
        R.uf = None
        R.wpend = []

    def _uf_protect(self, R: Region, on: bool) -> None:
        e = self.lib.gw_uf_protect(R.uf[0], R.uf[1], 1 if on else 0)
        if e:
            self.stats["written_errors"] = self.stats.get("written_errors", 0) + 1

    def _uf_written(self, R: Region, rewp: bool, k: Optional[int] = None) -> Optional[List[Tuple[int, int]]]:
        """The byte ranges of R (offsets) in pages written since they were protected, with the
        writes found before a pull (R.wpend); with rewp the pages are protected again in the same
        walk. None when the scan failed (the caller pushes everything). ``k``: the scan was made
        already (its result in self.ufout)."""
        out = self.ufout
        if k is None:
            k = self.lib.gw_uf_scan(R.uf[0], R.uf[1], 1 if rewp else 0, out, _UF_RUNS)
        if k < 0:
            self.stats["written_errors"] = self.stats.get("written_errors", 0) + 1
            return None
        self.stats["written_scans"] = self.stats.get("written_scans", 0) + 1
        s0, n = R.start, R.nbytes
        runs = [(max(0, out[2 * i] - s0), min(n, out[2 * i + 1] - s0)) for i in range(k)]
        if R.wpend:
            runs += R.wpend
            if rewp:
                R.wpend = []
        return _merge_runs(runs)

    # ------------------------------------------------------------------ push / pull
    def _overlap(self, s: Any, R: Region) -> bool:
        """Diff R on the pool while this thread drives the zero-copy sends already in flight
        (a region pushed before it in this launch): the diff costs no wall time then. Regions
        of 16 MiB or more only: below, the diff on awake workers takes tens of µs and the H200
        runs measured compare at 1 MiB slower with the overlap than without (docs/pinned.md)."""
        return (R.track == "compare" and R.pushed and not R.hot and not R.dirty and R.nbytes >= _DRAIN_MIN
                and bool(getattr(s, "_inflight", None)) and _threads is not None and _threads > 1)

    def _diff_overlapped(self, s: Any, R: Region) -> Optional[Tuple[int, int]]:
        """The changed span of R (None: unchanged; else (lo, hi), copied into the shadow), found
        by the pool while the sends in flight progress; (-1, -1): not started (diff inline)."""
        lib = self.lib
        sh, lv = self._cptrs(R)
        if lib.gw_pin_span_start(sh, lv, R.nbytes):
            return (-1, -1)
        self.stats["overlapped_diffs"] = self.stats.get("overlapped_diffs", 0) + 1
        w = s._w
        try:
            while not lib.gw_pin_job_done():
                w.progress()
        finally:
            lh = self.lohi
            changed = lib.gw_pin_span_finish(R.nbytes, lh, lh + 1)
        if not changed:
            return None
        lo, hi = lh[0], lh[1]
        lib.gw_pin_copy_mt(sh + lo, lv + lo, hi - lo)
        return (lo, hi)

    def _push(self, s: Any, R: Region, stream: Any, span: Any = False) -> None:
        """Push R if it changed. ``span``: compare mode's diff done already (None: unchanged,
        (lo, hi): that span changed and the shadow has it; False: diff here)."""
        if R.dirty:
            self.stats["skipped"] += 1       # the mirror holds newer bytes than the client
            return
        n = R.nbytes
        lo, hi = 0, n
        if R.pushed:
            if R.track == "explicit":
                if R.gen == R.pushed_gen:
                    self.stats["skipped"] += 1
                    return
            elif R.track == "compare":
                if R.hot:
                    # rewritten every time lately: push it whole without keeping the shadow
                    # (saves a copy of the region per launch); re-arm the diff at the end
                    R.hot -= 1
                    if not R.hot:
                        self._copy(R.shadow, R)
                else:
                    if span is False or span == (-1, -1):
                        if R.cshadow is None:
                            self._cptrs(R)
                        lh = self.lohi
                        span = (lh[0], lh[1]) if self.lib.gw_pin_diff_mt(R.cshadow, R.clive, n, lh, lh + 1) \
                            else None
                    if span is None:
                        self.stats["skipped"] += 1
                        R.streak = 0
                        return
                    lo, hi = span
                    if lo == 0 and hi == n and n >= _HOT_MIN:
                        R.streak += 1
                        if R.streak >= 2:
                            R.hot = min(_HOT_MAX, 1 << R.streak)
                    else:
                        R.streak = 0
            elif R.track == "protect":
                if R.hot:
                    # written at every launch lately: left unprotected (no fault per cycle) and
                    # pushed whole; protected again (below) before the push that ends the period
                    R.hot -= 1
                elif not self.lib.gw_wp_dirty(R.wp):
                    self.stats["skipped"] += 1   # no host store since the last push/pull
                    R.streak = 0
                    return
                elif R.wpgran and self._wp_granules(s, R, stream):
                    R.streak = 0
                    return
                elif n >= _HOT_MIN:
                    R.streak += 1                # pushed whole after a store: twice in a row -> hot
                    if R.streak >= 2:
                        R.hot = min(_HOT_MAX, 1 << R.streak)
            elif R.uf is not None:              # 'written': the kernel says which pages
                if R.hot:
                    # rewritten whole lately: left unprotected (no fault per page) and pushed whole;
                    # at the end protected again, before this push reads it
                    R.hot -= 1
                    if not R.hot:
                        self._uf_protect(R, True)
                else:
                    u = R.uf
                    k = self.lib.gw_uf_scan(u[0], u[1], 1, self.ufout, _UF_RUNS)
                    if k == 0 and not R.wpend:
                        self.stats["skipped"] += 1      # no page written since the last push/pull
                        R.streak = 0
                        return
                    runs = self._uf_written(R, True, k)
                    if runs is None:
                        self._uf_protect(R, True)
                        runs = [(0, n)]
                    if not runs:
                        self.stats["skipped"] += 1
                        R.streak = 0
                        return
                    if runs == [(0, n)] and n >= _HOT_MIN:
                        R.streak += 1
                        if R.streak >= 2:
                            R.hot = min(_HOT_MAX, 1 << R.streak)
                            self._uf_protect(R, False)
                    else:
                        R.streak = 0
                    if len(runs) > 1:
                        self._push_runs(s, R, runs, stream)
                        return
                    lo, hi = runs[0]
        elif R.shadow is not None:
            self._copy(R.shadow, R)
        elif R.uf is not None:
            self._uf_protect(R, True)       # first push: from here on the kernel records writes
            R.wpend = []
        if R.wp >= 0 and not R.hot:
            # protected before the copy reads it: a host store from here on is caught (and the
            # copy, as with CUDA, must not race with one)
            e = self.lib.gw_wp_protect(R.wp)
            if e:
                self.stats["protect_errors"] = self.stats.get("protect_errors", 0) + 1
        self._push_runs(s, R, ((lo, hi),), stream)

    def _wp_granules(self, s: Any, R: Region, stream: Any) -> bool:
        """protect mode with granules: push the granules written since the last push/pull
        (gw_wp_take protects them again before they are copied). False: push the region whole
        (unprotected whole: a second granule was written)."""
        n = R.nbytes
        k = self.lib.gw_wp_take(R.wp, self.wpout, _UF_RUNS)
        if k < 0:
            return False
        o = self.wpout
        runs = [(o[2 * i], min(n, o[2 * i + 1])) for i in range(k) if o[2 * i] < n]
        if runs:
            self.stats["granule_pushes"] = self.stats.get("granule_pushes", 0) + 1
            self._push_runs(s, R, runs, stream)
        else:
            self.stats["skipped"] += 1       # nothing written (or only the page tail past its bytes)
        return True

    def _push_runs(self, s: Any, R: Region, runs: Sequence[Tuple[int, int]], stream: Any) -> None:
        n = R.nbytes
        for lo, hi in runs:
            self.orig["cuMemcpyHtoDAsync"](s, R.mirror + lo, R.array if hi - lo == n else R.array[lo:hi],
                                           hi - lo, stream)
            if R.ref:       # the server's copy of the client bytes (server-side detection of pulls)
                self.orig["cuMemcpyDtoDAsync"](s, R.ref + lo, R.mirror + lo, hi - lo, stream)
            self.stats["push_bytes"] += hi - lo
        R.pushed = True
        R.pushed_gen = R.gen
        self.stats["pushes"] += 1

    def _cptrs(self, R: Region) -> Tuple[Any, Any]:
        if R.cshadow is None:
            R.cshadow = self.ffi.cast("uint8_t *", R.shadow.ctypes.data)
            R.clive = self.ffi.cast("uint8_t *", R.start)
        return R.cshadow, R.clive

    def _detected(self, R: Region) -> List[Tuple[int, int]]:
        """Wait for a detected pull's receives; the byte ranges that came back (merged runs)."""
        reqs, R.pulling = R.pulling, None
        s = self._sref()
        try:
            res = s._wait_reqs(reqs)
        except t.TransportError:        # the session is broken: its next call says so
            return [(0, R.nbytes)]
        return self._note_detected(R, [r.nbytes if r is not None else 0 for r in res])

    def _note_detected(self, R: Region, counts: List[int]) -> List[Tuple[int, int]]:
        """Bytes received per granule of a detected pull -> the changed runs; stats; whether
        the next pulls skip the diff (a region rewritten whole every time)."""
        runs: List[Tuple[int, int]] = []
        g = R.pg or R.nbytes
        got = 0
        for i, nb in enumerate(counts):
            if nb:
                lo = i * g
                hi = lo + nb
                got += nb
                if runs and runs[-1][1] == lo:
                    runs[-1] = (runs[-1][0], hi)
                else:
                    runs.append((lo, hi))
        st = self.stats
        st["pull_bytes"] += got
        st["pull_detected"] = st.get("pull_detected", 0) + 1
        st["pull_bytes_saved"] = st.get("pull_bytes_saved", 0) + R.nbytes - got
        # nothing changed: the next detected pull asks for coarse granules (fewer empty messages,
        # e.g. one instead of 64 for an unwritten 1 MiB input of a kernel without PTX); a change
        # found that way sends its whole coarse granule, and the pull after it is fine again
        R.quiet = got == 0
        st["pull_messages"] = st.get("pull_messages", 0) + len(counts)
        if got == R.nbytes and counts:
            R.dstreak += 1          # rewritten whole again: pull whole for a while, without the diff
            if R.dstreak >= 2 and not self._drains(R):
                R.dskip = min(_HOT_MAX, 1 << R.dstreak)
        else:
            R.dstreak = 0
        return runs

    def _drains(self, R: Region) -> bool:
        """Big compare-mode regions: their detected pulls are received granule by granule before
        the sync call goes out, each granule copied into the shadow as it lands (the copy
        overlaps the transfer instead of following it); they always use detection."""
        return R.shadow is not None and R.nbytes >= _DRAIN_MIN and R.granule > 0

    def _drain(self, s: Any, pulled: List[Region]) -> None:
        """Before a sync call: send the batch (with its pulls), then receive the granules of big
        detected pulls as they come, copying each into the shadow at once."""
        big = [R for R in pulled if R.pulling is not None and R.pulling is not _DRAINED and self._drains(R)]
        if not big:
            return
        with s._lock:
            if s._ncalls:
                s._flush_locked()
        lib = self.lib
        tmo = None if s._timeout < 0 else s._timeout
        for R in big:
            reqs = R.pulling
            g = R.pg or R.nbytes
            sh, lv = self._cptrs(R)
            counts: List[int] = []
            try:
                for i, rq in enumerate(reqs):
                    nb = rq.wait(timeout=tmo).nbytes      # drives the transport: later granules move too
                    counts.append(nb)
                    if nb:
                        lib.gw_pin_copy_mt(sh + i * g, lv + i * g, nb)
            except t.TransportError:
                R.pulling = None        # broken session: _finish copies the whole region
                continue
            self._note_detected(R, counts)
            R.pulling = _DRAINED

    def _copy(self, shadow: np.ndarray, R: Region) -> None:
        """shadow <- the region (the C pool for big regions)."""
        sh, lv = self._cptrs(R)
        self.lib.gw_pin_copy_mt(sh, lv, R.nbytes)

    def _pull(self, s: Any, R: Region, stream: int) -> None:
        if R.wp >= 0:
            self.lib.gw_wp_unprotect(R.wp)     # the receive writes the region (a syscall: no EFAULT)
        if R.uf is not None and not R.hot:
            # host writes not pushed yet (made while the region was device owned) are kept for the
            # next push; then unprotected, so the receive does not fault on every page
            runs = self._uf_written(R, False)
            R.wpend = [(0, R.nbytes)] if runs is None else runs
            self._uf_protect(R, False)
        self.stats["pulls"] += 1
        if R.detect and not R.ref:
            # first pull: whole, and the reference copy made from the mirror first (in stream
            # order); from now on pushes keep it equal to the client bytes
            try:
                R.ref = self.orig["cuMemAlloc"](s, R.nbytes)
            except CudaError:
                R.detect = False        # no room for the reference copy: pulls stay whole
            else:
                self.orig["cuMemcpyDtoDAsync"](s, R.ref, R.mirror, R.nbytes, stream)
            self.orig["cuMemcpyDtoHAsync"](s, R.array, R.mirror, R.nbytes, stream)
            self.stats["pull_bytes"] += R.nbytes
            return
        if R.ref and not R.dskip and R.pulling is None:
            # server-side detection: only the granules that differ from the server's copy of the
            # client bytes come back (the others arrive as empty messages); _finish sees which
            reqs: List[Any] = []
            g = R.granule
            if R.quiet and g:
                chunk = int(getattr(s, "_chunk", 0) or 0)
                g = chunk if 0 < chunk < R.nbytes else 0
            R.pg = g
            mirror_pull(s, R.array, R.mirror, R.ref, R.nbytes, g, stream, _reqs=reqs)
            R.pulling = reqs
            return
        if R.ref:
            # pulled whole (recently every granule changed, or a detected pull of it is still
            # being received by another thread): the reference copy first, in stream order, so
            # it is current when the server's copy back (which waits for it) is done
            if R.dskip:
                R.dskip -= 1
            self.orig["cuMemcpyDtoDAsync"](s, R.ref, R.mirror, R.nbytes, stream)
        self.orig["cuMemcpyDtoHAsync"](s, R.array, R.mirror, R.nbytes, stream)
        self.stats["pull_bytes"] += R.nbytes

    def _finish(self, pulled: List[Region]) -> None:
        """After the sync call returned: the pulled bytes are in the regions."""
        for R in pulled:
            changed = None
            if R.pulling is _DRAINED:
                R.pulling = None
                changed = []            # copied into the shadow as it arrived
            elif R.pulling is not None:
                changed = self._detected(R)
            if R.freed:
                continue
            if R.shadow is not None:
                sh, lv = self._cptrs(R)
                if changed is None:
                    self.lib.gw_pin_copy_mt(sh, lv, R.nbytes)
                else:               # only what came back: the rest is as the shadow has it
                    for lo, hi in changed:
                        self.lib.gw_pin_copy_mt(sh + lo, lv + lo, hi - lo)
            if R.wp >= 0 and not R.hot:
                self.lib.gw_wp_protect(R.wp)       # client == mirror again: catch the next store
            if R.uf is not None and not R.hot:
                self._uf_protect(R, True)          # client == mirror again (but R.wpend): record writes
                if changed is None:
                    R.wpend = []                   # pulled whole: nothing of the client's is left over
            R.pushed_gen = R.gen
            R.pushed = True
        if self.events:
            self._free_events, self.events = getattr(self, "_free_events", []) + self.events, []
        if self.nwp:
            # the program's next stores into protected regions most likely come right after a
            # sync: the userfaultfd handler polls awake for pinned_spin_us, so such a store costs
            # the writer's wake-up only (nothing with the mprotect backend)
            us = _spin_us()
            if us:
                self.lib.gw_wp_spin(us * 1000)

    def _arm(self, pulled: List[Region]) -> None:
        """A pulled region with a shadow of 1 MiB or more is copied when the sync returns: wake
        the pool now, so the wake-up overlaps the round trip."""
        for R in pulled:
            if R.shadow is not None and R.nbytes >= _MT_MIN and not (R.pulling is not None and self._drains(R)):
                us = _spin_us()
                if us:
                    self.lib.gw_pin_arm(us * 1000)
                return

    def _event(self, s: Any) -> int:
        free = getattr(self, "_free_events", None)
        if free:
            e = free.pop()
        else:
            e = self.orig["cuEventCreate"](s, 2)       # CU_EVENT_DISABLE_TIMING
        self.events.append(e)
        return e

    def _pull_cover(self, s: Any, stream: int, cover: Optional[Dict[int, Dict[int, int]]]) -> List[Region]:
        pulled: List[Region] = []
        if not cover:
            return pulled
        for rid, ws in cover.items():
            R = self.regions.get(rid)
            if R is None or not R.dirty:
                continue
            hit = False
            for w, sq in ws.items():
                cur = R.dirty.get(w)
                if cur is None:
                    continue
                hit = True
                if cur <= sq:
                    del R.dirty[w]
            if hit:
                self._pull(s, R, stream)
                pulled.append(R)
        return pulled

    def _pull_all(self, s: Any) -> List[Region]:
        pulled: List[Region] = []
        for R in list(self.regions.values()):
            if not R.dirty:
                continue
            writers = sorted(R.dirty, key=R.dirty.__getitem__)
            target = writers[-1]
            for w in writers[:-1]:       # the pull waits for every writer stream
                ev = self._event(s)
                self.orig["cuEventRecord"](s, ev, w)
                self.orig["cuStreamWaitEvent"](s, target, ev, 0)
            R.dirty.clear()
            self._pull(s, R, target)
            pulled.append(R)
        self.pend.clear()
        return pulled

    # ------------------------------------------------------------------ the launch
    def _func(self, s: Any, f: Any, fh: int) -> _Func:
        lay = getattr(f, "_layout", None)
        if lay is None:
            lay = s._param_layout(fh)
            if hasattr(f, "_layout"):
                f._layout = lay
        fi = _Func(getattr(f, "name", f"function {fh:#x}"), lay, self.ann.get(fh), self.version,
                   ptx_readonly(s, fh))
        self.funcs[fh] = fi
        return fi

    def h_cuLaunchKernel(self, f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                         hStream=0, kernelParams=None, extra=None):
        s = self._sref()
        orig = self.orig["cuLaunchKernel"]
        params = kernelParams if kernelParams is not None else extra
        if not params or not self.regions:
            return orig(s, f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                        hStream, kernelParams, extra)
        with self.lock:
            fh = int(f)
            fi = self.funcs.get(fh)
            if fi is None:
                fi = self._func(s, f, fh)
            ent = None
            cacheable = type(params) is bytes
            if cacheable:
                if fi.version != self.version:
                    fi.cache.clear()
                    fi.version = self.version
                ent = fi.cache.get(params)
            if ent is None:
                ent = self._rewrite(fi, params)
                if cacheable:
                    if len(fi.cache) >= 256:
                        fi.cache.clear()
                    fi.cache[params] = ent
            newp, used, written = ent
            self.stats["launches"] += 1
            if not used:
                if newp is not params:     # pointers into mapped regions only: rewritten, nothing to push
                    self.stats["rewritten"] += 1
                    return orig(s, f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                                sharedMemBytes, hStream, newp, None)
                return orig(s, f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                            hStream, kernelParams, extra)
            self.stats["rewritten"] += 1
            regions = self.regions
            later = None
            for rid in used:
                R = regions[rid]
                if R.nbytes >= _DRAIN_MIN and self._overlap(s, R):
                    if later is None:
                        later = []
                    later.append(R)       # diffed after the other pushes went out, overlapping them
                    continue
                self._push(s, R, hStream)
            if later:
                for R in later:
                    self._push(s, R, hStream, self._diff_overlapped(s, R) if self._overlap(s, R) else False)
            r = orig(s, f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                     hStream, newp, None)
            if written:
                st = _sid(hStream)
                self.seq = sq = self.seq + 1
                pst = self.pend.get(st)
                if pst is None:
                    pst = self.pend[st] = {}
                for rid in written:
                    regions[rid].dirty[st] = sq
                    w = pst.get(rid)
                    if w is None:
                        pst[rid] = {st: sq}
                    else:
                        w[st] = sq
            return r

    def _rewrite(self, fi: _Func, params: Any) -> Tuple[Any, Tuple[int, ...], Tuple[int, ...]]:
        """(rewritten params, regions used, regions possibly written) of one launch."""
        if not fi.offs:
            return params, (), ()
        ffi, lib = self.ffi, self.lib
        pb = bytearray(params)
        buf = ffi.from_buffer("uint8_t[]", pb)
        n = lib.gw_pin_rewrite(self.reg, buf, len(pb), fi.coffs, len(fi.offs), self.hits, self.cap)
        if n > self.cap:
            self.cap = n
            self.hits = ffi.new("gw_pin_hit_t[]", n)
            n = lib.gw_pin_rewrite(self.reg, buf, len(pb), fi.coffs, len(fi.offs), self.hits, self.cap)
        if n == 0:
            return params, (), ()
        hits = self.hits
        regions = self.regions
        if n == 1:
            h = hits[0]
            rid = h.id
            if regions[rid].track == "mapped":     # the GPU uses the client's pages: rewrite only
                return bytes(pb), (), ()
            return bytes(pb), (rid,), (() if fi.param[h.slot] in fi.readonly else (rid,))
        used: List[int] = []
        written: List[int] = []
        ro, param = fi.readonly, fi.param
        for i in range(n):
            h = hits[i]
            rid = h.id
            if regions[rid].track == "mapped":
                continue
            if rid not in used:
                used.append(rid)
            if rid not in written and param[h.slot] not in ro:
                written.append(rid)
        return bytes(pb), tuple(used), tuple(written)

    # ------------------------------------------------------------------ copies through gpuwire
    def _region_of(self, x: Any, n: int) -> Tuple[Optional[Region], int]:
        if not self.regions or x is None:
            return None, 0
        try:
            a = x if isinstance(x, int) else t.Buffer(x).ptr
        except (TypeError, ValueError):
            return None, 0
        rid = self.lib.gw_pin_find(self.reg, a, 0, self.off)
        if rid < 0:
            return None, 0
        off = int(self.off[0])
        R = self.regions.get(rid)
        if R is None or off + n > R.nbytes:
            return None, 0
        return R, off

    def _mapped_sync(self, s: Any, dst: int, src: int, n: int) -> None:
        """A synchronous copy from or to a mapped region: one device copy on the NULL stream and
        its synchronisation (the bytes are in place, or captured, when this returns)."""
        self.stats["copies_mapped"] += 1
        self.orig["cuMemcpyDtoDAsync"](s, dst, src, n, 0)
        self.h_cuStreamSynchronize(0)

    def h_cuMemcpyHtoD(self, dstDevice, srcHost, ByteCount):
        s = self._sref()
        with self.lock:
            R, off = self._region_of(srcHost, ByteCount)
            if R is not None and R.track == "mapped":
                return self._mapped_sync(s, dstDevice, R.mirror + off, ByteCount)
            if R is not None and R.dirty:   # the mirror holds the kernel's writes: copy from it
                self.stats["copies_via_mirror"] += 1
                return self.orig["cuMemcpyDtoD"](s, dstDevice, R.mirror + off, ByteCount)
        return self.orig["cuMemcpyHtoD"](s, dstDevice, srcHost, ByteCount)

    def h_cuMemcpyHtoDAsync(self, dstDevice, srcHost, ByteCount, hStream=0):
        s = self._sref()
        with self.lock:
            R, off = self._region_of(srcHost, ByteCount)
            if R is not None and (R.dirty or R.track == "mapped"):
                self.stats["copies_mapped" if R.track == "mapped" else "copies_via_mirror"] += 1
                return self.orig["cuMemcpyDtoDAsync"](s, dstDevice, R.mirror + off, ByteCount, hStream)
        return self.orig["cuMemcpyHtoDAsync"](s, dstDevice, srcHost, ByteCount, hStream)

    def h_cuMemcpyDtoHAsync(self, dstHost, srcDevice, ByteCount, hStream=0):
        s = self._sref()
        with self.lock:
            R, off = self._region_of(dstHost, ByteCount)
            if R is None:
                return self.orig["cuMemcpyDtoHAsync"](s, dstHost, srcDevice, ByteCount, hStream)
            if R.track == "mapped":     # straight into the client's pages, in stream order
                self.stats["copies_mapped"] += 1
                return self.orig["cuMemcpyDtoDAsync"](s, R.mirror + off, srcDevice, ByteCount, hStream)
            # into the mirror, in stream order; the region is pulled at the sync that covers it
            self._push(s, R, hStream)
            self.stats["copies_via_mirror"] += 1
            self.orig["cuMemcpyDtoDAsync"](s, R.mirror + off, srcDevice, ByteCount, hStream)
            st = _sid(hStream)
            self.seq = sq = self.seq + 1
            R.dirty[st] = sq
            self.pend.setdefault(st, {}).setdefault(R.id, {})[st] = sq
            return None

    def h_cuMemcpyDtoH(self, dstHost, srcDevice, ByteCount):
        s = self._sref()
        with self.lock:
            R, off = self._region_of(dstHost, ByteCount)
            if R is not None and R.track == "mapped":
                return self._mapped_sync(s, R.mirror + off, srcDevice, ByteCount)
            if R is not None and R.dirty:
                # a kernel's writes to R are still in the mirror: the copy goes into the mirror
                # after them (legacy stream), and the whole region comes back, as one legacy sync
                self.stats["copies_via_mirror"] += 1
                self.orig["cuMemcpyDtoD"](s, R.mirror + off, srcDevice, ByteCount)
                self.seq += 1
                R.dirty[0] = self.seq
                pulled = self._pull_all(s)
                sync = True
            else:
                pulled = self._pull_cover(s, 0, self.pend.pop(0, None))   # a sync copy syncs the legacy stream
                sync = False
                if R is not None and R.wp >= 0:
                    self.lib.gw_wp_unprotect(R.wp)   # the reply lands here (maybe by a syscall)
        try:
            if sync:
                self.orig["cuStreamSynchronize"](s, 0)
                return None
            return self.orig["cuMemcpyDtoH"](s, dstHost, srcDevice, ByteCount)
        finally:
            with self.lock:
                self._finish(pulled)
                if R is not None and not sync:
                    R.gen += 1      # new client bytes the mirror does not have

    # ------------------------------------------------------------------ sync points
    def h_cuCtxSynchronize(self):
        s = self._sref()
        with self.lock:
            pulled = self._pull_all(s)
            if pulled:
                self._arm(pulled)
                self._drain(s, pulled)
        try:
            return self.orig["cuCtxSynchronize"](s)
        finally:
            with self.lock:
                self._finish(pulled)

    def h_cuStreamSynchronize(self, hStream=0):
        s = self._sref()
        st = _sid(hStream)
        with self.lock:
            # the legacy stream synchronises with every blocking stream: pull everything
            pulled = self._pull_all(s) if st == 0 else self._pull_cover(s, st, self.pend.pop(st, None))
            if pulled:
                self._arm(pulled)
                self._drain(s, pulled)
        try:
            return self.orig["cuStreamSynchronize"](s, hStream)
        finally:
            with self.lock:
                self._finish(pulled)

    def h_cuEventSynchronize(self, hEvent):
        s = self._sref()
        with self.lock:
            cov = self.ev.get(int(hEvent))
            pulled = self._pull_cover(s, cov[0], cov[1]) if cov else []
            if pulled:
                self._arm(pulled)
                self._drain(s, pulled)
        try:
            return self.orig["cuEventSynchronize"](s, hEvent)
        finally:
            with self.lock:
                self._finish(pulled)

    def h_cuStreamQuery(self, hStream=0):
        s = self._sref()
        done = self.orig["cuStreamQuery"](s, hStream)
        if done:
            st = _sid(hStream)
            with self.lock:
                pulled = self._pull_all(s) if st == 0 else self._pull_cover(s, st, self.pend.pop(st, None))
            if pulled:
                try:
                    self.orig["gwSync"](s)          # the pulled bytes are in place when it returns
                finally:
                    with self.lock:
                        self._finish(pulled)
        return done

    def h_cuEventQuery(self, hEvent):
        s = self._sref()
        done = self.orig["cuEventQuery"](s, hEvent)
        if done:
            with self.lock:
                cov = self.ev.get(int(hEvent))
                pulled = self._pull_cover(s, cov[0], cov[1]) if cov else []
            if pulled:
                try:
                    self.orig["gwSync"](s)
                finally:
                    with self.lock:
                        self._finish(pulled)
        return done

    def h_cuEventRecord(self, hEvent, hStream=0):
        s = self._sref()
        st = _sid(hStream)
        with self.lock:
            if st == 0:     # the legacy stream orders after every blocking stream's earlier work
                cov: Dict[int, Dict[int, int]] = {}
                for p in self.pend.values():
                    _merge(cov, p)
            else:
                p = self.pend.get(st)
                cov = {rid: dict(ws) for rid, ws in p.items()} if p else {}
            self.ev[int(hEvent)] = (st, cov)
        return self.orig["cuEventRecord"](s, hEvent, hStream)

    def h_cuStreamWaitEvent(self, hStream, hEvent, Flags=0):
        s = self._sref()
        with self.lock:
            cov = self.ev.get(int(hEvent))
            if cov and cov[1]:
                _merge(self.pend.setdefault(_sid(hStream), {}), cov[1])
        return self.orig["cuStreamWaitEvent"](s, hStream, hEvent, Flags)


def _merge(into: Dict[int, Dict[int, int]], cov: Dict[int, Dict[int, int]]) -> None:
    for rid, ws in cov.items():
        d = into.get(rid)
        if d is None:
            into[rid] = dict(ws)
        else:
            for w, sq in ws.items():
                if d.get(w, -1) < sq:
                    d[w] = sq


# ----------------------------------------------------------------------------- session entry points

_MAKE_LOCK = threading.Lock()


def manager(session: Any, create: bool = True) -> Optional[PinnedManager]:
    """The session's :class:`PinnedManager` (made on first use: once, also when several
    threads make their first pinned call at the same time; a second manager would lose the
    regions registered in the first)."""
    m = session.__dict__.get("_pin")
    if m is None and create:
        with _MAKE_LOCK:
            m = session.__dict__.get("_pin")
            if m is None:
                m = session._pin = PinnedManager(session)
    return m


def attach(session: Any) -> None:
    """Route the session's host-memory calls through the pinned registry (Session.__init__)."""
    ref = weakref.ref(session)
    cls = type(session)

    def cuMemHostAlloc(bytesize, Flags=0):
        return manager(ref()).host_alloc(ref(), bytesize, Flags)

    def cuMemHostRegister(p, bytesize, Flags=0):
        return manager(ref()).host_register(ref(), p, bytesize, Flags)

    def _free(name):
        base = getattr(cls, name)

        def fn(p):
            s = ref()
            m = manager(s, create=False)
            if m is not None and p is not None:
                a = s._hostaddr(p) if not isinstance(p, int) else p
                R = m.by_start.get(a)
                if R is not None:
                    return m.release(s, R)
            return base(s, p)            # not a region of ours: the server answers (as before)
        fn.__name__ = name
        fn.__doc__ = base.__doc__
        return fn

    base_load, base_get = getattr(cls, "cuModuleLoadData"), getattr(cls, "cuModuleGetFunction")
    ptx = session.__dict__.setdefault("_pin_ptx", {"mods": {}, "funcs": {}})

    def cuModuleLoadData(image):
        h = base_load(ref(), image)
        try:
            from .spec import image_format
            if settings.get("pinned_ptx_readonly") and image_format(image) == "ptx":
                ptx["mods"][int(h)] = bytes(memoryview(image).cast("B")).split(b"\0", 1)[0]
        except (TypeError, ValueError):
            pass
        return h

    def cuModuleGetFunction(hmod, name):
        h = base_get(ref(), hmod, name)
        try:
            mh = int(hmod)
            if mh in ptx["mods"]:
                nm = name.decode() if isinstance(name, (bytes, bytearray)) else str(name)
                ptx["funcs"][int(h)] = (mh, nm)
        except (TypeError, ValueError):
            pass
        return h

    cuModuleLoadData.__doc__ = base_load.__doc__
    cuModuleGetFunction.__doc__ = base_get.__doc__
    cuMemHostAlloc.__doc__ = getattr(cls, "cuMemHostAlloc").__doc__
    cuMemHostRegister.__doc__ = getattr(cls, "cuMemHostRegister").__doc__
    d = session.__dict__
    d["cuMemHostAlloc"] = cuMemHostAlloc
    d["cuMemHostRegister"] = cuMemHostRegister
    d["cuMemFreeHost"] = _free("cuMemFreeHost")
    d["cuMemHostUnregister"] = _free("cuMemHostUnregister")
    d["cuModuleLoadData"] = cuModuleLoadData
    d["cuModuleGetFunction"] = cuModuleGetFunction

    def gwMirrorPull(dstHost, srcDevice, refDevice, ByteCount, granule, hStream=0):
        return mirror_pull(ref(), dstHost, srcDevice, refDevice, ByteCount, granule, hStream)
    gwMirrorPull.__doc__ = getattr(cls, "gwMirrorPull").__doc__
    d["gwMirrorPull"] = gwMirrorPull


def ptx_readonly(session: Any, fh: int) -> FrozenSet[int]:
    """Parameters of function ``fh`` that its PTX never writes through (empty when the module
    was not PTX, not loaded through the session, or the setting is off)."""
    info = session.__dict__.get("_pin_ptx")
    if not info or not settings.get("pinned_ptx_readonly"):
        return frozenset()
    got = info["funcs"].get(fh)
    if got is None:
        return frozenset()
    mh, name = got
    mod = info["mods"].get(mh)
    if mod is None:
        return frozenset()
    if isinstance(mod, bytes):          # analysed on first use, once per module
        from . import ptx_access
        try:
            mod = ptx_access.analyse(mod.decode("utf-8", "replace"))
        except Exception:               # never let the scan break a launch: nothing inferred
            mod = {}
        info["mods"][mh] = mod
    ent = mod.get(name)
    if ent is None:
        return frozenset()
    n, written = ent
    return frozenset(range(n)) - written


def _session_of(func: Any, session: Any) -> Tuple[Any, int]:
    if session is None:
        session = getattr(func, "session", None)
        if session is None:
            raise TypeError("annotate: give a Function (module.function(name)) or session= with a handle")
    return session, int(func)


def annotate(func: Any, *, readonly: Iterable[int] = (), ignore: Iterable[int] = (),
             struct_pointers: Optional[Dict[int, Sequence[int]]] = None, session: Any = None) -> None:
    """Declare what the launch rewrite cannot know about a kernel (by parameter index):

    * ``readonly``: pointer parameters the kernel only reads: regions reached only
      through them are not pulled back after the launch;
    * ``ignore``: 8-byte parameters that are not pointers (an integer or double that
      may equal a pinned address): never rewritten (the false-positive opt-out);
    * ``struct_pointers``: ``{param: [offsets]}``: 8-byte pointers inside a struct
      parameter passed by value, at these byte offsets inside it (a pointer field of
      8 bytes at an 8-aligned offset)."""
    s, fh = _session_of(func, session)
    m = manager(s)
    with m.lock:
        m.ann[fh] = _Ann(readonly, ignore, struct_pointers)
        m.funcs.pop(fh, None)
        m._hook(s)


def region(session: Any, buf: Any) -> Region:
    """The pinned :class:`Region` holding ``buf`` (a host_alloc array, a registered buffer or an address)."""
    m = manager(session, create=False)
    a = buf if isinstance(buf, int) else t.Buffer(buf).ptr
    R = m.find(a) if m is not None else None
    if R is None:
        raise ValueError(f"{a:#x} is not inside a pinned region of this session")
    return R


def auto_track(n: int, kind: str = "alloc") -> str:
    """What 'auto' tracks a new region of n bytes with (kind 'alloc': host_alloc, 'register':
    host_register): 'compare' below 64 KiB (a diff costs ~nothing), 'protect' for host_alloc
    regions of pinned_protect_min or more where the userfaultfd backend works (an unchanged
    launch is a flag read), else 'written' (a region the kernel cannot track that way falls back
    to 'compare' when it is registered; Region.track_note says why)."""
    if n < _UF_MIN:
        return "compare"
    pmin = int(settings.get("pinned_protect_min"))
    if kind == "alloc" and pmin > 0 and n >= pmin and settings.get("pinned_protect_uffd"):
        lib = _c()[1]
        lib.gw_wp_use_uffd(1)
        if lib.gw_wp_backend() == 1:
            return "protect"
    return "written"


def set_tracking(session: Any, buf: Any, mode: str) -> Region:
    """Change how a region's changes are found before a push (auto / written / always / compare /
    explicit / protect). 'written' raises RuntimeError naming why where it cannot work; 'auto'
    picks it where it can (and 'compare' otherwise, with the reason in Region.track_note)."""
    if mode not in TRACK_MODES and mode != "auto":
        raise ValueError(f"tracking mode {mode!r}: expected 'auto' or one of {', '.join(TRACK_MODES)}")
    R = region(session, buf)
    if R.track == "mapped":
        raise ValueError(f"{R!r} is mapped by the server (same host): the GPU uses its pages in place, "
                         f"there is no mirror whose changes could be tracked")
    if mode == "protect" and R.kind != "alloc":
        raise ValueError(f"tracking mode 'protect' needs a host_alloc region (whole pages of its own); "
                         f"{R!r} was registered: use 'compare' or 'explicit'")
    m = manager(session)
    with m.lock:
        R.track_note = ""
        if mode == "auto":
            mode = auto_track(R.nbytes, R.kind)
            if mode == "written":
                mode = "auto"               # (written where the kernel can, else compare)
        if mode != "protect":
            m._wp_off(R)        # (first: a range is registered with one userfaultfd at a time)
        if mode in ("auto", "written"):
            why = "" if R.uf is not None else m._uf_on(R)
            if why and mode == "written":
                raise RuntimeError(f"tracking mode 'written' for {R!r}: {why}")
            mode = "compare" if why else "written"
            R.track_note = why
        if mode != "written":
            m._uf_off(R)
        if mode == "protect" and R.wp < 0:
            m._wp_on(R)
            R.pushed = False
        R.hot = R.streak = 0
        R.track = mode
        if mode == "compare" and R.shadow is None:
            R.shadow = _shadow(R.nbytes)
            R.cshadow = None
            R.pushed = False          # the next launch pushes all and fills the shadow
        elif mode != "compare":
            R.shadow = R.cshadow = None
    return R


def stats(session: Any) -> Dict[str, int]:
    """Counters: launches seen, launches rewritten, pushes/pulls and their bytes, pushes skipped."""
    m = manager(session, create=False)
    return dict(m.stats) if m is not None else {}
