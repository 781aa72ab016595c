"""``--executor cpu``: the gpuwire server with host RAM as device memory and kernels
registered as Python callables. For CI and machines without a GPU; every protocol
test runs against it.

* Device memory: each session reserves a PROT_NONE, MAP_NORESERVE range of host
  address space (like cuMemAddressReserve); allocations back 64 KiB granules with
  anonymous pages mapped MAP_FIXED over it, and freeing maps PROT_NONE back (the
  pages go back to the OS). ``cuMemGetInfo`` reports a fixed budget (setting
  ``rpc_cpu_mem_gib``) minus what all sessions have backed.
* Kernels: :func:`register_kernel` ``(name, fn, param_types)``. A module image is
  PTX text (its ``.entry`` names are bound to registered kernels of the same name,
  so the same PTX runs on both executors) or JSON ``{"gpuwire_cpu_kernels": [names]}``.
  ``fn(k, *args)`` gets a :class:`KernelContext` ``k`` whose ``k.array(ptr, dtype,
  count)`` is the only way to touch memory: it checks the range against the
  session's allocations (a bad pointer is CUDA_ERROR_ILLEGAL_ADDRESS, sticky as on
  a GPU).
* Streams run in order, synchronously; events record a timestamp.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ... import settings
from .. import protocol as P
from .base import CudaCallError, Executor, ExecutorSession, MemoryMap, check_align, fail

_MEM_GIB_DEFAULT = 4.0
settings.register("rpc_cpu_mem_gib", _MEM_GIB_DEFAULT, float,
                  "CPU executor: the 'device memory' size reported by cuMemGetInfo and enforced "
                  "across all sessions (GiB).", layer="rpc")
settings.register("rpc_cpu_chunk", 0, int,
                  "CPU executor: bulk payloads travel as messages of this many bytes (0: one message per "
                  "payload), like the GPU executor's rpc_gpu_chunk; for tests of chunked copies.", layer="rpc")

PARAM_TYPES: Dict[str, Tuple[int, str]] = {
    "ptr": (8, "Q"), "u64": (8, "Q"), "i64": (8, "q"), "f64": (8, "d"),
    "u32": (4, "I"), "i32": (4, "i"), "f32": (4, "f"), "u16": (2, "H"), "i16": (2, "h"),
    "u8": (1, "B"), "i8": (1, "b"),
}


@dataclass
class Kernel:
    name: str
    fn: Callable
    param_types: Tuple[str, ...]
    layout: Tuple[Tuple[int, int], ...]
    unpack: struct.Struct


_KERNELS: Dict[str, Kernel] = {}
_KLOCK = threading.Lock()


def register_kernel(name: str, fn: Callable, param_types: Sequence[str]) -> Kernel:
    """Register a Python kernel for the CPU executor.

    ``param_types``: one of ``ptr u64 i64 f64 u32 i32 f32 u16 i16 u8 i8`` per
    parameter, or ``sN`` for a struct passed by value (N bytes, aligned like its
    widest power-of-two member up to 8; the kernel gets its bytes); offsets follow
    the CUDA ABI (each aligned to its size), which is what ``cuFuncGetParamInfo``
    reports. ``fn(k, *args)`` runs the whole grid."""
    off = 0
    lay = []
    codes = ["<"]
    for pt in param_types:
        m = re.fullmatch(r"s([1-9][0-9]{0,3})", pt) if isinstance(pt, str) else None
        if m:
            size = int(m.group(1))
            code, al = f"{size}s", 8 if size % 8 == 0 else 4 if size % 4 == 0 else 2 if size % 2 == 0 else 1
        elif pt not in PARAM_TYPES:
            raise ValueError(f"register_kernel({name!r}): unknown parameter type {pt!r} "
                             f"(known: {', '.join(PARAM_TYPES)}, sN for an N-byte struct)")
        else:
            size, code = PARAM_TYPES[pt]
            al = size
        aligned = (off + al - 1) // al * al
        codes.append("x" * (aligned - off) + code)
        lay.append((aligned, size))
        off = aligned + size
    k = Kernel(name, fn, tuple(param_types), tuple(lay), struct.Struct("".join(codes)))
    with _KLOCK:
        _KERNELS[name] = k
    return k


def registered_kernels() -> Dict[str, Kernel]:
    return dict(_KERNELS)


class KernelFault(Exception):
    """A kernel touched memory outside the session's allocations."""


class KernelContext:
    """What a CPU kernel sees: launch geometry and checked views of device memory."""

    def __init__(self, sess: "CPUSession", grid, block, shared: int):
        self._s = sess
        self.grid = grid
        self.block = block
        self.shared_mem = shared
        self.nthreads = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]

    def array(self, ptr: int, dtype: Any, count: int) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(count) * dt.itemsize
        if count < 0 or self._s.mm.find(ptr, n) is None:
            raise KernelFault(f"kernel access {ptr:#x}+{n} B is outside the session's allocations")
        if ptr % dt.alignment:
            raise KernelFault(f"misaligned {dt} access at {ptr:#x}")
        return self._s.view(ptr, n).view(dt)


# ----------------------------------------------------------------------------- built-in kernels

def _k_vector_add(k, a, b, c, n):
    k.array(c, np.float32, n)[:] = k.array(a, np.float32, n) + k.array(b, np.float32, n)


def _k_fill_f32(k, p, v, n):
    k.array(p, np.float32, n)[:] = np.float32(v)


def _k_saxpy(k, a, x, y, n):
    yv = k.array(y, np.float32, n)
    yv += np.float32(a) * k.array(x, np.float32, n)


def _k_noop(k):
    pass


def _act(v, relu):
    return np.maximum(v, 0, out=v) if relu else v


def _k_linear_fwd(k, x, w, b, y, B, I, O, relu):
    xv = k.array(x, np.float32, B * I).reshape(B, I)
    wv = k.array(w, np.float32, I * O).reshape(I, O)
    bv = k.array(b, np.float32, O)
    out = k.array(y, np.float32, B * O).reshape(B, O)
    out[:] = xv @ wv + bv
    _act(out, relu)


def _k_mse_grad(k, y, tgt, dy, loss, n):
    yv = k.array(y, np.float32, n)
    tv = k.array(tgt, np.float32, n)
    d = yv - tv
    k.array(dy, np.float32, n)[:] = (2.0 / n) * d
    k.array(loss, np.float32, 1)[0] += np.float32(np.dot(d, d) / n)


def _k_relu_bwd(k, y, dy, n):
    dv = k.array(dy, np.float32, n)
    dv *= (k.array(y, np.float32, n) > 0)


def _k_linear_bwd_data(k, dy, w, dx, B, I, O):
    dyv = k.array(dy, np.float32, B * O).reshape(B, O)
    wv = k.array(w, np.float32, I * O).reshape(I, O)
    k.array(dx, np.float32, B * I).reshape(B, I)[:] = dyv @ wv.T


def _k_linear_bwd_weight(k, x, dy, dw, db, B, I, O):
    xv = k.array(x, np.float32, B * I).reshape(B, I)
    dyv = k.array(dy, np.float32, B * O).reshape(B, O)
    k.array(dw, np.float32, I * O).reshape(I, O)[:] = xv.T @ dyv
    k.array(db, np.float32, O)[:] = dyv.sum(axis=0)


def _k_sgd(k, w, g, lr, n):
    wv = k.array(w, np.float32, n)
    wv -= np.float32(lr) * k.array(g, np.float32, n)


def _k_bad_write(k, p):
    k.array(p, np.uint8, 1)[0] = 1


register_kernel("vector_add", _k_vector_add, ("ptr", "ptr", "ptr", "i32"))
register_kernel("fill_f32", _k_fill_f32, ("ptr", "f32", "i32"))
register_kernel("saxpy", _k_saxpy, ("f32", "ptr", "ptr", "i32"))
register_kernel("noop", _k_noop, ())
register_kernel("poke", _k_bad_write, ("ptr",))
register_kernel("mlp_linear_fwd", _k_linear_fwd, ("ptr", "ptr", "ptr", "ptr", "i32", "i32", "i32", "i32"))
register_kernel("mlp_mse_grad", _k_mse_grad, ("ptr", "ptr", "ptr", "ptr", "i32"))
register_kernel("mlp_relu_bwd", _k_relu_bwd, ("ptr", "ptr", "i32"))
register_kernel("mlp_linear_bwd_data", _k_linear_bwd_data, ("ptr", "ptr", "ptr", "i32", "i32", "i32"))
register_kernel("mlp_linear_bwd_weight", _k_linear_bwd_weight, ("ptr", "ptr", "ptr", "ptr", "i32", "i32", "i32"))
register_kernel("sgd_update", _k_sgd, ("ptr", "ptr", "f32", "i32"))


# ----------------------------------------------------------------------------- libc VA helpers

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10
_PROT_NONE = 0
_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def _map(addr: Optional[int], size: int, prot: int, flags: int) -> int:
    p = _mmap(addr, size, prot, flags, -1, 0)
    if p is None or p == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap({size} B): {os.strerror(e)}")
    return p


def _host_ram() -> int:
    """This host's physical memory in bytes (a CPU executor's device memory cannot be more)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):   # pragma: no cover - not Linux
        return 1 << 62


# ----------------------------------------------------------------------------- executor

class CPUStream:
    __slots__ = ("flags",)

    def __init__(self, flags: int):
        self.flags = flags


class CPUEvent:
    __slots__ = ("flags", "t")

    def __init__(self, flags: int):
        self.flags = flags
        self.t: Optional[float] = None


class CPUModule:
    __slots__ = ("entries",)

    def __init__(self, entries: Dict[str, int]):
        self.entries = entries   # name -> number of params in the image (-1: unknown)


class CPUFunction:
    __slots__ = ("kernel", "module")

    def __init__(self, kernel: Kernel, module: CPUModule):
        self.kernel, self.module = kernel, module


_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$%]*)\s*\(([^)]*)\)", re.S)


def _parse_image(image: bytes) -> Dict[str, int]:
    """Kernel names (-> parameter count, -1 unknown) of a PTX / fatbin (uncompressed PTX inside) /
    JSON image; cubins hold only machine code and are refused."""
    if image[:4] == b"\x7fELF":
        raise fail(P.CUDA_ERROR_INVALID_IMAGE, "the CPU executor cannot run a cubin (give PTX, a fatbin with "
                                               "uncompressed PTX, or a JSON kernel list)")
    if len(image) >= 4 and struct.unpack_from("<I", image)[0] == 0xBA55ED50:
        text = image.decode("latin-1")
        entries = {m.group(1): len([x for x in m.group(2).split(",") if ".param" in x])
                   for m in _ENTRY.finditer(text)}
        if not entries:
            raise fail(P.CUDA_ERROR_INVALID_IMAGE, "fatbin without uncompressed PTX (build with --no-compress)")
        return entries
    text = image.rstrip(b"\0").decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
            names = d["gpuwire_cpu_kernels"]
            return {str(n): -1 for n in names}
        except (ValueError, KeyError, TypeError):
            raise fail(P.CUDA_ERROR_INVALID_IMAGE, "JSON image without a gpuwire_cpu_kernels list") from None
    entries = {m.group(1): len([x for x in m.group(2).split(",") if ".param" in x]) for m in _ENTRY.finditer(text)}
    if not entries and ".version" not in text:
        raise fail(P.CUDA_ERROR_INVALID_IMAGE, "not a PTX module")
    return entries


class CPUExecutor(Executor):
    kind = "cpu"
    granularity = 64 << 10

    def __init__(self, mem_bytes: Optional[int] = None):
        ram = _host_ram()
        if mem_bytes is None:
            gib = float(settings.get("rpc_cpu_mem_gib"))
            mem_bytes = gib * (1 << 30) if gib - gib == 0 else -1     # (inf, nan: refused below)
            if gib == _MEM_GIB_DEFAULT:
                mem_bytes = min(mem_bytes, ram)     # (the default on a host with less RAM: all of it)
        if not 0 < mem_bytes <= ram:
            raise ValueError(f"CPU executor memory (--cpu-mem-gib, GPUWIRE_RPC_CPU_MEM_GIB) must be above 0 "
                             f"and at most this host's RAM ({ram / (1 << 30):.1f} GiB), got "
                             f"{mem_bytes / (1 << 30) if mem_bytes != -1 else settings.get('rpc_cpu_mem_gib')} GiB")
        self.total = int(mem_bytes)
        self.bulk_chunk = max(0, int(settings.get("rpc_cpu_chunk")))
        self.used = 0
        self.lock = threading.Lock()

    def driver_version(self) -> int:
        return 13000

    def device_count(self) -> int:
        return 1

    def describe(self) -> Dict[str, Any]:
        return {"executor": "cpu", "device": "host RAM (gpuwire CPU executor)", "memory": self.total,
                "kernels": sorted(_KERNELS)}

    def check_va(self, va_size: int) -> None:
        """At start: can a session reserve ``va_size`` bytes of address space (--va-gib)?"""
        try:
            p = _map(None, va_size, _PROT_NONE, _ANON | _MAP_NORESERVE)
        except OSError as e:
            raise ValueError(f"--va-gib: cannot reserve {va_size} B of address space for a session: "
                             f"{e.strerror}") from None
        _munmap(p, va_size)

    def open_session(self, device: int, va_size: int) -> "CPUSession":
        if device != 0:
            raise fail(P.CUDA_ERROR_INVALID_DEVICE, f"device {device}: the CPU executor has one device")
        return CPUSession(self, va_size)


class CPUSession(ExecutorSession):
    def __init__(self, ex: CPUExecutor, va_size: int):
        self.ex = ex
        self.va_size = va_size
        self.va_base = _map(None, va_size, _PROT_NONE, _ANON | _MAP_NORESERVE)
        self.mm = MemoryMap(self, self.va_base, va_size, ex.granularity)
        self._all = np.frombuffer((ctypes.c_uint8 * va_size).from_address(self.va_base), np.uint8)
        self.sticky: Optional[int] = None
        self.hosts = 0
        self._ext: Dict[int, np.ndarray] = {}

    def c_calls(self) -> Dict[int, int]:
        """Hot calls the server's C loop may run here: memsets and device copies (host memory)."""
        from . import _cfast
        if not _cfast.available():
            return {}
        # memsets, device copies; and for the C server: small D2H pushes, stream/context sync
        return _cfast.host_fns([1, 2, 3, 4, 7, 8, 9])

    def c_bulk(self, nslots: int) -> Dict[str, Any]:
        """The C server's bulk copies (gw_rpc_bulk_t) on host memory: ``nslots`` staging slots
        (one bulk chunk each; 4 MiB when payloads are one message) and the host versions of
        the driver calls (memcpy; events complete at once)."""
        from . import _cfast
        if not _cfast.available():
            return {}
        size = self.ex.bulk_chunk or (4 << 20)
        self._c_slots = [np.zeros(size, np.uint8) for _ in range(nslots)]
        return {"slots": [int(a.ctypes.data) for a in self._c_slots], "slot_size": size,
                "events": [1] * nslots, "fns": _cfast.bulk_host_fns()}

    def view(self, ptr: int, n: int) -> np.ndarray:
        o = ptr - self.va_base
        if 0 <= o <= self.va_size - n:
            return self._all[o:o + n]
        for a, arr in self._ext.items():     # same-host mappings of client memory (gwHostMap)
            if a <= ptr and ptr + n <= a + arr.nbytes:
                return arr[ptr - a:ptr - a + n]
        raise fail(P.CUDA_ERROR_INVALID_VALUE, f"{ptr:#x}+{n} is not device memory of this session")

    # same-host mapped client memory: the server's mapping is the 'device memory' itself
    def host_map(self, addr: int, n: int) -> Tuple[int, int]:
        self._ext[addr] = np.frombuffer((ctypes.c_uint8 * n).from_address(addr), np.uint8)
        return addr, addr

    def host_unmap(self, token: int) -> None:
        self._ext.pop(token, None)

    # memory
    def back(self, start: int, size: int) -> Any:
        ex = self.ex
        with ex.lock:
            if ex.used + size > ex.total:
                raise fail(P.CUDA_ERROR_OUT_OF_MEMORY,
                           f"cuMemAlloc: {size} B more do not fit ({ex.used} of {ex.total} B in use)")
            ex.used += size
        try:
            _map(start, size, mmap.PROT_READ | mmap.PROT_WRITE, _ANON | _MAP_FIXED)
        except OSError as e:
            with ex.lock:
                ex.used -= size
            raise fail(P.CUDA_ERROR_OUT_OF_MEMORY, str(e)) from None
        return None

    def unback(self, start: int, size: int, token: Any) -> None:
        _map(start, size, _PROT_NONE, _ANON | _MAP_FIXED | _MAP_NORESERVE)
        with self.ex.lock:
            self.ex.used -= size

    def cuMemGetInfo(self):
        ex = self.ex
        with ex.lock:
            return (max(0, ex.total - ex.used), ex.total)

    def copy_htod(self, dst: int, src: Any, n: int, stream: Any) -> None:
        if hasattr(src, "recv_into"):
            src.recv_into_ptr(dst, n)
        elif n:
            self.view(dst, n)[:] = np.frombuffer(src, np.uint8, n)

    def copy_dtoh(self, sink: Any, src: int, n: int, stream: Any) -> None:
        sink.put_ptr(src, n, self.view(src, n))

    def copy_dtod(self, dst: int, src: int, n: int, stream: Any) -> None:
        if n:
            self.view(dst, n)[:] = self.view(src, n)

    def mirror_pull(self, sink: Any, src: int, ref: int, parts, stream: Any) -> None:
        """gwMirrorPull: granules of src that differ from ref go back (and into ref); the
        others as empty messages (docs/pinned.md)."""
        reqs = []
        try:
            for off, ln in parts:
                a, b = self.view(src + off, ln), self.view(ref + off, ln)
                if ln and not np.array_equal(a, b):
                    b[:] = a
                    reqs.append(sink.send_part_nb(src + off, ln))
                else:
                    reqs.append(sink.send_part_nb(0, 0))
        finally:
            for _ in range(len(parts) - len(reqs)):     # a failure mid-way: the rest go empty
                reqs.append(sink.send_part_nb(0, 0))
            sink.sent = True
            from ..lanes import wait_requests    # (the parts may be on the session's bulk lanes)
            wait_requests(reqs, sink.s.ep.worker, sink.s.bulk_timeout)

    def memset(self, dst: int, value: int, elem: int, count: int, stream: Any) -> None:
        check_align(dst, elem, "cuMemset")
        if count:
            v = self.view(dst, count * elem).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[elem])
            v[:] = value

    # host memory mirrors
    def host_alloc(self, size: int, flags: int) -> Any:
        # (server RAM like device memory: counted against the same rpc_cpu_mem_gib budget)
        ex = self.ex
        with ex.lock:
            if size > ex.total - ex.used:
                raise fail(P.CUDA_ERROR_OUT_OF_MEMORY,
                           f"host memory: {size} B more do not fit the CPU executor's memory "
                           f"(rpc_cpu_mem_gib: {ex.used} of {ex.total} B in use)")
            ex.used += size
        try:
            obj = bytearray(size)
        except MemoryError:
            with ex.lock:
                ex.used -= size
            raise fail(P.CUDA_ERROR_OUT_OF_MEMORY, f"host memory: {size} B: out of server memory") from None
        self.hosts += 1
        return obj

    def host_free(self, obj: Any) -> None:
        self.hosts -= 1
        if isinstance(obj, bytearray):
            with self.ex.lock:
                self.ex.used -= len(obj)

    # device facts
    def cuDeviceGetName(self, ln, dev):
        return "gpuwire CPU executor (host RAM)"[:max(0, ln - 1)]

    def cuDeviceGetUuid(self, sink, dev):
        sink.put_bytes(b"gpuwire-cpu-exec"[:16])

    _ATTRS = {1: 1024, 2: 1024, 3: 1024, 4: 64, 5: (1 << 31) - 1, 6: 65535, 7: 65535, 8: 48 << 10, 10: 32,
              16: 0, 75: 0, 76: 0}

    def cuDeviceGetAttribute(self, attrib, dev):
        if attrib == 16:
            return os.cpu_count() or 1
        if attrib <= 0 or attrib > 200:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuDeviceGetAttribute: unknown attribute {attrib}")
        return self._ATTRS.get(attrib, 0)

    def cuDeviceTotalMem(self, dev):
        return self.ex.total

    def cuGetErrorName(self, code):
        if code not in P.CURESULT_NAMES:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}")
        return P.result_name(code)

    def cuGetErrorString(self, code):
        if code not in P.CURESULT_NAMES:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"unknown CUresult {code}")
        return P.result_string(code)

    def cuCtxSynchronize(self):
        return None

    # streams and events (in order, synchronous)
    def cuStreamCreate(self, hid, flags):
        if flags & ~1:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuStreamCreate: flags {flags:#x}")
        return CPUStream(flags)

    def cuStreamDestroy(self, s):
        if not isinstance(s, CPUStream):
            raise fail(P.CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy: not a created stream")

    def cuStreamSynchronize(self, s):
        return None

    def cuStreamQuery(self, s):
        return None

    def cuStreamWaitEvent(self, s, e, flags):
        if flags & ~0x1:    # (CU_EVENT_WAIT_DEFAULT 0, CU_EVENT_WAIT_EXTERNAL 1)
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuStreamWaitEvent: flags {flags:#x}")
        return None

    def cuEventCreate(self, hid, flags):
        if flags & ~0xF:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuEventCreate: flags {flags:#x}")
        return CPUEvent(flags)

    def cuEventDestroy(self, e):
        return None

    def cuEventRecord(self, e, s):
        e.t = time.perf_counter()

    def cuEventSynchronize(self, e):
        return None

    def cuEventQuery(self, e):
        return None

    def cuEventElapsedTime(self, a, b):
        if a.t is None or b.t is None or (a.flags | b.flags) & 2:
            raise fail(P.CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: event not recorded or timing disabled")
        return (b.t - a.t) * 1000.0

    # modules and kernels
    def cuModuleLoadData(self, hid, image):
        data = image.read() if hasattr(image, "read") else bytes(image)
        return CPUModule(_parse_image(data))

    def cuModuleUnload(self, m):
        return None

    def cuModuleGetFunction(self, hid, m, name):
        n = bytes(name).rstrip(b"\0").decode("utf-8", "replace")
        if n not in m.entries:
            raise fail(P.CUDA_ERROR_NOT_FOUND, f"cuModuleGetFunction: no kernel {n!r} in the module")
        k = _KERNELS.get(n)
        if k is None:
            raise fail(P.CUDA_ERROR_NOT_FOUND, f"cuModuleGetFunction: kernel {n!r} is not registered with "
                                               f"the CPU executor (register_kernel)")
        if m.entries[n] >= 0 and m.entries[n] != len(k.param_types):
            raise fail(P.CUDA_ERROR_INVALID_IMAGE, f"kernel {n!r}: the image has {m.entries[n]} parameters, "
                                                   f"the registered kernel {len(k.param_types)}")
        return CPUFunction(k, m)

    def cuFuncGetParamInfo(self, f, idx):
        lay = f.kernel.layout
        if idx >= len(lay):
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuFuncGetParamInfo: {f.kernel.name} has {len(lay)} parameters")
        return lay[idx]

    def cuFuncGetAttribute(self, attrib, f):
        if attrib == 0:
            return 1024
        if attrib < 0 or attrib > 20:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuFuncGetAttribute: unknown attribute {attrib}")
        return 0

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shmem, stream, params):
        # the limits a GPU has (the attributes above: code that runs here must not fail there)
        A = self._ATTRS
        if min(gx, gy, gz, bx, by, bz) < 1 or bx * by * bz > A[1] or bx > A[2] or by > A[3] or bz > A[4] \
                or gx > A[5] or gy > A[6] or gz > A[7]:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuLaunchKernel: grid ({gx},{gy},{gz}) block ({bx},{by},{bz}) is outside the device's "
                       f"limits (grid {A[5]}x{A[6]}x{A[7]}, block {A[2]}x{A[3]}x{A[4]}, {A[1]} threads)")
        if shmem > A[8]:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuLaunchKernel: sharedMemBytes {shmem} is above the {A[8]} B a block may have")
        k = f.kernel
        data = params.read() if hasattr(params, "read") else params
        if len(data) != k.unpack.size:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"cuLaunchKernel {k.name}: parameter buffer is {len(data)} B, the kernel takes {k.unpack.size}")
        args = k.unpack.unpack_from(data, 0)
        ctx = KernelContext(self, (gx, gy, gz), (bx, by, bz), shmem)
        try:
            k.fn(ctx, *args)
        except KernelFault as e:
            self.sticky = P.CUDA_ERROR_ILLEGAL_ADDRESS
            raise fail(P.CUDA_ERROR_ILLEGAL_ADDRESS, f"{k.name}: {e}") from None
        except CudaCallError:
            raise
        except Exception as e:
            self.sticky = P.CUDA_ERROR_LAUNCH_FAILED
            raise fail(P.CUDA_ERROR_LAUNCH_FAILED, f"{k.name}: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self.mm.release_all()
        self._all = None
        _munmap(self.va_base, self.va_size)
        self.va_base = 0
