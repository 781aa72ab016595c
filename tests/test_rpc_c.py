"""The RPC layer's C module (gpuwire._rpc): encoder vs struct.pack, the frame scanner vs
the Python decoder on valid and fuzzed frames, the dispatch loop's translation and
validation with the host 'driver'."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from gpuwire import settings as _settings
from gpuwire.rpc import protocol as P
from gpuwire.rpc.codegen import layout
from gpuwire.rpc.spec import default_spec

_rpc = pytest.importorskip("gpuwire._rpc", reason="gpuwire._rpc is not built (pip install -e .)")
ffi, lib = _rpc.ffi, _rpc.lib
from gpuwire.rpc.executors import _cfast as cf  # noqa: E402
from gpuwire.rpc import server as S  # noqa: E402

SPEC = default_spec()


def test_layouts_match_the_spec():
    assert cf.available() and cf._consistent(SPEC)


@pytest.mark.parametrize("name", [c.name for c in SPEC.calls.values() if len(c.wire_format.request_args) <= 10])
def test_encoder_matches_struct(name):
    call = SPEC.calls[name]
    L = layout(call)
    rng = random.Random(call.id)
    vals = []
    for code in L.fixed.format.lstrip("<"):
        lim = {"b": 127, "B": 255, "h": 32767, "H": 65535, "i": 2**31 - 1, "I": 2**32 - 1, "q": 2**62, "Q": 2**62}[code]
        vals.append(rng.randrange(0, lim))
    buf = ffi.new("uint8_t[256]")
    end = lib.gw_rpc_put(buf, 256, 16, call.id, 99, L.fixed.format.lstrip("<").encode(),
                         *(vals + [0] * (10 - len(vals))))
    want = L.client.pack(call.id, 0, 99, *vals)
    assert end == 16 + len(want)
    assert bytes(ffi.buffer(buf, 256))[16:end] == want


def test_encoder_range_and_capacity():
    buf = ffi.new("uint8_t[32]")
    assert lib.gw_rpc_put(buf, 32, 0, 1, 9, b"B", 256, *([0] * 9)) == -2
    assert lib.gw_rpc_put(buf, 32, 0, 1, 9, b"I", -1, *([0] * 9)) == -2
    assert lib.gw_rpc_put(buf, 32, 28, 1, 16, b"Q", 5, *([0] * 9)) == -1
    assert lib.gw_rpc_put(buf, 32, 0, 1, 9, b"z", 5, *([0] * 9)) == -3


class _FakeEP:
    peer = "x"

    def send(self, *a, **k):
        pass


class _FakeSrv:
    executor = None
    token = None
    va_size = 0
    worker = None
    pool = None


def _frame(recs, flags=P.F_SYNC):
    body = b"".join(recs)
    return P.HEADER.pack(P.MAGIC, 1, flags, 3, len(recs), len(body)) + body


def _rec(name, *fixed, blobs=(), routes=()):
    L = layout(SPEC.calls[name])
    body = L.fixed.pack(*fixed)
    for b in blobs:
        body += struct.pack("<I", len(b)) + b
    for r in routes:
        body += struct.pack("<I", r)
    return P.RECORD.pack(SPEC.calls[name].id, 0, 8 + len(body)) + body


def _both(frame: bytes, ncalls: int, sync: bool):
    """(python status, c status, same record boundaries?)"""
    sess = S.ServerSession(_FakeSrv(), _FakeEP(), 1)
    mv = memoryview(bytearray(frame))
    try:
        recs = sess._parse(mv, P.HEADER_SIZE, len(frame), ncalls, sync)
        pst = 0
    except S.FrameError as e:
        recs, pst = None, e.status
    sc = cf.Scanner(S._table())
    buf = ffi.from_buffer(bytearray(frame))
    out = ffi.new("gw_rpc_rec_t[]", max(ncalls, 1))
    cst, msg = sc.scan(ffi.cast("uint8_t *", buf), P.HEADER_SIZE, len(frame), ncalls, sync, out)
    same = True
    if pst == 0 and cst == 0:
        for i, (e, vals, blobs, routes) in enumerate(recs):
            r = out[i]
            same &= r.id == e.call.id and e.fixed.unpack_from(mv, r.fixed) == vals
            same &= [r.route[k] for k in range(e.nroutes)] == routes
    return pst, cst, same


def test_scanner_agrees_with_python_on_valid_frames():
    recs = [_rec("cuMemAlloc", 0x1000, 4096), _rec("cuMemsetD32Async", 0x1000, 5, 16, 0),
            _rec("cuModuleGetFunction", 0x300, 0x301, blobs=[b"noop\0"]),
            _rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b"12345678"]),
            _rec("cuMemcpyDtoHAsync", 0x1000, 16, 0, routes=[P.TAG_BULK_OUT_FIRST]),
            _rec("cuMemcpyDtoH", 0x1000, 16, routes=[0])]
    f = _frame(recs)
    assert _both(f, len(recs), True) == (0, 0, True)


def test_scanner_agrees_with_python_on_fuzzed_frames():
    rng = random.Random(7)
    base = [_rec("cuMemsetD8", 0x1000, 1, 8), _rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b""]),
            _rec("cuMemcpyHtoD", 0x1000, 4, blobs=[b"abcd"]), _rec("gwSync")]
    disagree = 0
    for it in range(2000):
        recs = rng.sample(base[:3], rng.randint(1, 3)) + [base[3]]
        f = bytearray(_frame(recs))
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(P.HEADER_SIZE, len(f))
            if rng.random() < 0.7:
                f[k] = rng.randrange(256)
            else:
                del f[k]
        ncalls = len(recs) + rng.choice([0, 0, 0, -1, 1])
        pst, cst, same = _both(bytes(f), max(ncalls, 0), True)
        if (pst == 0) != (cst == 0) or not same:
            disagree += 1
    assert disagree == 0


def test_dispatch_validates_ranges_and_handles():
    d = cf.Dispatch(SPEC, cf.host_fns([1, 2, 3, 4]))
    mem = np.zeros(4096, np.uint8)
    base = int(mem.ctypes.data)
    d.alloc(base, 4096)
    d.bind("stream", 0x200, type("St", (), {"ptr": 0})())
    recs = [_rec("cuMemsetD32Async", base, 0x01020304, 16, 0x200),
            _rec("cuMemsetD8Async", base + 64, 7, 8, 0),
            _rec("cuMemcpyDtoDAsync", base + 128, base, 64, 1),
            _rec("cuMemsetD32Async", base + 4096, 1, 1, 0),                 # past the end
            _rec("cuMemsetD32Async", base, 1, 1, 0x999),                    # unknown stream
            _rec("cuMemsetD16Async", base + 1, 1, 1, 0),                    # misaligned
            _rec("gwSync")]
    f = bytearray(_frame(recs))
    fc = ffi.from_buffer(f)
    out = ffi.new("gw_rpc_rec_t[]", len(recs))
    sc = cf.Scanner(S._table())
    assert sc.scan(ffi.cast("uint8_t *", fc), P.HEADER_SIZE, len(f), len(recs), True, out)[0] == 0
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 0, len(recs))
    assert (k, res) == (3, P.CUDA_ERROR_INVALID_VALUE) and "not inside an allocation" in msg
    assert (mem[:64].view(np.uint32) == 0x01020304).all() and (mem[64:72] == 7).all()
    assert (mem[128:192] == mem[:64]).all()
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 4, len(recs))
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_HANDLE) and "0x999" in msg
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 5, len(recs))
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_VALUE) and "aligned" in msg
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 6, len(recs))
    assert (k, res) == (0, 0)                                                 # gwSync: back to Python
    d.free(base)
    assert not lib.gw_rpc_range_ok(d.s, base, 1)


def test_dispatch_launch_checks_the_parameter_size():
    d = cf.Dispatch(SPEC, cf.host_fns([0]))
    d.bind("function", 0x300, type("F", (), {"ptr": 0x1234, "size": 8})())
    recs = [_rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b"12345678"]),
            _rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b"1234"]),
            _rec("cuLaunchKernel", 0x301, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b""])]
    f = bytearray(_frame(recs, 0))
    fc = ffi.cast("uint8_t *", ffi.from_buffer(f))
    out = ffi.new("gw_rpc_rec_t[]", 3)
    assert cf.Scanner(S._table()).scan(fc, P.HEADER_SIZE, len(f), 3, False, out)[0] == 0
    n0 = lib.gw_rpc_host_count(0)
    k, res, msg = d.run(fc, out, 0, 3)
    assert (k, res) == (1, P.CUDA_ERROR_INVALID_VALUE) and "8" in msg and lib.gw_rpc_host_count(0) == n0 + 1
    k, res, msg = d.run(fc, out, 2, 3)
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_HANDLE)
    d.unbind("function", 0x300)
    k, res, msg = d.run(fc, out, 0, 3)
    assert res == P.CUDA_ERROR_INVALID_HANDLE


def test_handle_table_survives_churn():
    d = cf.Dispatch(SPEC, {})
    live = {}
    rng = random.Random(3)
    for i in range(20000):
        hid = rng.randrange(0x100, 0x100 + 3000)
        if hid in live and rng.random() < 0.5:
            d.unbind("event", hid)
            del live[hid]
        else:
            live[hid] = rng.randrange(1, 1 << 40)
            d.bind("event", hid, type("E", (), {"ptr": live[hid]})())
    # every live id resolves (through an event-record record with the host driver)
    d2 = cf.Dispatch(SPEC, cf.host_fns([5]))
    for hid, p in live.items():
        d2.bind("event", hid, type("E", (), {"ptr": p})())
    recs = [_rec("cuEventRecord", hid, 0) for hid in list(live)[:500]]
    f = bytearray(_frame(recs, 0))
    fc = ffi.cast("uint8_t *", ffi.from_buffer(f))
    out = ffi.new("gw_rpc_rec_t[]", len(recs))
    assert cf.Scanner(S._table()).scan(fc, P.HEADER_SIZE, len(f), len(recs), False, out)[0] == 0
    k, res, _ = d2.run(fc, out, 0, len(recs))
    assert (k, res) == (len(recs), 0)


# ----------------------------------------------------------------------------- the C server
# Frames the C server (gw_rpc_serve_handler under the transport's Endpoint.serve) can run
# entirely are answered without Python; the others, and those whose calls fail, go on in
# Python. The same calls against a server with GPUWIRE_RPC_C_SERVER=0 ("cpu-py") must
# give the same results and the same errors.

import threading  # noqa: E402

from gpuwire.rpc.protocol import DeferredCudaError  # noqa: E402
from test_rpc_support import close_soon, live_session, start_server, syncs_in_a_thread  # noqa: E402


@pytest.fixture
def inproc():
    """A CPU-executor server in this process (thread isolation), so the test can look at
    its sessions: which frames C answered."""
    srv = S.Server("127.0.0.1:0", executor="cpu", no_auth=True, isolation="thread", cpu_mem_gib=1)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    th.join(timeout=20)


def _connect(addr):
    import gpuwire
    return gpuwire.connect(addr, name="test-c-server")




def test_c_server_answers_hot_frames_without_python(inproc):
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        assert sess.serve_c is not None
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()                                   # stream creation: a Python frame
        c0, p0 = sess.c_frames, sess.frames
        for _ in range(50):
            s.gwSync()
        assert sess.c_frames - c0 == 50 and sess.frames == p0   # all answered in C
        out = np.zeros(1024, np.uint32)
        for i in range(20):
            s.cuMemsetD32Async(d, i, 1024, st)
        s.cuMemsetD32Async(d + 8, 0xABCD, 2, st)
        s.cuMemcpyDtoHAsync(out, d, 4096, st)          # pushed from C
        s.cuStreamSynchronize(st)
        want = np.full(1024, 19, np.uint32)
        want[2:4] = 0xABCD
        assert (out == want).all()
        assert sess.frames == p0 and sess.c_frames > c0 + 50
        # a frame with a call C does not run goes to Python, and C takes over again after
        free, total = s.mem_get_info()
        assert 0 < free <= total
        assert sess.frames == p0 + 1
        c1 = sess.c_frames
        s.cuCtxSynchronize()
        assert sess.c_frames == c1 + 1
    finally:
        s.close()


def _error_script(s):
    """Deferred failures in the middle of frames: a bad memset and a bad D2H push."""
    d = s.alloc(4096)
    st = s.stream()
    s.gwSync()
    out = np.zeros(1024, np.uint32)
    got = []
    s.cuMemsetD32Async(d, 1, 1024, st)
    s.cuMemsetD32Async(d + 8192, 2, 16, st)           # outside every allocation
    s.cuMemsetD32Async(d, 5, 1024, st)                # still runs (as a local driver would)
    s.cuMemsetD32Async(d + 4096, 2, 16, st)           # a later failure
    s.cuMemcpyDtoHAsync(out, d, 4096, st)
    try:
        s.cuStreamSynchronize(st)
    except DeferredCudaError as e:
        got.append((e.result, e.call, e.batch_position, (e.frame_seq - s._seq0) & 0xFFFFFFFF, e.call_seq,
                    e.later_failures, e.surfaced_at,
                    "is not inside an allocation of this session" in e.call_args))
    got.append(bool((out == 5).all()))
    bad = np.zeros(16, np.uint32)
    s.cuMemcpyDtoHAsync(bad, d + 8192, 64, st)         # a push that fails: the client gets no bytes, no hang
    try:
        s.gwSync()
    except DeferredCudaError as e:
        got.append((e.result, e.call, e.batch_position, e.later_failures, e.surfaced_at))
    got.append(s.get_last_error())
    got.append(s.get_last_error())                    # cleared by the first read
    s.cuMemsetD32Async(d, 9, 1024, st)
    s.cuMemcpyDtoHAsync(out, d, 4096, st)
    s.cuStreamSynchronize(st)
    got.append(bool((out == 9).all()))
    # a sync call C runs that fails: stream id never created
    try:
        s.cuStreamSynchronize(0x7777)
    except Exception as e:  # noqa: BLE001 - compared across servers
        got.append((type(e).__name__, getattr(e, "result", None)))
    return got


def test_c_server_errors_match_the_python_server():
    res = {}
    for kind in ("cpu", "cpu-py"):
        srv = start_server(kind)
        try:
            with _settings.override(rpc_flush_us=0):     # batch cuts (positions, seqs) not timing-dependent
                s = srv.connect()
            try:
                res[kind] = _error_script(s)
            finally:
                s.close()
        finally:
            srv.stop()
    c, py = res["cpu"], res["cpu-py"]
    assert c == py
    assert c[0][0] == P.CUDA_ERROR_INVALID_VALUE and c[0][1] == "cuMemsetD32Async" and c[0][5] == 1 and c[0][7]
    assert c[1] is True and c[2][1] == "cuMemcpyDtoHAsync" and c[-2] is True
    assert c[-1] == ("CudaError", P.CUDA_ERROR_INVALID_HANDLE)


def test_c_server_resumes_in_python_after_a_failure(inproc):
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        got = _error_script(s)
        assert got[0][1] == "cuMemsetD32Async" and got[1] is True
        assert sess.c_frames > 0            # frames before/after the failures were C's
        s.gwSync()
        assert sess.latch is None
    finally:
        s.close()


def test_c_server_malformed_frames_get_error_replies(inproc):
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        s.gwSync()
        c0 = sess.c_frames
        gw = SPEC.calls["gwSync"].id
        good = P.RECORD.pack(gw, 0, 8)
        bad = [
            P.HEADER.pack(P.MAGIC, 1, P.F_SYNC, 901, 1, 9) + good,            # body length lies
            P.HEADER.pack(P.MAGIC, 1, P.F_SYNC, 902, 2, 8) + good,            # 2 calls announced
            P.HEADER.pack(P.MAGIC, 1, P.F_SYNC, 903, 1, 8) + P.RECORD.pack(gw, 0, 7),   # short record
            P.HEADER.pack(P.MAGIC, 1, P.F_SYNC, 904, 1, 8) + P.RECORD.pack(60000, 0, 8),  # unknown call
            P.HEADER.pack(0x1234, 1, P.F_SYNC, 905, 1, 8) + good,              # bad magic
            P.HEADER.pack(P.MAGIC, 1, P.F_SYNC | 0x40, 906, 1, 8) + good,     # unknown flag
        ]
        for f in bad:
            s._ep.send(f, tag=P.TAG_REQ)
        s.gwSync()                      # still served; the error replies came first
        assert sess.errors == len(bad)
        assert len(s.protocol_errors) == len(bad)
        assert sess.c_frames == c0 + 1
    finally:
        s.close()


def test_serve_handler_passes_when_disabled():
    """Unit: the handler only answers a frame when enabled and attached; otherwise it
    passes it back untouched (no reply, nothing run)."""
    sc = cf.Serve(cf.Scanner(S._table()), P.TAG_REP)
    frame = _frame([P.RECORD.pack(SPEC.calls["gwSync"].id, 0, 8)])
    buf = ffi.new("uint8_t[]", frame)
    out = ffi.new("gw_rpc_msg_t[32]")
    nout = ffi.new("int *")
    assert lib.gw_rpc_serve_handler(ffi.cast("void *", sc.arg), buf, len(frame), out, 32, nout) == 0
    assert nout[0] == 0 and sc.v.passed == 1 and sc.v.frames == 0


def test_dispatch_launch_passes_kernel_params_at_the_layout_offsets():
    """With the function's parameter layout bound, the C loop launches with kernelParams
    pointing at each parameter inside the frame; without it, the parameter-buffer form."""
    d = cf.Dispatch(SPEC, cf.host_fns([0]))
    F = type("F", (), {"ptr": 0x1234, "size": 16, "layout": [(0, 8), (8, 4)]})
    d.bind("function", 0x300, F())
    d.bind("function", 0x301, type("G", (), {"ptr": 0x1235, "size": 16})())
    params = struct.pack("<QI4x", 0xDEADBEEFCAFE, 77)
    recs = [_rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[params]),
            _rec("cuLaunchKernel", 0x301, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[params])]
    f = bytearray(_frame(recs, 0))
    fc = ffi.cast("uint8_t *", ffi.from_buffer(f))
    out = ffi.new("gw_rpc_rec_t[]", 2)
    assert cf.Scanner(S._table()).scan(fc, P.HEADER_SIZE, len(f), 2, False, out)[0] == 0
    assert d.run(fc, out, 0, 1)[:2] == (1, 0)
    assert [lib.gw_rpc_host_last(i) for i in range(3)] == [1, 0xDEADBEEFCAFE, 77]
    assert d.run(fc, out, 1, 2)[:2] == (1, 0)
    assert lib.gw_rpc_host_last(0) == 2
    # a layout that does not fit the buffer is not used
    d.bind("function", 0x300, type("H", (), {"ptr": 0x1234, "size": 8, "layout": [(0, 8), (8, 4)]})())
    d.run(fc, out, 0, 1)
    assert lib.gw_rpc_host_last(0) != 1
    d.unbind("function", 0x300)
    assert d.run(fc, out, 0, 1)[1] == P.CUDA_ERROR_INVALID_HANDLE


def test_flush_timer_fires_only_for_unsent_batches():
    """The client's C flush timer: returns a batch's frame seq once it is overdue and still
    unsent; a batch sent in time (the seq moved on) never wakes the waiter; stop ends it."""
    import time
    tm = ffi.gc(lib.gw_rpc_timer_new(20_000_000), lib.gw_rpc_timer_free)     # 20 ms
    seqp = lib.gw_rpc_timer_seqp(tm)
    got = []
    th = threading.Thread(target=lambda: [got.append(lib.gw_rpc_timer_wait(tm)) for _ in range(2)])
    seqp[0] = 5
    t0 = time.monotonic()
    lib.gw_rpc_timer_arm(tm, 5)                       # a batch in frame 5 that is never sent
    th.start()
    for _ in range(200):
        if got:
            break
        time.sleep(0.005)
    assert got == [5] and time.monotonic() - t0 >= 0.019
    lib.gw_rpc_timer_arm(tm, 6)                       # frame 6's batch ...
    seqp[0] = 7                                       # ... goes out on its own
    time.sleep(0.06)
    assert got == [5]                                 # no wake-up for it
    lib.gw_rpc_timer_stop(tm)
    th.join(timeout=5)
    assert got == [5, -1]


# ----------------------------------------------------------------------------- the fast sync stub
# gwSync / cuCtxSynchronize / cuStreamSynchronize with nothing batched: one C call
# (gw_rpc_fsync) sends a pre-encoded frame and checks the reply; everything that is not the
# plain answer is read by the Python code of the generated stubs.

from gpuwire.rpc import client as C  # noqa: E402


@pytest.fixture
def fsync_count(monkeypatch):
    n = [0]
    real = C._fsync
    if real is None:
        pytest.skip("gpuwire._rpc has no gw_rpc_fsync")

    def counted(*a):
        r = real(*a)
        if r != 2:                  # 2: the session was busy, nothing sent
            n[0] += 1
        return r
    monkeypatch.setattr(C, "_fsync", counted)
    return n


def test_fast_sync_stub_runs_when_idle_and_falls_back_when_batched(inproc, fsync_count):
    with _settings.override(rpc_flush_us=0):         # batches leave only when the test says so
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        assert isinstance(s, C._FastSync)
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()
        s.cuMemsetD32Async(d, 1, 1024, st)           # one call batched: the generated stub sends both
        s.gwSync()
        assert fsync_count[0] == 1
        s.gwSync()
        s.cuCtxSynchronize()
        st.synchronize()
        s.cuStreamSynchronize(int(st))
        s.cuStreamSynchronize()                      # the NULL stream
        assert fsync_count[0] == 6
        s.cuMemsetD32Async(d, 7, 1024, st)           # batched: the generated stub sends it
        s.cuStreamSynchronize(st)
        assert fsync_count[0] == 6
        out = np.zeros(1024, np.uint32)
        s.cuMemcpyDtoHAsync(out, d, 4096, st)
        s.flush()                                    # nothing batched, one push outstanding
        s.cuStreamSynchronize(st)                    # fast: the reply's push count is waited for
        assert fsync_count[0] == 7 and (out == 7).all()
        # the seq the fast stub sent is the session's: a later batched frame still matches
        s.cuMemsetD32Async(d, 8, 1024, st)
        s.cuMemcpyDtoHAsync(out, d, 4096, st)
        s.gwSync()
        assert (out == 8).all() and s.protocol_errors == []
        with pytest.raises(TypeError):
            s.cuStreamSynchronize("not a stream")
        with pytest.raises(Exception):
            s.cuStreamSynchronize(-1)
    finally:
        s.close()


def test_fast_sync_stub_raises_a_pending_deferred_error(inproc, fsync_count):
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()
        s.cuMemsetD32Async(d + 8192, 2, 16, st)      # outside every allocation
        s.flush()                                    # sent: the sync call below is the fast stub's
        n0 = fsync_count[0]
        with pytest.raises(DeferredCudaError) as ei:
            s.gwSync()
        assert fsync_count[0] == n0 + 1
        e = ei.value
        assert e.call == "cuMemsetD32Async" and e.result == P.CUDA_ERROR_INVALID_VALUE and e.surfaced_at == "gwSync"
        s.gwSync()                                   # reported once
        # a failing sync call itself: its CUresult, through the fast stub
        with pytest.raises(P.CudaError) as ei2:
            s.cuStreamSynchronize(0x7777)
        assert ei2.value.result == P.CUDA_ERROR_INVALID_HANDLE
        assert s.get_last_error() == P.CUDA_ERROR_INVALID_HANDLE
    finally:
        s.close()


def _sync_script(s):
    """Sync calls with and without batched work and errors; what the caller sees."""
    got = _error_script(s)
    d = s.alloc(1 << 16)
    st = s.stream()
    for i in range(5):
        s.gwSync()
        s.cuCtxSynchronize()
        s.cuStreamSynchronize(st)
    s.cuMemsetD8Async(d + (1 << 16), 1, 1, st)
    s.flush()
    try:
        s.cuCtxSynchronize()
    except DeferredCudaError as e:
        got.append((e.result, e.call, e.batch_position, (e.frame_seq - s._seq0) & 0xFFFFFFFF, e.call_seq,
                    e.surfaced_at))
    got.append((s._seq - s._seq0) & 0xFFFFFFFF)      # (frame seqs count from the random first)
    got.append(s._call_seq)
    return got


def test_fast_sync_stub_matches_the_generated_stubs():
    """The same script with GPUWIRE_RPC_C_SYNC on and off (and the C batch flush,
    GPUWIRE_RPC_C_FLUSH, on and off), against the C and the Python server: the same
    results, errors, frame and call sequence numbers."""
    res = {}
    for kind in ("cpu", "cpu-py"):
        srv = start_server(kind)
        try:
            for fast, cflush in ((True, True), (True, False), (False, False)):
                with _settings.override(rpc_c_sync=fast, rpc_c_flush=cflush, rpc_flush_us=0):
                    s = srv.connect()
                    try:
                        assert isinstance(s, C._FastSync) == (fast and C._fsync is not None)
                        assert (getattr(s, "_fl", None) is not None) == (cflush and C._cflush is not None)
                        res[(kind, fast, cflush)] = _sync_script(s)
                    finally:
                        s.close()
        finally:
            srv.stop()
    vals = list(res.values())
    assert all(v == vals[0] for v in vals), res
    assert vals[0][-3][1] == "cuMemsetD8Async"


def test_fast_sync_stub_shares_a_session_between_threads():
    """The fast stub runs without the session lock (its C call takes the wire lock): threads
    that sync in a tight loop while others batch, push D2H copies and sync on the same
    session. Every frame goes out in seq order (no protocol error), each thread reads back
    its own values, and every sync covers what its thread issued before it."""
    srv = start_server("cpu")
    try:
        with _settings.override(rpc_flush_us=50):
            s = srv.connect()
        try:
            errs = []
            n_fast = [0]

            def worker(k):
                try:
                    st = s.stream()
                    d = s.alloc(4096)
                    out = np.zeros(1024, np.uint32)
                    for i in range(150):
                        v = k * 100_000 + i
                        s.cuMemsetD32Async(d, v, 1024, st)
                        if i % 3 == 0:
                            s.cuStreamSynchronize(st)
                            s.copy_to_host(out, d)
                        else:
                            s.cuMemcpyDtoHAsync(out, d, 4096, st)
                            s.flush() if i % 2 else None
                            (s.gwSync if i % 3 == 1 else s.cuCtxSynchronize)()
                            s.cuStreamSynchronize(st)
                        if not (out == v).all():
                            errs.append(f"thread {k} step {i}: read {int(out[0])}, wrote {v}")
                            return
                except BaseException as e:   # noqa: BLE001 - reported by the main thread
                    errs.append(e)

            def syncer():
                try:
                    for _ in range(1500):
                        s.gwSync()
                        s.cuStreamSynchronize()
                        n_fast[0] += 2
                except BaseException as e:   # noqa: BLE001
                    errs.append(e)

            ths = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
            ths += [threading.Thread(target=syncer) for _ in range(2)]
            for th in ths:
                th.start()
            for th in ths:
                th.join(timeout=120)
            assert not any(th.is_alive() for th in ths), "a thread hung"
            assert errs == [] and s.protocol_errors == []
            assert n_fast[0] == 6000
            seq = s._seq
            s.gwSync()                                # still in step with the server
            assert s._seq == (seq + 1) & 0xFFFFFFFF
        finally:
            s.close()
    finally:
        srv.stop()


def test_c_batch_flush_cycles_the_frame_ring():
    """Batches sent by gw_rpc_flush: many more frames than the ring has buffers (each buffer
    reused only once its send completed), pushes posted with their frame, a timer flush,
    and a sync frame with bulk data sent from Python between C flushes: every value
    arrives, in order, and the seqs match the server's."""
    import time
    srv = start_server("cpu")
    try:
        with _settings.override(rpc_flush_us=2000, rpc_batch_calls=4, rpc_batch_first=1):
            s = srv.connect()
        try:
            if getattr(s, "_fl", None) is None:
                pytest.skip("no C batch flush in this build")
            nfr = len(s._frames)
            d = s.alloc(1 << 20)
            st = s.stream()
            outs = []
            for i in range(12 * nfr):
                s.cuMemsetD32Async(d + 4096 * (i % 64), i, 1024, st)
                if i % 5 == 0:
                    o = np.zeros(1024, np.uint32)
                    s.cuMemcpyDtoHAsync(o, d + 4096 * (i % 64), 4096, st)
                    outs.append((i, o))
                if i % 17 == 0:                  # a sync copy with bulk data: a Python send
                    big = np.full(1 << 17, i, np.uint32)
                    s.cuMemcpyHtoD(d + (1 << 19), big, big.nbytes)
            s.cuMemsetD32Async(d, 77, 1, st)     # left to the flush timer
            time.sleep(0.05)
            s.cuStreamSynchronize(st)
            for i, o in outs:
                assert (o == i).all(), i
            back = np.zeros(1 << 17, np.uint32)
            s.cuMemcpyDtoH(back, d + (1 << 19), back.nbytes)
            assert (back == (12 * nfr - 1) // 17 * 17).all()
            one = np.zeros(1, np.uint32)
            s.cuMemcpyDtoH(one, d, 4)
            assert one[0] == 77 and s.protocol_errors == []
        finally:
            s.close()
    finally:
        srv.stop()


def test_fast_sync_stub_reports_a_lost_server():
    srv = start_server("cpu")
    try:
        s = srv.connect()
        s.gwSync()
    finally:
        srv.stop()
    try:
        with pytest.raises((P.SessionClosed, Exception)) as ei:
            for _ in range(3):
                s.gwSync()
        assert not isinstance(ei.value, AssertionError)
    finally:
        try:
            s.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- bulk H2D copies
# The GPU executor leaves an async H2D copy's last chunk(s) pending until the session's next
# call (rpc_gpu_h2d_overlap): checked here for content across chunk boundaries and odd sizes,
# ordering against later calls on the stream, and errors, on every executor (the CPU ones
# receive straight into memory and give the reference behaviour).

from test_rpc_support import EXECUTORS  # noqa: E402

_H2D_KINDS = EXECUTORS + [pytest.param("gpu-no-overlap", marks=pytest.mark.gpu)]


def _h2d_script(s):
    chunk = s._chunk or (4 << 20)
    sizes = [1000, (64 << 10) + 1, chunk - 7, chunk, chunk + 3, 2 * chunk + 1, 1, 3 * chunk - 5, 70000]
    total = sum(sizes) + 64
    rng = np.random.default_rng(7)
    host = s.pinned(total)
    host[:] = rng.integers(0, 256, total, dtype=np.uint8)
    plain = rng.integers(0, 256, total, dtype=np.uint8)      # not registered: sent and waited for
    d = s.alloc(total)
    st = s.stream()
    want = np.zeros(total, np.uint8)
    s.cuMemsetD8Async(d, 0, total, st)
    off = 0
    for i, n in enumerate(sizes):
        src = host if i % 3 != 2 else plain
        s.cuMemcpyHtoDAsync(d + off, src[off:off + n], n, st)
        want[off:off + n] = src[off:off + n]
        if i % 4 == 1:        # a memset right after a copy on the same stream runs after it
            s.cuMemsetD8Async(d + off + n // 2, 0xAB, min(5, n - n // 2), st)
            want[off + n // 2:off + n // 2 + min(5, n - n // 2)] = 0xAB
        off += n
    # a sync copy over part of an async one, then an async copy over that
    s.cuMemcpyHtoD(d + 10, plain[:chunk + 1], chunk + 1)
    want[10:10 + chunk + 1] = plain[:chunk + 1]
    s.cuMemcpyHtoDAsync(d + 20, host[:7], 7, st)
    want[20:27] = host[:7]
    s.cuStreamSynchronize(st)
    out = np.zeros(total, np.uint8)
    s.cuMemcpyDtoH(out, d, total)
    got = [bool((out == want).all()), int(np.flatnonzero(out != want)[:1].sum()) if (out != want).any() else -1]
    # a copy outside the allocation: a deferred error naming it; the copies after it still run
    big = 2 * chunk + 9
    s.cuMemcpyHtoDAsync(d + total - 8, host[:big], big, st)
    s.cuMemcpyHtoDAsync(d, host[5:5 + big], big, st)
    try:
        s.cuStreamSynchronize(st)
        got.append(None)
    except DeferredCudaError as e:
        got.append((e.call, e.result, e.later_failures))
    s.cuMemcpyDtoH(out, d, big)
    got.append(bool((out[:big] == host[5:5 + big]).all()))
    s.gwSync()
    return got


@pytest.mark.parametrize("kind", _H2D_KINDS)
def test_async_h2d_copies_keep_content_order_and_errors(kind):
    if kind == "gpu-no-overlap":
        srv = start_server("gpu", env={"GPUWIRE_RPC_GPU_H2D_OVERLAP": "0"})
    else:
        srv = start_server(kind)
    try:
        with _settings.override(rpc_flush_us=0):
            s = srv.connect()
        try:
            got = _h2d_script(s)
        finally:
            s.close()
    finally:
        srv.stop()
    assert got[0] is True, f"first differing byte at {got[1]}"
    assert got[2] == ("cuMemcpyHtoDAsync", P.CUDA_ERROR_INVALID_VALUE, 0)
    assert got[3] is True


def test_c_server_deferred_pushes_keep_their_bytes(inproc):
    """Pushes from C go out as deferred sends from alternating halves of the scratch buffer
    (the serve loop's GW_MSG_DEFER): back-to-back frames, each copying different bytes, must
    each deliver their own bytes, at odd sizes up to the half's capacity and beyond it (then
    Python pushes)."""
    with _settings.override(rpc_flush_us=0):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        n_max = 3 << 20
        d = s.alloc(n_max)
        st = s.stream()
        s.gwSync()
        sizes = [4, 1001, (64 << 10) + 3, (256 << 10) - 1, (512 << 10) - 64, (512 << 10) + 1, 3 << 20]
        outs = []
        c0 = sess.c_frames
        for rnd in range(3):
            for i, n in enumerate(sizes):
                val = (rnd * 16 + i + 1) & 0xFF
                s.cuMemsetD8Async(d, val, n, st)
                o = np.zeros(n, np.uint8)
                s.cuMemcpyDtoHAsync(o, d, n, st)
                s.flush()                       # its own frame: the next one is copied while it is sent
                outs.append((o, val))
        s.cuStreamSynchronize(st)
        bad = [(k, int(o[0]), v) for k, (o, v) in enumerate(outs) if not (o == v).all()]
        assert bad == []
        assert sess.c_frames - c0 >= 3 * 5       # the ones that fit a half went through C
    finally:
        s.close()


def test_flush_timer_stays_awake_one_delay_after_a_batch():
    """After a batch the timer waits one more delay without sleeping untimed: an arm in that
    window needs no wake-up (no futex wake on the client's path, e.g. a training loop's next
    step) and is still flushed on time; after an idle delay an arm wakes it again."""
    import time
    tm = ffi.gc(lib.gw_rpc_timer_new(30_000_000), lib.gw_rpc_timer_free)     # 30 ms
    seqp = lib.gw_rpc_timer_seqp(tm)
    got = []
    th = threading.Thread(target=lambda: [got.append(lib.gw_rpc_timer_wait(tm)) for _ in range(3)])
    th.start()
    time.sleep(0.05)                                  # the waiter is asleep, untimed
    seqp[0] = 1
    lib.gw_rpc_timer_arm(tm, 1)
    assert lib.gw_rpc_timer_signals(tm) == 1          # it had to be woken
    seqp[0] = 2                                       # frame 1 goes out on its own
    time.sleep(0.01)                                  # the waiter saw it sent (or waits for its due
    t0 = time.monotonic()                             # time): either way awake, not idle
    lib.gw_rpc_timer_arm(tm, 2)                       # the next batch, never sent
    assert lib.gw_rpc_timer_signals(tm) == 1          # no wake-up needed ...
    for _ in range(400):
        if got:
            break
        time.sleep(0.002)
    assert got == [2] and 0.028 <= time.monotonic() - t0 < 1.0   # ... and flushed on time
    seqp[0] = 3
    time.sleep(0.2)                                   # idle beyond the window (4 delays): asleep untimed
    lib.gw_rpc_timer_arm(tm, 3)
    assert lib.gw_rpc_timer_signals(tm) == 2
    for _ in range(400):
        if len(got) == 2:
            break
        time.sleep(0.002)
    assert got == [2, 3]
    lib.gw_rpc_timer_stop(tm)
    th.join(timeout=5)
    assert got == [2, 3, -1]


def test_flush_timer_wakes_once_per_delay_while_batches_go_out_on_their_own():
    """A loop whose period is the delay and whose batches are sent promptly (a training loop:
    three batches a step, then a sync): the waiter runs about once per delay (it deals with
    the latest batch when it wakes, and lingers from there), never flushes, and the arms need
    no wake-up. The arms take no lock the waiter holds (gw_rpc_timer_arm is lock-free)."""
    import time
    delay = 0.004
    tm = ffi.gc(lib.gw_rpc_timer_new(int(delay * 1e9)), lib.gw_rpc_timer_free)
    seqp = lib.gw_rpc_timer_seqp(tm)
    got = []
    th = threading.Thread(target=lambda: got.append(lib.gw_rpc_timer_wait(tm)))
    th.start()
    try:
        seq = 1
        seqp[0] = seq
        lib.gw_rpc_timer_arm(tm, seq)                 # wakes the idle waiter once
        steps = 60
        t0 = time.monotonic()
        for i in range(steps):
            for _ in range(3):
                lib.gw_rpc_timer_arm(tm, seq)
                seq += 1
                seqp[0] = seq                         # sent at once
            time.sleep(max(0.0, t0 + (i + 1) * delay - time.monotonic()))
        elapsed = time.monotonic() - t0
        wakes = [lib.gw_rpc_timer_wakes(tm, k) for k in range(3)]
        assert got == []                              # nothing was overdue
        assert lib.gw_rpc_timer_signals(tm) <= 2      # the loop's arms needed no wake-up
        # one wake-up per delay (two per delay before: at the due time, then after lingering)
        assert sum(wakes) <= elapsed / delay * 1.3 + 3, (wakes, elapsed / delay)
    finally:
        lib.gw_rpc_timer_stop(tm)
        th.join(timeout=5)
    assert got == [-1]


def test_flush_timer_arm_does_not_lose_a_wake_up_to_a_waiter_going_idle():
    """Arms racing the waiter's move to its untimed sleep: every batch left unsent is still
    flushed (the idle handshake of the lock-free arm loses no wake-up)."""
    import time
    tm = ffi.gc(lib.gw_rpc_timer_new(200_000), lib.gw_rpc_timer_free)      # 0.2 ms
    seqp = lib.gw_rpc_timer_seqp(tm)
    got = []
    th = threading.Thread(target=lambda: [got.append(lib.gw_rpc_timer_wait(tm)) for _ in range(40)])
    th.start()
    try:
        for seq in range(1, 41):
            seqp[0] = seq
            time.sleep(0.0002 * (seq % 4))            # arms at varying points of the waiter's linger
            lib.gw_rpc_timer_arm(tm, seq)             # never sent: must be flushed
            end = time.monotonic() + 5
            while len(got) < seq and time.monotonic() < end:
                time.sleep(0.0002)
            assert got[-1:] == [seq], (seq, got[-3:])
    finally:
        lib.gw_rpc_timer_stop(tm)
        th.join(timeout=5)


def test_fast_sync_stub_keeps_the_flush_timers_seq(inproc, fsync_count):
    """The fast stub's C call stores the next frame seq in the flush timer's cell: a batch
    started after fast syncs is still flushed by the timer (a stale cell would read as sent)."""
    import time
    with _settings.override(rpc_flush_us=20_000):    # 20 ms
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()
        for _ in range(5):
            s.gwSync()
        assert fsync_count[0] == 6 and s._tseq is not None and s._tseq[0] == s._seq
        n0 = sess.c_frames + sess.frames
        s.cuMemsetD32Async(d, 9, 1024, st)           # batched; only the timer sends it
        for _ in range(250):
            if sess.c_frames + sess.frames > n0:
                break
            time.sleep(0.004)
        assert sess.c_frames + sess.frames == n0 + 1
        out = np.zeros(1024, np.uint32)
        s.copy_to_host(out, d)
        assert (out == 9).all() and s.protocol_errors == []
    finally:
        s.close()


def test_training_step_frames_and_loss_readback(inproc):
    """A training step (memset, 11 launches, the loss D2H, a stream sync; the bench's MLP on
    the CPU executor) goes out as the batch ramp says: ramp frames, then the last batch with
    the D2H and the sync in one frame, so one round trip per step; the loss read back with
    the sync equals numpy's for the same step."""
    from gpuwire.bench import rpc as R
    B, I, H, O = 8, 4, 6, 2
    with _settings.override(rpc_flush_us=0, rpc_batch_first=2, rpc_batch_calls=64):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        ptx = R.find_ptx(None).read_bytes()
        mod = s.load_module(ptx)
        fns = {k: mod.function(k) for k in R.MLP_KERNELS}
        bufs = {k: s.alloc(4 * n) for k, n in R._mlp_buffers(B, I, H, O).items()}
        init = R._mlp_init(B, I, H, O)
        for k, v in init.items():
            s.copy_to_device(bufs[k], v)
        st = s.stream()
        plan = [(fns[n].handle, g, fns[n].pack([bufs[a] if isinstance(a, str) else a for a in args]))
                for n, g, args in R._mlp_plan(B, I, H, O)]
        loss = np.zeros(1, np.float32)
        s.gwSync()
        want_frames = 0
        left, at = len(plan) + 3, 2               # memset + launches + D2H + sync
        while left > at:                          # ramp: 2, 4, 8, ... then the rest with the sync
            want_frames, left, at = want_frames + 1, left - at, at * 2
        want_frames += 1
        losses = []
        for _ in range(3):
            f0, n0 = s._seq, sess.c_frames + sess.frames
            issue, sync, frames = R._mlp_remote_parts(s, st, plan, loss, bufs["loss"])
            assert frames == want_frames == (s._seq - f0)
            assert sess.c_frames + sess.frames - n0 == want_frames
            losses.append(float(loss[0]))
        x, t_ = init["x"], init["t"]
        h = np.maximum(x @ init["W1"] + init["b1"], 0)
        y = h @ init["W2"] + init["b2"]
        assert losses[0] == pytest.approx(float(((y - t_) ** 2).mean()), rel=1e-4)
        assert losses[2] < losses[0]              # the SGD updates ran between the readbacks
    finally:
        s.close()


# ----------------------------------------------------------------------------- review fixes
def _failing_wait(fl, fail_at):
    """Replace the flusher's gw_wait by one that makes the real wait and then reports the
    send it waited for as failed (a connection reset), the ``fail_at``-th time."""
    real = ffi.cast("int(*)(void *, void *, int64_t)", fl.wait)
    n = [0]

    def wait(worker, req, tmo):
        rc = real(worker, req, tmo)
        n[0] += 1
        return -25 if n[0] == fail_at else rc       # UCS_ERR_CONNECTION_RESET
    cb = ffi.callback("int(void *, void *, int64_t)", wait)
    fl.wait = ffi.cast("void *", cb)
    return cb, n


def test_c_batch_flush_failure_after_the_send_loses_no_call_silently(inproc):
    """gw_rpc_flush sent the frame, then waiting for the next frame buffer's previous send
    failed (that earlier frame may not have arrived): the error is raised, and afterwards the
    session neither writes into a frame buffer still in flight nor sends a frame whose header
    disagrees with its body: a later call either runs (and its bytes arrive) or raises."""
    with _settings.override(rpc_flush_us=0, rpc_batch_calls=1, rpc_batch_first=1):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        if getattr(s, "_fl", None) is None:
            pytest.skip("no C batch flush in this build")
        d = s.alloc(1 << 16)
        st = s.stream()
        s.gwSync()
        keep = _failing_wait(s._fl, 1)
        raised = []
        for i in range(2 * len(s._frames)):          # one call per frame: the ring wraps
            try:
                s.cuMemsetD32Async(d + 4 * i, i + 1, 1, st)
            except Exception as e:                  # noqa: BLE001 - checked below
                raised.append(e)
                break
        assert raised, "the failed wait for a frame buffer was not reported"
        out = np.zeros(4, np.uint32)
        try:
            s.cuMemsetD32Async(d + 4096, 1234, 4, st)
            s.cuMemcpyDtoH(out, d + 4096, 16)
        except P.SessionClosed:
            return                                   # refused clearly: nothing lost silently
        assert (out == 1234).all() and s.protocol_errors == [], (out, s.protocol_errors)
        del keep
    finally:
        s.close()


@pytest.mark.parametrize("c_flush", [False, True])
def test_python_batch_flush_failure_after_the_send_loses_no_call_silently(inproc, c_flush):
    """The same when the next frame buffer's earlier send was made from Python (a sync frame
    with bulk data) and waiting for it raises: on the Python flush path (rpc_c_flush off) and
    after a C flush that sent the frame."""
    from gpuwire import transport as t

    class _FailedSend:
        def wait(self, timeout=None):
            raise t.ConnectionLost("server", "injected: an earlier frame's send failed")

    with _settings.override(rpc_flush_us=0, rpc_batch_calls=1, rpc_batch_first=1, rpc_c_flush=c_flush):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        if c_flush and getattr(s, "_fl", None) is None:
            pytest.skip("no C batch flush in this build")
        assert (getattr(s, "_fl", None) is not None) == c_flush
        d = s.alloc(1 << 16)
        st = s.stream()
        s.gwSync()
        s._frames[(s._fi + 1) % len(s._frames)].req = _FailedSend()
        with pytest.raises(Exception):
            s.cuMemsetD32Async(d, 5, 1, st)           # flushed at once (a batch of one)
        _later_calls_fail_closed_or_run(s, lambda: s.cuMemsetD32Async(d + 4096, 1234, 4, st), d + 4096)
    finally:
        s.close()


def _later_calls_fail_closed_or_run(s, set_1234, at):
    """After a failed send: the next calls either raise SessionClosed or really run (a
    memset of 1234 read back), never vanish silently."""
    out = np.zeros(4, np.uint32)
    try:
        set_1234()
        s.cuMemcpyDtoH(out, at, 16)
    except P.SessionClosed:
        return
    assert (out == 1234).all() and s.protocol_errors == [], (out, s.protocol_errors)


def test_fast_sync_stub_counts_the_seq_of_every_attempted_call():
    """gw_rpc_fsync_w: a transport status that happens to equal the stub's own 'bad
    configuration' code (-22 is UCS_ERR_UNSUPPORTED) still used the frame seq and the call
    count (the frame may have gone out); only a bad configuration leaves them. Either way the
    wire lock stays held for Python to read the status and release it."""
    w = ffi.gc(lib.gw_rpc_wire_new(), lib.gw_rpc_wire_free)
    seqp, csp = lib.gw_rpc_wire_seqp(w), lib.gw_rpc_wire_call_seqp(w)
    seqp[0] = 41
    rep = ffi.new("uint8_t[]", 64)
    calls = [0]

    def call(conn, tag, sbuf, slen, rtag, rbuf, rcap, tmo, rlen):
        calls[0] += 1
        return -22
    cb = ffi.callback("int(void *, uint32_t, const void *, size_t, uint32_t, void *, size_t, int64_t, size_t *)",
                      call)
    f = ffi.new("gw_rpc_fsync_t *")
    f.call = ffi.cast("void *", cb)
    f.conn = ffi.cast("void *", 1)
    f.rep, f.rep_cap, f.len, f.wire = rep, 64, 24, w
    assert lib.gw_rpc_fsync_w(f, 0) == -22 and calls[0] == 1
    lib.gw_rpc_wire_unlock(w)
    assert (seqp[0], csp[0]) == (42, 1)
    f.len = 7                                   # a bad configuration: nothing sent, nothing used
    assert lib.gw_rpc_fsync_w(f, 0) == -22 and calls[0] == 1
    lib.gw_rpc_wire_unlock(w)
    assert (seqp[0], csp[0]) == (42, 1)


@pytest.mark.parametrize("c_flush", [False, True])
def test_sync_frame_with_bulk_data_failure_after_the_send_loses_no_call_silently(inproc, c_flush):
    """A sync frame with bulk data went out from Python, then waiting for the next frame
    buffer's earlier send raised: the error is raised, and later calls neither write into the
    buffer in flight nor read that frame's reply as theirs."""
    from gpuwire import transport as t

    class _StuckSend:
        def wait(self, timeout=None):
            raise t.OperationTimeout("injected: an earlier frame's send did not complete")

    with _settings.override(rpc_flush_us=0, rpc_c_flush=c_flush):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        d = s.alloc(1 << 20)
        s.gwSync()
        s._frames[(s._fi + 1) % len(s._frames)].req = _StuckSend()
        with pytest.raises(Exception):
            # a sync call whose argument travels as a bulk payload (above rpc_inline_max)
            s.gwFileStat("/" + "x" * (200 << 10))
        _later_calls_fail_closed_or_run(s, lambda: s.cuMemsetD32(d + 4096, 1234, 4), d + 4096)
    finally:
        s.close()


def _one_sync_times_out(s, stub):
    """Make one gwSync on ``s`` time out: a 1 ns timeout while the server is kept busy by a
    64 MiB memset sent just before (a CPU-executor memset takes milliseconds, so the sync's
    reply cannot arrive within the first deadline check; a 1 ns timeout alone was not
    enough: the wait checks the clock only every 16 progress calls, and a fast loopback
    reply sometimes came first). Returns whether the sync raised OperationTimeout."""
    from gpuwire import transport as t
    big = s.alloc(64 << 20)
    st = s.stream()
    calls_before = []
    if stub == "fast":
        real = C._fsync

        def counted(*a):
            calls_before.append(1)
            return real(*a)
        C._fsync = counted
    try:
        for _ in range(5):
            s.cuMemsetD32Async(big, 3, (64 << 20) // 4, st)
            s.flush()
            if stub == "fast":
                f = s._fs_gwSync
                tmo, f.timeout_ns = f.timeout_ns, 1
            else:
                tmo, s._timeout = s._timeout, 1e-9
                s._frame.calls.clear()               # (prepared calls carry their timeout)
            try:
                s.gwSync()
            except t.OperationTimeout:
                if stub == "fast":
                    assert calls_before, "the fast stub was not used"
                return True
            finally:
                if stub == "fast":
                    f.timeout_ns = tmo
                else:
                    s._timeout = tmo
                    s._frame.calls.clear()
        return False
    finally:
        if stub == "fast":
            C._fsync = real


@pytest.mark.parametrize("stub", ["fast", "generated"])
def test_a_sync_call_that_timed_out_does_not_shift_later_replies(inproc, stub):
    """A sync call whose reply did not come within its timeout raises OperationTimeout; its
    reply arrives later. The next sync calls must not take that reply for theirs (before:
    every later call raised 'reply for frame N, expected N+1'): it is dropped (noted in
    protocol_errors) and the session goes on in step."""
    with _settings.override(rpc_flush_us=0, rpc_c_sync=(stub == "fast")):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        d = s.alloc(4096)
        s.gwSync()
        assert _one_sync_times_out(s, stub)
        import time
        time.sleep(0.2)                              # the late reply is in
        out = np.zeros(4, np.uint32)
        for v in (5, 6, 7):
            s.cuMemsetD32(d, v, 4)
            s.cuMemcpyDtoH(out, d, 16)
            assert (out == v).all()
            s.gwSync()
        # (0 when the 1 ns timeout ended the call before its frame went out: no late reply)
        assert len(s.protocol_errors) <= 1 and all("timed out" in x for x in s.protocol_errors), \
            s.protocol_errors
    finally:
        s.close()


def test_a_dropped_late_reply_does_not_cut_the_next_reply_tail(inproc):
    """After a late reply was dropped, the sync call reads its own reply with that reply's
    length: small D2H results carried in the reply tail arrive (before: the dropped reply's
    length was used and the tail was refused as truncated)."""
    with _settings.override(rpc_flush_us=0, rpc_c_sync=False):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        if not s._tail_max:
            pytest.skip("the server offers no reply tail")
        d = s.alloc(4096)
        st = s.stream()
        s.cuMemsetD32Async(d, 77, 1024, st)
        s.gwSync()
        assert _one_sync_times_out(s, "generated")
        import time
        time.sleep(0.2)
        out = np.zeros(64, np.uint32)
        s.cuMemcpyDtoHAsync(out, d, out.nbytes, st)     # small: into the sync reply's tail
        s.cuStreamSynchronize(st)
        assert (out == 77).all()
        assert len(s.protocol_errors) <= 1, s.protocol_errors
    finally:
        s.close()






def test_an_interrupt_as_the_fast_stub_returns_does_not_leave_the_wire_locked(inproc, monkeypatch):
    """KeyboardInterrupt (Ctrl-C) is raised as a C call returns. When gw_rpc_fsync_w returned
    with the wire lock held (a reply for Python to read), the lock must still be released:
    before, every later call on the session (and close()) waited for it forever."""
    real = C._fsync

    def interrupted(*a):
        r = real(*a)
        if r == 1:
            raise KeyboardInterrupt
        return r
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()
        s.cuMemsetD32Async(d + 8192, 2, 16, st)      # outside every allocation: a deferred error
        s.flush()
        monkeypatch.setattr(C, "_fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            s.gwSync()                               # the reply carries the report: returns 1
        monkeypatch.setattr(C, "_fsync", real)
        assert syncs_in_a_thread(s), "the wire lock was left held"
    finally:
        close_soon(s)


def test_an_interrupt_as_the_wire_lock_is_taken_does_not_leave_it_locked(inproc, monkeypatch):
    """The same for the Python paths that take the wire lock (a sync round trip here)."""
    class _Lib:
        def __init__(self, lib_):
            self._l = lib_

        def __getattr__(self, k):
            return getattr(self._l, k)

        def gw_rpc_wire_lock(self, w):
            self._l.gw_rpc_wire_lock(w)
            raise KeyboardInterrupt

    with _settings.override(rpc_flush_us=0, rpc_c_sync_batch=False):
        s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        d = s.alloc(4096)
        s.gwSync()
        s.cuMemsetD32Async(d, 1, 16, 0)              # batched: the generated stub's round trip
        monkeypatch.setattr(C, "_rpc_lib", _Lib(C._rpc_lib))
        with pytest.raises(KeyboardInterrupt):
            s.gwSync()
        monkeypatch.setattr(C, "_rpc_lib", C._rpc_lib._l)
        assert syncs_in_a_thread(s), "the wire lock was left held"
    finally:
        close_soon(s)
