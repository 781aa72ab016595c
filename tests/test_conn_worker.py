"""Every accepted connection on a transport worker of its own (handoff listeners), and the
RPC server running each session on one: a peer cannot reach another connection by writing
its id (the receiver's connection id travels in the UCX tag and in the BYE, written by the
sender), and a session's transport state goes with its worker. What could take the process
down (listener and worker lifetimes with a request out) runs in a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from gpuwire import transport as t
from gpuwire.rpc import protocol as P
from test_rpc_support import inproc_server, start_server, wait_until
from test_rpc_wire import frame, record
from test_transport_api import EXPECT, run_code, assert_snippet_ok as assert_ok

pytestmark = pytest.mark.timeout(180)

TLS = "tcp,self"


# ----------------------------------------------------------------------------- helpers

class Echo:
    """Echo every message an endpoint receives (from a thread) until stopped."""

    def __init__(self, ep: t.Endpoint):
        self.ep, self.n, self._stop = ep, 0, threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        buf = bytearray(1 << 20)
        while not self._stop.is_set():
            try:
                r = self.ep.recv(buf, timeout=0.05)
            except t.OperationTimeout:
                continue
            except t.TransportError:
                return
            self.n += 1
            self.ep.send(bytes(buf[:r.nbytes]), tag=r.tag, timeout=5)

    def stop(self):
        self._stop.set()
        self._th.join(10)


class Pump:
    """Progress workers from a thread (over tcp a send completes only while its receiver's
    worker is progressed too), until stopped."""

    def __init__(self, *workers):
        self.workers, self._stop = workers, threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        while not self._stop.is_set():
            for w in self.workers:
                if not w._closed:
                    w.wait_event(0.005)

    def stop(self):
        self._stop.set()
        self._th.join(10)


def _accept_in_thread(lst, worker, timeout=10):
    """(thread, result dict): lst.accept_request() then .accept(worker) in a thread."""
    got = {}

    def run():
        try:
            got["req"] = req = lst.accept_request(timeout=timeout)
            got["ep"] = req.accept(worker)
        except Exception as e:     # noqa: BLE001 - the test looks at it
            got["err"] = e
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, got


def _connect_on(lst, server_worker, client_worker):
    """A connection to ``lst`` accepted on ``server_worker``: (server ep, client ep)."""
    th, got = _accept_in_thread(lst, server_worker)
    try:
        c = client_worker.connect("127.0.0.1", lst.port, timeout=10)
    finally:
        th.join(15)
    assert "err" not in got, got.get("err")
    return got["ep"], c


def _nothing_arrives(ep: t.Endpoint, w: t.Worker, wait=0.5) -> None:
    """No message reaches ``ep`` nor any connection of ``w`` within ``wait`` s."""
    buf = bytearray(256)
    with pytest.raises(t.OperationTimeout):
        ep.recv(buf, timeout=wait)
    with pytest.raises(t.OperationTimeout):
        w.recv(buf, timeout=0.05)


def run_py(body: str, timeout: float = 60):
    """Run ``body`` in a fresh interpreter with ``t``, ``threading``, ``time`` and ``ctx``
    (tcp,self) at hand; returns (rc, stdout, stderr)."""
    prelude = textwrap.dedent(f"""
        import os, sys, threading, time, faulthandler
        faulthandler.enable()
        from gpuwire import transport as t
        ctx = t.Context({{"TLS": {TLS!r}}})
    """) + EXPECT
    return run_code(prelude + textwrap.dedent(body), timeout)


@pytest.fixture
def ctx():
    c = t.Context({"TLS": TLS})
    try:
        yield c
    finally:
        c.close()


# ----------------------------------------------------------------------------- transport

def test_handoff_accept_puts_the_endpoint_on_the_given_worker(ctx):
    ws, w2, wc = ctx.worker(), ctx.worker(), ctx.worker()
    lst = ws.listen("127.0.0.1", 0, handoff=True)
    assert lst.handoff
    ep, c = _connect_on(lst, w2, wc)
    assert ep.worker is w2 and ep in w2.endpoints() and ep not in ws.endpoints()
    assert ep.state == "up" and c.state == "up"
    assert ep.remote_id == c.id and c.remote_id == ep.id
    echo = Echo(ep)
    try:
        buf = bytearray(1 << 20)
        for n in (1, 1000, 300_000):            # eager and rendezvous
            assert c.call(b"\x05" * n, buf, tag=9, timeout=5) == n and buf[n - 1] == 5
    finally:
        echo.stop()
    # the server side sends first too
    req = c.recv_nb(bytearray(16), tag=3, tag_mask=t.EXACT_TAG)
    ep.send(b"from-w2", tag=3, timeout=5)
    assert req.wait(5).nbytes == 7
    # Listener.accept(worker=) is take + accept
    th = threading.Thread(target=lambda: setattr(th, "ep", lst.accept(timeout=10, worker=w2)))
    th.start()
    try:
        c2 = wc.connect(lst.address, timeout=10)
    finally:
        th.join(15)
    assert th.ep.worker is w2 and c2.state == "up"
    # the connection does not need the listener's worker any more
    ws.close()
    echo = Echo(ep)
    try:
        assert c.call(b"after", bytearray(16), tag=1, timeout=5) == 5
    finally:
        echo.stop()
    c.close()
    assert ep.wait_peer_close(5)                      # the BYE came over w2's control worker
    assert ep.state == "lost"
    ep.close(force=True)
    c2.close()
    assert th.ep.wait_peer_close(5)
    th.ep.close(force=True)


def test_connections_on_two_workers_cannot_reach_each_other(ctx):
    """Client 2 writes client 1's server-side connection id into its messages (and its BYE):
    with each connection on a worker of its own nothing reaches connection 1; on one shared
    worker (the control) it does, which shows the forgery itself works."""
    ws, w1, w2, wc1, wc2 = (ctx.worker() for _ in range(5))
    lst = ws.listen("127.0.0.1", 0, handoff=True)
    ep1, c1 = _connect_on(lst, w1, wc1)
    ep2, c2 = _connect_on(lst, w2, wc2)
    c2._test_forge_remote_id(ep1.id)
    assert c2.remote_id == ep1.id
    pump = Pump(w1, w2)
    try:
        for tag in (0, 1, 7):
            c2.send(b"forged", tag=tag, timeout=5)
        _nothing_arrives(ep1, w1)
        c1.send(b"real", tag=7, timeout=5)                 # (connection 1 itself works)
        assert ep1.recv(bytearray(16), tag=7, tag_mask=t.EXACT_TAG, timeout=5).nbytes == 4
        c2.close()                                        # its BYE names connection 1 too
        time.sleep(0.3)
        assert ep1.state == "up"
        c1.send(b"still", tag=7, timeout=5)
        assert ep1.recv(bytearray(16), tag=7, tag_mask=t.EXACT_TAG, timeout=5).nbytes == 5
    finally:
        pump.stop()

    # control: both connections on one worker
    wsh, wc3, wc4 = ctx.worker(), ctx.worker(), ctx.worker()
    ep3, c3 = _connect_on(lst, wsh, wc3)
    ep4, c4 = _connect_on(lst, wsh, wc4)
    c4._test_forge_remote_id(ep3.id)
    pump = Pump(wsh)
    try:
        c4.send(b"forged", tag=7, timeout=5)
        r = ep3.recv(bytearray(16), tag=7, tag_mask=t.EXACT_TAG, timeout=5)
        assert r.nbytes == 6                               # delivered to connection 3
        c4.close()
        assert ep3.wait_peer_close(5)                      # the forged BYE ended connection 3
    finally:
        pump.stop()
    for ep in (ep1, ep2, ep3, ep4):
        ep.close(force=True)


def test_connection_ids_are_not_predictable(ctx):
    ids = []
    for _ in range(4):
        ws, wc = ctx.worker(), ctx.worker()
        lst = ws.listen("127.0.0.1", 0, handoff=True)
        ep, c = _connect_on(lst, ws, wc)
        ids += [ep.id, c.id]
        ws.close()
        wc.close()
    assert len(set(ids)) == len(ids)
    assert all(i & 0xFFFF for i in ids)
    assert (1 << 16 | 1) not in ids or len(set(i >> 16 for i in ids)) > 1


def test_rejected_request_fails_the_connect(ctx):
    ws, wc = ctx.worker(), ctx.worker()
    lst = ws.listen("127.0.0.1", 0, handoff=True)
    got = {}

    def server():
        req = lst.accept_request(timeout=10)
        got["client"] = req.client
        req.reject()
        req.reject()                                   # (again: nothing)
        got["state"] = req.state
    th = threading.Thread(target=server, daemon=True)
    th.start()
    try:
        with pytest.raises(t.ConnectionRefused) as ei:
            wc.connect("127.0.0.1", lst.port, timeout=10)
    finally:
        th.join(15)
    assert "reject" in str(ei.value).lower() and str(lst.port) in str(ei.value)
    assert got["state"] == "rejected" and got["client"].startswith("127.0.0.1:")
    # a dropped request is rejected too
    th = threading.Thread(target=lambda: lst.accept_request(timeout=10), daemon=True)
    th.start()
    try:
        with pytest.raises(t.ConnectionRefused):
            wc.connect("127.0.0.1", lst.port, timeout=10)
    finally:
        th.join(15)
    # and the listener goes on
    ep, c = _connect_on(lst, ws, wc)
    assert c.state == "up"


def test_accept_timeouts(ctx):
    ws = ctx.worker()
    lst = ws.listen("127.0.0.1", 0, handoff=True)
    t0 = time.monotonic()
    with pytest.raises(t.OperationTimeout):
        lst.accept_request(timeout=0.2)
    with pytest.raises(t.OperationTimeout):
        lst.accept(timeout=0.1)
    assert time.monotonic() - t0 < 3


def test_handshake_timeout_of_a_stalled_client(ctx, tmp_path):
    """A client that stops (SIGSTOP) before its handshake: the accept ends with ConnectTimeout
    within its timeout, and the half-made connection is gone from the worker."""
    ws, w2 = ctx.worker(), ctx.worker()
    lst = ws.listen("127.0.0.1", 0, handoff=True)
    code = (f"from gpuwire import transport as t\nctx = t.Context({{'TLS': {TLS!r}}})\nw = ctx.worker()\n"
            f"try:\n    w.connect('127.0.0.1', {lst.port}, timeout=30)\nexcept Exception:\n    pass\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        req = lst.accept_request(timeout=30)
        os.kill(p.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises((t.ConnectTimeout, t.ConnectionLost)):
            req.accept(w2, timeout=0.5)
        assert time.monotonic() - t0 < 5
        assert req.state == "failed" and not w2.endpoints()
        with pytest.raises(t.TransportError, match="already failed"):
            req.accept(w2)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


def test_misuse_gives_clear_errors(ctx):
    ws, w2, wc = ctx.worker(), ctx.worker(), ctx.worker()
    with pytest.raises(TypeError, match="handoff must be a bool"):
        ws.listen("127.0.0.1", 0, handoff="yes")
    plain = ws.listen("127.0.0.1", 0)
    with pytest.raises(ValueError, match="not in handoff mode"):
        plain.accept_request(timeout=0)
    with pytest.raises(ValueError, match="needs a handoff listener"):
        plain.accept(timeout=0, worker=w2)
    plain.close()
    lst = ws.listen("127.0.0.1", 0, handoff=True)
    th, got = _accept_in_thread(lst, w2)
    try:
        c = wc.connect("127.0.0.1", lst.port, timeout=10)
    finally:
        th.join(15)
    req = got["req"]
    assert req.state == "accepted" and c.state == "up"
    with pytest.raises(t.TransportError, match="already accepted"):
        req.accept(w2)
    with pytest.raises(t.TransportError, match="already accepted"):
        req.reject()
    # wrong type, closed worker, worker of another context: the request stays usable
    holder = {}

    def take():
        holder["req"] = lst.accept_request(timeout=10)
    th = threading.Thread(target=take, daemon=True)
    th.start()
    cth = threading.Thread(target=lambda: holder.setdefault("c", _try_connect(wc, lst.port)), daemon=True)
    cth.start()
    th.join(15)
    req = holder["req"]
    with pytest.raises(TypeError, match="expected a transport Worker"):
        req.accept(ctx)
    dead = ctx.worker()
    dead.close()
    with pytest.raises(t.ConnectionClosed, match="worker is closed"):
        req.accept(dead)
    other = t.Context({"TLS": TLS})
    try:
        with pytest.raises(ValueError, match="another Context"):
            req.accept(other.worker())
    finally:
        other.close()
    assert req.state == "pending"
    ep = req.accept(w2)
    cth.join(15)
    assert ep.worker is w2 and holder["c"].state == "up"
    lst.close()
    with pytest.raises(t.ConnectionClosed, match="listener is closed"):
        lst.accept_request(timeout=0)
    with pytest.raises(t.ConnectionClosed, match="listener is closed"):
        lst.accept(timeout=0)


def _try_connect(w, port):
    try:
        return w.connect("127.0.0.1", port, timeout=10)
    except Exception as e:     # noqa: BLE001
        return e


def test_close_listener_with_a_request_out_then_accept_or_reject():
    res = run_py("""
        ws, w2, wc = ctx.worker(), ctx.worker(), ctx.worker()
        lst = ws.listen("127.0.0.1", 0, handoff=True)
        port = lst.port
        out = {}
        def client(k):
            try:
                out[k] = wc.connect("127.0.0.1", port, timeout=10)
            except Exception as e:
                out[k] = e
        th = threading.Thread(target=client, args=("a",)); th.start()
        req = lst.accept_request(timeout=10)
        lst.close()                    # a taken request keeps UCX's listener alive
        ep = req.accept(w2)
        th.join(15)
        print("ACCEPTED", ep.worker is w2, out["a"].state)
        expect(lambda: lst.accept_request(timeout=0), t.ConnectionClosed)
        # nobody listens there any more once the last request was resolved
        expect(lambda: wc.connect("127.0.0.1", port, timeout=5), t.ConnectionRefused)
        lst2 = ws.listen("127.0.0.1", 0, handoff=True)
        port = lst2.port
        th = threading.Thread(target=client, args=("b",)); th.start()
        req = lst2.accept_request(timeout=10)
        lst2.close()
        req.reject()
        th.join(15)
        print("REJECTED", type(out["b"]).__name__)
        # queued requests (not taken) are rejected by the close
        lst3 = ws.listen("127.0.0.1", 0, handoff=True)
        port = lst3.port
        th = threading.Thread(target=client, args=("c",)); th.start()
        time.sleep(0.5)
        ws.progress()
        lst3.close()
        th.join(15)
        print("QUEUED", type(out["c"]).__name__)
        ctx.close()
    """)
    assert_ok(res, "ACCEPTED True up", "GOT ConnectionClosed accept_request", "GOT ConnectionRefused",
              "REJECTED ConnectionRefused")
    assert "QUEUED ConnectionRefused" in res[1] or "QUEUED ConnectTimeout" in res[1], res[1]


def test_destroying_the_listener_worker_with_a_request_out():
    res = run_py("""
        ws, w2, wc = ctx.worker(), ctx.worker(), ctx.worker()
        lst = ws.listen("127.0.0.1", 0, handoff=True)
        out = {}
        def client():
            try:
                out["c"] = wc.connect("127.0.0.1", lst.port, timeout=5)
            except Exception as e:
                out["c"] = e
        th = threading.Thread(target=client); th.start()
        req = lst.accept_request(timeout=10)
        ws.close()                     # the listener (and UCX's) goes with its worker
        expect(lambda: req.accept(w2), t.ConnectionClosed)
        print("STATE", req.state)
        th.join(15)
        print("CLIENT", type(out["c"]).__name__)     # (its request was rejected)
        # the same, rejected after the worker went; and a request dropped after the context closed
        ws = ctx.worker()
        lst = ws.listen("127.0.0.1", 0, handoff=True)
        th = threading.Thread(target=client); th.start()
        req = lst.accept_request(timeout=10)
        ws.close()
        req.reject()
        th.join(15)
        ws = ctx.worker()
        lst = ws.listen("127.0.0.1", 0, handoff=True)
        th = threading.Thread(target=client); th.start()
        req2 = lst.accept_request(timeout=10)
        ctx.close()
        th.join(15)
        del req2
        import gc; gc.collect()
        print("DONE")
    """)
    assert_ok(res, "GOT ConnectionClosed", "STATE failed", "CLIENT ConnectionRefused", "DONE")
    assert "UCX  WARN" not in res[1] + res[2], res


def test_accepting_worker_closed_during_the_handshake():
    """A worker closed (another thread) while an accept waits on it for the handshake: the
    accept ends with ConnectionClosed, nothing crashes."""
    res = run_py("""
        import signal, subprocess
        ws, w2 = ctx.worker(), ctx.worker()
        lst = ws.listen("127.0.0.1", 0, handoff=True)
        code = ("from gpuwire import transport as t\\nctx = t.Context({'TLS': 'tcp,self'})\\n"
                "w = ctx.worker()\\ntry:\\n    w.connect('127.0.0.1', %d, timeout=30)\\nexcept Exception:\\n    pass\\n"
                % lst.port)
        p = subprocess.Popen([sys.executable, "-c", code])
        req = lst.accept_request(timeout=30)
        os.kill(p.pid, signal.SIGSTOP)
        threading.Timer(0.3, w2.close).start()
        expect(lambda: req.accept(w2, timeout=10), t.ConnectionClosed, t.ConnectTimeout)
        os.kill(p.pid, signal.SIGKILL); p.wait()
        ctx.close()
    """)
    assert_ok(res, "GOT ConnectionClosed")


# ----------------------------------------------------------------------------- the RPC server

def _session_workers(srv) -> int:
    """Open transport workers of the server's context other than its own (the listener's, the
    spare, the warm-up client's)."""
    own = {id(srv.worker), id(srv._spare), id(srv._warmer)}
    return sum(1 for w in list(srv.ctx._workers) if not w._closed and id(w) not in own)


def _victim_and_forgery(address, victim, attacker_sends, n=4096):
    """``victim`` (an authenticated session) fills a buffer with 7s; ``attacker_sends(ep, ids, fr)``
    forges frames from a raw connection (no hello) naming the victim's server-side connection
    ids; returns the victim's buffer afterwards (all 7s unless a forged frame ran in its
    session)."""
    buf = victim.alloc(n)
    victim.memset(buf, 7, n)
    assert (victim.copy_to_host(np.zeros(n, np.uint8), buf) == 7).all()
    vid = victim._ep.remote_id                      # the victim's connection id on the server
    ids = [vid] + [(g << 16) | i for g in range(1, 5) for i in range(1, 17)] + \
          [(vid & 0xFFFF0000) | ((vid + k) & 0xFFFF) for k in range(-8, 9) if k]
    ctx = t.Context({"TLS": TLS})
    try:
        w = ctx.worker()
        ep = w.connect(address, timeout=10)
        fr = frame(900, [record("cuMemsetD8", int(buf), 0xEE, n)])     # deferred: no reply
        attacker_sends(ep, ids, fr)
        time.sleep(0.5)
        out = victim.copy_to_host(np.zeros(n, np.uint8), buf)
    finally:
        ctx.close()
    return out


def _send_forged(ep, ids, fr):
    for rid in ids:
        ep._test_forge_remote_id(rid)
        ep.send(fr, tag=P.TAG_REQ, timeout=5)


def _bye_forged(ep, ids, fr):
    ep._test_forge_remote_id(ids[0])
    ep.close()


@pytest.mark.parametrize("where", ["inproc", "process"])
def test_forged_frames_do_not_run_in_another_session(where):
    """Thread isolation, CPU executor: an attacker's raw connection (no hello, no token) sends
    deferred memsets naming the victim's connection id (and every id nearby): none runs in the
    victim's session. (Before sessions had workers of their own, the first one did.)"""
    if where == "inproc":
        with inproc_server() as srv:
            import gpuwire
            s = gpuwire.connect(srv.address)
            try:
                out = _victim_and_forgery(srv.address, s, _send_forged)
                assert (out == 7).all(), f"{int((out != 7).sum())} bytes of the victim's buffer changed"
                s.gwSync()
            finally:
                s.close()
    else:
        srv = start_server("cpu")
        try:
            s = srv.connect(name="victim")
            try:
                out = _victim_and_forgery(srv.address, s, _send_forged)
                assert (out == 7).all(), f"{int((out != 7).sum())} bytes of the victim's buffer changed"
            finally:
                s.close()
            assert srv.alive()
        finally:
            srv.stop()


def test_forged_bye_does_not_end_another_session():
    with inproc_server() as srv:
        import gpuwire
        s = gpuwire.connect(srv.address)
        try:
            out = _victim_and_forgery(srv.address, s, _bye_forged)
            assert (out == 7).all()
            time.sleep(0.3)
            s.gwSync()                                 # the victim's session goes on
            assert len([x for x in srv.sessions.values() if x.ready]) == 1
        finally:
            s.close()


def test_session_workers_close_when_sessions_end():
    with inproc_server() as srv:
        import gpuwire
        assert srv._spare is not None and _session_workers(srv) == 0
        s = gpuwire.connect(srv.address)
        sess = wait_until(lambda: [x for x in srv.sessions.values() if x.ready], 5)[0]
        assert sess.ep.worker is not srv.worker and not srv.worker.endpoints()
        assert sess.ep.worker.endpoints() == [sess.ep]
        assert wait_until(lambda: srv._spare is not None, 5)         # re-made once idle
        assert _session_workers(srv) == 1     # (counted after the refill: a spare being made is not one)
        s.close()
        assert wait_until(lambda: _session_workers(srv) == 0 and not srv.sessions, 10)
        assert sess.ep.worker._closed
        # a raw connection that never says hello: its worker goes with it too
        ctx = t.Context({"TLS": TLS})
        try:
            ep = ctx.worker().connect(srv.address, timeout=10)
            assert wait_until(lambda: _session_workers(srv) == 1, 5)
            ep.send(b"garbage", tag=P.TAG_REQ, timeout=5)
            ep.send(b"unexpected", tag=0x1234, timeout=5)          # never received: dies with it
            ep.close()
        finally:
            ctx.close()
        assert wait_until(lambda: _session_workers(srv) == 0 and not srv.sessions, 10)


def test_spare_warm_up_discards_a_worker_a_foreign_connection_reached(monkeypatch):
    """The spare session worker is warmed by one connection of the server's own (through a
    one-shot loopback listener of another worker): when another peer's connection comes in on
    it instead, the worker is not used."""
    with inproc_server() as srv:
        assert srv._warmer is not None
        ctx = t.Context({"TLS": TLS})
        fw, out = ctx.worker(), {}
        real_listen = srv._warmer.listen

        def listen(host, port, handoff=False):       # a foreign client is there first
            lst = real_listen(host, port, handoff=handoff)
            out["th"] = threading.Thread(target=lambda: out.setdefault("c", _try_connect(fw, lst.port)),
                                         daemon=True)
            out["th"].start()
            time.sleep(0.3)
            return lst
        monkeypatch.setattr(srv._warmer, "listen", listen)
        w = srv.ctx.worker()
        try:
            assert srv._warm(w) is False
            assert not w.endpoints()
        finally:
            w.close()
            out["th"].join(15)
            ctx.close()
        monkeypatch.undo()
        w = srv.ctx.worker()
        try:
            assert srv._warm(w) is True and not w.endpoints()
        finally:
            w.close()


def test_many_sequential_and_concurrent_sessions():
    with inproc_server() as srv:
        import gpuwire

        def one(k):
            with gpuwire.connect(srv.address, name=f"c{k}") as s:
                with s.alloc(1024) as d:
                    s.memset(d, k & 0xFF, 1024)
                    assert (s.copy_to_host(np.zeros(1024, np.uint8), d) == (k & 0xFF)).all()
        for k in range(25):
            one(k)
        errors = []

        def many(j):
            try:
                for k in range(5):
                    one(100 + 10 * j + k)
            except Exception as e:     # noqa: BLE001
                errors.append(e)
        ths = [threading.Thread(target=many, args=(j,)) for j in range(6)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(120)
        assert not errors, errors
        assert wait_until(lambda: _session_workers(srv) == 0 and not srv.sessions, 15)
        assert srv.ended == 25 + 30


def test_process_isolation_still_serves():
    srv = start_server("cpu-proc")
    try:
        for _ in range(2):
            with srv.connect() as s:
                assert s.address != srv.address           # redirected to a session worker process
                with s.alloc(256) as d:
                    s.memset(d, 9, 256)
                    assert (s.copy_to_host(np.zeros(256, np.uint8), d) == 9).all()
        assert srv.alive()
    finally:
        srv.stop()
