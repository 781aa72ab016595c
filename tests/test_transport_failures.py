"""Peers dying (SIGKILL) and closing, local shutdown with operations in flight,
and timeouts, over tcp ("tcp,self") and shared memory ("tcp,sm,self"), with
real peer processes (tests/_transport_peer.py)."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from gpuwire import transport as t
from conftest import TLS

pytestmark = pytest.mark.timeout(90)
KINDS = sorted(TLS)


def _kill_later(peer, delay=0.3):
    """SIGKILL ``peer`` from a timer thread; returns a dict that gets "t", the
    monotonic time taken just before the signal."""
    out = {}
    timer = threading.Timer(delay, lambda: out.setdefault("t", peer.kill()))
    timer.start()
    out["timer"] = timer
    return out


def _assert_lost(exc, peer_pid, what=""):
    assert isinstance(exc, t.ConnectionLost), repr(exc)
    assert isinstance(exc, ConnectionError) and isinstance(exc, t.TransportError)
    assert f"pid {peer_pid}" in str(exc), f"{what}: message does not name the peer: {exc}"
    assert f"pid {peer_pid}" in exc.peer
    assert exc.reason


# ------------------------------------------------------------ peer killed


@pytest.mark.parametrize("kind", KINDS)
def test_client_killed_while_server_waits_in_recv(spawn_peer, kind):
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        peer = spawn_peer("client", "--tls", TLS[kind], "--mode", "hold", "--connect",
                          lst.address, ready=False)
        ep = lst.accept(timeout=20)
        assert ep.peer_pid == peer.pid
        buf = bytearray(64)
        rr = ep.recv(buf, timeout=10)
        assert bytes(buf[:rr.nbytes]) == b"hihello" and rr.header_len == 2
        assert peer.event("ready")["peer_pid"] == os.getpid()
        pending = [ep.recv_nb(bytearray(64), tag=0x40 + i, tag_mask=t.EXACT_TAG) for i in range(3)]

        killed = _kill_later(peer)
        with pytest.raises(t.ConnectionLost) as ei:
            ep.recv(buf, tag=0x43, tag_mask=t.EXACT_TAG, timeout=5)
        t_lost = time.monotonic()
        killed["timer"].join()
        dt = t_lost - killed["t"]
        print(f"{kind}: recv saw the client's death after {dt * 1e3:.1f} ms")
        assert 0 <= dt < 1.0, f"death noticed after {dt:.3f}s"
        _assert_lost(ei.value, peer.pid, "waiting recv")
        assert ep.state == "lost" and ep.lost_reason()

        for req in pending:  # posted before the death
            with pytest.raises(t.ConnectionLost) as ei:
                req.wait(timeout=1)
            _assert_lost(ei.value, peer.pid, "pending recv_nb")
        for op in (lambda: ep.send(b"late", timeout=1),
                   lambda: ep.send_nb(b"late"),
                   lambda: ep.recv(buf, timeout=1),
                   lambda: ep.recv_nb(buf),
                   lambda: ep.call(b"x", buf, timeout=1),
                   lambda: ep.flush(timeout=1)):
            with pytest.raises(t.ConnectionLost) as ei:
                op()
            _assert_lost(ei.value, peer.pid, "later op")

        lost = w.poll_lost()
        assert len(lost) == 1 and lost[0] is ep
        assert w.poll_lost() == []
        assert peer.wait(5) == -9
    finally:
        ctx.close()


@pytest.mark.parametrize("kind", KINDS)
def test_server_killed_while_client_waits_in_call(spawn_peer, kind):
    peer = spawn_peer("server", "--tls", TLS[kind])
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        assert ep.peer_pid == peer.pid
        reply = bytearray(64)
        assert ep.call(b"ping", reply, tag=5, timeout=10) == 4  # echoed
        ep.send(b"", header=b"!gw:quiet", tag=6, timeout=5)       # stop replying
        assert ep.recv(reply, tag=6, tag_mask=t.EXACT_TAG, timeout=5).nbytes == 7
        pending = ep.recv_nb(bytearray(64), tag=0x44, tag_mask=t.EXACT_TAG)

        killed = _kill_later(peer)
        with pytest.raises(t.ConnectionLost) as ei:
            ep.call(b"ping", reply, tag=7, timeout=5)
        t_lost = time.monotonic()
        killed["timer"].join()
        dt = t_lost - killed["t"]
        print(f"{kind}: call saw the server's death after {dt * 1e3:.1f} ms")
        assert 0 <= dt < 1.0, f"death noticed after {dt:.3f}s"
        _assert_lost(ei.value, peer.pid, "call")

        with pytest.raises(t.ConnectionLost) as ei:
            pending.wait(timeout=1)
        _assert_lost(ei.value, peer.pid, "pending recv_nb")
        with pytest.raises(t.ConnectionLost) as ei:
            ep.call(b"again", reply, tag=8, timeout=1)
        _assert_lost(ei.value, peer.pid, "later call")
        with pytest.raises(t.ConnectionLost):
            ep.send(b"x", timeout=1)
        assert [e.id for e in w.poll_lost()] == [ep.id]
        assert peer.wait(5) == -9
    finally:
        ctx.close()


@pytest.mark.parametrize("kind", KINDS)
def test_death_noticed_by_an_any_source_wait_and_poll_lost(spawn_peer, kind):
    """A worker waiting in an any-source recv (no per-endpoint op pending) keeps
    its endpoints' liveness: after the kill, poll_lost() names the endpoint and
    the endpoint's state is "lost" within 1 s."""
    peer = spawn_peer("server", "--tls", TLS[kind])
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        t_kill = peer.kill()
        with pytest.raises(t.OperationTimeout):
            w.recv(bytearray(16), tag=0x999, tag_mask=t.EXACT_TAG, timeout=0.5)
        lost = []
        while not lost and time.monotonic() - t_kill < 1.0:
            w.wait_event(0.02)
            lost = w.poll_lost()
        dt = time.monotonic() - t_kill
        assert [e.id for e in lost] == [ep.id], f"poll_lost after {dt:.3f}s: {lost}"
        assert ep.state == "lost"
        assert peer.wait(5) == -9
    finally:
        ctx.close()


# ------------------------------------------------------------ clean close


@pytest.mark.parametrize("kind", KINDS)
def test_local_close_fails_pending_ops_and_peer_sees_lost(spawn_peer, kind):
    peer = spawn_peer("server", "--tls", TLS[kind])
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        buf = bytearray(64)
        ep.send(b"tok-1", header=b"!gw:waitlost", tag=9, timeout=5)
        rr = ep.recv(buf, tag=9, tag_mask=t.EXACT_TAG, timeout=5)
        assert bytes(buf[rr.header_len:rr.nbytes]) == b"armed"
        pending = [ep.recv_nb(bytearray(32), tag=0x60 + i, tag_mask=t.EXACT_TAG) for i in range(5)]
        any_src = w.recv_nb(bytearray(32), tag=0x70, tag_mask=t.EXACT_TAG)

        ep.close()
        for req in pending:
            with pytest.raises(t.ConnectionClosed, match="closed"):
                req.wait(timeout=1)
        ep.close()  # idempotent
        ep.close(timeout=0)
        assert ep.state == "closed" and ep.transports == ""
        mr = ctx.register(size=64)
        for op in (lambda: ep.send(b"x", timeout=1), lambda: ep.send_nb(b"x"),
                   lambda: ep.recv(buf, timeout=1), lambda: ep.recv_nb(buf),
                   lambda: ep.flush(timeout=1), lambda: ep.unpack_rkey(mr.pack())):
            with pytest.raises(t.ConnectionClosed):
                op()
        # the worker itself is fine: an any-source recv is still pending, and
        # new connections work
        assert not any_src.done()
        ep2 = w.connect(peer.address, timeout=10)
        assert ep2.call(b"still here", buf, tag=11, timeout=5) == 10

        ev = peer.event("waitlost", token="tok-1", timeout=10)
        assert ev["type"] == "ConnectionLost", ev
        assert f"pid {os.getpid()}" in ev["msg"]
        assert ev["ep_id"] in ev["poll_lost"]
        assert ev["state"] == "lost"
        assert ev["dt"] < 5
    finally:
        ctx.close()


@pytest.mark.parametrize("kind", KINDS)
def test_peer_close_gives_connection_lost(spawn_peer, kind):
    peer = spawn_peer("server", "--tls", TLS[kind])
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        pending = ep.recv_nb(bytearray(32), tag=0x61, tag_mask=t.EXACT_TAG)
        t0 = time.monotonic()
        ep.send(b"tok-2", header=b"!gw:close", tag=9, timeout=5)
        with pytest.raises(t.ConnectionLost) as ei:
            pending.wait(timeout=5)
        assert time.monotonic() - t0 < 1.0
        _assert_lost(ei.value, peer.pid, "pending recv on peer close")
        assert "reset" in ei.value.reason.lower() or "closed" in ei.value.reason.lower()
        assert peer.event("closed", token="tok-2")
        with pytest.raises(t.ConnectionLost):
            ep.send(b"x", timeout=1)
        assert [e.id for e in w.poll_lost()] == [ep.id]
        assert ep.state == "lost"
    finally:
        ctx.close()


def test_worker_and_context_close_with_everything_open(spawn_peer):
    peer = spawn_peer("server", "--tls", TLS["tcp"])
    ctx = t.Context({"TLS": TLS["tcp"]})
    w = ctx.worker()
    w2 = ctx.worker()
    lst = w.listen("127.0.0.1", 0)
    eps = [w.connect(peer.address, timeout=10) for _ in range(2)]
    ep_other = w2.connect(peer.address, timeout=10)
    pending = [ep.recv_nb(bytearray(16), tag=0x62, tag_mask=t.EXACT_TAG) for ep in eps]
    any_src = w.recv_nb(bytearray(16), tag=0x63, tag_mask=t.EXACT_TAG)
    mr = ctx.register(size=4096)  # ctx.close() releases it too
    assert mr.length == 4096

    w.close()
    for ep in eps:
        assert ep.state == "closed"
    for req in pending:
        with pytest.raises(t.ConnectionClosed):
            req.wait(timeout=1)
    w.close()  # idempotent
    with pytest.raises(t.ConnectionClosed):
        w.connect(peer.address, timeout=1)
    with pytest.raises(t.ConnectionClosed):
        w.listen("127.0.0.1", 0)
    with pytest.raises(t.ConnectionClosed):
        w.recv_nb(bytearray(8))
    with pytest.raises(t.ConnectionClosed):
        lst.accept(timeout=0.1)
    with pytest.raises(t.ConnectionClosed):
        eps[0].send(b"x")
    any_src.release()  # dropping a request of a closed worker is harmless
    # the other worker is unaffected
    assert ep_other.call(b"other", bytearray(16), tag=3, timeout=5) == 5
    # the peer saw both endpoints of the closed worker go
    seen = [peer.event("served_lost", timeout=10) for _ in range(2)]
    assert all(ev["type"] == "ConnectionLost" and ev["peer_pid"] == os.getpid() for ev in seen)

    ctx.close()
    assert ep_other.state == "closed"
    ctx.close()  # idempotent
    with pytest.raises(t.ConnectionClosed):
        ctx.register(size=64)
    with pytest.raises(t.ConnectionClosed):
        w2.connect(peer.address, timeout=1)


def test_endpoint_context_managers(spawn_peer):
    peer = spawn_peer("server", "--tls", TLS["shm"])
    with t.Context({"TLS": TLS["shm"]}) as ctx:
        with ctx.worker() as w:
            with w.connect(peer.address, timeout=10) as ep:
                assert ep.call(b"cm", bytearray(8), timeout=5) == 2
            assert ep.state == "closed"
            with w.listen("127.0.0.1", 0) as lst:
                port = lst.port
                assert port > 0
            with pytest.raises(t.ConnectionClosed):
                lst.accept(timeout=0.1)
        with pytest.raises(t.ConnectionClosed):
            w.connect(peer.address)
    assert ctx._closed


# ------------------------------------------------------------ timeouts


@pytest.mark.parametrize("kind", KINDS)
def test_connect_to_closed_port_is_refused_quickly(kind):
    with t.Context({"TLS": TLS[kind]}) as ctx:
        w = ctx.worker()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        t0 = time.monotonic()
        with pytest.raises((t.ConnectionRefused, t.ConnectTimeout)) as ei:
            w.connect(f"127.0.0.1:{port}", timeout=5)
        dt = time.monotonic() - t0
        assert dt < 2.0, f"refusal took {dt:.2f}s"
        assert isinstance(ei.value, t.ConnectionRefused), "expected a refusal, not a timeout"
        assert f"127.0.0.1:{port}" in str(ei.value)
        # the worker still connects afterwards
        lst = w.listen("127.0.0.1", 0)
        res = {}
        th = threading.Thread(target=lambda: res.setdefault("ep", lst.accept(timeout=10)))
        th.start()
        ep = w.connect(lst.address, timeout=10)
        th.join()
        assert ep.state == "up" and res["ep"].peer_pid == os.getpid()


@pytest.mark.parametrize("kind", KINDS)
def test_connect_to_silent_listener_times_out(kind):
    """A TCP listener that never speaks UCX: ConnectTimeout after ~timeout."""
    with t.Context({"TLS": TLS[kind]}) as ctx, socket.socket() as s:
        w = ctx.worker()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        t0 = time.monotonic()
        with pytest.raises(t.ConnectTimeout, match="no handshake within 0.5s") as ei:
            w.connect(f"127.0.0.1:{s.getsockname()[1]}", timeout=0.5)
        dt = time.monotonic() - t0
        assert 0.5 <= dt < 1.5, dt
        assert isinstance(ei.value, TimeoutError)


def test_connect_timeout_default_comes_from_settings():
    from gpuwire import settings

    with t.Context({"TLS": "tcp,self"}) as ctx, socket.socket() as s:
        w = ctx.worker()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        with settings.override(connect_timeout_s=0.3):
            t0 = time.monotonic()
            with pytest.raises(t.ConnectTimeout):
                w.connect(f"127.0.0.1:{s.getsockname()[1]}")
            assert time.monotonic() - t0 < 1.0


def _timed_out(fn, *a, **kw):
    """Run fn expecting OperationTimeout; return the elapsed time. The exception is
    not kept (its traceback would keep the timed-out request posted, see
    test_timed_out_recv_does_not_swallow_a_later_message)."""
    t0 = time.monotonic()
    try:
        fn(*a, **kw)
    except t.OperationTimeout as e:
        assert isinstance(e, TimeoutError) and "timed out" in str(e)
        return time.monotonic() - t0
    raise AssertionError("no OperationTimeout")


def test_recv_timeout_then_endpoint_still_works(link):
    buf = bytearray(64)
    for timeout in (0, 0.05, 0.3):
        dt = _timed_out(link.ep.recv, buf, tag=0x71, tag_mask=t.EXACT_TAG, timeout=timeout)
        assert timeout <= dt < timeout + 0.5
    assert _timed_out(link.w.recv, buf, tag=0x72, tag_mask=t.EXACT_TAG, timeout=0.05) < 0.6
    # the timed-out receives were cancelled: they do not eat this message
    other = bytearray(64)
    rr = link.ep.recv_nb(other, tag=0x71, tag_mask=t.EXACT_TAG)
    link.ep.send(b"after timeouts", tag=0x71, timeout=5)
    res = rr.wait(5)
    assert bytes(other[:res.nbytes]) == b"after timeouts"
    assert bytes(buf[:14]) != b"after timeouts"


def test_timed_out_recv_does_not_swallow_a_later_message(link):
    old, new = bytearray(64), bytearray(64)
    try:
        link.ep.recv(old, tag=0x77, tag_mask=t.EXACT_TAG, timeout=0.05)
    except t.OperationTimeout as e:
        kept = e  # e.g. logged/stored by the caller; keeps the traceback
    req = link.ep.recv_nb(new, tag=0x77, tag_mask=t.EXACT_TAG)
    link.ep.send(b"for the new receive", tag=0x77, timeout=5)
    try:
        rr = req.wait(timeout=1)
        assert bytes(new[:rr.nbytes]) == b"for the new receive"
        assert bytes(old[:8]) == bytes(8)
    finally:
        del kept
        req.release()


def test_request_wait_timeout_keeps_the_request(link):
    buf = bytearray(64)
    req = link.ep.recv_nb(buf, tag=0x73, tag_mask=t.EXACT_TAG)
    with pytest.raises(t.OperationTimeout):
        req.wait(timeout=0)
    with pytest.raises(t.OperationTimeout):
        req.wait(timeout=0.05)
    with pytest.raises(t.OperationTimeout):
        link.w.wait_any([req], timeout=0.05)
    with pytest.raises(t.OperationTimeout):
        link.w.wait_all([req], timeout=0.05)
    assert not req.done()
    link.ep.send(b"late", tag=0x73, timeout=5)
    assert link.w.wait_any([req], timeout=5) == 0
    assert req.wait(timeout=5).nbytes == 4 and bytes(buf[:4]) == b"late"
    with pytest.raises(t.TransportError, match="already released"):
        req.wait(1)


def test_accept_timeouts():
    with t.Context({"TLS": "tcp,sm,self"}) as ctx:
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        for fn, arg in ((lst.accept, 0.2), (w.accept_address, 0.2), (lst.accept, 0)):
            t0 = time.monotonic()
            with pytest.raises(t.OperationTimeout):
                fn(timeout=arg)
            assert arg <= time.monotonic() - t0 < arg + 0.5


def test_call_timeout_against_a_quiet_peer(spawn_peer):
    peer = spawn_peer("server", "--tls", TLS["shm"])
    with t.Context({"TLS": TLS["shm"]}) as ctx:
        ep = ctx.worker().connect(peer.address, timeout=10)
        reply = bytearray(16)
        ep.send(b"", header=b"!gw:quiet", tag=6, timeout=5)
        ep.recv(reply, tag=6, tag_mask=t.EXACT_TAG, timeout=5)
        t0 = time.monotonic()
        with pytest.raises(t.OperationTimeout, match="no reply within 0.3s"):
            ep.call(b"ping", reply, tag=1, timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 0.8
        assert ep.state == "up"


def test_op_timeout_setting_applies_to_waits(spawn_peer):
    from gpuwire import settings

    peer = spawn_peer("server", "--tls", TLS["shm"])
    with t.Context({"TLS": TLS["shm"]}) as ctx:
        with settings.override(op_timeout_s=0.2):
            w = ctx.worker()
            ep = w.connect(peer.address, timeout=10)
            for op in (lambda: ep.recv(bytearray(8), tag=0x74, tag_mask=t.EXACT_TAG),
                       lambda: w.recv(bytearray(8), tag=0x75, tag_mask=t.EXACT_TAG),
                       lambda: ep.recv_nb(bytearray(8), tag=0x76, tag_mask=t.EXACT_TAG).wait()):
                t0 = time.monotonic()
                with pytest.raises(t.OperationTimeout):
                    op()
                assert 0.2 <= time.monotonic() - t0 < 0.7
            ep.send(b"", header=b"!gw:quiet", tag=6)
            ep.recv(bytearray(16), tag=6, tag_mask=t.EXACT_TAG)
            t0 = time.monotonic()
            with pytest.raises(t.OperationTimeout):
                ep.call(b"x", bytearray(8), tag=1)
            assert 0.2 <= time.monotonic() - t0 < 0.7


def test_op_timeout_of_one_worker_does_not_leak_into_calls_of_another(spawn_peer):
    from gpuwire import settings

    peer = spawn_peer("server", "--tls", TLS["shm"])
    with t.Context({"TLS": TLS["shm"]}) as ctx:
        w1 = ctx.worker()                       # op_timeout_s = 0: no timeout
        ep = w1.connect(peer.address, timeout=10)
        with settings.override(op_timeout_s=0.2):
            ctx.worker()                        # another worker, made under a 0.2 s default
        # outside the override and on w1 the default is "no timeout": the peer
        # answers tag 13 after sleeping 1 s, and call() must get that answer
        reply = bytearray(16)
        ep.send(struct.pack("<d", 1.0), header=b"!gw:delay", tag=13, timeout=5)
        t0 = time.monotonic()
        n = ep.call(b"q", reply, tag=14, reply_tag=13)
        assert time.monotonic() - t0 >= 0.5
        assert bytes(reply[:n]) == b"oklate"


# ------------------------------------------------------------ closing lost endpoints


def _snippet(body, env=None, timeout=60):
    """Run ``body`` in a fresh interpreter (a crash must not take pytest down);
    returns (returncode, stdout, stderr)."""
    import subprocess
    import sys
    import textwrap

    code = ("import os, sys, time, signal\nfrom gpuwire import transport as t\n"
            + textwrap.dedent(body) + '\nprint("SNIPPET-END", flush=True)\n')
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


_CLOSE_ORDERS = {
    # the peer closes first (our endpoint is "lost"), we close it, then the peer dies
    "peer_closed_then_killed": """
        ep.send(b"tok", header=b"!gw:close", tag=9)
        try:
            ep.recv(bytearray(8), tag=0x555, tag_mask=t.EXACT_TAG, timeout=5)
        except t.ConnectionLost:
            print("LOST", flush=True)
        ep.close()
        os.kill(PEER_PID, signal.SIGKILL)
    """,
    # the peer dies, we notice, then close
    "killed_then_closed": """
        os.kill(PEER_PID, signal.SIGKILL)
        try:
            ep.recv(bytearray(8), tag=0x555, tag_mask=t.EXACT_TAG, timeout=5)
        except t.ConnectionLost:
            print("LOST", flush=True)
        ep.close()
    """,
    # the peer dies and we close at once, before anything noticed it
    "closed_right_after_kill": """
        os.kill(PEER_PID, signal.SIGKILL)
        ep.close()
        print("LOST", flush=True)
    """,
    # the peer dies; the endpoint is not closed by hand: the worker closes it
    "killed_then_worker_closed": """
        os.kill(PEER_PID, signal.SIGKILL)
        try:
            ep.recv(bytearray(8), tag=0x555, tag_mask=t.EXACT_TAG, timeout=5)
        except t.ConnectionLost:
            print("LOST", flush=True)
        w.close()
    """,
}


@pytest.mark.parametrize("order", sorted(_CLOSE_ORDERS))
@pytest.mark.parametrize("kind", KINDS)
def test_closing_lost_endpoints_never_crashes(spawn_peer, kind, order):
    """Close an endpoint whose peer closed or died, in every order, over tcp and
    shared memory, with more endpoints to the same peer open; then keep the worker
    progressing while UCX reports the dead peer on the closed endpoints."""
    peer = spawn_peer("server", "--tls", TLS[kind])
    body = f"""
        PEER_PID = {peer.pid}
        ctx = t.Context({{"TLS": {TLS[kind]!r}}})
        w = ctx.worker()
        others = [w.connect({peer.address!r}, timeout=10) for _ in range(3)]
        ep = w.connect({peer.address!r}, timeout=10)
        assert ep.call(b"ping", bytearray(8), tag=1, timeout=5) == 4
        t0 = time.monotonic()
    """ + textwrap_indent(_CLOSE_ORDERS[order]) + """
        for _ in range(10):              # UCX reports the resets now
            if not w._closed:
                w.wait_event(0.05)
        for o in others:
            o.close()
            o.close()
        ep.close()                       # idempotent
        print("CLOSE-SECONDS", round(time.monotonic() - t0, 3), flush=True)
        ctx.close()
        ctx.close()
    """
    rc, out, err = _snippet(body)
    assert rc == 0, f"rc={rc}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert "LOST" in out and "SNIPPET-END" in out, out
    secs = float(out.split("CLOSE-SECONDS")[1].split()[0])
    assert secs < 10, f"closing took {secs}s"


def textwrap_indent(block):
    import textwrap

    return textwrap.indent(textwrap.dedent(block), " " * 8)


def test_many_lost_endpoints_close_quickly(spawn_peer):
    """64 endpoints to a peer that then dies: closing all of them (the worker
    closes them) is quick and clean, over tcp where a flush could wait in vain."""
    peer = spawn_peer("server", "--tls", TLS["tcp"])
    rc, out, err = _snippet(f"""
        ctx = t.Context({{"TLS": "tcp,self"}})
        w = ctx.worker()
        eps = [w.connect({peer.address!r}, timeout=10) for _ in range(64)]
        os.kill({peer.pid}, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while len(w.poll_lost()) < 64 and time.monotonic() < deadline:
            w.wait_event(0.02)
        t0 = time.monotonic()
        for ep in eps[:32]:
            ep.close()
        w.close()
        print("CLOSE-SECONDS", round(time.monotonic() - t0, 3), flush=True)
        ctx.close()
    """, timeout=120)
    assert rc == 0, f"rc={rc}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    secs = float(out.split("CLOSE-SECONDS")[1].split()[0])
    assert secs < 10, f"closing 64 lost endpoints took {secs}s"


# ------------------------------------------------------------ threads sharing a worker


@pytest.mark.parametrize("shared", [False, True], ids=["own-endpoints", "one-endpoint"])
@pytest.mark.parametrize("kind", KINDS)
def test_threads_waiting_on_one_worker_are_woken(spawn_peer, kind, shared):
    """Two threads call() on ONE worker (on two endpoints, or both on one endpoint
    with their own tags) with spin 0, so every wait blocks in epoll at once. Each
    must get its own replies (no thread may read a tag, length or request that
    another thread's call wrote), and a completion that one thread's progress
    makes for the other must wake it: a missed wake-up costs a 100 ms block slice.
    The peer server serves each endpoint from its own thread on one worker too."""
    from gpuwire import settings

    peer = spawn_peer("server", "--tls", TLS[kind])
    with settings.override(spin_us=0), t.Context({"TLS": TLS[kind]}) as ctx:
        w = ctx.worker()
        eps = [w.connect(peer.address, timeout=10) for _ in range(2)]
        if shared:
            eps[1] = eps[0]
        n = 300
        slow = [0, 0]
        errors = []

        def run(i):
            try:
                msg = b"thread-%d" % i
                reply = bytearray(64)
                for k in range(n):
                    t0 = time.monotonic()
                    got = eps[i].call(msg, reply, tag=i + 1, timeout=10)
                    if time.monotonic() - t0 > 0.05:
                        slow[i] += 1
                    assert bytes(reply[:got]) == msg
            except BaseException as e:  # reported below
                errors.append(e)

        t0 = time.monotonic()
        ths = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        dt = time.monotonic() - t0
        assert not errors, errors
        print(f"{kind}: {2 * n} calls from 2 threads in {dt:.2f}s, {sum(slow)} over 50 ms")
        assert sum(slow) <= n // 20, f"{sum(slow)} of {2 * n} calls took > 50 ms (missed wake-ups)"
        assert dt < 10
