"""API edges of gpuwire.transport: bad arguments give clear exceptions (never a
crash), use-after-close, settings (GPUWIRE_*), idle CPU cost of a blocked
server. Anything that could take the process down runs in a subprocess."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from gpuwire import settings
from gpuwire import transport as t
from conftest import TLS

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------ helpers


# the snippet runner's `expect(fn, *exc)`: prints GOT <exception> <message>, or NO-EXCEPTION
EXPECT = textwrap.dedent("""
    def expect(fn, *exc):
        try:
            fn()
        except exc as e:
            print("GOT", type(e).__name__, str(e).replace(chr(10), " "), flush=True)
            return e
        print("NO-EXCEPTION", flush=True)
""")


def run_snippet(body, peer=None, tls="tcp,self", timeout=30, env=None):
    """Run ``body`` in a fresh interpreter with ``ctx``, ``w`` and (given a peer)
    ``ep`` connected to it; returns (returncode or "timeout", stdout, stderr)."""
    prelude = textwrap.dedent(f"""
        import os, sys, time, signal
        from gpuwire import transport as t
        ctx = t.Context({{"TLS": {tls!r}}})
        w = ctx.worker()
        ep = w.connect(os.environ["GW_PEER"], timeout=10) if os.environ.get("GW_PEER") else None
    """) + EXPECT
    env = dict(env or {})
    if peer is not None:
        env["GW_PEER"] = peer.address
        env["GW_PEER_PID"] = str(peer.pid)
    return run_code(prelude + textwrap.dedent(body), timeout, env)


def run_code(code, timeout, env=None):
    """Run ``code`` (then print SNIPPET-END) in a fresh interpreter with ``env`` added to
    the environment; returns (returncode or "timeout", stdout, stderr)."""
    code += '\nprint("SNIPPET-END", flush=True)\n'
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        return "timeout", e.stdout or "", e.stderr or ""
    return p.returncode, p.stdout, p.stderr


def assert_snippet_ok(res, *expected_lines):
    rc, out, err = res
    assert rc == 0, f"snippet died (rc={rc}); stdout:\n{out}\nstderr:\n{err[-2000:]}"
    assert "SNIPPET-END" in out
    for line in expected_lines:
        assert line in out, f"{line!r} not in output:\n{out}"


@pytest.fixture
def peer(spawn_peer):
    return spawn_peer("server", "--tls", TLS["tcp"])


# ------------------------------------------------------------ buffers and arguments


@pytest.mark.parametrize("bad", ["text", 5, 2.5, None, [1, 2], {"a": 1}, object()],
                         ids=["str", "int", "float", "None", "list", "dict", "object"])
def test_non_buffers_are_type_errors_naming_the_type(link, bad):
    name = type(bad).__name__
    hdr = bad if bad is not None else "h"  # header=None means "no header"
    ops = [(lambda: link.ep.send(bad, timeout=1), name),
           (lambda: link.ep.send_nb(bad), name),
           (lambda: link.ep.send(b"x", header=hdr, timeout=1), type(hdr).__name__),
           (lambda: link.ep.recv_nb(bad), name),
           (lambda: link.w.recv_nb(bad), name),
           (lambda: link.ep.call(bad, bytearray(8), timeout=1), name),
           (lambda: link.ep.call(b"x", bad, timeout=1), name),
           (lambda: link.ep.put(bad, 0, None), None),
           (lambda: t.Buffer(bad), name)]
    if bad is not None:  # register(None) means register(size=...)
        ops.append((lambda: link.ctx.register(bad), name))
    for op, expected in ops:
        with pytest.raises(TypeError) as ei:
            op()
        if expected:
            assert f"got {expected}" in str(ei.value), str(ei.value)
    assert link.ep.state == "up"
    assert link.ep.call(b"still fine", bytearray(16), timeout=5) == 10


def test_read_only_buffers_cannot_receive(link):
    ro = [b"immutable", memoryview(b"abc"), np.frombuffer(b"abcd", dtype=np.uint8),
          t.RawBuffer(np.zeros(8, np.uint8).ctypes.data, 8, readonly=True)]
    for buf in ro:
        for op in (lambda: link.ep.recv_nb(buf), lambda: link.w.recv_nb(buf),
                   lambda: link.ep.call(b"x", buf, timeout=1), lambda: t.Buffer(buf, writable=True)):
            with pytest.raises(TypeError, match="read-only"):
                op()
    # a Buffer made read-only cannot be used to receive either
    with pytest.raises(TypeError, match="read-only"):
        link.ep.recv_nb(t.Buffer(b"xyz"))
    # but read-only buffers are fine to send
    rr = link.ep.recv_nb(bytearray(16), tag=0x80, tag_mask=t.EXACT_TAG)
    link.ep.send(memoryview(b"ro-ok"), header=b"h", tag=0x80, timeout=5)
    assert rr.wait(5).nbytes == 6


def test_non_contiguous_buffers_are_rejected(link):
    a = np.zeros((8, 8), dtype=np.uint8)[:, 1]
    with pytest.raises(ValueError, match="contiguous"):
        link.ep.send(a, timeout=1)
    with pytest.raises(ValueError, match="contiguous"):
        link.ep.recv_nb(a)


def test_header_limits(link):
    with pytest.raises(ValueError, match="256 bytes; at most 255"):
        link.ep.send(b"x", header=b"h" * 256, timeout=1)
    with pytest.raises(ValueError, match="at most 255"):
        link.ep.send_nb(b"", header=bytearray(4096))
    rr = link.ep.recv_nb(bytearray(300), tag=0x81, tag_mask=t.EXACT_TAG)
    link.ep.send(b"", header=b"h" * 255, tag=0x81, timeout=5)
    assert rr.wait(5).header_len == 255


@pytest.mark.parametrize("tag", [-1, t.MAX_TAG + 1, 1 << 24, 1 << 32])
def test_send_tag_out_of_range(link, tag):
    with pytest.raises(ValueError, match="tag must be in 0..0xfffffe"):
        link.ep.send(b"x", tag=tag, timeout=1)
    with pytest.raises(ValueError):
        link.ep.prepare_call(b"x", bytearray(8), tag=tag)


@pytest.mark.parametrize("tag", [-1, 1 << 24], ids=["neg", "2**24"])
@pytest.mark.parametrize("op", ["ep.recv_nb", "w.recv_nb", "call"])
def test_recv_and_call_tag_out_of_range(link, op, tag):
    fn = {"ep.recv_nb": lambda: link.ep.recv_nb(bytearray(8), tag=tag, tag_mask=t.EXACT_TAG),
          "w.recv_nb": lambda: link.w.recv_nb(bytearray(8), tag=tag, tag_mask=t.EXACT_TAG),
          "call": lambda: link.ep.call(b"x", bytearray(8), tag=tag, timeout=0.5)}[op]
    with pytest.raises(ValueError, match="tag"):
        req = fn()
        if isinstance(req, t.Request):
            req.release()


def test_bad_tag_types(link):
    with pytest.raises(TypeError):
        link.ep.send(b"x", tag="1", timeout=1)
    with pytest.raises(TypeError):
        link.ep.send(b"x", tag=1.5, timeout=1)
    with pytest.raises(TypeError, match="timeout must be a number"):
        link.ep.recv(bytearray(8), timeout="1")


def test_numpy_header(link):
    hdr = np.frombuffer(b"hdr4", dtype=np.uint8)
    rr = link.ep.recv_nb(bytearray(16), tag=0x82, tag_mask=t.EXACT_TAG)
    link.ep.send(b"payload", header=hdr, tag=0x82, timeout=5)
    assert rr.wait(5).header_len == 4


def test_message_larger_than_buffer_is_truncated_error(link):
    for n in (9, 5000, 400000):
        req = link.ep.recv_nb(bytearray(8), tag=0x83, tag_mask=t.EXACT_TAG)
        link.ep.send(bytes(n), tag=0x83, timeout=10)
        with pytest.raises(t.MessageTruncated) as ei:
            req.wait(10)
        assert isinstance(ei.value, t.TransportError)
    # any-source receive too
    req = link.w.recv_nb(bytearray(4), tag=0x84, tag_mask=t.EXACT_TAG)
    link.ep.send(b"12345", tag=0x84, timeout=5)
    with pytest.raises(t.MessageTruncated):
        req.wait(5)
    # exactly fitting is fine
    buf = bytearray(5)
    req = link.ep.recv_nb(buf, tag=0x85, tag_mask=t.EXACT_TAG)
    link.ep.send(b"12345", tag=0x85, timeout=5)
    assert req.wait(5).nbytes == 5 and buf == b"12345"


@pytest.mark.parametrize("addr", ["nohost.invalid:1", "127.0.0.1", "127.0.0.1:99999", "",
                                  "127.0.0.1:abc", "127.0.0.1:0", "[::1", "1:2:3",
                                  "[::1]x"])
def test_bad_connect_addresses_are_value_errors(addr):
    with t.Context({"TLS": "tcp,self"}) as ctx:
        w = ctx.worker()
        t0 = time.monotonic()
        with pytest.raises(ValueError):
            w.connect(addr, timeout=2)
        assert time.monotonic() - t0 < 10.0  # a DNS lookup at worst, never a connect wait


def test_bad_connect_and_listen_arguments():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        w = ctx.worker()
        for kw in ({"port": 0}, {"port": 70000}, {"port": -1}, {"port": "80"}):
            with pytest.raises(ValueError, match="port"):
                w.connect("127.0.0.1", **kw)
        for port in (-1, 65536, "0", 1.5):
            with pytest.raises(ValueError, match="port"):
                w.listen("127.0.0.1", port)
        with pytest.raises(ValueError, match="resolve"):
            w.listen("nohost.invalid", 0)
        for addr in (None, 5):
            with pytest.raises(ValueError):
                w.connect(addr)
        assert t.parse_hostport("[::1]:5") == ("::1", 5)
        assert t.parse_hostport("localhost", 7)[1] == 7
        with pytest.raises(ValueError, match="no port"):
            t.parse_hostport("localhost")


def test_bad_worker_addresses_are_value_errors():
    with t.Context({"TLS": "sm,self"}) as ctx:
        w, w2 = ctx.worker(), ctx.worker()
        good = w.address
        for bad in (b"", b"garbage", good[:20], good + b"tail", b"\0" * len(good)):
            with pytest.raises(ValueError, match="not a gpuwire worker address"):
                w2.connect_address(bad, timeout=1)
        for bad in ("text", None, 5):
            with pytest.raises(TypeError, match="must be bytes"):
                w2.connect_address(bad, timeout=1)
        # a well-formed but corrupted address is refused, not a crash
        corrupted = good[:-8] + b"\xff" * 8
        with pytest.raises((t.ConnectionRefused, t.ConnectTimeout, ValueError)):
            w2.connect_address(corrupted, timeout=1)


def test_connect_by_address_over_shared_memory():
    """Worker addresses connect without a listener, over sm only."""
    with t.Context({"TLS": "sm,self"}) as ctx:
        ws, wc = ctx.worker(), ctx.worker()
        res = {}

        def serve():
            sep = ws.accept_address(timeout=10)
            buf = bytearray(64)
            rr = sep.recv(buf, timeout=10)
            sep.send(bytes(buf[:rr.nbytes]).upper(), tag=rr.tag, timeout=10)
            res["sep"] = sep
            while not res.get("done"):
                ws.wait_event(0.02)

        th = threading.Thread(target=serve)
        th.start()
        try:
            ep = wc.connect_address(ws.address, timeout=10)
            assert "memory" in ep.transports
            reply = bytearray(64)
            n = ep.call(b"by address", reply, tag=3, timeout=10)
            assert bytes(reply[:n]) == b"BY ADDRESS"
            assert ep.peer_pid == os.getpid()
        finally:
            res["done"] = True
            th.join(10)


def test_connect_without_tcp_is_refused_quickly():
    """A client context without tcp cannot make a sockaddr connection: it is refused
    at once, it does not hang."""
    with t.Context({"TLS": "tcp,self"}) as sctx, t.Context({"TLS": "sm,self"}) as cctx:
        lst = sctx.worker().listen("127.0.0.1", 0)
        t0 = time.monotonic()
        with pytest.raises(t.ConnectionRefused, match="unreachable"):
            cctx.worker().connect(lst.address, timeout=5)
        assert time.monotonic() - t0 < 1.0


def test_listen_without_tcp_is_an_error():
    with t.Context({"TLS": "sm,self"}) as ctx:
        with pytest.raises(t.TransportError, match="tcp"):
            ctx.worker().listen("127.0.0.1", 0)


def test_bad_context_settings_are_transport_errors():
    with pytest.raises(t.TransportError, match="NOT_A_UCX_KEY"):
        t.Context({"NOT_A_UCX_KEY": "1"})
    with pytest.raises(t.TransportError, match="RNDV_THRESH=not-a-size"):
        t.Context({"UCX_RNDV_THRESH": "not-a-size"})


def test_rawbuffer_and_register_validation():
    for ptr in (0, -1, "0x10", None, 1.5):
        with pytest.raises(ValueError, match="ptr"):
            t.RawBuffer(ptr, 8)
    for size in (-1, "8", 1.5):
        with pytest.raises(ValueError, match="size"):
            t.RawBuffer(4096, size)
    with t.Context({"TLS": "tcp,self"}) as ctx:
        for size in (0, -5, 1.5, "4096"):
            with pytest.raises(ValueError, match="size must be a positive int"):
                ctx.register(size=size)
        with pytest.raises(ValueError, match="empty"):
            ctx.register(b"")
        with pytest.raises(ValueError, match="not both"):
            ctx.register(bytearray(8), size=8)
        mr = ctx.register(size=4096)
        assert mr.length == 4096 and mr.base and len(mr.view()) == 4096
        mr.view()[:4] = b"abcd"
        assert bytes(mr.view()[:4]) == b"abcd"
        assert mr.buffer.nbytes == 4096 and mr.buffer.ptr == mr.base
        mr.close()
        mr.close()  # idempotent


@pytest.mark.parametrize("what", ["view", "buffer", "pack"])
def test_memory_region_use_after_close_is_a_clear_error(what):
    with t.Context({"TLS": "tcp,self"}) as ctx:
        mr = ctx.register(size=1 << 20)
        mr.close()
        with pytest.raises((ValueError, t.TransportError)):
            getattr(mr, what)() if what != "buffer" else mr.buffer


# ------------------------------------------------------------ rkeys (no RMA)


def test_garbage_packed_keys_are_value_errors(link):
    mr = link.ctx.register(size=4096)
    good = mr.pack()
    for bad in (b"", b"garbage", os.urandom(200), good[:31], good[:-1], good + b"x",
                b"\0" * len(good)):
        with pytest.raises(ValueError, match="not a packed gpuwire memory key"):
            link.ep.unpack_rkey(bad)
    for bad in ("text", None, 5):
        with pytest.raises(TypeError, match="packed rkey must be bytes"):
            link.ep.unpack_rkey(bad)
    with pytest.raises(ValueError, match="another process"):
        link.ep.unpack_rkey(good)   # our own key names us, not the peer: RMA would miss
    _, body = link.command("reg", struct.pack("<QQ", 4096, 1))
    base = struct.unpack_from("<Q", body)[0]
    rk = link.ep.unpack_rkey(body[16:])  # the peer's key on the endpoint to it
    assert (rk.base, rk.length) == (base, 4096)
    with pytest.raises(TypeError, match="RemoteKey"):
        link.ep.put(b"x", base, body[16:])
    mr.close()


def test_corrupted_key_body_is_a_value_error(link):
    mr = link.ctx.register(size=4096)
    good = mr.pack()
    with pytest.raises(ValueError):
        link.ep.unpack_rkey(good[:32] + b"\xff" * (len(good) - 32))


# ------------------------------------------------------------ use after close (subprocess)


def test_operations_after_close_raise_connection_closed(peer):
    assert_snippet_ok(run_snippet("""
        ep.close()
        buf = bytearray(8)
        expect(lambda: ep.send(b"x"), t.ConnectionClosed)
        expect(lambda: ep.recv_nb(buf), t.ConnectionClosed)
        expect(lambda: ep.flush(), t.ConnectionClosed)
        print("STATE", ep.state)
    """, peer), "GOT ConnectionClosed", "STATE closed")


@pytest.mark.parametrize("op", ["call", "serve_echo", "peer_pid", "prepared_call"])
def test_use_after_close_does_not_crash(peer, op):
    body = {
        "call": 'expect(lambda: ep.call(b"x", bytearray(8), timeout=1), t.ConnectionClosed)',
        "serve_echo": 'expect(lambda: ep.serve_echo(bytearray(64), 1), t.ConnectionClosed)',
        "peer_pid": 'print("PID", ep.peer_pid); print("GOT ConnectionClosed")',
        "prepared_call": 'expect(f, t.ConnectionClosed)',
    }[op]
    pre = 'f = ep.prepare_call(b"x", bytearray(8), timeout=1); assert f() == 1\n'
    assert_snippet_ok(run_snippet(pre + "ep.close()\n" + body, peer), "GOT ConnectionClosed")


@pytest.mark.parametrize("op", ["worker", "info"])
def test_context_use_after_close_does_not_crash(op):
    assert_snippet_ok(run_snippet(f"""
        ctx.close()
        expect(lambda: ctx.{op}(), t.ConnectionClosed)
    """), "GOT ConnectionClosed")


def test_pending_any_source_receive_after_worker_close(peer):
    assert_snippet_ok(run_snippet("""
        req = w.recv_nb(bytearray(8), tag=5, tag_mask=t.EXACT_TAG)
        w.close()
        expect(lambda: req.wait(0.5), t.ConnectionClosed)
    """, peer), "GOT ConnectionClosed")


@pytest.mark.parametrize("fn", ["wait_any", "wait_all"])
def test_wait_on_released_request_does_not_crash(peer, fn):
    assert_snippet_ok(run_snippet(f"""
        req = ep.recv_nb(bytearray(8), tag=5, tag_mask=t.EXACT_TAG)
        ep.send(b"x", tag=5)
        req.wait(5)
        expect(lambda: w.{fn}([req], timeout=0.5), t.TransportError, ValueError)
    """, peer), "GOT")


def test_wait_any_empty_list():
    assert_snippet_ok(run_snippet("""
        expect(lambda: w.wait_any([]), ValueError)
    """, timeout=5), "GOT ValueError")


def test_wait_all_empty_list_and_wait_any_empty_with_timeout(link):
    assert link.w.wait_all([], timeout=0.1) == []
    with pytest.raises(ValueError, match="no requests"):  # with a timeout too
        link.w.wait_any([], timeout=0.05)
    with pytest.raises(TypeError, match="expected Requests"):
        link.w.wait_any([object()], timeout=0.05)


def test_close_lost_endpoint_then_peer_exits_does_not_crash(peer):
    assert_snippet_ok(run_snippet("""
        ep.send(b"tok", header=b"!gw:close", tag=9)
        expect(lambda: ep.recv(bytearray(8), tag=0x555, tag_mask=t.EXACT_TAG, timeout=5),
               t.ConnectionLost)
        ep.close()                      # the peer closed first: our conn is "lost"
        os.kill(int(os.environ["GW_PEER_PID"]), signal.SIGKILL)
        time.sleep(0.2)
        for _ in range(10):
            w.wait_event(0.05)          # UCX now reports the data endpoint's reset
    """, peer), "GOT ConnectionLost")


@pytest.mark.timeout(180)
def test_accepted_client_connects_without_further_server_progress():
    # in a subprocess: after the failed connect, closing the context has been seen
    # to crash the process
    assert_snippet_ok(run_snippet("""
        import threading
        ctx.close()
        for attempt in range(100):
            with t.Context({"TLS": "tcp,self"}) as c2:
                ws, wc = c2.worker(), c2.worker()
                lst = ws.listen("127.0.0.1", 0)
                kept = []  # keep the accepted endpoint open
                th = threading.Thread(target=lambda: kept.append(lst.accept(timeout=10)))
                th.start()  # accepts one client, then never progresses ws again
                try:
                    wc.connect(lst.address, timeout=1.5)
                except t.ConnectTimeout as e:
                    print("ATTEMPT", attempt, "FAILED:", repr(e), flush=True)
                    os._exit(3)
                finally:
                    th.join()
        print("ALL-CONNECTED")
    """, timeout=150), "ALL-CONNECTED")


# ------------------------------------------------------------ settings


def test_settings_override_affects_new_workers():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        default = settings.get("spin_us")
        before = ctx.worker()
        with settings.override(spin_us=0):
            assert settings.get("spin_us") == 0
            inside = ctx.worker()
            assert inside.spin_us == 0
            assert before.spin_us == default
            with settings.override(spin_us="7.5"):  # strings are parsed
                assert ctx.worker().spin_us == 7.5
            assert ctx.worker().spin_us == 0
        assert ctx.worker().spin_us == default
        assert inside.spin_us == 0  # a worker keeps what it was made with
        inside.spin_us = 3
        assert inside.spin_us == 3
        with pytest.raises(KeyError, match="unknown gpuwire setting"):
            with settings.override(no_such_setting=1):
                pass
        with pytest.raises(ValueError, match="GPUWIRE_SPIN_US='abc'"):
            with settings.override(spin_us="abc"):
                pass
        assert settings.get("spin_us") == default


def test_spin_zero_worker_still_delivers(spawn_peer):
    peer = spawn_peer("server", "--tls", TLS["shm"], "--spin-us", "0")
    assert peer.info["spin_us"] == 0
    with settings.override(spin_us=0), t.Context({"TLS": TLS["shm"]}) as ctx:
        ep = ctx.worker().connect(peer.address, timeout=10)
        reply = bytearray(300000)
        for n in (1, 5000, 300000):
            assert ep.call(b"z" * n, reply, tag=2, timeout=10) == n


@pytest.mark.parametrize("var,value", [("GPUWIRE_SPIN_US", "abc"), ("GPUWIRE_SPIN_US", "1e"),
                                       ("GPUWIRE_OP_TIMEOUT_S", "soon"),
                                       ("GPUWIRE_CONNECT_TIMEOUT_S", "x")])
def test_bad_environment_setting_names_the_variable(var, value):
    code = ("from gpuwire import transport as t, settings\n"
            "ctx = t.Context({'TLS': 'tcp,self'})\n"
            "try:\n"
            "    ctx.worker(); settings.get('connect_timeout_s')\n"
            "except ValueError as e:\n"
            "    print('VALUEERROR', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, var: value})
    assert p.returncode == 0, p.stderr
    assert f"VALUEERROR {var}={value!r}" in p.stdout, p.stdout + p.stderr


def test_environment_setting_is_used():
    code = ("from gpuwire import transport as t\n"
            "print('SPIN', t.Context({'TLS': 'tcp,self'}).worker().spin_us)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "GPUWIRE_SPIN_US": "7"})
    assert p.returncode == 0, p.stderr
    assert "SPIN 7.0" in p.stdout


def test_nan_spin_setting_names_the_variable():
    code = ("from gpuwire import transport as t\n"
            "try:\n"
            "    t.Context({'TLS': 'tcp,self'}).worker()\n"
            "except ValueError as e:\n"
            "    print('VALUEERROR', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "GPUWIRE_SPIN_US": "nan"})
    assert "VALUEERROR" in p.stdout and "GPUWIRE_SPIN_US" in p.stdout, p.stdout + p.stderr


def _call_median(ep, n=5):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        ep.call(b"x", bytearray(8), tag=1, timeout=5)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2]


def test_emulated_rtt_delays_replies(spawn_peer):
    peer = spawn_peer("server", "--tls", TLS["shm"])
    with t.Context({"TLS": TLS["shm"]}) as ctx:
        plain = ctx.worker().connect(peer.address, timeout=10)
        with settings.override(emulate_rtt_us=20000):
            slow_w = ctx.worker()
        assert slow_w.emulate_rtt_us == 20000
        slow = slow_w.connect(peer.address, timeout=10)
        assert _call_median(plain) < 0.005
        assert _call_median(slow) >= 0.010  # the reply becomes visible rtt/2 after arrival


def test_emulated_rtt_is_close_to_the_setting(spawn_peer):
    peer = spawn_peer("server", "--tls", TLS["shm"])
    with t.Context({"TLS": TLS["shm"]}) as ctx:
        with settings.override(emulate_rtt_us=20000):
            w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        assert 0.010 <= _call_median(ep) < 0.040


# ------------------------------------------------------------ idle cost


def _cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_share(pid, seconds=1.0):
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_seconds(pid) - c0) / (time.monotonic() - t0)


@pytest.mark.parametrize("kind", sorted(TLS))
def test_idle_server_costs_no_cpu(spawn_peer, kind):
    """With the default spin (50 us) a server blocked in accept, and then in
    accept + recv with a connected idle client, uses ~0% CPU."""
    default = settings.all_settings()["spin_us"].default
    assert default == 50
    peer = spawn_peer("server", "--tls", TLS[kind], env={"GPUWIRE_SPIN_US": str(default)})
    assert peer.info["spin_us"] == 50
    time.sleep(0.3)  # let start-up work finish
    share = _cpu_share(peer.pid)
    assert share < 0.05, f"server blocked in accept used {share:.1%} CPU"
    with t.Context({"TLS": TLS[kind]}) as ctx:
        ep = ctx.worker().connect(peer.address, timeout=10)
        assert ep.call(b"hello", bytearray(8), timeout=5) == 5
        time.sleep(0.2)
        share = _cpu_share(peer.pid)
        assert share < 0.05, f"server blocked in accept+recv used {share:.1%} CPU"


# ------------------------------------------------------------ adaptive call spin


def _delayed_echo(ws, lst, n, delay_s, ready):
    """Accept one client on ``lst``; answer ``n`` calls, each ``delay_s`` after it came."""
    ep = lst.accept(timeout=10)
    ready.set()
    buf = bytearray(64)
    try:
        for _ in range(n):
            r = ep.recv(buf, timeout=10)
            time.sleep(delay_s)
            ep.send(bytes(buf[:r.nbytes]), tag=r.tag, timeout=10)
    finally:
        ep.close()


@pytest.mark.parametrize("adapt", [False, True])
def test_call_spin_adapts_to_the_recent_waits(adapt):
    """Worker.call_spin_max_us: calls whose replies take longer than spin_us block on the
    event fd every time, unless the adaptive spin is on: then, after the first call, a call
    spins up to twice the recent waits (call_wait_hint_us) and does not block. The replies
    are right either way."""
    import threading
    n, delay = 10, 0.02
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc = ctx.worker(), ctx.worker()
        wc.spin_us = 100
        assert wc.call_spin_max_us == 0           # off unless set
        if adapt:
            wc.call_spin_max_us = 200_000
        lst = ws.listen("127.0.0.1", 0)
        ready = threading.Event()
        th = threading.Thread(target=_delayed_echo, args=(ws, lst, n, delay, ready), daemon=True)
        th.start()
        try:
            ep = wc.connect(lst.address, timeout=10)
            assert ready.wait(10)
            reply = bytearray(64)
            blocked = []
            for i in range(n):
                b0 = wc.blocked_waits
                assert ep.call(b"call %d" % i, reply, tag=5, timeout=10) == len(b"call %d" % i)
                assert bytes(reply[:len(b"call %d" % i)]) == b"call %d" % i
                blocked.append(wc.blocked_waits - b0)
            assert wc.call_wait_hint_us >= delay * 1e6 * 0.9
            if adapt:          # (one late reply, > twice the recent ones, may still block once)
                assert sum(blocked[2:]) <= 1, blocked
            else:
                assert all(b >= 1 for b in blocked), blocked
        finally:
            th.join(timeout=30)
        assert not th.is_alive()


def test_call_spin_max_refuses_bad_values():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        w = ctx.worker()
        for bad in (-1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="call_spin_max_us"):
                w.call_spin_max_us = bad
        assert w.call_spin_max_us == 0


# ------------------------------------------------------------ orderly goodbye: wait_peer_close, forced close


def _send_recv(sep, cep, data, tag):
    """``data`` from cep to sep, each side driven by its own thread; returns what arrived."""
    into = bytearray(len(data))
    r = sep.recv_nb(into, tag=tag)
    th = threading.Thread(target=cep.send, args=(data,), kwargs={"tag": tag, "timeout": 10})
    th.start()
    try:
        n = r.wait(10).nbytes
    finally:
        th.join(10)
    return bytes(into[:n])


def _pair(ctx, ws=None):
    """A listener's worker (``ws``, or a new one) and a client worker connected over sockaddr
    on 127.0.0.1; returns (server worker, client worker, server ep, client ep)."""
    ws, wc = ws or ctx.worker(), ctx.worker()
    lst = ws.listen("127.0.0.1", 0)
    got = {}
    th = threading.Thread(target=lambda: got.setdefault("ep", lst.accept(timeout=10)))
    th.start()
    try:
        cep = wc.connect("127.0.0.1", lst.port, timeout=10)
    finally:
        th.join(10)
    lst.close()
    return ws, wc, got["ep"], cep


def test_wait_peer_close_times_out_while_the_peer_is_up_and_returns_on_its_bye():
    with t.Context({"TLS": "tcp,self"}) as ctx:
        ws, wc, sep, cep = _pair(ctx)
        try:
            t0 = time.monotonic()
            assert cep.wait_peer_close(0.1) is False
            assert 0.09 <= time.monotonic() - t0 < 2.0 and cep.state == "up"
            th = threading.Thread(target=sep.close)
            th.start()
            try:
                assert cep.wait_peer_close(5.0) is True
            finally:
                th.join(10)
            assert cep.state == "lost"
            assert cep.wait_peer_close(0.0) is True        # (at once, and with no time left)
        finally:
            for o in (cep, sep, wc, ws):
                o.close()


def test_orderly_goodbye_is_quiet_on_both_sides(capfd):
    """The goodbye the RPC uses at a session's end, on tcp with large messages on both rails:
    one side closes (flush, then its BYE), the other waits for that BYE and closes forced
    (flushing nothing; its data endpoint goes with its worker). No UCX error or warning on
    either side: a flush close towards a side already gone logs 'error during flush', and
    a flush close of the control endpoint waits for a peer that never answers. The forced
    side's pending receive fails; everything sent before the goodbye arrived."""
    with t.Context({"TLS": "tcp,self"}) as ctx:
        for _ in range(4):
            ws, wc, sep, cep = _pair(ctx)
            try:
                big = bytes(range(256)) * 4096        # (1 MiB: the rendezvous protocol)
                assert _send_recv(sep, cep, big, 9) == big
                assert _send_recv(cep, sep, big[::-1], 10) == big[::-1]
                pending = cep.recv_nb(bytearray(8), tag=11)
                th = threading.Thread(target=sep.close)
                th.start()
                try:
                    assert cep.wait_peer_close(5.0)
                finally:
                    th.join(10)
                t0 = time.monotonic()
                cep.close(force=True)
                wc.close()
                assert time.monotonic() - t0 < 1.0
                with pytest.raises(t.TransportError):
                    pending.wait(5)
            finally:
                for o in (cep, sep, wc, ws):
                    o.close()
    err = capfd.readouterr().err
    assert "UCX  ERROR" not in err and "UCX  WARN" not in err, err


def test_a_plain_close_delivers_what_was_sent_and_the_peer_sees_it_go():
    """Flush, then BYE: a message sent (locally complete) right before close() arrives,
    and the peer's connection goes down after it."""
    with t.Context({"TLS": "tcp,self"}) as ctx:
        for _ in range(3):
            ws, wc, sep, cep = _pair(ctx)
            try:
                assert _send_recv(sep, cep, b"first", 2) == b"first"    # (the data path is up)
                buf = bytearray(8)
                r = sep.recv_nb(buf, tag=3)
                cep.send(b"last", tag=3, timeout=10)
                cep.close()
                assert cep.state == "closed"
                assert bytes(buf[:r.wait(10).nbytes]) == b"last"
                assert sep.wait_peer_close(5.0) and sep.state == "lost"
            finally:
                for o in (cep, sep, wc, ws):
                    o.close()
