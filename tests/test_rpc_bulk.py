"""Bulk copies in the C server (gw_rpc_bulk_*, setting rpc_c_bulk): frames of async H2D copies
have their payloads received into a ring of staging slots and settled lazily (when the ring
comes round, before any other frame runs, before a frame goes to Python); frames of async D2H
copies are copied into the slots and sent from C. Checked here: the bytes (checksums over odd
sizes, chunk boundaries and copies larger than the ring), ordering against later calls on the
same stream, errors (bad ranges, short and long payloads found only when a slot is settled),
the same results as the Python server, and a session that ends with payloads still pending.

The CPU executor runs the same C code with host memcpy for the driver copies; with
rpc_cpu_chunk set its payloads travel in chunks like the GPU executor's."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from gpuwire import settings as _settings
from gpuwire.rpc import protocol as P
from gpuwire.rpc.executors import _cfast as cf
from gpuwire.rpc.executors import cpu as _cpu  # noqa: F401 - registers rpc_cpu_chunk
from gpuwire.rpc.protocol import DeferredCudaError
from test_rpc_support import inproc_server, live_session, start_server, wait_until

pytestmark = pytest.mark.skipif(not cf.available(), reason="gpuwire._rpc is not built")

CHUNK = 64 << 10


def _server(**over):
    """A CPU-executor server in this process, payloads in 64 KiB chunks, with these settings."""
    return inproc_server(dict(rpc_cpu_chunk=CHUNK, rpc_flush_us=0, **over))


@contextlib.contextmanager
def _server_session(**over):
    """(server, client session, its server-side session) on a _server(**over)."""
    with _server(**over) as srv:
        s = _connect(f"127.0.0.1:{srv.port}")
        try:
            yield srv, s, live_session(srv)
        finally:
            s.close()


@pytest.fixture
def inproc():
    """A CPU-executor server in this process (payloads in 64 KiB chunks, a ring of 3 slots,
    D2H frames from 64 KiB through the ring)."""
    with _server(rpc_c_bulk_slots=3, rpc_c_bulk_dtoh_min=64 << 10) as srv:
        yield srv


def _connect(addr):
    import gpuwire
    return gpuwire.connect(addr, name="test-bulk")




# all above rpc_inline_max (64 KiB): smaller copies travel inside the frame (Python's path)
SIZES = [CHUNK * 3 + 5,          # one copy = the whole ring
         70000, CHUNK + 1, 2 * CHUNK,
         CHUNK * 5 + 17,         # more chunks than slots: the copy cycles through the ring
         100003, 1 << 20]


def _copy_script(s, sizes=SIZES):
    """Async H2D copies from pinned memory on one stream, memsets after some of them (they
    must land on top), then async D2H copies back (their own frames), checksums compared."""
    total = sum(sizes)
    rng = np.random.default_rng(11)
    host = s.pinned(total)
    host[:] = rng.integers(0, 256, total, dtype=np.uint8)
    d = s.alloc(total)
    st = s.stream()
    s.cuMemsetD8Async(d, 0x5A, total, st)
    s.gwSync()
    want = host.copy()
    off = 0
    for i, n in enumerate(sizes):
        s.cuMemcpyHtoDAsync(d + off, host[off:off + n], n, st)
        if i % 3 == 1:             # a later call on the same stream runs after the copy
            s.cuMemsetD8Async(d + off + n // 3, 0xC3, 11, st)
            want[off + n // 3:off + n // 3 + 11] = 0xC3
        off += n
    out = np.zeros(total, np.uint8)
    off = 0
    for n in sizes:
        s.cuMemcpyDtoHAsync(out[off:off + n], d + off, n, st)
        s.flush()
        off += n
    s.cuStreamSynchronize(st)
    bad = np.flatnonzero(out != want)
    return int(bad[0]) if bad.size else -1, int(out.astype(np.uint64).sum()), int(want.astype(np.uint64).sum())


@pytest.mark.parametrize("progress", [False, True, "thread"])
def test_c_bulk_copies_keep_bytes_and_stream_order(inproc, progress):
    """rpc_bulk_progress: the client drives its transport after each payload / push posting
    (read at each copy), or the worker's progress thread does ('thread'); the bytes are the
    same every way."""
    s = _connect(f"127.0.0.1:{inproc.port}")
    w = s._w
    calls = [0]
    real = w.progress

    def counted():
        calls[0] += 1
        return real()
    try:
        w.progress = counted
    except AttributeError:          # pragma: no cover - a Worker without instance attributes
        pytest.skip("cannot count Worker.progress calls")
    seen = {}
    close = s.close

    def close_and_note():               # (the helper closes the session: read the thread first)
        seen.update(w.progress_thread_stats())
        close()
    s.close = close_and_note
    with _settings.override(rpc_bulk_progress=progress):
        _copies_keep_bytes_and_stream_order(inproc, s)
    st = seen
    assert (calls[0] > 0) == (progress is True)
    if progress == "thread":
        assert st["running"] == 1 and st["requests"] > 0   # (it drove the payloads and pushes)


def test_bulk_progress_auto_follows_the_data_path(inproc):
    """rpc_bulk_progress=auto (the default): on unless the connection's data lanes are all
    shared memory; the setting's on/off spellings parse, anything else is refused by name."""
    from gpuwire.rpc import client as C
    assert C._shm_only("posix/memory,sysv/memory,cma/memory") and C._shm_only("cma/memory")
    assert not C._shm_only("tcp/lo") and not C._shm_only("posix/memory,tcp/lo") and not C._shm_only("")
    for raw, want in ((True, "on"), ("1", "on"), ("off", "off"), (False, "off"), ("AUTO", "auto")):
        with _settings.override(rpc_bulk_progress=raw):
            assert _settings.get("rpc_bulk_progress") == want
    with _settings.override(rpc_bulk_progress="THREAD"):
        assert _settings.get("rpc_bulk_progress") == "thread"
    with pytest.raises(ValueError, match="GPUWIRE_RPC_BULK_PROGRESS.*expected auto, thread, on"):
        with _settings.override(rpc_bulk_progress="sometimes"):
            pass
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        with _settings.override(rpc_bulk_progress="auto"):
            assert s._bulk_progress() == (not C._shm_only(s._ep.transports))
        with _settings.override(rpc_bulk_progress="off"):
            assert s._bulk_progress() is False
    finally:
        s.close()


def _copies_keep_bytes_and_stream_order(inproc, s):
    try:
        sess = live_session(inproc)
        assert sess.bulk_c is not None and sess.chunk == CHUNK
        first_bad, got, want = _copy_script(s)
        assert first_bad == -1 and got == want
        st = sess.bulk_c.stats()
        assert st["h2d"] == len(SIZES)          # every copy ran in C
        assert st["d2h"] == len(SIZES)
        assert st["pending"] == 0               # the sync settled everything
        assert st["max_pending"] == 3           # the whole ring was in flight
        # back-to-back copies reusing the slots while earlier ones are still pending
        for rnd in range(3):
            first_bad, got, want = _copy_script(s, [CHUNK * 2 + rnd, 65537, 3 * CHUNK])
            assert first_bad == -1 and got == want
    finally:
        s.close()


def test_c_bulk_pending_payloads_are_settled_before_a_python_frame(inproc):
    """A frame C does not run (cuMemGetInfo) must see the copies before it done; so must a
    sync D2H copy (Python's path)."""
    s = _connect(f"127.0.0.1:{inproc.port}")
    try:
        sess = live_session(inproc)
        n = 2 * CHUNK + 3
        host = s.pinned(n)
        host[:] = np.arange(n, dtype=np.uint64).astype(np.uint8)
        d = s.alloc(n)
        s.gwSync()
        s.cuMemcpyHtoDAsync(d, host, n, 0)
        assert wait_until(lambda: sess.bulk_c.stats()["h2d"] == 1)
        assert sess.bulk_c.stats()["pending"] == 3      # its three chunks: posted, not settled
        free, total = s.mem_get_info()            # a Python frame
        assert 0 < free <= total
        assert sess.bulk_c.stats()["pending"] == 0
        out = np.zeros(n, np.uint8)
        s.cuMemcpyDtoH(out, d, n)                 # sync copy: Python
        assert (out == host).all()
    finally:
        s.close()


def test_c_bulk_leaves_copies_above_h2d_max_to_python():
    """rpc_c_bulk_h2d_max: an async H2D copy above it (and its frame) takes the Python path;
    the smaller ones still run in C; the bytes and the stream order are the same."""
    with _server_session(rpc_c_bulk_slots=3, rpc_c_bulk_h2d_max=2 * CHUNK) as (srv, s, sess):
        assert sess.bulk_c is not None
        sizes = [CHUNK * 3 + 5, 70000, 2 * CHUNK, 1 << 20, 100003]
        first_bad, got, want = _copy_script(s, sizes)
        assert first_bad == -1 and got == want
        assert sess.bulk_c.stats()["h2d"] == sum(1 for n in sizes if n <= 2 * CHUNK)   # 3 of 5


def test_c_bulk_inflight_bytes_cap_the_posted_receives():
    """rpc_c_bulk_inflight: with room for one 64 KiB message only one payload receive stays
    posted (large chunks keep fewer receives in flight); the bytes still arrive in order."""
    with _server_session(rpc_c_bulk_slots=4, rpc_c_bulk_inflight=CHUNK + 100) as (srv, s, sess):
        n = 3 * CHUNK + 9
        host = s.pinned(n)
        host[:] = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
        d = s.alloc(n)
        s.gwSync()
        s.cuMemcpyHtoDAsync(d, host, n, 0)
        out = np.zeros(n, np.uint8)
        s.cuMemcpyDtoH(out, d, n)
        assert (out == host).all()
        first_bad, got, want = _copy_script(s, [n, 5 * CHUNK + 1, 70000])
        assert first_bad == -1 and got == want
        st = sess.bulk_c.stats()
        assert st["h2d"] == 4
        # one 64 KiB message (+ a short last one of a copy) at a time, not the 4 slots
        assert st["max_pending"] == 2, st


def _error_script(s, chunk):
    """Copies with bad ranges between good ones, a short and a long payload (their failure is
    only seen when the slot is settled): each error names its copy; the other copies land."""
    n = 3 * chunk + 7
    host = s.pinned(2 * n)
    host[:] = np.random.default_rng(5).integers(0, 256, 2 * n, dtype=np.uint8)
    d = s.alloc(2 * n)
    st = s.stream()
    s.gwSync()
    got = []
    s.cuMemcpyHtoDAsync(d, host[:n], n, st)
    s.cuMemcpyHtoDAsync(d + 2 * n - 8, host[:n], n, st)      # runs past the allocation
    s.cuMemcpyHtoDAsync(d + n, host[n:], n, st)
    try:
        s.cuStreamSynchronize(st)
        got.append(None)
    except DeferredCudaError as e:
        got.append((e.result, e.call, e.batch_position, e.call_seq, e.later_failures,
                    "not inside an allocation" in e.call_args or "is not inside" in e.call_args))
    out = np.zeros(2 * n, np.uint8)
    s.cuMemcpyDtoH(out, d, 2 * n)
    got.append(bool((out == host).all()))
    # a payload shorter / longer than the record announces (a broken client): the copy's error
    a = 3 * chunk + 7             # four messages, the last of 7 bytes
    for delta in (-3, +3):
        real = s._put_bulk

        def lying(p, data, nb, is_async=False, delta=delta):
            q = real(p, data, nb, is_async)
            tag, dd, nn, nowait = s._bulk[-1]
            m = nn + delta
            src = np.zeros(max(m, 0), np.uint8) if delta > 0 else memoryview(getattr(dd, "obj", dd))[:m]
            s._bulk[-1] = (tag, src, m, False)
            return q
        s._put_bulk = lying
        try:
            # one message: simply short/long
            s.cuMemcpyHtoDAsync(d, host[:a], a, st)
        finally:
            s._put_bulk = real
        s.cuMemcpyHtoDAsync(d + n, host[:n], n, st)            # a good copy after it still lands
        try:
            s.cuStreamSynchronize(st)
            got.append(None)
        except DeferredCudaError as e:
            got.append((e.result, e.call, e.batch_position, e.later_failures,
                        ("bulk payload chunk of" if delta < 0 else "bulk payload chunk longer than") in e.call_args))
        s.cuMemcpyDtoH(out, d + n, n)
        got.append(bool((out[:n] == host[:n]).all()))
    s.gwSync()                                                 # the session is fine afterwards
    return got


@pytest.mark.parametrize("kind", ["cpu", "cpu-nobulk", "cpu-py"])
def test_c_bulk_errors_match_the_python_server(kind):
    env = {"GPUWIRE_RPC_CPU_CHUNK": str(CHUNK), "GPUWIRE_RPC_C_BULK_SLOTS": "3", "GPUWIRE_RPC_C_BULK_DTOH_MIN": "65536"}
    if kind == "cpu-nobulk":
        env["GPUWIRE_RPC_C_BULK"] = "0"
    srv = start_server("cpu-py" if kind == "cpu-py" else "cpu", env=env)
    try:
        with _settings.override(rpc_flush_us=0):
            s = srv.connect()
        try:
            got = _error_script(s, CHUNK)
        finally:
            s.close()
        assert srv.alive()
    finally:
        srv.stop()
    res, call, pos, cseq, later, named = got[0]
    assert (res, call, pos, later, named) == (P.CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync", 0, 0, True)
    assert got[1] is True
    for k in (2, 4):      # short, long payload
        assert got[k] == (P.CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync", 0, 0, True), got[k]
        assert got[k + 1] is True
    test_c_bulk_errors_match_the_python_server.results[kind] = (cseq, got)


test_c_bulk_errors_match_the_python_server.results = {}


def test_c_bulk_error_sequence_numbers_match():
    """Same script, same call sequence numbers of the failing copy with and without C."""
    r = test_c_bulk_errors_match_the_python_server.results
    if len(r) < 3:
        pytest.skip("needs the three servers of test_c_bulk_errors_match_the_python_server")
    assert r["cpu"] == r["cpu-nobulk"] == r["cpu-py"]


def test_c_bulk_session_ending_with_a_payload_pending_is_cleaned_up():
    """A client announces a bulk payload and never sends it: the pending receive times out
    (rpc_bulk_timeout_s) as the copy's error, and a session that simply ends with receives
    posted is cleaned up; the server keeps serving others."""
    env = {"GPUWIRE_RPC_BULK_TIMEOUT_S": "1.5", "GPUWIRE_RPC_CPU_CHUNK": str(CHUNK)}
    srv = start_server("cpu", env=env)
    try:
        with _settings.override(rpc_flush_us=0):
            s = srv.connect()
        try:
            n = 2 * CHUNK
            host = s.pinned(n)
            d = s.alloc(n)
            st = s.stream()
            s.gwSync()
            real = s._put_bulk

            def never(p, data, nb, is_async=False):
                q = real(p, data, nb, is_async)
                s._bulk.pop()            # announced, not sent
                return q
            s._put_bulk = never
            try:
                s.cuMemcpyHtoDAsync(d, host, n, st)
                s.flush()                        # its own frame (nothing sent triggers no flush)
            finally:
                s._put_bulk = real
            t0 = time.monotonic()
            with pytest.raises(DeferredCudaError) as ei:
                s.cuStreamSynchronize(st)
            assert ei.value.call == "cuMemcpyHtoDAsync" and ei.value.result == P.CUDA_ERROR_INVALID_VALUE
            assert time.monotonic() - t0 < 30
            s.gwSync()
            # now one whose connection drops with the receive still posted
            s._put_bulk = never
            s.cuMemcpyHtoDAsync(d, host, n, st)
            s.flush()
            s._put_bulk = real
            time.sleep(0.2)
            s._ep.close()
        finally:
            try:
                s.close()
            except Exception:
                pass
        with _settings.override(rpc_flush_us=0):
            s2 = srv.connect()
        try:
            n = 3 * CHUNK + 1
            h = s2.pinned(n)
            h[:] = 7
            d2 = s2.alloc(n)
            s2.cuMemcpyHtoDAsync(d2, h, n, 0)
            out = np.zeros(n, np.uint8)
            s2.cuMemcpyDtoH(out, d2, n)
            assert (out == 7).all()
        finally:
            s2.close()
        assert srv.alive()
    finally:
        srv.stop()


@pytest.mark.gpu
def test_c_bulk_copies_on_the_gpu():
    """The same bytes-and-order script against the GPU executor (4 MiB chunks, pinned slots)."""
    srv = start_server("gpu")
    try:
        with _settings.override(rpc_flush_us=0):
            s = srv.connect()
        try:
            ch = s._chunk
            sizes = [1 << 20, ch, ch + 1, 3 * ch - 5, 70000, 9 * ch + 3, (1 << 20) + 7, 16 << 20]
            first_bad, got, want = _copy_script(s, sizes)
            assert first_bad == -1 and got == want
            errs = _error_script(s, ch)
            assert errs[0][:3] == (P.CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync", 0)
            assert errs[1] is True and errs[3] is True and errs[5] is True
            assert errs[2][:2] == errs[4][:2] == (P.CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync")
        finally:
            s.close()
    finally:
        srv.stop()


def test_c_bulk_refuses_a_spec_whose_copy_layout_it_does_not_read():
    """The bulk engine reads both async copies' fixed parts as '<QQQ': with a spec that says
    otherwise it is not attached (ValueError: the session keeps the Python path)."""
    import types
    from gpuwire.rpc.spec import default_spec
    with _server_session(rpc_c_bulk_slots=2) as (srv, s, sess):
        real = sess.bulk_c.serve, sess.bulk_c.res
        for name in ("cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync"):
            calls = dict(default_spec().calls)
            c = calls[name]
            calls[name] = types.SimpleNamespace(id=c.id, deferred=True, wire_format=types.SimpleNamespace(
                request="<QQ", reply=c.wire_format.reply))
            spec = types.SimpleNamespace(calls=calls)
            h0 = real[0].handler
            with pytest.raises(ValueError):
                b = cf.Bulk(real[0], spec, sess.ep.c_bulk_entry(), real[1], CHUNK, 1.0)
                b.close()
            assert real[0].handler == h0
        s.gwSync()


def test_c_bulk_frames_are_in_the_frame_trace(tmp_path):
    """rpc_trace_dir: the frames the bulk handler runs itself (H2D and D2H copy frames) and the
    ones it passes to Python are in the per-frame trace like every other frame."""
    with _server_session(rpc_c_bulk_slots=3, rpc_c_bulk_dtoh_min=CHUNK, rpc_trace_dir=str(tmp_path)) as (srv, s, sess):
        n = 3 * CHUNK + 5
        host = s.pinned(2 * n)
        host[:] = 9
        d = s.alloc(2 * n)
        st = s.stream()
        s.gwSync()
        seq0 = s._seq
        s.cuMemcpyHtoDAsync(d, host[:n], n, st)
        s.cuMemcpyHtoDAsync(d + n, host[n:], n, st)
        out = np.zeros(n, np.uint8)
        s.cuMemcpyDtoHAsync(out, d + n, n, st)
        s.flush()
        s.cuStreamSynchronize(st)
        seq1 = s._seq
        assert (out == 9).all()
        stats = sess.bulk_c.stats()
        assert stats["h2d"] == 2 and stats["d2h"] == 1, stats
        rows = sess.serve_c.trace_rows()
        seqs = {r[0] for r in rows}
        assert set(range(seq0, seq1)) <= seqs, (seq0, seq1, sorted(seqs)[-8:])
        for r in rows:
            if seq0 <= r[0] < seq1:
                assert r[4] and r[9] >= r[4], r           # t_in, t_out
