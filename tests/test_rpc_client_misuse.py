"""The client's public API under misuse (session 14 audit): every wrong use gets a clear
error at once or at the next sync point, never a crash, a hang, a silently lost call or
silently wrong data. Against a real `gpuwire serve` process (CPU executor in CI, the GPU
executor where there is one)."""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from gpuwire import settings
from gpuwire import transport as t
from gpuwire.rpc import CudaError, DeferredCudaError, SessionClosed, protocol as P
from gpuwire.rpc.ptx_access import param_kinds
from test_rpc_support import EXECUTORS, PTX, start_server


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    srv = start_server(request.param)
    yield srv
    srv.stop()


@pytest.fixture()
def s(server):
    sess = server.connect(name="misuse")
    yield sess
    try:
        sess.close()
    except CudaError:
        pass


def _fill(s):
    return s.load_module(PTX).function("fill_f32")      # fill_f32(float *p, float v, int n)


# ----------------------------------------------------------------------------- close

def test_concurrent_close_is_safe(server):
    for _ in range(10):
        sess = server.connect()
        ts = [threading.Thread(target=sess.close) for _ in range(3)]
        try:
            for th in ts:
                th.start()
        finally:
            for th in ts:
                th.join(20)
        assert not any(th.is_alive() for th in ts) and sess.closed


def test_every_call_after_close_raises(server):
    sess = server.connect()
    buf = sess.alloc(64)
    sess.close()
    with pytest.raises(SessionClosed):
        sess.cuMemsetD8(buf, 1, 64)                 # a deferred call: not silently dropped
    with pytest.raises(SessionClosed):
        sess.memset(buf.ptr, 1, 64, stream=None)
    with pytest.raises(SessionClosed):
        sess.alloc(64)
    with pytest.raises(SessionClosed):
        sess.sync()
    with pytest.raises(SessionClosed):
        sess.cuMemcpyDtoHAsync(np.zeros(8, np.uint8), buf, 8, 0)


def test_close_raises_a_deferred_error_nobody_saw(server):
    sess = server.connect()
    buf = sess.alloc(64)
    sess.cuMemcpyHtoD(buf.ptr + 32, np.zeros(64, np.uint8), 64)      # runs past the allocation
    with pytest.raises(DeferredCudaError) as ei:
        sess.close()
    assert ei.value.call == "cuMemcpyHtoD" and ei.value.surfaced_at == "close"
    assert sess.closed
    sess.close()                                                       # idempotent, nothing more


def test_close_after_flush_still_reports(server):
    sess = server.connect()
    sess.memset(0xdead0000, 0, 16)
    sess.flush()
    time.sleep(0.05)
    with pytest.raises(DeferredCudaError, match="cuMemsetD8"):
        sess.close()


def test_with_block_raises_it_unless_an_exception_leaves_the_block(server):
    with pytest.raises(DeferredCudaError):
        with server.connect() as sess:
            sess.memset(0xdead0000, 0, 16)
    with pytest.raises(KeyError):                                      # the block's own exception wins
        with server.connect() as sess:
            sess.memset(0xdead0000, 0, 16)
            raise KeyError("mine")
    assert sess.closed and sess.deferred_error is not None and sess.deferred_error.call == "cuMemsetD8"


def test_clean_close_raises_nothing(server):
    with server.connect() as sess:
        buf = sess.alloc(64)
        sess.memset(buf, 1, 64)
        sess.sync()
        sess.memset(buf, 2, 64)                                        # fine, and not synced
    assert sess.deferred_error is None


def test_collected_session_warns_about_a_lost_error(server):
    sess = server.connect()
    sess.memset(0xdead0000, 0, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sess.__del__()
    assert any("failed deferred call" in str(x.message) for x in w)


# ----------------------------------------------------------------------------- deferred errors at sync points

def test_first_launch_does_not_swallow_a_deferred_error(s):
    buf = s.alloc(64)
    s.cuMemcpyHtoD(buf.ptr + 32, np.zeros(64, np.uint8), 64)          # fails on the server
    with pytest.raises(DeferredCudaError, match="cuMemcpyHtoD"):
        s.launch(_fill(s), 1, 16, (buf, 1.0, 16))                      # its layout probe is a sync point
    s.sync()                                                           # reported once


def test_layout_probe_racing_failing_calls_caches_no_wrong_layout(s):
    f = _fill(s)
    stop = threading.Event()

    def bad():
        while not stop.is_set():
            s.memset(0xdead0000, 0, 16)
            time.sleep(0.0005)
    th = threading.Thread(target=bad)
    th.start()
    try:
        for _ in range(60):
            f._layout = None
            try:
                assert f.param_layout() == [(0, 8), (8, 4), (12, 4)]
            except DeferredCudaError:
                pass                                                   # the other thread's, surfaced here
    finally:
        stop.set()
        th.join()
    try:
        s.sync()
    except DeferredCudaError:
        pass


def test_a_sticky_error_names_the_call_that_broke_the_context(s):
    if s.executor != "cpu":
        pytest.skip("the CPU executor's poke kernel faults on purpose")
    poke = s.load_module(PTX).function("poke")
    s.launch(poke, 1, 1, (0x1234,))
    with pytest.raises(CudaError) as ei:
        s.sync()
    assert "poke" in str(ei.value) or "cuLaunchKernel" in str(ei.value)
    with pytest.raises(CudaError) as ei2:
        s.sync()                                                       # sticky: still failing
    assert ei2.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"


def test_raw_calls_always_return_a_tuple(s):
    assert s.raw.gwSync() == (0,)
    assert s.raw.cuCtxSynchronize() == (0,)
    assert s.raw.cuMemsetD8(s.alloc(8), 0, 8) == (0,)
    r = s.raw.cuMemGetInfo()
    assert r[0] == 0 and len(r) == 3


# ----------------------------------------------------------------------------- handles and buffers

def test_handles_of_another_session_are_refused(server):
    a, b = server.connect(), server.connect()
    try:
        sa = a.stream()
        sb = b.stream()
        assert int(sa) != int(sb)                                      # per-session random bases
        b.cuStreamDestroy(int(sa))                                     # A's id names nothing in B
        with pytest.raises(DeferredCudaError) as ei:
            b.sync()
        assert ei.value.name == "CUDA_ERROR_INVALID_HANDLE"
        sb.synchronize()                                               # B's own stream is intact
        fa = a.load_module(PTX).function("fill_f32")
        buf = b.alloc(64)
        with pytest.raises(ValueError, match="another session"):
            b.launch(fa, 1, 16, (buf, 1.0, 16))
        with pytest.raises(ValueError, match="another session"):
            b.launch(b.load_module(PTX).function("fill_f32"), 1, 16, (buf, 1.0, 16), stream=sa)
        with pytest.raises(ValueError, match="another session"):
            b.copy_to_device(a.alloc(64), np.zeros(64, np.uint8))
    finally:
        a.close()
        b.close()


def test_a_freed_buffer_is_refused_even_when_its_address_is_reused(s):
    f = _fill(s)
    old = s.alloc(256)
    old.free()
    new = s.alloc(256)
    assert new.ptr == old.ptr                                          # the address came back
    new.copy_from(np.full(64, 5, np.float32))
    for bad in (lambda: s.launch(f, 1, 64, (old, 9.0, 64)),
                lambda: s.copy_to_device(old, np.zeros(64, np.float32)),
                lambda: s.copy_to_host(np.zeros(64, np.float32), old),
                lambda: s.memset(old, 0, 256),
                lambda: old.memset(0)):
        with pytest.raises(ValueError, match="freed"):
            bad()
    s.sync()
    assert (new.copy_to(np.zeros(64, np.float32)) == 5).all()


def test_alloc_sizes(s):
    with pytest.raises(CudaError, match="positive"):
        s.alloc(0)
    with pytest.raises(CudaError, match="positive"):
        s.alloc(-1)
    with pytest.raises(TypeError):
        s.alloc(True)
    with pytest.raises(TypeError):
        s.alloc(64.0)
    b = s.alloc(np.int64(256))
    assert b.nbytes == 256 and isinstance(b.nbytes, int)
    b.free()
    s.sync()


def test_copy_arguments_are_named(s):
    buf = s.alloc(64)
    with pytest.raises(TypeError, match="copy_to_device: array must be a buffer"):
        s.copy_to_device(buf, "text")
    with pytest.raises(TypeError, match="nbytes must be an int"):
        s.copy_to_device(buf, np.zeros(16, np.uint8), nbytes=16.0)
    with pytest.raises(ValueError, match="run past the end"):
        s.copy_to_host(np.zeros(128, np.uint8), buf)
    with pytest.raises(TypeError, match="module image"):
        s.load_module(None)
    mod = s.load_module(PTX)
    with pytest.raises(TypeError, match="name must be a str"):
        mod.function(123)
    s.sync()


# ----------------------------------------------------------------------------- kernel parameters

def test_ptx_param_kinds():
    with open(PTX) as f:
        kinds = param_kinds(f.read())
    assert kinds["fill_f32"] == ["i", "f", "i"] and kinds["saxpy"][0] == "f" and kinds["noop"] == []
    assert param_kinds(".visible .entry k(.param .align 8 .b8 k_param_0[16], .param .f64 k_param_1)\n{ret;}") \
        == {"k": ["b", "f"]}


def test_kernel_parameters_follow_the_ptx_types(s):
    f = _fill(s)
    buf = s.alloc(64)
    s.launch(f, 1, 16, (buf, 3, 16))                  # an int for a float parameter: the value 3.0
    s.launch(f, 1, 4, (buf, np.int32(7), 4))
    s.sync()
    got = buf.copy_to(np.zeros(16, np.float32))
    assert (got[:4] == 7).all() and (got[4:] == 3).all()
    assert f.pack((buf, 1.0, 2**32 - 1))[12:16] == b"\xff\xff\xff\xff"    # unsigned range: its bits
    assert f.pack((buf, 1.0, -1))[12:16] == b"\xff\xff\xff\xff"
    with pytest.raises(TypeError, match="parameter 2 .*takes an int"):
        f.pack((buf, 1.0, 4.0))                        # a float for an int parameter
    with pytest.raises(OverflowError, match="parameter 2"):
        f.pack((buf, 1.0, 2**32 + 4))                  # never masked
    with pytest.raises(OverflowError, match="parameter 2"):
        f.pack((buf, 1.0, -2**31 - 1))
    with pytest.raises(TypeError, match="parameter 1"):
        f.pack((buf, b"\x01\x02\x03\x04", 4))          # bytes for a float parameter
    with pytest.raises(TypeError, match="parameter 1"):
        f.pack((buf, "x", 4))
    with pytest.raises(TypeError, match="takes 3 parameters"):
        f.pack((buf, 1.0))


def test_kernel_parameters_without_ptx_types(s):
    f = _fill(s)
    f.param_layout()
    f._ptypes = None                                   # as for a cubin: the values' types decide
    f._structs.clear()
    buf = s.alloc(64)
    assert len(f.pack((buf, 1.0, 2**32 - 1))) == 16
    with pytest.raises(OverflowError):
        f.pack((buf, 1.0, 2**33))
    with pytest.raises(ValueError, match="takes 4 bytes, got 9"):
        f.pack((buf, b"123456789", 4))
    assert f.pack((buf, b"\0\0\x80\x3f", 4))[8:12] == b"\0\0\x80\x3f"


def test_launch_dimensions(s):
    f = _fill(s)
    buf = s.alloc(64)
    s.launch(f, np.int64(1), (np.int32(16),), (buf, 1.0, 16))
    for bad, exc in ((1.0, TypeError), ((1, 1, 1, 1), ValueError), ((), ValueError), ((1, 2.0), TypeError),
                     (True, TypeError)):
        with pytest.raises(exc, match="launch: grid"):
            s.launch(f, bad, 16, (buf, 1.0, 16))
    with pytest.raises(TypeError, match="must be a Function"):
        s.launch(0x555, 1, 1, ())
    s.sync()


def test_c_encoder_refuses_non_integer_handles(server):
    with settings.override(rpc_c_encoder=True):
        sess = server.connect()
    try:
        buf = sess.alloc(16)
        for bad in (lambda: sess.cuMemsetD8Async(buf, 7, 4, 1.9),
                    lambda: sess.cuMemsetD8(str(buf.ptr), 9, 4),
                    lambda: sess.cuMemsetD8(float(buf.ptr), 5, 2)):
            with pytest.raises(TypeError, match="bad argument"):
                bad()
        sess.sync()
    finally:
        sess.close()


# ----------------------------------------------------------------------------- connect

def test_connect_bounds_the_hello_by_its_timeout():
    ctx = t.Context()
    try:
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        eps = []
        stop = threading.Event()

        def acc():                                     # accepts, never answers
            while not stop.is_set():
                try:
                    eps.append(lst.accept(timeout=0.2))
                except t.OperationTimeout:
                    continue
                except t.TransportError:
                    return
        th = threading.Thread(target=acc)
        th.start()
        try:
            import gpuwire
            t0 = time.monotonic()
            with pytest.raises(t.ConnectTimeout, match="hello"):
                gpuwire.connect(f"127.0.0.1:{lst.port}", token="x", timeout=1.0)
            assert time.monotonic() - t0 < 8
        finally:
            stop.set()
            th.join()
    finally:
        ctx.close()


def test_token_type(server):
    with pytest.raises(TypeError, match="token must be a str or bytes"):
        server.connect(token=5)


# ----------------------------------------------------------------------------- the CPU executor's limits

def test_cpu_executor_enforces_a_gpus_launch_limits(server, s):
    if server.executor != "cpu":
        pytest.skip("the CPU executor's limits")
    f = _fill(s)
    buf = s.alloc(64)
    for grid, block, shm in (((1, 1, 65536), 1, 0), ((1, 70000, 1), 1, 0), (1, (1, 1, 65), 0), (1, 1, 2**31)):
        s.launch(f, grid, block, (buf, 1.0, 1), shared_mem=shm)
        with pytest.raises(DeferredCudaError, match="cuLaunchKernel"):
            s.sync()
    st, ev = s.stream(), s.event()
    s.cuStreamWaitEvent(st, ev, 7)
    with pytest.raises(DeferredCudaError, match="flags"):
        s.sync()
    assert s.cuDeviceGetAttribute(5, 0) == 2**31 - 1


def test_a_copy_larger_than_the_servers_bulk_max_is_refused_at_once(s):
    assert s._bulk_max >= 1 << 30                      # the hello's bulk_max (the session's VA range at least)
    buf = s.alloc(4 << 20)
    s._bulk_max = 1 << 20                              # (as if the server could serve no more)
    out = np.zeros(4 << 20, np.uint8)
    with pytest.raises(CudaError, match="bulk_max"):
        s.copy_to_host(out, buf)
    with pytest.raises(CudaError, match="bulk_max"):
        s.copy_to_host(out, buf, stream=s.stream())
    s.sync()                                           # nothing half-sent: the session goes on
    s._bulk_max = 1 << 62
    s.copy_to_host(out, buf)


@pytest.mark.parametrize("name,value", [("rpc_spin_us", "inf"), ("rpc_server_spin_us", "nan"),
                                        ("rpc_timeout_s", -1), ("rpc_flush_us", "nan"),
                                        ("rpc_bulk_timeout_s", 0), ("rpc_lane_wait_s", -2),
                                        ("rpc_hello_timeout_s", "inf"), ("rpc_worker_claim_s", 0)])
def test_rpc_time_settings_refuse_bad_values_by_name(name, value):
    import gpuwire.rpc.server  # noqa: F401  (registers the server's settings)
    with pytest.raises(ValueError, match="GPUWIRE_" + name.upper()):
        with settings.override(**{name: value}):
            pass
    settings.set("rpc_spin_us", -1)                    # negative: the transport's spin_us (allowed)
    settings.set("rpc_spin_us", 1000.0)
