"""The executor interface shared by the CPU and GPU executors.

The server's generated dispatch (see :mod:`gpuwire.rpc.codegen`) decodes a call,
translates its handles, checks every device range against the session's
allocations, and then calls the method *named after the call* on a target: the
server session for session-level calls (context, device, allocation
bookkeeping, last error), else the executor session. An executor therefore
implements a narrow set of operations:

* :class:`Executor` (one per server process): device facts and sessions.
* :class:`ExecutorSession` (one per client session): ``back``/``unback`` of VA
  granules, copies, memsets, streams, events, modules, launches. The CUDA-named
  methods below forward the copy/memset families to a few primitives, so an
  executor implements ``copy_htod``, ``copy_dtoh``, ``copy_dtod``, ``memset``.

Failures are raised as :class:`CudaCallError` (a CUresult and a message).
"""
from __future__ import annotations

import bisect
import threading
from typing import Any, Dict, List, Optional, Tuple

from .. import protocol as P


class CudaCallError(Exception):
    """A call failed with CUresult ``code`` (the server turns it into the call's result)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or P.result_name(code))
        self.code = int(code)


def fail(code: int, message: str = "") -> "CudaCallError":
    return CudaCallError(code, message)


class Executor:
    """Process-wide part: what the server reports and how sessions are made."""
    kind = "?"
    granularity = 2 << 20          # VA mapping granularity reported to clients
    bulk_chunk = 0                 # preferred bulk message size (0: one message)

    def driver_version(self) -> int:
        raise NotImplementedError

    def device_count(self) -> int:
        raise NotImplementedError

    def open_session(self, device: int, va_size: int) -> "ExecutorSession":
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"executor": self.kind}

    def close(self) -> None:
        pass


class MemoryMap:
    """Allocations of one session inside its reserved VA range, and the physical
    backing of the granules they touch (reference counted, so small allocations
    share a granule and a granule is released with its last allocation)."""

    def __init__(self, sess: "ExecutorSession", base: int, size: int, gran: int):
        self.sess, self.base, self.size, self.gran = sess, base, size, gran
        self.starts: List[int] = []            # allocation starts, sorted
        self.sizes: Dict[int, int] = {}
        self.segs: List[int] = []              # backing segment starts, sorted
        self.seginfo: Dict[int, List[Any]] = {}  # start -> [size, refcount, token]
        self.backed = 0
        self.external: Dict[int, int] = {}     # same-host mappings (outside the VA range, no backing)

    # -- lookups
    def find(self, ptr: int, n: int) -> Optional[Tuple[int, int]]:
        """(start, size) of the allocation holding [ptr, ptr+n), or None."""
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0:
            return None
        s = self.starts[i]
        sz = self.sizes[s]
        if ptr + n <= s + sz and (n > 0 or ptr < s + sz or sz == 0):
            return s, sz
        return None

    def _overlapping_segs(self, g0: int, g1: int) -> List[int]:
        i = bisect.bisect_right(self.segs, g0) - 1
        out = []
        if i >= 0:
            s = self.segs[i]
            if s + self.seginfo[s][0] > g0:
                out.append(s)
        j = bisect.bisect_left(self.segs, g0 if not out else g0 + 1)
        while j < len(self.segs) and self.segs[j] < g1:
            if self.segs[j] not in out:
                out.append(self.segs[j])
            j += 1
        return out

    # -- alloc / free
    def alloc(self, ptr: int, n: int) -> None:
        if n <= 0:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "cuMemAlloc: bytesize must be > 0")
        if ptr % 256 or ptr < self.base or ptr + n > self.base + self.size:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemAlloc: address {ptr:#x}+{n} is outside the session's VA range "
                       f"[{self.base:#x}, {self.base + self.size:#x}) or misaligned")
        i = bisect.bisect_right(self.starts, ptr)
        if i > 0:
            ps = self.starts[i - 1]
            if ps + self.sizes[ps] > ptr:
                raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuMemAlloc: {ptr:#x} overlaps the allocation at {ps:#x}")
        if i < len(self.starts) and self.starts[i] < ptr + n:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemAlloc: {ptr:#x}+{n} overlaps the allocation at {self.starts[i]:#x}")
        g = self.gran
        g0 = ptr // g * g
        g1 = (ptr + n + g - 1) // g * g
        have = sorted(self._overlapping_segs(g0, g1))
        # unbacked runs inside [g0, g1)
        runs = []
        cur = g0
        for s in have:
            if s > cur:
                runs.append((cur, s - cur))
            cur = max(cur, s + self.seginfo[s][0])
        if cur < g1:
            runs.append((cur, g1 - cur))
        made = []
        try:
            for s, sz in runs:
                tok = self.sess.back(s, sz)
                made.append((s, sz, tok))
        except BaseException:
            for s, sz, tok in made:
                self.sess.unback(s, sz, tok)
            raise
        for s, sz, tok in made:
            bisect.insort(self.segs, s)
            self.seginfo[s] = [sz, 0, tok]
            self.backed += sz
        for s in self._overlapping_segs(g0, g1):
            self.seginfo[s][1] += 1
        self.starts.insert(i, ptr)
        self.sizes[ptr] = n

    def add_external(self, ptr: int, n: int) -> None:
        """A range the session may name that is not VA-range memory (a same-host mapping of client
        memory, gwHostMap): found by find() like an allocation, never backed or unbacked here."""
        i = bisect.bisect_right(self.starts, ptr)
        if (i > 0 and self.starts[i - 1] + self.sizes[self.starts[i - 1]] > ptr) or \
                (i < len(self.starts) and self.starts[i] < ptr + n):
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwHostMap: {ptr:#x}+{n} overlaps an allocation of this session")
        self.starts.insert(i, ptr)
        self.sizes[ptr] = n
        self.external[ptr] = n

    def remove_external(self, ptr: int) -> None:
        if self.external.pop(ptr, None) is not None:
            del self.sizes[ptr]
            self.starts.pop(bisect.bisect_left(self.starts, ptr))

    def free(self, ptr: int) -> None:
        n = self.sizes.get(ptr)
        if n is None:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuMemFree: {ptr:#x} is not an allocation of this session")
        if ptr in self.external:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuMemFree: {ptr:#x} is a same-host mapping of client memory (free it with cuMemFreeHost)")
        del self.sizes[ptr]
        self.starts.pop(bisect.bisect_left(self.starts, ptr))
        g = self.gran
        g0 = ptr // g * g
        g1 = (ptr + n + g - 1) // g * g
        for s in self._overlapping_segs(g0, g1):
            info = self.seginfo[s]
            info[1] -= 1
            if info[1] <= 0:
                del self.seginfo[s]
                self.segs.pop(bisect.bisect_left(self.segs, s))
                self.backed -= info[0]
                self.sess.unback(s, info[0], info[2])

    def release_all(self) -> None:
        for s in list(self.segs):
            sz, _rc, tok = self.seginfo.pop(s)
            try:
                self.sess.unback(s, sz, tok)
            except Exception:
                pass
        self.segs.clear()
        self.starts.clear()
        self.sizes.clear()
        self.external.clear()
        self.backed = 0


class ExecutorSession:
    """Per-client-session part of an executor. Streams/events/modules/functions
    are whatever objects the executor returns; the server maps client ids to them."""

    va_base = 0
    va_size = 0

    # -- memory primitives (override)
    def back(self, start: int, size: int) -> Any:
        raise NotImplementedError

    def unback(self, start: int, size: int, token: Any) -> None:
        raise NotImplementedError

    def copy_htod(self, dst: int, src: Any, n: int, stream: Any) -> None:
        raise NotImplementedError

    def copy_dtoh(self, sink: Any, src: int, n: int, stream: Any) -> None:
        raise NotImplementedError

    def copy_dtod(self, dst: int, src: int, n: int, stream: Any) -> None:
        raise NotImplementedError

    # -- same-host mapped client memory (gwHostMap; executors that can, define these)
    # host_map(addr, n) -> (device address, token): make the server-process mapping [addr, addr+n)
    # of client pages usable as device memory; host_unmap(token): undo it once the work issued
    # before has completed.

    def memset(self, dst: int, value: int, elem: int, count: int, stream: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- pinned mirrors: send back only what changed (docs/pinned.md, "Server-side detection")
    def gwMirrorPull(self, sink, src, ref, n, granule, stream):
        parts = mirror_parts(n, granule, getattr(self, "chunk", 0) or 0)
        try:
            self.mirror_pull(sink, src, ref, parts, stream)
        except BaseException:
            if not sink.sent:       # the client posted one receive per granule: answer each
                sink.finish()
            raise

    def mirror_pull(self, sink: Any, src: int, ref: int, parts: List[Tuple[int, int]], stream: Any) -> None:
        raise fail(P.CUDA_ERROR_NOT_SUPPORTED, "gwMirrorPull: not supported by this executor")

    # -- CUDA-named glue onto the primitives
    def cuMemcpyHtoD(self, dst, src, n):
        self.copy_htod(dst, src, n, None)

    def cuMemcpyHtoDAsync(self, dst, src, n, stream):
        self.copy_htod(dst, src, n, stream)

    def cuMemcpyDtoH(self, sink, src, n):
        self.copy_dtoh(sink, src, n, None)

    def cuMemcpyDtoHAsync(self, sink, src, n, stream):
        self.copy_dtoh(sink, src, n, stream)

    def cuMemcpyDtoD(self, dst, src, n):
        self.copy_dtod(dst, src, n, None)

    def cuMemcpyDtoDAsync(self, dst, src, n, stream):
        self.copy_dtod(dst, src, n, stream)

    def cuMemsetD8(self, dst, v, n):
        self.memset(dst, v, 1, n, None)

    def cuMemsetD16(self, dst, v, n):
        self.memset(dst, v, 2, n, None)

    def cuMemsetD32(self, dst, v, n):
        self.memset(dst, v, 4, n, None)

    def cuMemsetD8Async(self, dst, v, n, stream):
        self.memset(dst, v, 1, n, stream)

    def cuMemsetD16Async(self, dst, v, n, stream):
        self.memset(dst, v, 2, n, stream)

    def cuMemsetD32Async(self, dst, v, n, stream):
        self.memset(dst, v, 4, n, stream)

    def cuModuleLoadFatBinary(self, hid, image):
        return self.cuModuleLoadData(hid, image)


MIRROR_MAX_PARTS = 1 << 16


def mirror_parts(n: int, granule: int, chunk: int) -> List[Tuple[int, int]]:
    """gwMirrorPull's messages: (offset, length) per granule (one for all when granule is 0);
    a granule must fit the executor's bulk message size ``chunk`` (0: any)."""
    g = granule or n
    if n and (g <= 0 or (n + g - 1) // g > MIRROR_MAX_PARTS):
        raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwMirrorPull: granule {granule} splits {n} B into more than "
                                               f"{MIRROR_MAX_PARTS} messages")
    if chunk and g > chunk:
        raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwMirrorPull: granule of {g} B is larger than the server's bulk "
                                               f"message size ({chunk} B)")
    if n == 0:
        return [(0, 0)]
    return [(o, min(g, n - o)) for o in range(0, n, g)]


def check_align(ptr: int, elem: int, what: str) -> None:
    if elem > 1 and ptr % elem:
        raise fail(P.CUDA_ERROR_INVALID_VALUE, f"{what}: {ptr:#x} is not {elem}-byte aligned")


_registry_lock = threading.Lock()
