"""Bulk lanes (gpuwire.rpc.lanes, docs/protocol.md "Bulk lanes"): a session's large payloads on
extra connections, each driven by a progress thread of its own on both sides.

Checked here against real servers (in-process and a server process) over tcp: the bytes of
copies in both directions (async through the C bulk copies, sync and chunked through Python,
below and above rpc_lane_min, mirror pulls), that the lanes carried them, the auto setting,
the server's cap, a stranger on a lane port, set-up failures, and a client killed with copies
in flight on its lanes (memory freed, the server keeps serving)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpuwire
from gpuwire import settings
from gpuwire import transport as t
from gpuwire.rpc import lanes as L
from gpuwire.rpc import protocol as P
from gpuwire.rpc.executors import cpu as _cpu  # noqa: F401 - registers rpc_cpu_chunk
from test_rpc_support import copy_roundtrip, inproc_server, live_session, start_server, wait_until

CHUNK = 64 << 10
LANE_MIN = 128 << 10


def _server(**over):
    """A CPU-executor server in this process (tcp), payloads in 64 KiB chunks."""
    return inproc_server(dict(rpc_cpu_chunk=CHUNK, rpc_lane_min=LANE_MIN, **over), tls="tcp,self")


def _connect(srv, lanes, **kw):
    with settings.override(rpc_bulk_lanes=lanes):
        return gpuwire.connect(f"127.0.0.1:{srv.port}", tls="tcp,self", name="test-lanes", **kw)


def _lane_requests(s):
    return [w.progress_thread_stats()["requests"] for w in s._lane_ws]


def test_lane_of_is_the_rule_both_sides_use():
    assert L.lane_of(7, 0, 100, 2, 1000) == -1                 # small: the session's connection
    assert L.lane_of(7, 0, 1000, 0, 1000) == -1                # no lanes
    assert [L.lane_of(7, k, 1000, 3, 1000) for k in range(4)] == [1, 2, 0, 1]
    assert [L.lane_of(tag, 0, 1 << 20, 2, 1000) for tag in (8, 9, 10)] == [0, 1, 0]


@pytest.mark.parametrize("nlanes", [1, 3])
def test_copies_over_lanes_keep_their_bytes(nlanes):
    """Async copies (C bulk copies), sync copies and a chunked copy, under and over
    rpc_lane_min, both directions: the same bytes; the lanes carried the big ones."""
    with _server() as srv:
        s = _connect(srv, nlanes)
        try:
            assert len(s._lane_eps) == nlanes and s._lane_min == LANE_MIN
            sess = live_session(srv)
            assert len(sess.lane_eps) == nlanes
            rng = np.random.default_rng(1)
            st = s.stream()
            for n in (LANE_MIN - 1, LANE_MIN, 5 * CHUNK + 3, 3 << 20):
                a = rng.integers(0, 256, n, dtype=np.uint8)
                h = s.pinned(n)
                h[:] = a
                d = s.alloc(n)
                s.gwSync()           # (the copy's frame then holds the copy alone: the C bulk path)
                before = sum(_lane_requests(s))
                s.cuMemcpyHtoDAsync(d, h, n, st)
                back = s.pinned(n)
                back[:] = 0
                s.cuMemcpyDtoHAsync(back, d, n, st)
                st.synchronize()
                assert np.array_equal(back, a), n
                used = sum(_lane_requests(s)) - before
                # (the count is of transfers that had to wait: one that completed at once is not)
                assert (used > 0) == (n >= LANE_MIN), (n, used)
                out = np.zeros(n, np.uint8)
                s.cuMemcpyHtoD(d, a[::-1].copy(), n)
                s.cuMemcpyDtoH(out, d, n)
                assert np.array_equal(out, a[::-1]), n
                d.free()
            # every lane carried messages (chunks are spread by tag + index)
            assert all(r > 0 for r in _lane_requests(s))
            assert sess.bulk_c is not None and sess.bulk_c.stats()["h2d"] >= 1    # (the C bulk copies on lanes too)
        finally:
            s.close()


def test_mirror_pulls_over_lanes():
    """gwMirrorPull sends one message per granule; over lanes they arrive whole."""
    with _server() as srv:
        s = _connect(srv, 2)
        try:
            n = 512 << 10
            host = np.zeros(n, np.uint8)
            m = s.alloc(n)
            ref = s.alloc(n)
            s.cuMemsetD8(m, 7, n)
            s.cuMemsetD8(ref, 0, n)
            s.cuMemsetD8(m + 4096, 9, 10)
            s.gwMirrorPull(host, m, ref, n, 64 << 10)
            s.gwSync()
            assert (host[:4096] == 7).all() and (host[4096:4106] == 9).all() and (host[4106:] == 7).all()
        finally:
            s.close()


def test_auto_asks_for_lanes_off_shared_memory_only():
    with _server() as srv:
        with settings.override(rpc_bulk_lanes="auto"):
            s = gpuwire.connect(f"127.0.0.1:{srv.port}", tls="tcp,self", name="auto-tcp")
        try:
            assert len(s._lane_eps) == L.AUTO_LANES
        finally:
            s.close()
        s = _connect(srv, 0)
        try:
            assert s._lane_eps == [] and "lanes" not in s.info
        finally:
            s.close()
    with settings.override(rpc_bulk_lanes="auto"):
        srv = start_server("cpu")          # default transports: shared memory on one host
        try:
            s = srv.connect(name="auto-shm")
            try:
                from gpuwire.rpc.client import _shm_only
                if _shm_only(s._ep.transports):
                    assert s._lane_eps == []
                else:
                    assert len(s._lane_eps) == L.AUTO_LANES
            finally:
                s.close()
        finally:
            srv.stop()
    for bad in ("many", "9", "-1"):
        with pytest.raises(ValueError, match="GPUWIRE_RPC_BULK_LANES.*auto or a number of lanes"):
            with settings.override(rpc_bulk_lanes=bad):
                pass


@pytest.mark.parametrize("where", ["thread", "process"])
def test_sessions_with_lanes_close_without_ucx_errors(capfd, where):
    """A session's lanes close after its bye with no UCX error or warning on either side
    (docs/protocol.md "Bulk lanes"): before, the side closing a lane second logged
    'error during flush: Connection reset by remote peer' about twice per session and now
    and then 'object ... was not returned to mpool'. Each session moves bytes over its lanes
    both ways first; the server process shares this test's stderr."""
    env = {"UCX_TLS": "tcp,self"}
    srv = start_server("cpu", token=None, env=env) if where == "process" else None
    ctx = _server() if srv is None else None
    port = srv.port if srv is not None else ctx.__enter__().port
    try:
        for i in range(6):
            with settings.override(rpc_bulk_lanes=4):
                s = gpuwire.connect(f"127.0.0.1:{port}", tls="tcp,self", name=f"quiet-{i}")
            try:
                assert len(s._lane_eps) == 4
                before = sum(_lane_requests(s))
                assert copy_roundtrip(s, 3 << 20, mod=241 - i)
                assert sum(_lane_requests(s)) > before or where == "process"
            finally:
                s.close()
            assert s._lane_eps == [] and s._lane_ws == []
    finally:
        if srv is not None:
            srv.stop()
        else:
            ctx.__exit__(None, None, None)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "UCX  ERROR" not in text and "UCX  WARN" not in text, text[-3000:]


def test_the_server_caps_and_can_refuse_lanes():
    with _server(rpc_lanes_max=1) as srv:
        s = _connect(srv, 3)
        try:
            assert len(s._lane_eps) == 1 and len(s.info["lanes"]["ports"]) == 1
            assert copy_roundtrip(s, 1 << 20)
        finally:
            s.close()
    with _server(rpc_lanes_max=0) as srv:
        s = _connect(srv, 3)
        try:
            assert s._lane_eps == [] and "lanes" not in s.info
            assert s.cuMemGetInfo()[1] > 0
        finally:
            s.close()


def test_a_stranger_on_a_lane_port_is_refused(monkeypatch):
    """A connection to a lane port without the session's secret is closed; the listener took
    its one connection, so the client's own lane fails the connect by name; the server goes on."""
    real = L.connect

    def stranger_first(ctx, host, offer, n, timeout):
        w = ctx.worker()
        try:
            ep = w.connect(f"{host}:{offer['ports'][0]}", timeout=5)
            ep.send(L._AUTH.pack(b"x" * 16, 0), tag=P.TAG_LANE, timeout=5)
            with pytest.raises((t.ConnectionLost, t.ConnectionClosed, t.OperationTimeout)):
                ep.recv(bytearray(16), tag=P.TAG_LANE, tag_mask=t.EXACT_TAG, timeout=3)
        finally:
            w.close()
        return real(ctx, host, offer, n, timeout)

    with _server(rpc_lane_wait_s=3) as srv:
        monkeypatch.setattr(L, "connect", stranger_first)
        with pytest.raises(P.ProtocolError, match="bulk lane 0"):
            _connect(srv, 2, timeout=3)
        monkeypatch.setattr(L, "connect", real)
        s = _connect(srv, 2)
        try:
            assert len(s._lane_eps) == 2 and s.cuMemGetInfo()[1] > 0
        finally:
            s.close()


def test_a_session_that_never_connects_its_lanes_ends_cleanly(monkeypatch):
    """The client goes away between the offer and its lanes: the session's lane threads end with
    it (no worker is closed under a waiting thread) and the server keeps serving."""
    def fail(*a, **k):
        raise L.LaneError("bulk lane 0 (test): refused")
    with _server() as srv:
        monkeypatch.setattr(L, "connect", fail)
        with pytest.raises(P.ProtocolError, match="bulk lane 0.*rpc_bulk_lanes=0"):
            _connect(srv, 2)
        monkeypatch.undo()
        assert wait_until(lambda: not srv.sessions, timeout=10)
        s = _connect(srv, 2)
        try:
            assert len(s._lane_eps) == 2
        finally:
            s.close()


def test_client_killed_with_copies_on_its_lanes():
    """SIGKILL while async copies are in flight on the lanes: the session's memory comes back
    (cuMemGetInfo) and the server process keeps serving."""
    srv = start_server("cpu", extra=["--tls", "tcp,self"])
    try:
        with settings.override(rpc_bulk_lanes=0):
            probe = srv.connect(name="probe", tls="tcp,self")
        free0 = probe.cuMemGetInfo()[0]
        code = textwrap.dedent(f"""
            import gpuwire, time
            import gpuwire.rpc.client          # (registers the rpc settings)
            from gpuwire import settings
            with settings.override(rpc_bulk_lanes=2):
                s = gpuwire.connect({srv.address!r}, token={srv.token!r}, tls="tcp,self")
            n = 8 << 20
            h = s.pinned(n); d = s.alloc(n); st = s.stream()
            for _ in range(40):
                s.cuMemcpyHtoDAsync(d, h, n, st)
            print("ready", len(s._lane_eps), flush=True)
            time.sleep(60)
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().split() == ["ready", "2"]
            assert probe.cuMemGetInfo()[0] < free0
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            assert wait_until(lambda: probe.cuMemGetInfo()[0] == free0, timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert srv.alive()
        with settings.override(rpc_bulk_lanes=2):
            s = srv.connect(name="after", tls="tcp,self")
        try:
            assert len(s._lane_eps) == 2
        finally:
            s.close()
        probe.close()
    finally:
        srv.stop()


def test_a_big_frame_ahead_of_lane_payloads_is_driven():
    """A frame too big to leave in one go (it needs its worker's progress) announces a payload
    that travels on a lane: the client, waiting for the payload's send, drives the session's
    own worker too, else the server never gets the frame and both sides wait forever (found
    with the MLP bench's first copies on the GPU box)."""
    with _server(rpc_bulk_timeout_s=10) as srv:
        with settings.override(rpc_batch_first=100000, rpc_batch_calls=100000,
                               rpc_batch_bytes=8 << 20, rpc_flush_us=0):
            s = _connect(srv, 2, timeout=10)
        try:
            n = 2 << 20
            with s.alloc(4096) as small, s.alloc(n) as d:
                for _ in range(20000):                    # ~0.8 MB of batched records
                    s.cuMemsetD8Async(small, 1, 16, 0)
                assert s._ncalls > 10000
                a = (np.arange(n) % 249).astype(np.uint8)
                s.cuMemcpyHtoD(d, a, n)                   # (not pinned: sent and waited for)
                out = np.zeros(n, np.uint8)
                s.cuMemcpyDtoH(out, d, n)
            assert np.array_equal(out, a)
        finally:
            s.close()
