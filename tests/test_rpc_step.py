"""The sync call with calls batched in one C call (gw_rpc_bsync_w, setting
rpc_c_sync_batch; docs/protocol.md "Client: the batched sync in C"): a training step's
boundary (memset, launches, a small D2H, stream sync) must behave exactly as the generated
stub's Python round trip does: results, the reply tail, pushes, deferred errors raised at
the sync naming the call, the call's own error, timeouts with the late reply dropped, a
lost connection, Ctrl-C as the C call returns, and threads. Each scenario runs with the
setting on and off against real server processes (C server and Python server) and the two
traces must be equal."""
from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from gpuwire import settings as _settings
from gpuwire import transport as t
from gpuwire.rpc import CudaError, DeferredCudaError, SessionClosed, client as C
from gpuwire.rpc import protocol as P
from test_rpc_support import EXECUTORS, PTX, close_soon, start_server, syncs_in_a_thread

pytestmark = pytest.mark.skipif(C._bsync is None or C._fsync is None,
                                reason="gpuwire._rpc without the batched sync path")


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    srv = start_server(request.param)
    yield srv
    srv.stop()


class _Count:
    """Counts the calls of the batched sync path (C._bsync) while installed."""

    def __init__(self, monkeypatch):
        self.n = 0
        self.real = C._bsync

        def counted(*a):
            self.n += 1
            return self.real(*a)
        monkeypatch.setattr(C, "_bsync", counted)


def _connect(srv, on: bool, **kw):
    kw.setdefault("rpc_flush_us", 0)
    with _settings.override(rpc_c_sync_batch=on, **kw):
        return srv.connect(name=f"test-step-{int(on)}")


def _err(e: BaseException, s):
    """What must be equal between the two paths (not the rendered pointer values; the frame
    seq counted from session ``s``'s first, which is random)."""
    if isinstance(e, DeferredCudaError):
        return ("deferred", e.call, e.result, e.batch_position, (e.frame_seq - s._seq0) & 0xFFFFFFFF,
                e.call_seq, e.later_failures, e.surfaced_at)
    if isinstance(e, CudaError):
        return ("cuda", e.call, e.result)
    return (type(e).__name__,)


def _both(server, monkeypatch, scenario, **kw):
    """Run ``scenario(s)`` (returns a trace) with the setting off, then on; returns both
    traces and how often the C path ran in each."""
    out = []
    for on in (False, True):
        cnt = _Count(monkeypatch)
        s = _connect(server, on, **kw)
        try:
            assert (s._bs_cuStreamSynchronize is not None) == on
            out.append((scenario(s), cnt.n))
        finally:
            s.close()
        monkeypatch.setattr(C, "_bsync", cnt.real)
    (off, n_off), (on_, n_on) = out
    assert n_off == 0, "the C path ran with the setting off"
    return off, on_, n_on


def _mlp_like_steps(s, steps=20):
    mod = s.load_module(PTX)
    f = mod.function("vector_add")
    n = 64
    a, b, c, acc = s.alloc(4 * n), s.alloc(4 * n), s.alloc(4 * n), s.alloc(4 * n)
    s.copy_to_device(a, np.arange(n, dtype=np.float32))
    s.copy_to_device(b, np.ones(n, np.float32))
    st = s.stream()
    params = f.pack([a, b, c, n])
    loss = np.zeros(1, np.float32)
    small = np.zeros(16, np.uint32)
    trace = []
    for i in range(steps):
        s.cuMemsetD32Async(acc, i, n, st)
        for _ in range(6):
            s.cuLaunchKernel(f.handle, 1, 1, 1, 64, 1, 1, 0, st, params)
        s.cuMemcpyDtoHAsync(loss, c.ptr + 4 * (i % n), 4, st)      # the loss read: the reply tail
        s.cuMemcpyDtoHAsync(small, acc, small.nbytes, st)
        seq0, cs0 = s._seq, s._call_seq
        s.cuStreamSynchronize(st)
        trace.append((float(loss[0]), small.tolist(), (s._seq - seq0) & 0xFFFFFFFF, s._call_seq - cs0,
                      s._ncalls, s._pos))
    return trace


def test_steps_give_the_same_results_on_both_paths(server, monkeypatch):
    off, on, n_on = _both(server, monkeypatch, _mlp_like_steps)
    assert on == off
    assert n_on >= 20, "the batched syncs did not take the C path"
    for i, (loss, small, dseq, dcalls, ncalls, pos) in enumerate(on):
        assert loss == float(i % 64) + 1.0 and small == [i] * 16
        # one frame for the sync; it carried the launch and the two copies batched after the
        # ramp's second flush (2, then 4 calls) and the sync record
        assert (dseq, dcalls) == (1, 4)
        assert ncalls == 0 and pos == P.HEADER_SIZE


def test_the_batch_ramp_restarts_after_a_batched_sync(server, monkeypatch):
    def scen(s):
        d = s.alloc(4096)
        s.gwSync()
        out = []
        for _ in range(3):
            for _ in range(5):
                s.cuMemsetD32Async(d, 1, 4, 0)
            out.append(s._flush_at)
            s.cuCtxSynchronize()
            out.append((s._flush_at, s._ncalls, s._call_seq))
        return out
    off, on, n_on = _both(server, monkeypatch, scen, rpc_batch_first=2)
    assert on == off and n_on == 4       # (the first gwSync carries the batched cuMemAlloc)


def test_gwsync_and_ctx_sync_with_calls_batched(server, monkeypatch):
    def scen(s):
        d = s.alloc(4096)
        out = np.zeros(8, np.uint32)
        res = []
        for v, sync in ((3, s.gwSync), (4, s.cuCtxSynchronize), (5, s.sync), (6, s.synchronize)):
            s.cuMemsetD32Async(d, v, 8, 0)
            s.cuMemcpyDtoHAsync(out, d, out.nbytes, 0)
            sync()
            res.append(out.tolist())
        return res
    off, on, n_on = _both(server, monkeypatch, scen, rpc_batch_first=64)
    assert on == off == [[v] * 8 for v in (3, 4, 5, 6)]
    assert n_on == 4


def test_a_deferred_error_is_raised_at_the_batched_sync_naming_the_call(server, monkeypatch):
    def scen(s):
        d = s.alloc(4096)
        st = s.stream()
        out = np.full(4, 9, np.uint32)
        s.gwSync()
        tr = []
        s.cuMemsetD32Async(d, 1, 4, st)
        s.cuMemsetD32Async(d.ptr + (1 << 30), 1, 4, st)      # outside every allocation
        s.cuMemcpyDtoHAsync(out, d, out.nbytes, st)
        try:
            s.cuStreamSynchronize(st)
            tr.append("no error")
        except Exception as e:
            tr.append(_err(e, s))
        tr.append(out.tolist())
        for _ in range(2):                                  # what the session does next
            s.cuMemsetD32Async(d, 2, 4, st)
            s.cuMemcpyDtoHAsync(out, d, out.nbytes, st)
            try:
                s.cuStreamSynchronize(st)
                tr.append(("ok", out.tolist()))
            except Exception as e:
                tr.append(_err(e, s))
        tr.append(_err(s.deferred_error, s) if s.deferred_error else None)
        return tr
    off, on, n_on = _both(server, monkeypatch, scen, rpc_batch_first=64)
    assert on == off
    first = on[0]
    assert first[0] == "deferred" and first[1] == "cuMemsetD32Async" and first[3] == 1, first
    assert first[-1] == "cuStreamSynchronize"
    assert n_on >= 1


def test_a_failed_tail_copy_leaves_the_buffer_alone(server, monkeypatch):
    def scen(s):
        d = s.alloc(4096)
        st = s.stream()
        good, bad = np.zeros(4, np.uint32), np.full(4, 7, np.uint32)
        s.gwSync()
        s.cuMemsetD32Async(d, 5, 4, st)
        s.cuMemcpyDtoHAsync(good, d, good.nbytes, st)
        s.cuMemcpyDtoHAsync(bad, d.ptr + (1 << 30), bad.nbytes, st)   # fails on the server
        try:
            s.cuStreamSynchronize(st)
            r = "no error"
        except Exception as e:
            r = _err(e, s)
        return r, good.tolist(), bad.tolist()
    off, on, n_on = _both(server, monkeypatch, scen, rpc_batch_first=64)
    assert on == off
    r, good, bad = on
    assert r[0] == "deferred" and r[1] == "cuMemcpyDtoHAsync" and good == [5] * 4 and bad == [7] * 4


def test_the_sync_calls_own_error(server, monkeypatch):
    def scen(s):
        d = s.alloc(4096)
        s.gwSync()
        s.cuMemsetD32Async(d, 1, 4, 0)
        try:
            s.cuStreamSynchronize(0x7FFF_0000)               # no such stream
            r = "no error"
        except Exception as e:
            r = _err(e, s)
        out = np.zeros(4, np.uint32)
        s.cuMemsetD32Async(d, 8, 4, 0)
        s.cuMemcpyDtoHAsync(out, d, out.nbytes, 0)
        s.cuStreamSynchronize(0)
        return r, out.tolist()
    off, on, n_on = _both(server, monkeypatch, scen, rpc_batch_first=64)
    assert on == off
    assert on[0][0] == "cuda" and on[0][1] == "cuStreamSynchronize" and on[1] == [8] * 4


def test_large_results_still_come_as_pushes(server, monkeypatch):
    def scen(s):
        d = s.alloc(1 << 16)
        st = s.stream()
        big = np.zeros(4096, np.uint32)                     # 16 KiB: above the reply tail's limit
        small = np.zeros(2, np.uint32)
        s.gwSync()
        res = []
        for v in (11, 12):
            s.cuMemsetD32Async(d, v, 4096, st)
            s.cuMemcpyDtoHAsync(big, d, big.nbytes, st)
            s.cuMemcpyDtoHAsync(small, d, small.nbytes, st)
            s.cuStreamSynchronize(st)
            res.append((int(big.min()), int(big.max()), small.tolist(), len(s._pushes)))
        return res
    off, on, n_on = _both(server, monkeypatch, scen, rpc_batch_first=64)
    assert on == off == [(11, 11, [11, 11], 0), (12, 12, [12, 12], 0)]
    assert n_on == 3                     # (the first gwSync carries the batched allocations)


def test_copies_in_flight_take_the_generated_stub(server, monkeypatch):
    """An async copy from pinned memory keeps its sends in flight until a sync point: the
    C path leaves that sync to the generated stub (which waits for them); the next one is
    its own again."""
    cnt = _Count(monkeypatch)
    s = _connect(server, True, rpc_inline_max=1024, rpc_batch_first=64)
    try:
        d, d2 = s.alloc(1 << 16), s.alloc(4096)
        src = s.pinned(16384)
        src[:] = np.arange(16384) % 251
        out = np.zeros(16384, np.uint8)
        small = np.zeros(4, np.uint32)
        s.gwSync()
        n0 = cnt.n
        s.cuMemcpyHtoDAsync(d, src, src.nbytes, 0)       # bulk from pinned memory: in flight
        assert s._inflight
        s.cuMemsetD32Async(d2, 6, 4, 0)
        s.cuMemcpyDtoHAsync(small, d2, small.nbytes, 0)
        s.cuStreamSynchronize(0)
        assert cnt.n == n0 and not s._inflight and small.tolist() == [6] * 4
        s.cuMemcpyDtoHAsync(out, d, out.nbytes, 0)       # above the inline limit: a push
        s.cuStreamSynchronize(0)
        assert cnt.n == n0 + 1 and (out == src).all()
    finally:
        s.close()


def test_timeout_at_the_batched_sync_and_the_late_reply_is_dropped(server, monkeypatch):
    cnt = _Count(monkeypatch)
    s = _connect(server, True, rpc_batch_first=64)
    try:
        big = s.alloc(64 << 20)
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()
        timed_out = False
        for _ in range(5):
            s.cuMemsetD32Async(big, 3, (64 << 20) // 4, st)      # milliseconds on the server
            f = s._bs_gwSync
            tmo, f.timeout_ns = f.timeout_ns, 1
            try:
                s.gwSync()
            except t.OperationTimeout:
                timed_out = True
                break
            finally:
                f.timeout_ns = tmo
        assert timed_out and cnt.n >= 1
        assert s._ncalls == 0 and s._pos == P.HEADER_SIZE       # the batch went out (or is gone)
        time.sleep(0.3)                                          # the late reply is in
        out = np.zeros(4, np.uint32)
        for v in (5, 6, 7):
            s.cuMemsetD32Async(d, v, 4, st)
            s.cuMemcpyDtoHAsync(out, d, out.nbytes, st)
            s.cuStreamSynchronize(st)                            # batched: the C path
            assert (out == v).all()
        assert len(s.protocol_errors) <= 1 and all("timed out" in x for x in s.protocol_errors), \
            s.protocol_errors
        assert syncs_in_a_thread(s)
    finally:
        s.close()


def test_a_lost_connection_raises_session_closed(monkeypatch):
    got = []
    for on in (False, True):
        srv = start_server("cpu")
        try:
            s = _connect(srv, on, rpc_batch_first=64)
            d = s.alloc(4096)
            s.gwSync()
            srv.stop()
            time.sleep(0.2)
            s.cuMemsetD32Async(d, 1, 4, 0)
            with pytest.raises(SessionClosed) as ei:
                s.cuStreamSynchronize(0)
            assert s.closed
            with pytest.raises(SessionClosed):
                s.cuMemsetD32Async(d, 1, 4, 0)
                s.cuStreamSynchronize(0)
            got.append(str(ei.value).replace(srv.address, "ADDR"))
            close_soon(s)
        finally:
            srv.stop()
    assert got[0] == got[1] and got[0].startswith("cuStreamSynchronize: connection to gpuwire server ADDR lost"), got


def test_an_interrupt_as_the_c_call_returns_does_not_leave_the_wire_locked(server, monkeypatch):
    """KeyboardInterrupt raised as gw_rpc_bsync_w returns with the wire lock held (a reply
    with a deferred-error report): the lock is released; later calls and close() go on."""
    real = C._bsync
    seen = []

    def interrupted(*a):
        st = real(*a)
        seen.append(st)
        raise KeyboardInterrupt
    s = _connect(server, True, rpc_batch_first=64)
    try:
        d = s.alloc(4096)
        s.gwSync()
        s.cuMemsetD32Async(d.ptr + (1 << 30), 1, 4, 0)       # fails: the reply is not plain
        monkeypatch.setattr(C, "_bsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            s.cuStreamSynchronize(0)
        monkeypatch.setattr(C, "_bsync", real)
        assert seen == [1]
        assert syncs_in_a_thread(s), "the wire lock was left held"
        out = np.zeros(4, np.uint32)
        for _ in range(2):                     # (a deferred error may still be reported once)
            s.cuMemsetD32Async(d, 4, 4, 0)
            s.cuMemcpyDtoHAsync(out, d, out.nbytes, 0)
            try:
                s.cuStreamSynchronize(0)
                break
            except CudaError:
                pass
        assert out.tolist() == [4] * 4
    finally:
        close_soon(s)


def test_threads_mixing_batched_and_fast_syncs(server, monkeypatch):
    cnt = _Count(monkeypatch)
    s = _connect(server, True, rpc_batch_first=4)
    errors = []
    try:
        bufs = [s.alloc(4096) for _ in range(4)]
        streams = [s.stream() for _ in range(4)]
        s.gwSync()

        def worker(i):
            out = np.zeros(4, np.uint32)
            try:
                for k in range(150):
                    v = i * 1000 + k
                    s.cuMemsetD32Async(bufs[i], v, 4, streams[i])
                    s.cuMemcpyDtoHAsync(out, bufs[i], out.nbytes, streams[i])
                    s.cuStreamSynchronize(streams[i])
                    if (out != v).any():
                        errors.append((i, k, out.tolist()))
                    if k % 7 == 0:
                        s.gwSync()
            except Exception as e:   # noqa: BLE001
                errors.append(repr(e))
        ths = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        assert not any(th.is_alive() for th in ths), "a thread hung"
        assert not errors, errors[:5]
        assert s.deferred_error is None and not s.protocol_errors
        assert cnt.n > 0
    finally:
        s.close()


# ------------------------------------------------------------------ the adaptive sync spin


def test_session_worker_gets_the_adaptive_spin_where_cores_allow(server, monkeypatch):
    """rpc_spin_adapt_us reaches the session's worker (call_spin_max_us) on machines with
    4 or more logical CPUs; off with fewer, with 0, or when not above rpc_spin_us."""
    from gpuwire.rpc import client as client_mod
    for cpus, kw, want in ((8, {}, 20000.0), (2, {}, 0.0), (8, {"rpc_spin_adapt_us": 0}, 0.0),
                           (8, {"rpc_spin_adapt_us": 500, "rpc_spin_us": 1000}, 0.0),
                           (4, {"rpc_spin_adapt_us": 3000}, 3000.0)):
        monkeypatch.setattr(client_mod.os, "cpu_count", lambda c=cpus: c)
        with _settings.override(**kw):
            s = server.connect(name="spin")
        try:
            assert s._w.call_spin_max_us == want, (cpus, kw)
        finally:
            s.close()
    with pytest.raises(ValueError, match="rpc_spin_adapt_us"):
        with _settings.override(rpc_spin_adapt_us=-5):
            server.connect(name="bad")


def test_long_steps_keep_spinning_through_their_sync(server, monkeypatch):
    """A loop whose sync waits outlast rpc_spin_us: with the adaptive spin the client stops
    blocking (no wake-up per step) after the first steps; without it every sync blocks. The
    results are the same."""
    from gpuwire.rpc import client as client_mod
    monkeypatch.setattr(client_mod.os, "cpu_count", lambda: 8)
    n = 1 << 21
    per = 300 if server.executor == "gpu" else 4      # launches per step: a step of ms either way
    x = np.arange(n, dtype=np.float32) % 97
    counts = {}
    for adapt in (0, 200_000):
        with _settings.override(rpc_spin_us=50, rpc_spin_adapt_us=adapt, rpc_bulk_lanes=0, rpc_flush_us=0):
            s = server.connect(name=f"spin-{adapt}")
        try:
            f = s.cuModuleGetFunction(s.cuModuleLoadData(PTX.read_bytes()), "saxpy")
            st = s.stream()
            with s.alloc(x.nbytes) as dx, s.alloc(x.nbytes) as dy:
                s.copy_to_device(dx, x)
                s.cuMemsetD32(dy, 0, n)
                params = struct.pack("<f4xQQi", 1.0, dx.ptr, dy.ptr, n)
                blocked, waits = [], []
                for i in range(8):
                    for _ in range(per):
                        s.cuLaunchKernel(f, (n + 255) // 256, 1, 1, 256, 1, 1, 0, st, params)
                    b0, t0 = s._w.blocked_waits, time.perf_counter()
                    s.cuStreamSynchronize(st)
                    waits.append(time.perf_counter() - t0)
                    blocked.append(s._w.blocked_waits - b0)
                y = s.copy_to_host(np.zeros(n, np.float32), dy)
                assert np.array_equal(y, 8 * per * x)
        finally:
            s.close()
        assert min(waits[1:]) > 50e-6 * 4, waits         # every sync outlasts rpc_spin_us
        counts[adapt] = blocked
    assert all(b >= 1 for b in counts[0]), counts
    assert sum(counts[200_000][2:]) <= 1, counts     # (one step twice as slow as the others may block)
