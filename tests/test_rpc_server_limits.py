"""Limits and start-up checks of `gpuwire serve` (CPU executor, a real server process): bad
hello info, oversize inline results, bulk payloads that never come, host allocations over
the memory budget, client-chosen sizes of failed pushes, announced module images, idle
unauthenticated connections, and the CLI's one-line errors for bad arguments. Every case
gets an error (reply or exit status 2) and the server goes on serving others."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from gpuwire import transport as t
from gpuwire.rpc import protocol as P
from gpuwire.rpc.codegen import layout
from gpuwire.rpc.spec import default_spec
from test_rpc_support import start_server, wait_until
from test_rpc_wire import Raw, _still_serving, err_of, frame, hello_frame, record


def _hello_info(rep: bytes) -> dict:
    off = P.HEADER_SIZE + P.REPLY_HEAD.size + layout(default_spec().calls["gwHello"]).reply.size + 1
    (ln,) = struct.unpack_from("<I", rep, off)
    return json.loads(rep[off + 4:off + 4 + ln])


def _result(rep: bytes, name: str):
    """(CUresult, deferred report (CUresult name, text) or None) of a sync frame's reply."""
    assert err_of(rep) is None, err_of(rep)
    off = P.HEADER_SIZE + P.REPLY_HEAD.size
    (res,) = struct.unpack_from("<I", rep, off)
    L = layout(default_spec().calls[name])
    off += L.reply.size
    # (the sync calls used here have no strings; an inline result: u32 length + bytes)
    if L.routes:
        (ln,) = struct.unpack_from("<I", rep, off)
        off += 4 + ln
    if rep[off] != 1:
        return res, None
    r = P.REPORT.unpack_from(rep, off + 1)
    text = rep[off + 1 + P.REPORT.size:off + 1 + P.REPORT.size + r[-1]].decode()
    return res, (P.result_name(r[0]), text)


def _session(srv) -> "tuple[Raw, dict]":
    raw = Raw(srv)
    rep = raw.hello()
    assert err_of(rep) is None, err_of(rep)
    return raw, _hello_info(rep)


def _sync(raw: Raw, seq: int, timeout=30.0):
    return _result(raw.call(frame(seq, [record("gwSync")], P.F_SYNC), timeout=timeout), "gwSync")


def _status(pid: int) -> dict:
    d = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                d[k] = int(v.split()[0])
    return d


@pytest.fixture(scope="module")
def server():
    srv = start_server("cpu")
    try:
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- A: hello info (item 9)

@pytest.mark.parametrize("info, why", [(b"[" * 60000, "nested too deeply"),
                                       (b'{"lanes": Infinity}', "lanes"),
                                       (b'{"lanes": NaN}', "lanes")], ids=["deep", "lanes-inf", "lanes-nan"])
def test_bad_hello_info_gets_an_error_reply(server, info, why):
    raw = Raw(server)
    try:
        st, msg = err_of(raw.call(hello_frame(info=info)))
        assert st == P.ST_MALFORMED and "hello info" in msg and why in msg, msg
        # the connection stays usable: a good hello on it opens the session
        assert err_of(raw.call(hello_frame())) is None
        assert _sync(raw, 1) == (0, None)
    finally:
        raw.close()
    _still_serving(server)


# ----------------------------------------------------------------------------- C: inline D2H (item 6)

def test_sync_dtoh_inline_over_inline_max_is_invalid_value(server):
    raw, info = _session(server)
    try:
        X, imax = info["va_base"], info["inline_max"]
        assert _result(raw.call(frame(1, [record("cuMemAlloc", X, 4 * imax), record("gwSync")], P.F_SYNC)),
                       "gwSync") == (0, None)
        for seq, n in ((2, 2 * imax), (3, imax + 1), (4, 4 * imax)):
            rep = raw.call(frame(seq, [record("cuMemcpyDtoH", X, n, routes=[0])], P.F_SYNC))
            res, _ = _result(rep, "cuMemcpyDtoH")
            assert res == P.CUDA_ERROR_INVALID_VALUE
            flags = P.HEADER.unpack_from(rep, 0)[2]
            assert flags & P.F_REASON and b"inline" in rep
        # the session goes on: an inline result of inline_max bytes still works
        rep = raw.call(frame(5, [record("cuMemcpyDtoH", X, imax, routes=[0])], P.F_SYNC))
        assert _result(rep, "cuMemcpyDtoH") == (0, None)
    finally:
        raw.close()
    _still_serving(server)


# ----------------------------------------------------------------------------- D: missing bulk payload (item 5)

@pytest.fixture(scope="module", params=["cpu", "cpu-py"])
def short_bulk_server(request):
    srv = start_server(request.param, env={"GPUWIRE_RPC_BULK_TIMEOUT_S": "1"})
    try:
        yield srv
    finally:
        srv.stop()


def test_bulk_payload_that_never_comes_is_a_deferred_error(short_bulk_server):
    srv = short_bulk_server
    raw, info = _session(srv)
    try:
        X = info["va_base"]
        assert _result(raw.call(frame(1, [record("cuMemAlloc", X, 4096), record("gwSync")], P.F_SYNC)),
                       "gwSync") == (0, None)
        bulk = P.BULK_SLOT.pack(P.BULK_MARK, P.TAG_BULK_IN_FIRST, 4096)
        # a module image announced as a bulk payload and never sent (the Python bulk path)
        img = record("cuModuleLoadData", 0x100)
        img = img[:4] + struct.pack("<I", len(img) + len(bulk)) + img[8:] + bulk
        raw.send(frame(2, [img]))
        t0 = time.monotonic()
        res, rpt = _sync(raw, 3)
        took = time.monotonic() - t0
        assert res == 0 and rpt is not None and rpt[0] == "CUDA_ERROR_INVALID_VALUE", rpt
        assert "not received" in rpt[1], rpt
        assert took < 1.8, f"{took:.1f}s: waited for the payload more than once"
        # an H2D copy whose payload never comes: its error, after one timeout
        h2d = record("cuMemcpyHtoD", X, 4096)
        h2d = h2d[:4] + struct.pack("<I", len(h2d) + len(bulk)) + h2d[8:] + bulk
        t0 = time.monotonic()
        res, rpt = _result(raw.call(frame(4, [h2d, record("gwSync")], P.F_SYNC), timeout=30), "gwSync")
        assert rpt is not None and rpt[0] == "CUDA_ERROR_INVALID_VALUE" and "not received" in rpt[1], rpt
        assert time.monotonic() - t0 < 1.8
        assert _sync(raw, 5) == (0, None)       # the session is kept
    finally:
        raw.close()
    _still_serving(srv)


# ----------------------------------------------------------------------------- E: host allocations (item 3)

@pytest.fixture(scope="module")
def small_server():
    srv = start_server("cpu", extra=["--cpu-mem-gib", "0.25"], env={"GPUWIRE_RPC_BULK_TIMEOUT_S": "3"})
    try:
        yield srv
    finally:
        srv.stop()


def test_host_allocations_count_against_the_memory_budget(small_server):
    srv = small_server
    rss0 = _status(srv.p.pid)["VmRSS"]
    raw, info = _session(srv)
    try:
        def info_free(seq):
            rep = raw.call(frame(seq, [record("cuMemGetInfo")], P.F_SYNC))
            return struct.unpack_from("<IQQ", rep, P.HEADER_SIZE + P.REPLY_HEAD.size)

        res, free0, total = info_free(1)
        assert res == 0 and total == 256 << 20
        seq = 2
        for name, addr, n in (("cuMemHostAlloc", 0x1000, 1 << 30), ("cuMemHostRegister", 1 << 44, 1 << 30),
                              ("cuMemHostAlloc", 0x2000, 1 << 62), ("cuMemHostAlloc", 0x3000, (1 << 63) + 5)):
            raw.send(frame(seq, [record(name, addr, n, 0)]))
            res, rpt = _sync(raw, seq + 1)
            seq += 2
            assert rpt is not None and rpt[0] == "CUDA_ERROR_OUT_OF_MEMORY", (name, n, rpt)
        assert _status(srv.p.pid)["VmRSS"] < rss0 + (200 << 10), "host RAM was allocated anyway"
        # within the budget: allocated, counted in cuMemGetInfo, and given back when freed
        raw.send(frame(seq, [record("cuMemHostAlloc", 0x4000, 64 << 20, 0)]))
        assert _sync(raw, seq + 1) == (0, None)
        assert info_free(seq + 2)[1] == free0 - (64 << 20)
        raw.send(frame(seq + 3, [record("cuMemFreeHost", 0x4000)]))
        assert _sync(raw, seq + 4) == (0, None)
        assert info_free(seq + 5)[1] == free0
    finally:
        raw.close()
    _still_serving(srv)


# ----------------------------------------------------------------------------- F: sizes of failed pushes (item 2)

@pytest.fixture(scope="module")
def chunked_server():
    srv = start_server("cpu", env={"GPUWIRE_RPC_CPU_CHUNK": str(4 << 20)})
    try:
        yield srv
    finally:
        srv.stop()


def test_failed_push_message_count_is_bounded(chunked_server):
    srv = chunked_server
    raw, info = _session(srv)
    try:
        assert info["bulk_max"] >= info["va_size"]
        tag = P.TAG_BULK_OUT_FIRST

        def pushed(n, seq, limit=0.5):
            """Messages the server sent for a failed push of n bytes (a bad source address)."""
            rep = raw.call(frame(seq, [record("cuMemcpyDtoHAsync", 0x1000, n, 0, routes=[tag]),
                                       record("gwSync")], P.F_SYNC), timeout=60)
            res, rpt = _result(rep, "gwSync")
            assert rpt is not None and rpt[0] == "CUDA_ERROR_INVALID_VALUE", rpt
            k, buf = 0, bytearray(16)
            while True:
                try:
                    raw.ep.recv(buf, tag=tag, tag_mask=t.EXACT_TAG, timeout=limit)
                except t.OperationTimeout:
                    return k
                k += 1

        # a size a copy could have: the messages the client posted receives for (8 MiB: 2)
        assert pushed(8 << 20, 1) == 2
        # over anything the session could copy: none (it was 65536 for 2**38 B)
        # (not 2**63 here: before the fix that made a list of 2**41 entries)
        assert pushed(1 << 38, 2) == 0
        assert _sync(raw, 3) == (0, None)
    finally:
        raw.close()
    _still_serving(srv)


# ----------------------------------------------------------------------------- G: announced images (item 4)

def test_announced_module_image_takes_no_ram_until_it_comes(small_server):
    srv = small_server
    rss0 = _status(srv.p.pid)["VmRSS"]
    raws = []
    try:
        for i in range(2):
            raw, _info = _session(srv)
            raws.append(raw)
            bulk = P.BULK_SLOT.pack(P.BULK_MARK, P.TAG_BULK_IN_FIRST + i, 1 << 30)
            img = record("cuModuleLoadData", 0x100)
            img = img[:4] + struct.pack("<I", len(img) + len(bulk)) + img[8:] + bulk
            raw.send(frame(1, [img]))
        time.sleep(1.0)
        grew = _status(srv.p.pid)["VmRSS"] - rss0
        assert grew < (100 << 10), f"server RSS grew by {grew} kB for images that never came"
        _still_serving(srv)
        # a large image that does come loads (received into lazily backed memory)
        with srv.connect(name="big image") as s:
            image = json.dumps({"gpuwire_cpu_kernels": ["noop"]}).encode() + b" " * (3 << 20)
            m = s.cuModuleLoadData(image)
            f = s.cuModuleGetFunction(m, "noop")
            s.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, 0, b"")
            s.gwSync()
        res, rpt = _sync(raws[0], 2)
        assert rpt is not None and "not received" in rpt[1], rpt
    finally:
        for raw in raws:
            raw.close()


# ----------------------------------------------------------------------------- H: hello deadline (item 7)

def test_connection_without_hello_is_closed_after_the_deadline():
    srv = start_server("cpu", env={"GPUWIRE_RPC_HELLO_TIMEOUT_S": "1"})
    raws = []
    try:
        base = _status(srv.p.pid)["Threads"]
        raws = [Raw(srv) for _ in range(5)]
        assert wait_until(lambda: _status(srv.p.pid)["Threads"] >= base + 5, 5)
        t0 = time.monotonic()
        st, msg = err_of(raws[0].reply(timeout=10))
        assert st == P.ST_HELLO_REQUIRED and "rpc_hello_timeout_s" in msg, msg
        assert time.monotonic() - t0 < 5
        assert wait_until(lambda: _status(srv.p.pid)["Threads"] <= base, 10), "session threads stay"
        # a client that says hello in time is served
        raw, _info = _session(srv)
        raws.append(raw)
        time.sleep(1.5)
        assert _sync(raw, 1) == (0, None)
        _still_serving(srv)
    finally:
        for raw in raws:
            try:
                raw.close()
            except Exception:
                pass
        srv.stop()


# ----------------------------------------------------------------------------- B: CLI start-up errors (items 10, 11)

def _serve(*args, timeout=30):
    cmd = [sys.executable, "-m", "gpuwire.cli", "serve", *args]
    env = dict(os.environ, GPUWIRE_RPC_TOKEN="")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gpuwire serve {' '.join(args)}: started instead of refusing")
    return r.returncode, r.stderr.strip().splitlines()


def _free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


@pytest.mark.parametrize("extra, why", [
    (["--cpu-mem-gib", "nan"], "--cpu-mem-gib"),
    (["--cpu-mem-gib", "-1"], "--cpu-mem-gib"),
    (["--cpu-mem-gib", "100000000"], "RAM"),
    (["--va-gib", "-1"], "--va-gib"),
    (["--va-gib", "1e9"], "--va-gib"),
    (["--device", "-1"], "--device"),
    (["--device", "1"], "--device"),
    (["--cpu-kernels", "no_such_module_xyz"], "no_such_module_xyz"),
    (["--tls", "bogus"], "bogus"),
    (["--listen", "192.0.2.1:{port}"], "not an address of this machine"),
])
def test_cli_bad_arguments_exit_2_with_one_line(extra, why):
    port = _free_port()
    args = ["--executor", "cpu", "--token", "t", "--listen", f"127.0.0.1:{port}"]
    args += [a.replace("{port}", str(port)) for a in extra]
    rc, err = _serve(*args)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("gpuwire serve: ") and why in err[0], err


def test_cli_port_in_use_exits_2():
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        so.listen(1)
        port = so.getsockname()[1]
        rc, err = _serve("--executor", "cpu", "--token", "t", "--listen", f"127.0.0.1:{port}")
    assert rc == 2 and len(err) == 1 and "address already in use" in err[0], err


def test_cli_gpu_executor_in_thread_mode_without_cuda_exits_2():
    try:
        import cuda.bindings  # noqa: F401
        pytest.skip("cuda.bindings is installed here")
    except ImportError:
        pass
    rc, err = _serve("--executor", "gpu", "--isolation", "thread", "--token", "t",
                     "--listen", f"127.0.0.1:{_free_port()}")
    assert rc == 2 and len(err) == 1 and "cuda.bindings" in err[0], err


def test_session_worker_stops_listening_once_its_client_is_in():
    """Process isolation: the session worker's listener closes when its session has
    authenticated, so no other connection can share the session's transport worker."""
    from gpuwire import transport as t
    from test_rpc_support import start_server
    srv = start_server("cpu-proc")
    try:
        s = srv.connect()
        try:
            assert s.address != srv.address                   # redirected to the session worker
            ctx = t.Context({"TLS": "tcp,self"})
            try:
                w = ctx.worker()
                host, port = t.parse_hostport(s.address)
                with pytest.raises((t.ConnectionRefused, t.ConnectTimeout, t.ConnectionLost)):
                    ep = w.connect(f"{host}:{port}", timeout=3.0)
                    ep.close()
            finally:
                ctx.close()
            buf = s.alloc(64)                                  # the session itself goes on
            s.memset(buf, 3, 64)
            assert (s.copy_to_host(bytearray(64), buf) == bytes([3]) * 64)
        finally:
            s.close()
    finally:
        srv.stop()


def test_session_object_limit_is_a_clear_deferred_error():
    """rpc_session_max_objects: a session's handles and allocations are bounded; one more is a
    deferred CUDA_ERROR_OUT_OF_MEMORY naming the setting, freeing makes room again, and other
    sessions count their own."""
    from gpuwire.rpc.protocol import CudaError
    srv = start_server("cpu", env={"GPUWIRE_RPC_SESSION_MAX_OBJECTS": "40"})
    try:
        s = srv.connect()
        try:
            evs = [s.event() for _ in range(25)]
            bufs = [s.alloc(256) for _ in range(15)]
            s.gwSync()                                   # 40: at the limit, all fine
            s.alloc(256)
            with pytest.raises(CudaError) as ei:
                s.gwSync()
            msg = str(ei.value)
            assert "rpc_session_max_objects" in msg and "40" in msg and "cuMemAlloc" in msg, msg
            s.event()
            with pytest.raises(CudaError) as ei:
                s.gwSync()
            assert "a new event" in str(ei.value)
            for b in bufs[:5]:
                b.free()
            more = [s.alloc(256) for _ in range(5)]      # room again
            s.gwSync()
            assert s.mem_get_info()[0] > 0
            s2 = srv.connect()                           # its own count
            try:
                [s2.alloc(256) for _ in range(30)]
                s2.gwSync()
            finally:
                s2.close()
            del evs, more
        finally:
            try:
                s.close()
            except CudaError:
                pass
    finally:
        srv.stop()
