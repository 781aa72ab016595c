"""The spec against a real driver (GPU machines only): every symbol resolves, and
a call sequence bound purely from the spec (symbols, ctypes, size expressions,
the packed kernel-parameter layout) runs. Skipped where there is no libcuda."""
from __future__ import annotations

import ctypes
import ctypes.util
import struct

import pytest

from gpuwire.rpc.spec import image_bytes, load_spec, split_ctype

pytestmark = pytest.mark.gpu

# .version lowered from nvcc's output so older drivers JIT it too
AXPY_PTX = b"""
.version 7.8
.target sm_80
.address_size 64
.visible .entry axpy(.param .f32 axpy_param_0, .param .u64 axpy_param_1, .param .u64 axpy_param_2,
                     .param .u32 axpy_param_3)
{
    .reg .pred %p<2>; .reg .f32 %f<5>; .reg .b32 %r<6>; .reg .b64 %rd<8>;
    ld.param.f32 %f1, [axpy_param_0];
    ld.param.u64 %rd1, [axpy_param_1];
    ld.param.u64 %rd2, [axpy_param_2];
    ld.param.u32 %r2, [axpy_param_3];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.s32 %p1, %r1, %r2;
    @%p1 bra $L__BB0_2;
    cvta.to.global.u64 %rd3, %rd2;
    cvta.to.global.u64 %rd4, %rd1;
    mul.wide.s32 %rd5, %r1, 4;
    add.s64 %rd6, %rd4, %rd5;
    ld.global.f32 %f2, [%rd6];
    add.s64 %rd7, %rd3, %rd5;
    ld.global.f32 %f3, [%rd7];
    fma.rn.f32 %f4, %f2, %f1, %f3;
    st.global.f32 [%rd7], %f4;
$L__BB0_2:
    ret;
}
"""

_C = {"b": ctypes.c_int8, "B": ctypes.c_uint8, "h": ctypes.c_int16, "H": ctypes.c_uint16, "i": ctypes.c_int32,
      "I": ctypes.c_uint32, "q": ctypes.c_int64, "Q": ctypes.c_uint64, "f": ctypes.c_float, "d": ctypes.c_double}


def _libcuda():
    for name in (ctypes.util.find_library("cuda"), "libcuda.so.1", "libcuda.so"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                pass
    pytest.skip("libcuda not found (no NVIDIA driver here)")


def _abi(arg):
    """The C ABI type of an argument (not its wire code)."""
    base, stars, _ = split_ctype(arg.ctype)
    if stars:
        return ctypes.c_void_p
    if base == "CUdevice":
        return ctypes.c_int
    if arg.kind == "handle":
        return ctypes.c_void_p
    return _C[arg.code]


class Driver:
    def __init__(self):
        self.spec = load_spec()
        self.lib = _libcuda()

    def __getattr__(self, name):
        call = self.spec.calls[name]
        fn = getattr(self.lib, call.symbol)
        fn.restype = ctypes.c_int
        fn.argtypes = [_abi(a) for a in call.args]

        def invoke(*args, ok=(0,)):
            rc = fn(*args)
            assert rc in ok, f"{name} ({call.symbol}) returned {rc}"
            return rc
        return invoke


def test_symbols_resolve():
    spec, lib = load_spec(), _libcuda()
    missing = [c.symbol for c in spec.cuda_calls() if not hasattr(lib, c.symbol)]
    assert not missing


def test_spec_bound_sequence():
    d = Driver()
    spec = d.spec
    d.cuInit(0)
    ver = ctypes.c_int()
    d.cuDriverGetVersion(ctypes.byref(ver))
    count = ctypes.c_int()
    d.cuDeviceGetCount(ctypes.byref(count))
    assert count.value >= 1
    dev = ctypes.c_int()
    d.cuDeviceGet(ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(spec.calls["cuDeviceGetName"].arg("name").size_fn({"len": 256}))
    d.cuDeviceGetName(name, 256, dev)
    assert name.value
    uuid = ctypes.create_string_buffer(spec.calls["cuDeviceGetUuid"].arg("uuid").size_fn({}))
    d.cuDeviceGetUuid(uuid, dev)
    cc = ctypes.c_int()
    d.cuDeviceGetAttribute(ctypes.byref(cc), 75, dev)   # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    assert cc.value >= 7
    total = ctypes.c_size_t()
    d.cuDeviceTotalMem(ctypes.byref(total), dev)
    ctx = ctypes.c_void_p()
    d.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    d.cuCtxSetCurrent(ctx)
    cur = ctypes.c_void_p()
    d.cuCtxGetCurrent(ctypes.byref(cur))
    assert cur.value == ctx.value
    free, tot = ctypes.c_size_t(), ctypes.c_size_t()
    d.cuMemGetInfo(ctypes.byref(free), ctypes.byref(tot))
    assert tot.value == total.value

    n = 1000
    x, y = ctypes.c_uint64(), ctypes.c_uint64()
    d.cuMemAlloc(ctypes.byref(x), n * 4)
    d.cuMemAlloc(ctypes.byref(y), n * 4)
    stream = ctypes.c_void_p()
    d.cuStreamCreate(ctypes.byref(stream), 1)
    ev0, ev1 = ctypes.c_void_p(), ctypes.c_void_p()
    d.cuEventCreate(ctypes.byref(ev0), 0)
    d.cuEventCreate(ctypes.byref(ev1), 0)
    ones = struct.pack("<f", 1.0)
    d.cuMemsetD32Async(x, struct.unpack("<I", ones)[0], n, stream)
    host = (ctypes.c_float * n)(*range(n))
    size = spec.calls["cuMemcpyHtoDAsync"].arg("srcHost").size_fn({"ByteCount": n * 4})
    d.cuMemcpyHtoDAsync(y, host, size, stream)

    img = image_bytes(AXPY_PTX)
    mod = ctypes.c_void_p()
    d.cuModuleLoadData(ctypes.byref(mod), img)
    fn = ctypes.c_void_p()
    d.cuModuleGetFunction(ctypes.byref(fn), mod, b"axpy")
    # the layout the client packs kernelParams with
    layout = []
    for i in range(16):
        off, sz = ctypes.c_size_t(), ctypes.c_size_t()
        if d.cuFuncGetParamInfo(fn, i, ctypes.byref(off), ctypes.byref(sz), ok=(0, 1)) != 0:
            break   # CUDA_ERROR_INVALID_VALUE past the last parameter
        layout.append((off.value, sz.value))
    assert layout == [(0, 4), (8, 8), (16, 8), (24, 4)]
    values = [struct.pack("<f", 2.0), struct.pack("<Q", x.value), struct.pack("<Q", y.value), struct.pack("<i", n)]
    packed = bytearray(max(o + s for o, s in layout))
    for (o, s), v in zip(layout, values):
        packed[o:o + s] = v
    buf = ctypes.create_string_buffer(bytes(packed), len(packed))
    bufsize = ctypes.c_size_t(len(packed))
    extra = (ctypes.c_void_p * 5)(1, ctypes.cast(buf, ctypes.c_void_p), 2,
                                  ctypes.cast(ctypes.byref(bufsize), ctypes.c_void_p), 0)
    d.cuEventRecord(ev0, stream)
    d.cuLaunchKernel(fn, (n + 255) // 256, 1, 1, 256, 1, 1, 0, stream, None, extra)
    d.cuEventRecord(ev1, stream)
    out = (ctypes.c_float * n)()
    d.cuMemcpyDtoHAsync(out, y, n * 4, stream)
    d.cuStreamSynchronize(stream)
    d.cuEventSynchronize(ev1)
    assert d.cuStreamQuery(stream) == 0 and d.cuEventQuery(ev1) == 0
    ms = ctypes.c_float()
    d.cuEventElapsedTime(ctypes.byref(ms), ev0, ev1)
    assert ms.value >= 0
    assert [out[i] for i in (0, 1, n - 1)] == [2.0, 3.0, float(n - 1 + 2)]

    pinned = ctypes.c_void_p()
    d.cuMemHostAlloc(ctypes.byref(pinned), 4096, 0)
    d.cuMemsetD8(x, 7, 16)
    d.cuMemcpyDtoH(pinned, x, 16)
    assert ctypes.string_at(pinned, 16) == b"\x07" * 16
    d.cuMemFreeHost(pinned)
    reg = ctypes.create_string_buffer(8192)
    d.cuMemHostRegister(reg, 8192, 0)
    d.cuMemHostUnregister(reg)
    d.cuStreamWaitEvent(None, ev1, 0)
    d.cuCtxSynchronize()
    s = ctypes.c_char_p()
    d.cuGetErrorName(1, ctypes.byref(s))
    assert s.value == b"CUDA_ERROR_INVALID_VALUE"
    d.cuGetErrorString(1, ctypes.byref(s))
    regs = ctypes.c_int()
    d.cuFuncGetAttribute(ctypes.byref(regs), 4, fn)    # CU_FUNC_ATTRIBUTE_NUM_REGS
    d.cuModuleUnload(mod)
    d.cuEventDestroy(ev0)
    d.cuEventDestroy(ev1)
    d.cuStreamDestroy(stream)
    d.cuMemFree(x)
    d.cuMemFree(y)
    d.cuDevicePrimaryCtxRelease(dev)
