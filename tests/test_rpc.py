"""The RPC layer end to end: a real `gpuwire serve` subprocess on loopback, every spec
call through it, batching, deferred errors, last-error semantics, handle validation,
kernels. Runs against the CPU executor everywhere and against the GPU executor
(marked gpu) where there is one."""
from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest

import gpuwire
from gpuwire import settings
from gpuwire.rpc import CudaError, DeferredCudaError, protocol as P
from gpuwire.rpc.spec import default_spec
from test_rpc_support import EXECUTORS, PTX, KERNELS, copy_roundtrip, start_server

CU = P.CURESULT


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    srv = start_server(request.param)
    yield srv
    srv.stop()


@pytest.fixture()
def s(server):
    sess = server.connect(name="test")
    yield sess
    sess.close()


@pytest.fixture()
def mod(s):
    return s.load_module(PTX)


def _np(a):
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------- one scenario per spec call

def _hello(s, srv):
    assert s.session_id >= 1 and s.executor == srv.executor
    assert s.driver_version >= 12000


def _sync(s, srv):
    s.gwSync()


def _last(s, srv):
    assert s.get_last_error() == 0
    r, cid, seq = s.gwPeekAtLastError()
    assert r == 0


def _init(s, srv):
    s.cuInit(0)
    with pytest.raises(CudaError) as ei:
        s.cuInit(3)
    assert ei.value.name == "CUDA_ERROR_INVALID_VALUE"


def _driver(s, srv):
    assert s.cuDriverGetVersion() >= 12000


def _errname(s, srv):
    assert s.cuGetErrorName(1) == "CUDA_ERROR_INVALID_VALUE"
    assert s.cuGetErrorName(0) == "CUDA_SUCCESS"
    assert s.cuGetErrorString(2)


def _devices(s, srv):
    n = s.cuDeviceGetCount()
    assert n >= 1
    d = s.cuDeviceGet(0)
    assert d == 0
    with pytest.raises(CudaError):
        s.cuDeviceGet(n + 5)
    assert s.cuDeviceGetName(256, d)
    assert len(s.cuDeviceGetUuid(None, d)) == 16
    assert s.cuDeviceGetAttribute(10, d) == 32          # warp size
    assert s.cuDeviceTotalMem(d) > 0


def _ctx(s, srv):
    c = s.cuDevicePrimaryCtxRetain(0)
    assert c
    s.cuCtxSetCurrent(c)
    assert s.cuCtxGetCurrent() == c
    assert s.cuCtxGetDevice() == 0
    s.cuCtxSynchronize()
    s.cuDevicePrimaryCtxRelease(0)
    s.cuCtxSetCurrent(0xDEAD)
    with pytest.raises(DeferredCudaError) as ei:
        s.cuCtxSynchronize()
    assert ei.value.call == "cuCtxSetCurrent" and ei.value.name == "CUDA_ERROR_INVALID_CONTEXT"


def _memalloc(s, srv):
    free0, total = s.cuMemGetInfo()
    p = s.cuMemAlloc(1 << 20)
    assert p and p % 256 == 0
    s.cuMemsetD8(p, 7, 1 << 20)
    free1, _ = s.cuMemGetInfo()
    assert free1 < free0 or srv.executor == "gpu"
    s.cuMemFree(p)
    s.gwSync()


def _memcpy(s, srv):
    a = np.arange(4096, dtype=np.uint32)
    with s.alloc(a.nbytes) as d, s.alloc(a.nbytes) as d2:
        s.cuMemcpyHtoD(d, a, a.nbytes)
        s.cuMemcpyDtoD(d2, d, a.nbytes)
        out = np.zeros_like(a)
        s.cuMemcpyDtoH(out, d2, a.nbytes)
        assert (out == a).all()
        assert s.cuMemcpyDtoH(None, d, 8) == a[:2].tobytes()


def _memcpy_async(s, srv):
    a = np.arange(1000, dtype=np.float64)
    with s.stream() as st, s.alloc(a.nbytes) as d, s.alloc(a.nbytes) as d2:
        s.cuMemcpyHtoDAsync(d, a, a.nbytes, st)
        s.cuMemcpyDtoDAsync(d2, d, a.nbytes, st)
        out = np.zeros_like(a)
        s.cuMemcpyDtoHAsync(out, d2, a.nbytes, st)
        st.synchronize()
        assert (out == a).all()


def _memset(s, srv):
    with s.alloc(4096) as d, s.stream() as st:
        out = np.zeros(1024, np.uint32)
        s.cuMemsetD32(d, 0xDEADBEEF, 1024)
        s.copy_to_host(out, d)
        assert (out == 0xDEADBEEF).all()
        s.cuMemsetD16(d, 0x1234, 2048)
        s.copy_to_host(out, d)
        assert (out == 0x12341234).all()
        s.cuMemsetD8(d, 0xAB, 4096)
        s.copy_to_host(out, d)
        assert (out == 0xABABABAB).all()
        s.cuMemsetD32Async(d, 5, 1024, st)
        s.cuMemsetD16Async(d, 1, 2, st)
        s.cuMemsetD8Async(d, 9, 1, st)
        st.synchronize()
        s.copy_to_host(out, d)
        assert out[0] == 0x00010009 and (out[1:] == 5).all()


def _hostmem(s, srv):
    arr = s.host_alloc(1 << 16)
    assert arr.nbytes == 1 << 16
    arr[:] = 3
    with s.alloc(1 << 16) as d:
        s.copy_to_device(d, arr)
        back = s.copy_to_host(np.zeros(1 << 16, np.uint8), d)
        assert (back == 3).all()
    s.free_host(arr)
    buf = np.zeros(8192, np.uint8)
    s.cuMemHostRegister(buf, buf.nbytes, 0)
    s.cuMemHostUnregister(buf)
    s.gwSync()
    s.cuMemHostUnregister(buf)            # not registered any more
    with pytest.raises(DeferredCudaError):
        s.gwSync()


def _streams(s, srv):
    st = s.cuStreamCreate(0)
    assert s.cuStreamQuery(st) in (True, False)
    ev = s.cuEventCreate(0)
    s.cuEventRecord(ev, st)
    s.cuStreamWaitEvent(0, ev, 0)
    s.cuStreamSynchronize(st)
    s.cuStreamSynchronize(0)
    s.cuStreamSynchronize(P.STREAM_LEGACY)
    s.cuStreamDestroy(st)
    s.cuEventDestroy(ev)
    s.gwSync()


def _events(s, srv):
    a, b = s.event(), s.event()
    a.record()
    with s.alloc(1 << 20) as d:
        d.memset(1)
    b.record()
    b.synchronize()
    assert b.query() is True
    assert s.cuEventQuery(a) is True
    ms = a.elapsed_ms(b)
    assert ms >= 0.0
    a.destroy()
    b.destroy()


def _modules(s, srv):
    m = s.cuModuleLoadData(PTX.read_bytes())
    f = s.cuModuleGetFunction(m, "saxpy")
    info = [s.cuFuncGetParamInfo(f, i) for i in range(4)]
    assert [x[0] for x in info] == [0, 8, 16, 24] and [x[1] for x in info] == [4, 8, 8, 4]
    assert s.cuFuncGetAttribute(0, f) >= 32        # max threads per block
    n = 300
    x = np.arange(n, dtype=np.float32)
    with s.alloc(x.nbytes) as dx, s.alloc(x.nbytes) as dy:
        s.copy_to_device(dx, x)
        s.cuMemsetD32(dy, 0, n)
        params = struct.pack("<f4xQQi", 2.0, dx.ptr, dy.ptr, n)
        s.cuLaunchKernel(f, 2, 1, 1, 256, 1, 1, 0, 0, params)
        y = s.copy_to_host(np.zeros(n, np.float32), dy)
        assert np.allclose(y, 2 * x)
    s.cuModuleUnload(m)
    m2 = s.cuModuleLoadFatBinary((KERNELS / "gw_test_kernels.fatbin").read_bytes())
    f2 = s.cuModuleGetFunction(m2, "noop")
    s.cuLaunchKernel(f2, 1, 1, 1, 1, 1, 1, 0, 0, b"")
    s.cuCtxSynchronize()
    s.cuModuleUnload(m2)
    s.gwSync()


def _files(s, srv):
    """gds file calls; this server has no --data-root, so every path is refused
    (tests/test_gds_remote.py reads real files through a server that has one)."""
    assert "roots=" in s.gwFileBackend()
    with pytest.raises(CudaError) as ei:
        s.gwFileStat("x.bin")
    assert ei.value.name == "CUDA_ERROR_NOT_PERMITTED"
    from gpuwire.gds.service import pack_reads
    with s.alloc(64) as d:
        s.gwFileRead(d, "x.bin", 0, 8)
        with pytest.raises(DeferredCudaError) as ei:
            s.gwSync()
        assert ei.value.call == "gwFileRead" and "no data roots" in str(ei.value)
        blob = pack_reads([("x.bin", 0, 8, d.ptr)])
        s.gwFileReadV(blob, len(blob), 1)
        with pytest.raises(DeferredCudaError) as ei:
            s.gwSync()
        assert ei.value.call == "gwFileReadV" and ei.value.name == "CUDA_ERROR_NOT_PERMITTED"
    s.get_last_error()


def _mirror_pull(s, srv):
    """gwMirrorPull (pinned mirrors; tests/test_pinned_detect.py covers it in depth): only the
    granule that differs from the reference comes back, and the reference is updated."""
    n = 8192
    host = np.zeros(n, np.uint8)
    with s.alloc(n) as m, s.alloc(n) as ref:
        s.cuMemsetD8(m, 0, n)
        s.cuMemsetD8(ref, 0, n)
        s.cuMemsetD8(m.ptr + 4096, 3, 10)
        host[0] = 1                                    # granule 0 is unchanged: the client keeps it
        s.gwMirrorPull(host, m.ptr, ref.ptr, n, 4096)
        s.gwSync()
        assert host[0] == 1 and list(host[4096:4097 + 10]) == [3] * 10 + [0]
        back = np.ones(n, np.uint8)
        s.cuMemcpyDtoH(back, ref, n)
        assert back[0] == 0 and back[4096] == 3


def _hostmap(s, srv):
    """gwHostMap / gwHostUnmap at the stub level (tests/test_hostmap.py covers mapped regions):
    a sealed memfd handed over the session's unix socket becomes device memory of the session;
    the same bytes are seen from both sides; an unknown mapping is refused."""
    from gpuwire.rpc import hostmap
    ok, why = hostmap.supported()
    if not ok or "hostmap" not in s.info:
        pytest.skip(f"no same-host mapping: {why or 'not offered'}")
    offer = s.info["hostmap"]
    ch = hostmap.Channel(offer["sock"], bytes.fromhex(offer["secret"]))
    fd, m = hostmap.make_memfd(8192)
    try:
        key = ch.send(fd, 8192)
        dptr = s.gwHostMap(8192, key)
        m[:4] = b"abcd"
        with s.alloc(8192) as d:
            s.cuMemcpyDtoD(d, dptr, 8192)
            assert bytes(s.copy_to_host(np.zeros(4, np.uint8), d, nbytes=4)) == b"abcd"
            s.cuMemsetD8(dptr + 8, 0x5A, 4)
            s.gwSync()
            assert m[8:12] == b"ZZZZ"
        s.gwHostUnmap(dptr)
        s.gwHostUnmap(dptr)                        # a second time: not a mapping any more
        with pytest.raises(DeferredCudaError) as ei:
            s.gwSync()
        assert ei.value.call == "gwHostUnmap" and "not a mapping of this session" in str(ei.value)
    finally:
        os.close(fd)
        ch.close()


def _bulk_lanes(s, srv):
    """gwBulkLanes at the stub level (tests/test_lanes.py covers the lanes): a session whose
    hello asked for none has no offer to take up; a session with lanes refuses a second call;
    its copies come back whole through the lanes."""
    with settings.override(rpc_bulk_lanes=0):
        s0 = srv.connect(name="no lanes")
    try:
        with pytest.raises(CudaError) as ei:
            s0.gwBulkLanes(2)
        assert ei.value.result == CU["CUDA_ERROR_NOT_SUPPORTED"] and ei.value.call == "gwBulkLanes"
        assert "offered no bulk lanes" in ei.value.reason and ei.value.reason in str(ei.value)
    finally:
        s0.close()
    with settings.override(rpc_bulk_lanes=2):
        s2 = srv.connect(name="lanes")
    try:
        assert len(s2._lane_eps) == 2
        with pytest.raises(CudaError) as ei:
            s2.gwBulkLanes(2)                      # (in use already)
        assert ei.value.result == CU["CUDA_ERROR_INVALID_VALUE"]
        assert copy_roundtrip(s2, 3 << 20)
    finally:
        s2.close()


SCENARIOS = {
    "gwBulkLanes": _bulk_lanes,
    "gwHostMap": _hostmap, "gwHostUnmap": _hostmap,
    "gwMirrorPull": _mirror_pull,
    "gwFileRead": _files, "gwFileReadV": _files, "gwFileStat": _files, "gwFileBackend": _files,
    "gwHello": _hello, "gwSync": _sync, "gwGetLastError": _last, "gwPeekAtLastError": _last,
    "cuInit": _init, "cuDriverGetVersion": _driver, "cuGetErrorName": _errname, "cuGetErrorString": _errname,
    "cuDeviceGetCount": _devices, "cuDeviceGet": _devices, "cuDeviceGetName": _devices,
    "cuDeviceGetUuid": _devices, "cuDeviceGetAttribute": _devices, "cuDeviceTotalMem": _devices,
    "cuDevicePrimaryCtxRetain": _ctx, "cuDevicePrimaryCtxRelease": _ctx, "cuCtxSetCurrent": _ctx,
    "cuCtxGetCurrent": _ctx, "cuCtxGetDevice": _ctx, "cuCtxSynchronize": _ctx,
    "cuMemAlloc": _memalloc, "cuMemFree": _memalloc, "cuMemGetInfo": _memalloc,
    "cuMemcpyHtoD": _memcpy, "cuMemcpyDtoH": _memcpy, "cuMemcpyDtoD": _memcpy,
    "cuMemcpyHtoDAsync": _memcpy_async, "cuMemcpyDtoHAsync": _memcpy_async, "cuMemcpyDtoDAsync": _memcpy_async,
    "cuMemsetD8": _memset, "cuMemsetD16": _memset, "cuMemsetD32": _memset, "cuMemsetD8Async": _memset,
    "cuMemsetD16Async": _memset, "cuMemsetD32Async": _memset,
    "cuMemHostAlloc": _hostmem, "cuMemFreeHost": _hostmem, "cuMemHostRegister": _hostmem,
    "cuMemHostUnregister": _hostmem,
    "cuStreamCreate": _streams, "cuStreamDestroy": _streams, "cuStreamSynchronize": _streams,
    "cuStreamQuery": _streams, "cuStreamWaitEvent": _streams,
    "cuEventCreate": _events, "cuEventDestroy": _events, "cuEventRecord": _events, "cuEventSynchronize": _events,
    "cuEventQuery": _events, "cuEventElapsedTime": _events,
    "cuModuleLoadData": _modules, "cuModuleLoadFatBinary": _modules, "cuModuleUnload": _modules,
    "cuModuleGetFunction": _modules, "cuFuncGetParamInfo": _modules, "cuFuncGetAttribute": _modules,
    "cuLaunchKernel": _modules,
}
_ALL = sorted(default_spec().calls)
_FUNCS = sorted({f.__name__: f for f in SCENARIOS.values()}.values(), key=lambda f: f.__name__)


def test_every_spec_call_has_a_scenario():
    missing = [c for c in _ALL if c not in SCENARIOS]
    assert not missing, f"spec calls without an RPC test scenario: {missing}"


def test_sync_errors_say_why(s):
    """A sync call the server refuses raises CudaError with the CUresult and the server's reason
    (reply flag F_REASON); the session goes on, and the next failure has its own reason."""
    with pytest.raises(CudaError) as ei:
        s.cuMemcpyDtoH(np.zeros(8, np.uint8), 0x1234, 8)
    e = ei.value
    assert e.result == CU["CUDA_ERROR_INVALID_VALUE"] and e.call == "cuMemcpyDtoH"
    assert "0x1234" in e.reason and "not inside an allocation of this session" in e.reason, e.reason
    assert e.reason in str(e)
    assert s.get_last_error() == CU["CUDA_ERROR_INVALID_VALUE"]
    s.gwSync()                                    # nothing sticky: the session serves on
    with s.alloc(64) as d:
        with pytest.raises(CudaError) as ei:
            s.cuMemcpyDtoH(np.zeros(128, np.uint8), d, 128)     # past the end of the allocation
    assert "+128" in ei.value.reason and "0x1234" not in ei.value.reason, ei.value.reason


@pytest.mark.parametrize("scenario", _FUNCS, ids=lambda f: f.__name__.strip("_"))
def test_call(s, server, scenario):
    scenario(s, server)
    assert s.get_last_error() in (0, CU["CUDA_ERROR_INVALID_VALUE"], CU["CUDA_ERROR_INVALID_CONTEXT"],
                                  CU["CUDA_ERROR_INVALID_DEVICE"], CU["CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"])


# ----------------------------------------------------------------------------- wrappers and kernels

def test_pythonic_launch_and_copies(s, mod):
    n = 5000
    a = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    b = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    with s.alloc(a.nbytes) as da, s.alloc(b.nbytes) as db, s.alloc(a.nbytes) as dc, s.stream() as st:
        s.copy_to_device(da, a, stream=st)
        s.copy_to_device(db, b, stream=st)
        s.launch(mod.function("vector_add"), grid=(n + 255) // 256, block=256, args=(da, db, dc, n), stream=st)
        out = s.copy_to_host(np.empty(n, np.float32), dc, stream=st)
        st.synchronize()
        assert np.allclose(out, a + b)
        s.launch(mod["fill_f32"], (n + 127) // 128, (128, 1, 1), (dc, 0.5, n))
        assert np.allclose(dc.copy_to(np.empty(n, np.float32)), 0.5)


def test_large_copies_go_bulk(s):
    n = 3 << 20                      # > rpc_inline_max: separate zero-copy messages
    a = np.random.default_rng(2).integers(0, 255, n, dtype=np.uint8)
    with s.alloc(n) as d, s.stream() as st:
        s.copy_to_device(d, a)
        assert (s.copy_to_host(np.empty(n, np.uint8), d) == a).all()
        b = a[::-1].copy()
        s.copy_to_device(d, b, stream=st)
        out = np.empty(n, np.uint8)
        s.copy_to_host(out, d, stream=st)
        st.synchronize()
        assert (out == b).all()
        img = np.zeros(1, np.uint8)
        s.copy_to_host(img, d)       # small sync copy after bulk ones
        assert img[0] == b[0]


def test_mlp_steps_match_numpy(s, mod):
    rng = np.random.default_rng(3)
    B, I, H, O = 32, 16, 32, 4
    x = rng.standard_normal((B, I)).astype(np.float32)
    tgt = rng.standard_normal((B, O)).astype(np.float32)
    W1 = (rng.standard_normal((I, H)) * 0.3).astype(np.float32)
    b1 = np.zeros(H, np.float32)
    W2 = (rng.standard_normal((H, O)) * 0.3).astype(np.float32)
    b2 = np.zeros(O, np.float32)
    lr = 0.05
    bufs = {k: s.alloc(v.nbytes) for k, v in dict(x=x, t=tgt, W1=W1, b1=b1, W2=W2, b2=b2).items()}
    for k, v in dict(x=x, t=tgt, W1=W1, b1=b1, W2=W2, b2=b2).items():
        s.copy_to_device(bufs[k], v)
    h, y, dy, dh = (s.alloc(B * H * 4), s.alloc(B * O * 4), s.alloc(B * O * 4), s.alloc(B * H * 4))
    dW1, db1, dW2, db2 = s.alloc(I * H * 4), s.alloc(H * 4), s.alloc(H * O * 4), s.alloc(O * 4)
    loss = s.alloc(4)
    f = {n: mod.function(n) for n in ("mlp_linear_fwd", "mlp_mse_grad", "mlp_relu_bwd", "mlp_linear_bwd_data",
                                      "mlp_linear_bwd_weight", "sgd_update")}
    g = lambda n: (n + 127) // 128  # noqa: E731
    losses = []
    for step in range(3):
        s.cuMemsetD32(loss, 0, 1)
        s.launch(f["mlp_linear_fwd"], g(B * H), 128, (bufs["x"], bufs["W1"], bufs["b1"], h, B, I, H, 1))
        s.launch(f["mlp_linear_fwd"], g(B * O), 128, (h, bufs["W2"], bufs["b2"], y, B, H, O, 0))
        s.launch(f["mlp_mse_grad"], g(B * O), 128, (y, bufs["t"], dy, loss, B * O))
        s.launch(f["mlp_linear_bwd_weight"], g(H * O + O), 128, (h, dy, dW2, db2, B, H, O))
        s.launch(f["mlp_linear_bwd_data"], g(B * H), 128, (dy, bufs["W2"], dh, B, H, O))
        s.launch(f["mlp_relu_bwd"], g(B * H), 128, (h, dh, B * H))
        s.launch(f["mlp_linear_bwd_weight"], g(I * H + H), 128, (bufs["x"], dh, dW1, db1, B, I, H))
        for w, gr, n in ((bufs["W1"], dW1, I * H), (bufs["b1"], db1, H), (bufs["W2"], dW2, H * O),
                         (bufs["b2"], db2, O)):
            s.launch(f["sgd_update"], g(n), 128, (w, gr, lr, n))
        losses.append(float(s.copy_to_host(np.zeros(1, np.float32), loss)[0]))
        # numpy reference step
        hh = np.maximum(x @ W1 + b1, 0)
        yy = hh @ W2 + b2
        d = yy - tgt
        ref_loss = float((d * d).mean())
        assert abs(losses[-1] - ref_loss) < 1e-3 * max(1, ref_loss), (step, losses[-1], ref_loss)
        dyy = 2 * d / d.size
        gW2, gb2 = hh.T @ dyy, dyy.sum(0)
        dhh = (dyy @ W2.T) * (hh > 0)
        gW1, gb1 = x.T @ dhh, dhh.sum(0)
        W1, b1, W2, b2 = W1 - lr * gW1, b1 - lr * gb1, W2 - lr * gW2, b2 - lr * gb2
    assert losses[-1] < losses[0]
    got = s.copy_to_host(np.zeros((I, H), np.float32), bufs["W1"])
    assert np.allclose(got, W1, atol=1e-4)


# ----------------------------------------------------------------------------- batching

def test_deferred_calls_do_not_round_trip_and_batch_limits(server):
    with settings.override(rpc_batch_calls=10, rpc_batch_first=10, rpc_flush_us=0):
        s = server.connect()
    try:
        seq0 = s._seq
        d = s.alloc(1 << 16)                      # deferred: no frame yet
        st = s.stream()
        ev = s.event()
        assert s._seq == seq0 and s._ncalls == 3
        for i in range(22):
            s.cuMemsetD32Async(d, i, 16, st)      # 25 calls: two full batches of 10 went out
        assert s._seq == seq0 + 2 and s._ncalls == 5
        s.flush()
        assert s._seq == seq0 + 3 and s._ncalls == 0
        s.flush()                                 # nothing batched: no frame
        assert s._seq == seq0 + 3
        ev.record(st)
        out = s.copy_to_host(np.zeros(4, np.uint32), d)  # sync call carries the batch
        assert s._seq == seq0 + 4 and (out == 21).all()
    finally:
        s.close()


def test_batch_ramp_after_sync_points(server):
    with settings.override(rpc_batch_calls=16, rpc_batch_first=2, rpc_flush_us=0):
        s = server.connect()
    try:
        d = s.alloc(4096)
        s.gwSync()
        for rnd in range(2):
            seq0 = s._seq
            sent = []
            for i in range(40):
                s.cuMemsetD8(d, 1, 16)
                if s._seq != seq0 + len(sent):
                    sent.append(i + 1)
            # frames after 2, then 4, 8, 16, 16 more calls (2, 6, 14, 30)
            assert sent == [2, 6, 14, 30], sent
            s.gwSync()                                 # a sync point restarts the ramp
    finally:
        s.close()


def test_batch_byte_limit(server):
    with settings.override(rpc_batch_bytes=4096, rpc_flush_us=0):
        s = server.connect()
    try:
        with s.alloc(1 << 16) as d:
            seq0 = s._seq
            data = np.ones(1000, np.uint8)
            for _ in range(5):
                s.cuMemcpyHtoD(d, data, 1000)     # ~1 KiB records: a frame every ~4
            assert s._seq > seq0
    finally:
        s.close()


def test_timer_flush(server):
    with settings.override(rpc_flush_us=2000):
        s = server.connect()
    try:
        d = s.alloc(4096)
        seq0 = s._seq
        s.cuMemsetD8(d, 1, 4096)
        deadline = time.monotonic() + 2
        while s._seq == seq0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert s._seq == seq0 + 1, "the flush timer did not send the batch"
        assert s._ncalls == 0
    finally:
        s.close()


def test_no_timer_when_disabled(server):
    with settings.override(rpc_flush_us=0, rpc_batch_first=8):
        s = server.connect()
    try:
        d = s.alloc(4096)
        seq0 = s._seq
        s.cuMemsetD8(d, 1, 4096)
        time.sleep(0.05)
        assert s._seq == seq0 and s._ncalls == 2
    finally:
        s.close()


def test_allocation_is_client_side_and_reuses_addresses(s):
    a = s.alloc(1000)
    b = s.alloc(1000)
    assert b.ptr >= a.ptr + 1000
    pa = a.ptr
    a.free()
    c = s.alloc(500)
    assert c.ptr == pa                               # first fit
    big = s.alloc(5 << 20)
    assert big.ptr % s._va.gran == 0
    s.gwSync()
    assert s.get_last_error() == 0


# ----------------------------------------------------------------------------- errors

@pytest.fixture()
def s8(server):
    """A session whose first batch holds 8 calls (tests that count batch positions)."""
    with settings.override(rpc_batch_first=8):
        sess = server.connect(name="test")
    yield sess
    sess.close()


def test_deferred_error_is_sticky_until_reported_and_names_the_call(s8):
    s = s8
    with s.alloc(4096) as d:
        s.cuMemsetD32(d, 1, 16)                        # ok
        s.cuMemsetD32(d.ptr + 4096, 7, 1)              # past the end: fails on the server
        s.cuMemsetD8(d, 1, 1 << 30)                    # fails too: counted, not reported
        s.cuMemsetD32(d, 2, 16)                        # ok: the server goes on
        with pytest.raises(DeferredCudaError) as ei:
            s.cuCtxSynchronize()
        e = ei.value
        assert e.call == "cuMemsetD32" and e.name == "CUDA_ERROR_INVALID_VALUE"
        assert f"cuMemsetD32(dstDevice={d.ptr + 4096:#x}, ui=7, N=1)" in e.call_args
        assert e.batch_position == 2 and e.later_failures == 1       # after cuMemAlloc and the good memset
        assert e.surfaced_at == "cuCtxSynchronize"
        assert "cuCtxSynchronize" in str(e) and "not inside an allocation" in str(e)
        # reported once: the latch is clear, the work after the failure ran
        s.cuCtxSynchronize()
        out = s.copy_to_host(np.zeros(16, np.uint32), d)
        assert (out == 2).all()
        # the last error is still there until read
        assert s.peek_at_last_error() == CU["CUDA_ERROR_INVALID_VALUE"]
        assert s.get_last_error() == CU["CUDA_ERROR_INVALID_VALUE"]
        assert s.get_last_error() == 0


def test_sync_call_error_wins_and_raw_api(s):
    with s.alloc(64) as d:
        s.cuMemsetD8(d.ptr + 100, 1, 1)               # deferred failure
        r, out = s.raw.cuMemcpyDtoH(None, d, 8)
        assert r == CU["CUDA_ERROR_INVALID_VALUE"] and s.deferred_error.call == "cuMemsetD8"
        s.cuMemsetD8(d.ptr + 100, 1, 1)
        with pytest.raises(CudaError) as ei:
            s.cuMemcpyDtoH(None, d.ptr + 60, 8)        # fails itself: its own error wins
        assert not isinstance(ei.value, DeferredCudaError)
        assert ei.value.call == "cuMemcpyDtoH" and ei.value.deferred.call == "cuMemsetD8"


def test_last_error_semantics(s):
    assert s.get_last_error() == 0
    with pytest.raises(CudaError):
        s.cuDeviceGet(99)
    r, cid, seq = s.gwPeekAtLastError()
    assert r == CU["CUDA_ERROR_INVALID_DEVICE"] and cid == default_spec().calls["cuDeviceGet"].id
    assert s.peek_at_last_error() == r                     # peek does not reset
    st = s.stream()
    assert st.query() in (True, False)                     # NOT_READY is not an error
    assert s.get_last_error() == r
    assert s.get_last_error() == 0


def test_invalid_handles(s):
    with pytest.raises(CudaError) as ei:
        s.cuStreamSynchronize(0x12345)
    assert ei.value.name == "CUDA_ERROR_INVALID_HANDLE"
    with pytest.raises(CudaError):
        s.cuEventQuery(0x4444)
    st = s.stream()
    st.destroy()
    with pytest.raises(CudaError):
        s.cuStreamQuery(st)                                # destroyed
    m = s.load_module(PTX)
    fn = m.function("noop")
    m.unload()
    s.cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, 0, b"")      # function of an unloaded module
    with pytest.raises(DeferredCudaError) as ei:
        s.gwSync()
    assert ei.value.name == "CUDA_ERROR_INVALID_HANDLE"
    s.cuModuleGetFunction(m, "noop")                       # deferred: fails on the server
    with pytest.raises(DeferredCudaError):
        s.gwSync()
    m2 = s.load_module(PTX)
    m2.function("no_such_kernel")
    with pytest.raises(DeferredCudaError) as ei:
        s.gwSync()
    assert ei.value.name == "CUDA_ERROR_NOT_FOUND"


def test_cross_session_pointers_are_refused(server):
    a = server.connect(name="a")
    b = server.connect(name="b")
    try:
        secret = np.full(1024, 42, np.uint8)
        pad = a.alloc(64 << 20)   # so da lies where b has nothing (with process isolation the
        da = a.alloc(1024)        # sessions have separate address spaces that may coincide)
        a.copy_to_device(da, secret)
        a.gwSync()
        sa = a.stream()
        a.gwSync()
        # b names a's pointer: read, write, copy, free, launch target
        with pytest.raises(CudaError) as ei:
            b.copy_to_host(np.zeros(16, np.uint8), da.ptr, nbytes=16)
        assert ei.value.name == "CUDA_ERROR_INVALID_VALUE"
        b.cuMemsetD8(da.ptr, 0, 1024)
        with pytest.raises(DeferredCudaError):
            b.gwSync()
        with b.alloc(1024) as db:
            b.cuMemcpyDtoD(db, da.ptr, 1024)
            with pytest.raises(DeferredCudaError):
                b.gwSync()
        b.cuMemFree(da.ptr)
        with pytest.raises(DeferredCudaError):
            b.gwSync()
        with pytest.raises(CudaError) as ei:
            b.cuStreamSynchronize(sa.handle)                # a's stream id means nothing to b
        assert ei.value.name == "CUDA_ERROR_INVALID_HANDLE"
        # a's memory is intact
        assert (a.copy_to_host(np.zeros(1024, np.uint8), da) == 42).all()
        pad.free()
    finally:
        a.close()
        b.close()


def test_close_frees_memory(server):
    obs = server.connect(name="observer")
    try:
        base = obs.mem_get_info()[0]
        s2 = server.connect(name="user")
        s2.alloc(64 << 20)
        s2.gwSync()
        assert obs.mem_get_info()[0] <= base - (64 << 20) or server.executor == "gpu"
        s2.close()
        from test_rpc_support import wait_until
        slack = 0 if server.executor == "cpu" else 4 << 20
        assert wait_until(lambda: obs.mem_get_info()[0] >= base - slack, 10)
    finally:
        obs.close()


def test_illegal_address_is_sticky_and_session_local(server):
    a = server.connect(name="crasher")
    b = server.connect(name="bystander")
    try:
        m = a.load_module(PTX)
        a.launch(m.function("poke"), 1, 1, (8,))          # writes to address 8
        with pytest.raises(CudaError) as ei:
            a.cuCtxSynchronize()
        assert ei.value.name in ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED")
        with pytest.raises(CudaError):
            a.cuMemGetInfo()                               # the context stays unusable
        with b.alloc(64) as d:                             # another session is unaffected
            b.cuMemsetD8(d, 3, 64)
            assert (b.copy_to_host(np.zeros(64, np.uint8), d) == 3).all()
    finally:
        a.close()
        b.close()


def test_closed_session_raises(server):
    s = server.connect()
    s.close()
    with pytest.raises(gpuwire.rpc.SessionClosed):
        s.cuCtxSynchronize()
    s.close()


def test_bad_arguments_are_caught_on_the_client(s):
    with pytest.raises(TypeError):
        s.cuMemsetD8("x", 1, 1)
    with pytest.raises(ValueError):
        s.cuMemcpyHtoD(0, b"abc", 10)                      # buffer shorter than ByteCount
    with pytest.raises(TypeError):
        s.cuMemcpyDtoH(b"readonly", 0, 4)
    with pytest.raises(ValueError):
        s.cuMemcpyDtoHAsync(None, 0, 4, 0)
    s.gwSync()
