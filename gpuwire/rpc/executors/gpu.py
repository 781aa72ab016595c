"""``--executor gpu``: calls run on the GPU through the CUDA driver API.

Control calls go through ``cuda.bindings.driver`` (imported here only, lazily: CPU
machines never import it). The launch hot path goes through gpuwire's C helper
(``gpuwire._rpc``, libcuda entry points from ``cuGetProcAddress``) when it is built,
which skips cuda.bindings' per-call argument conversion; ``gpuwire bench rpc
--tests dispatch`` measures both (and cupy's launch) on the GPU machine.

Per session: its own context (``cuCtxCreate`` on the session's thread, so it stays
current there), a VA reservation (``cuMemAddressReserve``) whose granules are backed
with ``cuMemCreate``/``cuMemMap``/``cuMemSetAccess`` as the client allocates, and
pinned staging buffers for bulk copies (double-buffered chunks).
"""
from __future__ import annotations

import ctypes
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ... import settings
from .. import protocol as P
from .base import CudaCallError, Executor, ExecutorSession, MemoryMap, check_align, fail

settings.register("rpc_gpu_chunk", 4 << 20, int,
                  "GPU executor: bulk copies move through pinned staging in chunks of this size.", layer="rpc")
settings.register("rpc_gpu_staging", 4, int,
                  "GPU executor: pinned staging buffers (of rpc_gpu_chunk bytes) in the bulk copy ring.",
                  layer="rpc")
settings.register("rpc_gpu_h2d_overlap", True, bool,
                  "GPU executor: an async H2D copy's last chunk(s) are left received-but-unqueued until "
                  "the session's next call, which posts its own payload receive first: the next payload "
                  "moves while the server finishes this one (needs rpc_gpu_staging >= 4).", layer="rpc")
settings.register("rpc_gpu_c_launch", True, bool,
                  "GPU executor: launch kernels through the C helper (gpuwire._rpc) when it is built.",
                  layer="rpc")
settings.register("rpc_gpu_graph_min", 8, settings.nonneg_int,
                  "GPU executor: a run of at least this many kernel launches on one stream in one frame, "
                  "seen before with the same kernels, dimensions and parameter sizes, is replayed as a CUDA "
                  "graph (built the second time the run is seen; later only nodes whose parameters changed "
                  "are updated). 0: off (every launch is its own cuLaunchKernel).", layer="rpc")
settings.register("rpc_gpu_graph_cache", 32, settings.nonneg_int,
                  "GPU executor: launch runs (and their graphs) a session remembers, least recently used "
                  "dropped first (see rpc_gpu_graph_min).", layer="rpc")

_drv = None


def _driver():
    global _drv
    if _drv is None:
        try:
            from cuda.bindings import driver
        except ImportError as e:
            raise RuntimeError("the GPU executor needs cuda.bindings (pip install 'gpuwire[gpu]'): "
                               f"{e}") from None
        _drv = driver
    return _drv


def _code(err: Any) -> int:
    try:
        return int(err)
    except (TypeError, ValueError):
        return int(getattr(err, "value", P.CUDA_ERROR_UNKNOWN))


def ck(r: Any, what: str) -> Any:
    """Unpack a cuda.bindings result tuple; raise CudaCallError on failure."""
    err = r[0]
    c = _code(err)
    if c:
        raise CudaCallError(c, f"{what}: {P.result_name(c)}")
    if len(r) == 1:
        return None
    if len(r) == 2:
        return r[1]
    return tuple(r[1:])


def _addr(x: Any) -> int:
    """Host address of a buffer or a numpy array."""
    if isinstance(x, int):
        return x
    if isinstance(x, np.ndarray):
        return int(x.ctypes.data)
    from ... import transport as t
    return t.Buffer(x).ptr


class GPUStream:
    __slots__ = ("h", "ptr")

    def __init__(self, h: Any):
        self.h = h
        self.ptr = int(h)


class GPUEvent:
    __slots__ = ("h", "ptr")

    def __init__(self, h: Any):
        self.h = h
        self.ptr = int(h)


class GPUModule:
    __slots__ = ("h",)

    def __init__(self, h: Any):
        self.h = h


class GPUFunction:
    __slots__ = ("h", "ptr", "layout", "size", "scratch", "ptrs", "ptrs_addr", "module")

    def __init__(self, h: Any, layout: List[Tuple[int, int]], module: GPUModule):
        self.h = h
        self.ptr = int(h)
        self.module = module
        self.layout = layout
        self.size = max((o + s for o, s in layout), default=0)
        self.scratch = np.zeros(max(self.size, 8), np.uint8)
        base = int(self.scratch.ctypes.data)
        self.ptrs = np.array([base + o for o, _ in layout] or [0], np.uint64)
        self.ptrs_addr = int(self.ptrs.ctypes.data)


class GPUExecutor(Executor):
    kind = "gpu"

    def __init__(self, devices: Optional[List[int]] = None):
        d = _driver()
        ck(d.cuInit(0), "cuInit")
        self.d = d
        self.ndev = ck(d.cuDeviceGetCount(), "cuDeviceGetCount")
        if self.ndev < 1:
            raise RuntimeError("no CUDA device")
        self.version = ck(d.cuDriverGetVersion(), "cuDriverGetVersion")
        self.dev_handles = [ck(d.cuDeviceGet(i), "cuDeviceGet") for i in range(self.ndev)]
        prop = self.alloc_prop(0)
        self.granularity = int(ck(d.cuMemGetAllocationGranularity(
            prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM), "granularity"))
        self.bulk_chunk = int(settings.get("rpc_gpu_chunk"))
        self.names = [ck(d.cuDeviceGetName(256, h), "cuDeviceGetName").split(b"\0")[0].decode()
                      for h in self.dev_handles]
        self.c = None
        self.fns = None
        self.graph_fns = None      # (launch-run graph entry points, at the first session)
        if settings.get("rpc_gpu_c_launch"):
            try:
                from . import _cfast
                self.c = _cfast.load(d)
            except Exception:  # the C helper is optional
                self.c = None

    def alloc_prop(self, dev: int):
        d = _driver()
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = dev
        return prop

    def driver_version(self) -> int:
        return int(self.version)

    def device_count(self) -> int:
        return self.ndev

    def describe(self) -> Dict[str, Any]:
        return {"executor": "gpu", "device": ", ".join(self.names), "devices": self.names,
                "c_launch": self.c is not None}

    def open_session(self, device: int, va_size: int) -> "GPUSession":
        if not 0 <= device < self.ndev:
            raise fail(P.CUDA_ERROR_INVALID_DEVICE, f"device {device} does not exist ({self.ndev} devices)")
        return GPUSession(self, device, va_size)


class GPUSession(ExecutorSession):
    def __init__(self, ex: GPUExecutor, device: int, va_size: int):
        d = ex.d
        self.ex, self.d, self.dev = ex, d, device
        self.devh = ex.dev_handles[device]
        try:
            self.ctx = ck(d.cuCtxCreate(None, 0, self.devh), "cuCtxCreate")
        except TypeError:  # older bindings: cuCtxCreate(flags, dev)
            self.ctx = ck(d.cuCtxCreate(0, self.devh), "cuCtxCreate")
        self.sticky = None
        self.va_size = va_size
        self.va_base = 0
        self._staging: List[Any] = []
        self.ex_timeout = 120.0
        self.h2d_pend: List[Any] = []
        self.h2d_failed: Optional[Tuple[int, str]] = None
        try:
            self.va_base = int(ck(d.cuMemAddressReserve(va_size, ex.granularity, 0, 0), "cuMemAddressReserve"))
            self.mm = MemoryMap(self, self.va_base, va_size, ex.granularity)
            self.prop = ex.alloc_prop(device)
            desc = d.CUmemAccessDesc()
            desc.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            desc.location.id = device
            desc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            self.access = [desc]
            self.chunk = ex.bulk_chunk
            self.ex_timeout = float(settings.get("rpc_bulk_timeout_s"))
            self.small = self._pinned(P.U32.size + (1 << 20))   # inline D2H and small staging
            # a ring of pinned staging buffers for bulk copies: a slot is busy while its copy
            # (event) or its send (request) is outstanding, so copies overlap the network
            k = int(settings.get("rpc_gpu_staging"))
            self.stage = [self._pinned(self.chunk) for _ in range(k)]
            self.ev = [ck(d.cuEventCreate(2), "cuEventCreate") for _ in range(k)]  # DISABLE_TIMING
            self.ev_used = [False] * k
            self.ring_req: List[Any] = [None] * k
            self.ring_i = 0
            # async H2D chunks whose receive is posted but not yet waited for / queued:
            # (slot, request, device address, length, stream, BulkIn); finished by h2d_finish
            self.h2d_overlap = bool(settings.get("rpc_gpu_h2d_overlap")) and k >= 4
            self.s0 = d.CUstream(0)
        except BaseException:
            self.close()
            raise

    def c_calls(self) -> Dict[int, int]:
        """Driver entry points of the hot calls for the server's C dispatch loop."""
        from . import _cfast
        if not _cfast.available() or not settings.get("rpc_gpu_c_launch"):
            return {}
        if self.ex.fns is None:
            self.ex.fns = _cfast.driver_fns(self.d)
        return self.ex.fns

    def c_graphs(self) -> Dict[str, Any]:
        """The C dispatch loop's launch-run graphs: {"fns": entry points, "min_run", "cache"}
        (rpc_gpu_graph_min, rpc_gpu_graph_cache); empty when off or an entry point is missing."""
        from . import _cfast
        min_run = int(settings.get("rpc_gpu_graph_min"))
        if not min_run or not self.c_calls():
            return {}
        if getattr(self.ex, "graph_fns", None) is None:
            self.ex.graph_fns = _cfast.graph_driver_fns(self.d)
        if not self.ex.graph_fns:
            return {}
        return {"fns": self.ex.graph_fns, "min_run": min_run, "cache": int(settings.get("rpc_gpu_graph_cache"))}

    def c_scratch(self) -> Tuple[int, int]:
        """Pinned host memory the server's C loop copies pushed D2H bytes into: two halves of
        a bulk chunk each (the C server alternates them so one push is on the wire while the
        next is copied)."""
        if getattr(self, "c_push", None) is None:
            self.c_push = self._pinned(2 * (self.chunk + 64))
        return self.c_push

    def c_bulk(self, nslots: int) -> Dict[str, Any]:
        """The C server's bulk copies (gw_rpc_bulk_t): ``nslots`` pinned staging slots of one
        bulk chunk each, an event per slot and the driver entry points it calls. Empty when
        the C helper or an entry point is missing."""
        from . import _cfast
        if not _cfast.available():
            return {}
        fns = _cfast.bulk_driver_fns(self.d)
        if not fns:
            return {}
        slots = [self._pinned(self.chunk)[0] for _ in range(nslots)]
        evs = [ck(self.d.cuEventCreate(2), "cuEventCreate") for _ in range(nslots)]  # DISABLE_TIMING
        self.ev_c = evs
        return {"slots": slots, "slot_size": self.chunk, "events": [int(e) for e in evs], "fns": fns}

    # ------------------------------------------------------------------ helpers
    def _pinned(self, n: int) -> Tuple[int, int]:
        p = int(ck(self.d.cuMemHostAlloc(n, 0), "cuMemHostAlloc"))
        self._staging.append(p)
        return (p, n)

    def _s(self, stream: Any):
        if stream is None:
            return self.s0
        return stream.h if isinstance(stream, GPUStream) else stream

    def special_stream(self, hid: int) -> Any:
        return GPUStream(self.d.CUstream(hid))

    # ------------------------------------------------------------------ memory
    def back(self, start: int, size: int) -> Any:
        d = self.d
        h = ck(d.cuMemCreate(size, self.prop, 0), "cuMemCreate")
        try:
            ck(d.cuMemMap(start, size, 0, h, 0), "cuMemMap")
            try:
                ck(d.cuMemSetAccess(start, size, self.access, 1), "cuMemSetAccess")
            except CudaCallError:
                d.cuMemUnmap(start, size)
                raise
        except CudaCallError:
            d.cuMemRelease(h)
            raise
        return h

    def unback(self, start: int, size: int, token: Any) -> None:
        d = self.d
        d.cuCtxSynchronize()        # nothing may still use the range (cuMemFree semantics)
        d.cuMemUnmap(start, size)
        d.cuMemRelease(token)

    def cuMemGetInfo(self):
        return ck(self.d.cuMemGetInfo(), "cuMemGetInfo")

    def copy_htod(self, dst: int, src: Any, n: int, stream: Any) -> None:
        d = self.d
        s = self._s(stream)
        if not hasattr(src, "recv_into_ptr"):
            if self.h2d_pend:
                self.h2d_finish()       # the previous copy's tail goes first
            if n:
                if stream is None:
                    ck(d.cuMemcpyHtoD(dst, _addr(src), n), "cuMemcpyHtoD")
                else:
                    ck(d.cuMemcpyHtoDAsync(dst, _addr(src), n, s), "cuMemcpyHtoDAsync")
            return
        if src.nbytes != n:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload is {src.nbytes} B, the call copies {n}")
        from ..server import _chunks
        # two receives posted ahead: the network fills one slot while another is copied
        parts = _chunks(n, self.chunk)
        pending: List[Any] = []

        def post(i: int) -> None:
            k = self._slot()
            pending.append((k, src.recv_part_nb(self.stage[k][0], parts[i][1])))
        overlap = self.h2d_overlap and stream is not None
        try:
            for i in range(min(2, len(parts))):
                post(i)
            if self.h2d_pend:
                # the previous copy's tail, now that this payload's receives are posted (a failure
                # stays in h2d_failed: the server reports it as the previous copy's)
                self.h2d_finish()
            for i, (off, ln) in enumerate(parts):
                if overlap and i + 2 >= len(parts):
                    # every remaining chunk's receive is posted: leave them for the next call
                    for j in range(i, len(parts)):
                        k, req = pending.pop(0)
                        self.h2d_pend.append((k, req, dst + parts[j][0], parts[j][1], s, src))
                    break
                k, req = pending.pop(0)
                src.wait_part(req, ln)
                if ln:
                    ck(d.cuMemcpyHtoDAsync(dst + off, self.stage[k][0], ln, s), "cuMemcpyHtoDAsync")
                    ck(d.cuEventRecord(self.ev[k], s), "cuEventRecord")
                    self.ev_used[k] = True
                if i + 2 < len(parts):
                    post(i + 2)
        finally:
            for _k, r in pending:   # a failure mid-way: take the rest so nothing is left queued
                try:
                    r.wait(timeout=self.ex_timeout)
                except Exception:
                    pass
            src.done = True
        if stream is None:
            ck(d.cuStreamSynchronize(s), "cuStreamSynchronize")

    def h2d_finish(self) -> None:
        """Wait for the left-over chunks of the last async H2D copy and queue their copies
        (before any other call of the session runs). Never raises: a failure is kept in
        ``h2d_failed`` (CUresult, text) for the server to report as that copy's error."""
        pend, self.h2d_pend = self.h2d_pend, []
        d = self.d
        for n, (k, req, dptr, ln, s, src) in enumerate(pend):
            try:
                src.wait_part(req, ln)
                if ln:
                    ck(d.cuMemcpyHtoDAsync(dptr, self.stage[k][0], ln, s), "cuMemcpyHtoDAsync")
                    ck(d.cuEventRecord(self.ev[k], s), "cuEventRecord")
                    self.ev_used[k] = True
            except CudaCallError as e:
                if self.h2d_failed is None:
                    self.h2d_failed = (e.code, str(e))
                for _k, r, *_ in pend[n + 1:]:      # take the rest so nothing is left queued
                    try:
                        r.wait(timeout=self.ex_timeout)
                    except Exception:
                        pass
                return
            except Exception as e:   # transport errors: the session ends through its own path
                if self.h2d_failed is None:
                    self.h2d_failed = (P.CUDA_ERROR_INVALID_VALUE, f"bulk payload: {e}")
                for _k, r, *_ in pend[n + 1:]:
                    r.release()
                return

    def _slot(self) -> int:
        """The next staging slot, once its copy and its send are done."""
        k = self.ring_i
        self.ring_i = (k + 1) % len(self.stage)
        r = self.ring_req[k]
        if r is not None:
            self.ring_req[k] = None
            r.wait(timeout=self.ex_timeout)
        if self.ev_used[k]:
            ck(self.d.cuEventSynchronize(self.ev[k]), "cuEventSynchronize")
            self.ev_used[k] = False
        return k

    def copy_dtoh(self, sink: Any, src: int, n: int, stream: Any) -> None:
        d = self.d
        s = self._s(stream)
        if not sink.route:
            p, cap = self.small
            if n:
                ck(d.cuMemcpyDtoHAsync(p, src, n, s), "cuMemcpyDtoHAsync")
                ck(d.cuStreamSynchronize(s), "cuStreamSynchronize")
            sink.put_ptr(p, n, (ctypes.c_char * max(n, 1)).from_address(p))
            return
        from ..server import _chunks
        for off, ln in _chunks(n, self.chunk):
            k = self._slot()
            p, _cap = self.stage[k]
            if ln:
                ck(d.cuMemcpyDtoHAsync(p, src + off, ln, s), "cuMemcpyDtoHAsync")
                ck(d.cuEventRecord(self.ev[k], s), "cuEventRecord")
                # wait for the copy while driving the transport: the previous chunks' sends
                # only move while somebody progresses the worker
                self._wait_event(self.ev[k], sink)
            # the send completes in the background (the slot is reused only after it)
            self.ring_req[k] = sink.send_part_nb(p, ln)
        sink.sent = True

    # ------------------------------------------------------------------ pinned mirrors
    def _mirror_diff(self, nparts: int) -> Any:
        """The diff kernel (gpuwire/rpc/kernels/gw_mirror_diff.ptx), its flag buffers and event."""
        st = getattr(self, "_mdiff", None)
        if st is None or st["cap"] < nparts:
            d = self.d
            if st is None:
                from ..kernels import MIRROR_DIFF_PTX
                mod = ck(d.cuModuleLoadData(MIRROR_DIFF_PTX.read_bytes()), "cuModuleLoadData(gw_mirror_diff)")
                fn = ck(d.cuModuleGetFunction(mod, b"gw_mirror_diff"), "cuModuleGetFunction(gw_mirror_diff)")
                vals = np.zeros(5, np.uint64)
                ptrs = np.array([vals.ctypes.data + 8 * i for i in range(5)], np.uint64)
                st = {"fn": fn, "vals": vals, "ptrs": ptrs, "cap": 0, "dflags": 0,
                      "ev": ck(d.cuEventCreate(2), "cuEventCreate")}
            else:
                d.cuMemFree(st["dflags"])
            cap = max(1024, nparts)
            st["dflags"] = int(ck(d.cuMemAlloc(4 * cap), "cuMemAlloc(mirror flags)"))
            st["hflags"] = self._pinned(4 * cap)[0]
            st["cap"] = cap
            self._mdiff = st
        return st

    def _wait_event(self, ev: Any, sink: Any) -> None:
        d = self.d
        while True:
            c = _code(d.cuEventQuery(ev)[0])
            if c == 0:
                return
            if c != P.CUDA_ERROR_NOT_READY:
                raise CudaCallError(c, f"cuEventQuery: {P.result_name(c)}")
            sink.progress()

    def mirror_pull(self, sink: Any, src: int, ref: int, parts, stream: Any) -> None:
        """gwMirrorPull on the GPU: the diff kernel flags the granules of src that differ from
        ref (on the stream, after the work before it), then changed granules go back through
        the staging ring (consecutive ones in one D2H copy) and into ref; unchanged ones as
        empty messages. Returns once the copies ran (ref is current before the next call)."""
        d = self.d
        s = self._s(stream)
        k = len(parts)
        n = parts[-1][0] + parts[-1][1]
        sent = 0
        pend: Dict[int, List[Any]] = {}
        empty: List[Any] = []
        try:
            if not n:
                empty.append(sink.send_part_nb(0, 0))
                sent = 1
                return
            st = self._mirror_diff(k)
            g = parts[0][1] if k > 1 else (n + 15) // 16 * 16
            dflags, hflags = st["dflags"], st["hflags"]
            ck(d.cuMemsetD32Async(dflags, 0, k, s), "cuMemsetD32Async(mirror flags)")
            st["vals"][:] = (src, ref, n, g, dflags)
            nb = max(1, min(2048, (n // 16 + 255) // 256))
            ck(d.cuLaunchKernel(st["fn"], nb, 1, 1, 256, 1, 1, 0, s, int(st["ptrs"].ctypes.data), 0),
               "cuLaunchKernel(gw_mirror_diff)")
            ck(d.cuMemcpyDtoHAsync(hflags, dflags, 4 * k, s), "cuMemcpyDtoHAsync(mirror flags)")
            ck(d.cuEventRecord(st["ev"], s), "cuEventRecord")
            self._wait_event(st["ev"], sink)
            flags = np.frombuffer((ctypes.c_uint32 * k).from_address(hflags), np.uint32)
            i = 0
            while i < k:
                if not flags[i]:
                    empty.append(sink.send_part_nb(0, 0))
                    sent += 1
                    i += 1
                    continue
                j, tot = i, 0        # a run of changed granules that fits one staging slot
                while j < k and flags[j] and tot + parts[j][1] <= self.chunk:
                    tot += parts[j][1]
                    j += 1
                slot = self._slot()
                for r in pend.pop(slot, ()):
                    r.wait(timeout=self.ex_timeout)
                p = self.stage[slot][0]
                off0 = parts[i][0]
                ck(d.cuMemcpyDtoHAsync(p, src + off0, tot, s), "cuMemcpyDtoHAsync")
                ck(d.cuMemcpyDtoDAsync(ref + off0, src + off0, tot, s), "cuMemcpyDtoDAsync(mirror ref)")
                ck(d.cuEventRecord(self.ev[slot], s), "cuEventRecord")
                self._wait_event(self.ev[slot], sink)
                reqs = pend[slot] = []
                for m in range(i, j):
                    off, ln = parts[m]
                    reqs.append(sink.send_part_nb(p + off - off0, ln))
                    sent += 1
                i = j
        finally:
            for _ in range(k - sent):          # a failure mid-way: the rest go empty
                empty.append(sink.send_part_nb(0, 0))
            sink.sent = True
            for reqs in list(pend.values()) + [empty]:   # the slots are free again once sent
                for r in reqs:
                    try:
                        r.wait(timeout=self.ex_timeout)
                    except Exception:
                        pass

    def copy_dtod(self, dst: int, src: int, n: int, stream: Any) -> None:
        if not n:
            return
        if stream is None:
            ck(self.d.cuMemcpyDtoD(dst, src, n), "cuMemcpyDtoD")
        else:
            ck(self.d.cuMemcpyDtoDAsync(dst, src, n, self._s(stream)), "cuMemcpyDtoDAsync")

    def memset(self, dst: int, value: int, elem: int, count: int, stream: Any) -> None:
        check_align(dst, elem, "cuMemset")
        d = self.d
        if stream is None:
            fn = {1: d.cuMemsetD8, 2: d.cuMemsetD16, 4: d.cuMemsetD32}[elem]
            ck(fn(dst, value, count), "cuMemset")
        else:
            fn = {1: d.cuMemsetD8Async, 2: d.cuMemsetD16Async, 4: d.cuMemsetD32Async}[elem]
            ck(fn(dst, value, count, self._s(stream)), "cuMemsetAsync")

    # host memory mirrors
    def host_alloc(self, size: int, flags: int) -> Any:
        return int(ck(self.d.cuMemHostAlloc(size, flags & 0x7), "cuMemHostAlloc"))

    def host_free(self, obj: Any) -> None:
        ck(self.d.cuMemFreeHost(obj), "cuMemFreeHost")

    # same-host mapped client memory (gwHostMap): the server's mapping of the client's memfd,
    # page-locked and device-mapped; copies and kernels use it as pinned host memory
    def host_map(self, addr: int, n: int) -> Tuple[int, int]:
        d = self.d
        ck(d.cuMemHostRegister(addr, n, 0x1 | 0x2), "cuMemHostRegister")   # PORTABLE | DEVICEMAP
        try:
            dptr = int(ck(d.cuMemHostGetDevicePointer(addr, 0), "cuMemHostGetDevicePointer"))
        except BaseException:
            d.cuMemHostUnregister(addr)
            raise
        return dptr, addr

    def host_unmap(self, token: int) -> None:
        d = self.d
        ck(d.cuCtxSynchronize(), "cuCtxSynchronize")      # work issued before may still use it
        ck(d.cuMemHostUnregister(token), "cuMemHostUnregister")

    # ------------------------------------------------------------------ device facts
    def cuDeviceGetName(self, ln, dev):
        name = ck(self.d.cuDeviceGetName(max(ln, 1), self.ex.dev_handles[dev]), "cuDeviceGetName")
        return bytes(name).split(b"\0")[0].decode("utf-8", "replace")

    def cuDeviceGetUuid(self, sink, dev):
        u = ck(self.d.cuDeviceGetUuid(self.ex.dev_handles[dev]), "cuDeviceGetUuid")
        b = getattr(u, "bytes", None)
        if b is None:
            b = bytes(u)
        sink.put_bytes(bytes(b)[:16].ljust(16, b"\0"))

    def cuDeviceGetAttribute(self, attrib, dev):
        d = self.d
        try:
            a = d.CUdevice_attribute(attrib)
        except ValueError:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuDeviceGetAttribute: unknown attribute {attrib}") from None
        return int(ck(d.cuDeviceGetAttribute(a, self.ex.dev_handles[dev]), "cuDeviceGetAttribute"))

    def cuDeviceTotalMem(self, dev):
        return int(ck(self.d.cuDeviceTotalMem(self.ex.dev_handles[dev]), "cuDeviceTotalMem"))

    def _err_text(self, fn, code: int) -> str:
        d = self.d
        try:
            r = d.CUresult(code)
        except ValueError:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}") from None
        s = ck(fn(r), "cuGetError")
        return bytes(s).split(b"\0")[0].decode("utf-8", "replace") if not isinstance(s, str) else s

    def cuGetErrorName(self, code):
        return self._err_text(self.d.cuGetErrorName, code)

    def cuGetErrorString(self, code):
        return self._err_text(self.d.cuGetErrorString, code)

    def cuCtxSynchronize(self):
        ck(self.d.cuCtxSynchronize(), "cuCtxSynchronize")

    # ------------------------------------------------------------------ streams, events
    def cuStreamCreate(self, hid, flags):
        return GPUStream(ck(self.d.cuStreamCreate(flags), "cuStreamCreate"))

    def cuStreamDestroy(self, s):
        if isinstance(s, GPUStream) and s.ptr in (0, 1, 2):
            raise fail(P.CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: not a created stream")
        ck(self.d.cuStreamDestroy(s.h), "cuStreamDestroy")

    def cuStreamSynchronize(self, s):
        ck(self.d.cuStreamSynchronize(self._s(s)), "cuStreamSynchronize")

    def cuStreamQuery(self, s):
        ck(self.d.cuStreamQuery(self._s(s)), "cuStreamQuery")

    def cuStreamWaitEvent(self, s, e, flags):
        ck(self.d.cuStreamWaitEvent(self._s(s), e.h, flags), "cuStreamWaitEvent")

    def cuEventCreate(self, hid, flags):
        return GPUEvent(ck(self.d.cuEventCreate(flags), "cuEventCreate"))

    def cuEventDestroy(self, e):
        ck(self.d.cuEventDestroy(e.h), "cuEventDestroy")

    def cuEventRecord(self, e, s):
        ck(self.d.cuEventRecord(e.h, self._s(s)), "cuEventRecord")

    def cuEventSynchronize(self, e):
        ck(self.d.cuEventSynchronize(e.h), "cuEventSynchronize")

    def cuEventQuery(self, e):
        ck(self.d.cuEventQuery(e.h), "cuEventQuery")

    def cuEventElapsedTime(self, a, b):
        return float(ck(self.d.cuEventElapsedTime(a.h, b.h), "cuEventElapsedTime"))

    # ------------------------------------------------------------------ modules, launches
    def cuModuleLoadData(self, hid, image):
        data = image.read() if hasattr(image, "read") else bytes(image)
        return GPUModule(ck(self.d.cuModuleLoadData(data), "cuModuleLoadData"))

    def cuModuleUnload(self, m):
        ck(self.d.cuModuleUnload(m.h), "cuModuleUnload")

    def cuModuleGetFunction(self, hid, m, name):
        n = bytes(name).rstrip(b"\0")
        h = ck(self.d.cuModuleGetFunction(m.h, n), "cuModuleGetFunction")
        layout = []
        while True:
            r = self.d.cuFuncGetParamInfo(h, len(layout))
            if _code(r[0]):
                break
            layout.append((int(r[1]), int(r[2])))
            if len(layout) > 4096:
                break
        return GPUFunction(h, layout, m)

    def cuFuncGetParamInfo(self, f, idx):
        off, size = ck(self.d.cuFuncGetParamInfo(f.h, idx), "cuFuncGetParamInfo")
        return (int(off), int(size))

    def cuFuncGetAttribute(self, attrib, f):
        d = self.d
        try:
            a = d.CUfunction_attribute(attrib)
        except ValueError:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuFuncGetAttribute: unknown attribute {attrib}") from None
        return int(ck(d.cuFuncGetAttribute(a, f.h), "cuFuncGetAttribute"))

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shmem, stream, params):
        data = params.read() if hasattr(params, "read") else params
        n = len(data)
        if n != f.size:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuLaunchKernel: parameter buffer is {n} B, the kernel takes {f.size}")
        c = self.ex.c
        s = self._s(stream)
        if c is not None:
            sp = stream.ptr if isinstance(stream, GPUStream) else 0
            r = c.launch(f.ptr, gx, gy, gz, bx, by, bz, shmem, sp, data, n)
            if r:
                raise CudaCallError(r, f"cuLaunchKernel: {P.result_name(r)}")
            return
        if n:
            f.scratch[:n] = np.frombuffer(data, np.uint8, n)
        ck(self.d.cuLaunchKernel(f.h, gx, gy, gz, bx, by, bz, shmem, s, f.ptrs_addr if f.layout else 0, 0),
           "cuLaunchKernel")

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        d = self.d
        try:
            d.cuCtxSynchronize()
        except Exception:
            pass
        mm = getattr(self, "mm", None)
        if mm is not None:
            mm.release_all()
        if self.va_base:
            d.cuMemAddressFree(self.va_base, self.va_size)
            self.va_base = 0
        for _k, r, *_ in getattr(self, "h2d_pend", []):   # a session ending mid-copy: cancel
            try:
                r.release()
            except Exception:
                pass
        self.h2d_pend = []
        for r in getattr(self, "ring_req", []):
            if r is not None:
                try:
                    r.wait(timeout=2.0)
                except Exception:
                    pass
        self.ring_req = []
        for e in getattr(self, "ev", []) + getattr(self, "ev_c", []):
            d.cuEventDestroy(e)
        self.ev = []
        self.ev_c = []
        for p in self._staging:
            d.cuMemFreeHost(p)
        self._staging = []
        if getattr(self, "ctx", None) is not None:
            d.cuCtxDestroy(self.ctx)
            self.ctx = None
