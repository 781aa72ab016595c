"""Defects of the transport's API edges found by an audit (bad input gives a clear error,
never a crash, hang or silent corruption). What could take the process down runs in a
subprocess."""
from __future__ import annotations

import gc
import math
import os
import struct
import textwrap
import threading
import time

import numpy as np
import pytest

from gpuwire import settings
from gpuwire import transport as t
from gpuwire.transport import core
from conftest import TLS
from test_transport_api import _pair, run_code, assert_snippet_ok as assert_ok

pytestmark = pytest.mark.timeout(120)


def run_py(body: str, timeout: float = 60, env=None):
    """Run ``body`` in a fresh interpreter (with ``t``, ``np``, ``threading``, ``time`` and a
    ``pair()`` of connected loopback workers at hand); returns (rc, stdout, stderr)."""
    prelude = textwrap.dedent("""
        import os, sys, threading, time, faulthandler
        faulthandler.enable()
        import numpy as np
        from gpuwire import transport as t

        def pair(tls="tcp,self"):
            ctx = t.Context({"TLS": tls})
            ws, wc = ctx.worker(), ctx.worker()
            lst = ws.listen("127.0.0.1", 0)
            got = {}
            th = threading.Thread(target=lambda: got.setdefault("ep", lst.accept(timeout=10)))
            th.start()
            try:
                c = wc.connect("127.0.0.1", lst.port, timeout=10)
            finally:
                th.join(10)
            return ctx, ws, wc, lst, got["ep"], c

        def pump(w):
            # progress w from a thread; returns its stop()
            ev = threading.Event()
            def run():
                while not ev.is_set():
                    w.wait_event(0.02)
            th = threading.Thread(target=run); th.start()
            def stop():
                ev.set(); th.join()
            return stop
    """)
    return run_code(prelude + textwrap.dedent(body), timeout, env)


class _Pump:
    """Progress a worker from a thread (stop() before closing it)."""

    def __init__(self, w):
        self.w, self.ev = w, threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while not self.ev.is_set():
            try:
                self.w.wait_event(0.02)
            except Exception:
                return

    def stop(self):
        self.ev.set()
        self.th.join(10)


# ------------------------------------------------------------ 1. wait_all duplicates


def test_wait_all_with_a_request_twice_is_a_value_error():
    assert_ok(run_py("""
        ctx, ws, wc, lst, s, c = pair()
        req = s.recv_nb(bytearray(100), tag=1, tag_mask=t.EXACT_TAG)
        stop = pump(ws)
        c.send(b"x" * 10, tag=1, timeout=5)
        stop()
        try:
            ws.wait_all([req, req], timeout=5)
            print("NO-ERROR")
        except ValueError as e:
            print("GOT ValueError", e)
        print("still", req.wait(5).nbytes)       # the request itself is untouched
        ctx.close()
    """), "GOT ValueError wait_all: request 1 is request 0 again", "still 10")


# ------------------------------------------------------------ 2. closed worker


@pytest.mark.parametrize("op", ["spin_us=", "emulate_rtt_us=", "address", "poll_lost", "event_fd"])
def test_closed_worker_raises_connection_closed(op):
    code = {"spin_us=": "setattr(w, 'spin_us', 7)", "emulate_rtt_us=": "setattr(w, 'emulate_rtt_us', 7)",
            "address": "w.address", "poll_lost": "w.poll_lost()", "event_fd": "w.event_fd"}[op]
    assert_ok(run_py(f"""
        ctx = t.Context({{"TLS": "tcp,self"}})
        w = ctx.worker()
        w.close()
        try:
            {code}
            print("NO-ERROR")
        except t.ConnectionClosed as e:
            print("GOT ConnectionClosed", e)
    """), "GOT ConnectionClosed worker is closed")


# ------------------------------------------------------------ 3. Worker on a closed Context


def test_worker_on_a_closed_context_is_connection_closed():
    assert_ok(run_py("""
        ctx = t.Context({"TLS": "tcp,self"})
        ctx.close()
        try:
            t.Worker(ctx)
            print("NO-ERROR")
        except t.ConnectionClosed as e:
            print("GOT ConnectionClosed", e)
    """), "GOT ConnectionClosed context is closed")
    with pytest.raises(TypeError, match="Context"):
        t.Worker(None)


# ------------------------------------------------------------ 10. object arrays


def test_object_arrays_are_not_buffers():
    objs = np.array([object(), "x", 5], dtype=object)
    rec = np.zeros(2, dtype=[("a", "O"), ("b", "i4")])
    for bad in (objs, rec):
        with pytest.raises(TypeError, match="Python objects"):
            t.Buffer(bad)
    # a field name with an O in it is no object
    ok = np.zeros(2, dtype=[("Offset", "i4")])
    assert t.Buffer(ok).nbytes == 8
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        with pytest.raises(TypeError, match="Python objects"):
            cep.send(objs, timeout=1)
        with pytest.raises(TypeError, match="Python objects"):
            sep.recv_nb(np.empty(4, dtype=object))
        with pytest.raises(TypeError, match="Python objects"):
            ctx.register(objs)


# ------------------------------------------------------------ 6. Endpoint.close(timeout=bad)


def test_endpoint_close_with_a_bad_timeout_raises_before_closing():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match="timeout"):
                cep.close(timeout=bad)
            assert cep.state == "up"
        with pytest.raises(TypeError, match="timeout"):
            cep.close(timeout="1")
        assert cep.state == "up"
        p = _Pump(ws)
        try:
            cep.close(timeout=None)      # None: the default; really closes
            assert cep.state == "closed"
            assert sep.wait_peer_close(5.0)
        finally:
            p.stop()
        # a huge (finite) timeout is fine too
        ws2, wc2, sep2, cep2 = _pair(ctx)
        p = _Pump(ws2)
        try:
            cep2.close(timeout=1e12)
            assert sep2.wait_peer_close(5.0)
        finally:
            p.stop()


# ------------------------------------------------------------ 12. timeout values


def test_timeout_conversion():
    assert core._ns(-1) == 0 and core._ns(-1e-9) == 0 and core._ns(-math.inf) == 0
    assert core._ns(math.inf) == core._INF and core._ns(1e300) == core._INF
    assert core._ns(10 ** 400) == core._INF
    assert core._ns(9.3e9) == core._INF          # past int64 ns: no timeout, never a wrap
    assert core._ns(1.5) == 1_500_000_000
    with pytest.raises(ValueError, match="timeout"):
        core._ns(float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        core._ns("1")


def test_negative_timeout_means_now_not_forever():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        t0 = time.monotonic()
        with pytest.raises(t.OperationTimeout):
            sep.recv(bytearray(8), tag=3, tag_mask=t.EXACT_TAG, timeout=-1)
        with pytest.raises(t.OperationTimeout):
            ws.wait_all([sep.recv_nb(bytearray(8), tag=4, tag_mask=t.EXACT_TAG)], timeout=-0.5)
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(ValueError, match="timeout"):
            sep.recv(bytearray(8), tag=3, tag_mask=t.EXACT_TAG, timeout=float("nan"))


@pytest.mark.parametrize("timeout", [9.2233720e9, float("inf")], ids=["int64-edge", "inf"])
def test_huge_timeouts_wait_for_the_message(timeout):
    """9.2233720e9 s overflowed the C deadline (a timeout after 0 s); inf was an
    OverflowError."""
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        th = threading.Timer(0.3, lambda: cep.send(b"late", tag=5, timeout=5))
        th.start()
        try:
            r = sep.recv(bytearray(8), tag=5, tag_mask=t.EXACT_TAG, timeout=timeout)
            assert r.nbytes == 4
        finally:
            th.join(10)


def test_c_deadlines_saturate():
    """A C layer passing a timeout near INT64_MAX ns (c_call_entry hands the ns over) waits;
    t0 + timeout no longer wraps to a deadline in the past."""
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        req = sep.recv_nb(bytearray(8), tag=6, tag_mask=t.EXACT_TAG)
        th = threading.Timer(0.3, lambda: cep.send(b"late", tag=6, timeout=5))
        th.start()
        try:
            t0 = time.monotonic()
            assert core.lib.gw_wait(ws._w, req._r, (1 << 63) - 1000) == 0
            assert time.monotonic() - t0 > 0.1
            assert req.wait(1).nbytes == 4
        finally:
            th.join(10)


# ------------------------------------------------------------ 7. read-only registrations


def test_read_only_buffer_registers_read_only():
    data = bytes(b"IMMUTABLE-BYTES-OBJECT-" * 4)
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        mr = ctx.register(data)
        assert mr.readonly
        v = mr.view()
        assert v.readonly
        with pytest.raises(TypeError):
            v[0:3] = b"abc"
        p = _Pump(ws)
        try:
            rk = cep.unpack_rkey(mr.pack())
            assert rk.readonly
            with pytest.raises(t.errors.RMAReadOnly, match="read-only"):
                cep.put(b"PUT", mr.base + 3, rk, timeout=5)
            assert isinstance(t.errors.RMAReadOnly("x"), PermissionError)
            got = bytearray(16)
            cep.get(got, mr.base, rk, timeout=5)      # reading it is fine
            assert bytes(got) == data[:16]
        finally:
            p.stop()
        assert data.startswith(b"IMMUTABLE")
        w = ctx.register(bytearray(64))
        assert not w.readonly and not w.view().readonly


# ------------------------------------------------------------ 8. dropped pending send


@pytest.mark.parametrize("how", ["drop", "release"])
def test_dropped_pending_send_keeps_its_payload_until_sent(how):
    assert_ok(run_py(f"""
        ctx, ws, wc, lst, s, c = pair()
        N = 4 << 20
        x = bytearray(N); del x         # glibc: the next N-byte blocks come from the heap
        into = bytearray(N)
        rreq = s.recv_nb(into, tag=7, tag_mask=t.EXACT_TAG)
        def post():
            payload = bytearray(b"\\x11") * N
            req = c.send_nb(payload, tag=7)
            assert not req.done()       # rendezvous: UCX still reads the payload
            {"req.release()" if how == "release" else "pass"}
            del req
        post()
        junk = bytearray(b"\\x77") * N  # would reuse the freed payload
        stop = threading.Event()
        def pump():
            while not stop.is_set():
                wc.wait_event(0.02)
        th = threading.Thread(target=pump); th.start()
        try:
            r = rreq.wait(20)
        finally:
            stop.set(); th.join()
        print("GOT", r.nbytes, into.count(b"\\x11"))
        ws.close(); wc.close()          # (parked payloads are let go with the worker)
        print("parked after close", len(wc._parked))
        ctx.close()
    """), f"GOT {4 << 20} {4 << 20}", "parked after close 0")


# ------------------------------------------------------------ 11. RTT emulation and timeouts


def test_emulated_rtt_timed_out_receive_keeps_the_message_for_the_next():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        with settings.override(emulate_rtt_us=400_000):   # visible 200 ms after arrival
            ws = ctx.worker()
        ws, wc, sep, cep = _pair(ctx, ws)
        p, p2 = _Pump(wc), _Pump(ws)
        try:
            cep.send(b"important", tag=1, timeout=5)
            with pytest.raises(t.OperationTimeout):
                sep.recv(bytearray(16), tag=1, tag_mask=t.EXACT_TAG, timeout=0.1)
            buf = bytearray(16)
            t0 = time.monotonic()
            r = sep.recv(buf, tag=1, tag_mask=t.EXACT_TAG, timeout=2)
            assert bytes(buf[:r.nbytes]) == b"important"
            assert time.monotonic() - t0 < 1.0          # shows at its original due time
            # a receive with another tag does not take it
            cep.send(b"again", tag=2, timeout=5)
            with pytest.raises(t.OperationTimeout):
                sep.recv(bytearray(16), tag=2, tag_mask=t.EXACT_TAG, timeout=0.05)
            with pytest.raises(t.OperationTimeout):
                sep.recv(bytearray(16), tag=3, tag_mask=t.EXACT_TAG, timeout=0.3)
            r = ws.recv(buf, tag=2, tag_mask=t.EXACT_TAG, timeout=2)   # any source too
            assert bytes(buf[:r.nbytes]) == b"again" and r.endpoint is sep
        finally:
            p.stop()
            p2.stop()


# ------------------------------------------------------------ 4, 5. close while blocked


def test_worker_close_while_another_thread_receives():
    assert_ok(run_py("""
        ctx = t.Context({"TLS": "tcp,self"})
        w = ctx.worker()
        out = {}
        def blocked():
            t0 = time.monotonic()
            try:
                w.recv(bytearray(8), timeout=None)
                out["r"] = "NO-ERROR"
            except Exception as e:
                out["r"] = f"{type(e).__name__}: {e}"
            out["dt"] = time.monotonic() - t0
        th = threading.Thread(target=blocked); th.start()
        time.sleep(0.5)
        w.close()
        th.join(10)
        print("RESULT", out.get("r", "STILL BLOCKED"), out.get("dt", 99) < 3)
        ctx.close()
    """), "RESULT ConnectionClosed: recv: the worker is closed True")


@pytest.mark.parametrize("timeout", [None, 8.0])
def test_listener_close_while_another_thread_accepts(timeout):
    assert_ok(run_py(f"""
        ctx = t.Context({{"TLS": "tcp,self"}})
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        out = {{}}
        def blocked():
            t0 = time.monotonic()
            try:
                lst.accept(timeout={timeout!r})
                out["r"] = "NO-ERROR"
            except Exception as e:
                out["r"] = type(e).__name__
            out["dt"] = time.monotonic() - t0
        th = threading.Thread(target=blocked); th.start()
        time.sleep(0.5)
        lst.close()
        th.join(10)
        print("RESULT", out.get("r", "STILL BLOCKED"), out.get("dt", 99) < 2)
        w.close(); ctx.close()
    """), "RESULT ConnectionClosed True")


# ------------------------------------------------------------ 9. foreign packed keys


def test_packed_key_of_another_peer_is_refused(spawn_peer):
    pa = spawn_peer("server", "--tls", TLS["tcp"])
    pb = spawn_peer("server", "--tls", TLS["tcp"])
    with t.Context({"TLS": TLS["tcp"]}) as ctx:
        w = ctx.worker()
        ea = w.connect(pa.address, timeout=10)
        eb = w.connect(pb.address, timeout=10)
        buf = bytearray(1 << 16)
        req = ea.recv_nb(buf, tag=0x7F0000, tag_mask=t.EXACT_TAG)
        ea.send(struct.pack("<QQ", 64, 1), header=b"!gw:reg", tag=0x7F0000, timeout=10)
        r = req.wait(10)
        body = bytes(buf[r.header_len:r.nbytes])
        key = body[16:]
        with pytest.raises(ValueError, match="another process"):
            eb.unpack_rkey(key)
        rk = ea.unpack_rkey(key)                 # on the endpoint to its owner: fine
        assert rk.length == 64


# ------------------------------------------------------------ 14. Worker() failing


def test_failing_worker_constructor_frees_the_c_worker(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    def nfds():
        return len(os.listdir(f"/proc/{os.getpid()}/fd"))

    with t.Context({"TLS": "tcp,self"}) as ctx:
        ctx.worker().close()                     # (UCX's one-time fds)
        monkeypatch.setattr(core, "_ns", boom)
        f0 = nfds()
        for _ in range(10):
            with pytest.raises(RuntimeError, match="boom"):
                ctx.worker()
        assert nfds() - f0 < 5


# ------------------------------------------------------------ 17. error messages


def test_listen_on_a_port_in_use_says_so():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        with pytest.raises(t.TransportError, match="address already in use"):
            w.listen("127.0.0.1", lst.port)


def test_connect_without_tcp_names_tcp():
    with t.Context({"TLS": "tcp,self"}) as sctx, t.Context({"TLS": "sm,self"}) as cctx:
        lst = sctx.worker().listen("127.0.0.1", 0)
        with pytest.raises(t.ConnectionRefused, match="needs tcp in UCX_TLS"):
            cctx.worker().connect(lst.address, timeout=5)


def test_bad_context_configs_name_what_was_wrong():
    with pytest.raises(t.TransportError, match="UCX_TLS='bogus'"):
        t.Context({"TLS": "bogus"})
    with pytest.raises(TypeError, match="names must be non-empty strings"):
        t.Context({5: "x"})
    with pytest.raises(TypeError, match="TLS=None"):
        t.Context({"TLS": None})


# ------------------------------------------------------------ 18. raw buffers, bools


def test_rawbuffer_address_range_and_bools():
    for ptr in (1 << 64, (1 << 64) + 0x1000, True):
        with pytest.raises(ValueError, match="ptr"):
            t.RawBuffer(ptr, 8)
    with pytest.raises(ValueError, match="address space"):
        t.RawBuffer((1 << 64) - 4, 8)
    with pytest.raises(ValueError, match="size"):
        t.RawBuffer(4096, True)
    with t.Context({"TLS": "tcp,self"}) as ctx:
        with pytest.raises(ValueError, match="size"):
            ctx.register(size=True)
        w = ctx.worker()
        with pytest.raises(ValueError, match="port"):
            w.listen("127.0.0.1", True)
        with pytest.raises(ValueError, match="port"):
            w.connect("127.0.0.1", True, timeout=1)


# ------------------------------------------------------------ 19. dropped objects


def test_dropped_listener_frees_its_port_and_worker_close_frees_rkeys():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        port = lst.port
        del lst
        gc.collect()
        again = w.listen("127.0.0.1", port)       # the port was given back
        again.close()
        ws, wc, sep, cep = _pair(ctx)
        mr = ctx.register(bytearray(64))
        p = _Pump(ws)
        try:
            rk = cep.unpack_rkey(mr.pack())
        finally:
            p.stop()
        assert rk._k is not None
        wc.close()
        assert rk._k is None                      # destroyed with the worker, not leaked


def test_dropped_memory_region_is_unregistered(monkeypatch):
    calls = []
    real_lib = core.lib
    real = real_lib.gw_mem_unmap

    class Lib:
        def __getattr__(self, name):
            return getattr(real_lib, name)

        @staticmethod
        def gw_mem_unmap(m):
            calls.append(m)
            real(m)

    with t.Context({"TLS": "tcp,self"}) as ctx:
        monkeypatch.setattr(core, "lib", Lib())
        mr = ctx.register(size=4096)
        v = mr.view()                             # a view keeps it registered
        del mr
        gc.collect()
        assert calls == []
        v[0] = 1
        del v
        gc.collect()
        assert len(calls) == 1
