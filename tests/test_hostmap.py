"""Same-host mapped regions (docs/pinned.md): host_alloc memory the session's server maps and the
GPU (here: the CPU executor, and the GPU executor on the device machine) uses in place.

Everything runs against a real `gpuwire serve` process on loopback; the descriptor travels over
the session's real unix socket."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.rpc import hostmap, pinned
from gpuwire.rpc.kernels import pinned as PK
from gpuwire.rpc.protocol import CudaError, CURESULT
from pinned_support import addr, check, mod  # noqa: F401 (fixture: mod)
from test_rpc_support import EXECUTORS, start_server, wait_until

F32 = np.float32
MIB = 1 << 20
OK, WHY = hostmap.supported()
pytestmark = pytest.mark.skipif(not OK, reason=WHY or "no same-host mapping here")


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    # 3 MiB of mapped memory per session at most (the cap test), a short wait for descriptors
    srv = start_server(request.param, extra=["--cpu-kernels", "gpuwire.rpc.kernels.pinned"],
                       env={"GPUWIRE_RPC_HOSTMAP_MAX_GIB": str(3 / 1024), "GPUWIRE_RPC_HOSTMAP_WAIT_S": "0.5"})
    srv.kind = request.param
    yield srv
    srv.stop()


@pytest.fixture()
def s(server):
    with settings.override(rpc_hostmap="auto"):
        sess = server.connect(name="test-hostmap")
    yield sess
    sess.close()


def server_memfds(srv) -> int:
    """memfd mappings of gpuwire host memory in the server process (thread isolation)."""
    with open(f"/proc/{srv.p.pid}/maps") as f:
        return sum(1 for line in f if "memfd:gpuwire-host" in line)


def thread_mode(srv) -> bool:
    return srv.isolation == "thread"


# ----------------------------------------------------------------------------- mapping

def test_host_alloc_is_mapped_on_the_same_host(server, s):
    assert s.hostmap, s.hostmap_note
    a = s.host_alloc(4 * MIB // 4)
    R = pinned.region(s, a)
    assert R.track == "mapped"
    assert R.mirror != R.start or server.kind == "gpu"    # (the CPU executor maps it elsewhere)
    if thread_mode(server):
        assert server_memfds(server) >= 1
    with pytest.raises(ValueError, match="mapped by the server"):
        pinned.set_tracking(s, a, "compare")


def test_kernels_read_and_write_the_client_pages_in_place(s, mod):
    n = 3000
    buf = s.host_alloc((3 * n + 16) * 4).view(F32)
    x, y, out = buf[:n], buf[n:2 * n], buf[2 * n:3 * n]
    x[:] = np.arange(n)
    y[:] = 1000 * np.arange(n) % 977
    buf[3 * n:] = 42
    f = mod.function("pin_add")
    s.launch(f, (n + 127) // 128, 128, (addr(x), addr(y), addr(out), n))
    s.synchronize()
    check(out, np.arange(n, dtype=F32) + (1000 * np.arange(n) % 977).astype(F32))
    check(buf[3 * n:], np.full(16, 42, F32))
    # the client changes its bytes; the next launch reads them with no push at all
    x[:] = 5
    s.launch(f, (n + 127) // 128, 128, (addr(x), addr(y), addr(out), n))
    s.synchronize()
    check(out, 5 + (1000 * np.arange(n) % 977).astype(F32))
    st = pinned.stats(s)
    assert st["pushes"] == 0 and st["pulls"] == 0 and st["rewritten"] == 2


def test_mapped_and_mirrored_regions_in_one_launch(server):
    n = 1024
    with settings.override(rpc_hostmap="auto"):
        s = server.connect(name="test-hostmap-mixed")
    try:
        x = s.host_alloc(n * 4).view(F32)                   # mapped
        y = np.zeros(n, F32)
        s.cuMemHostRegister(y, n * 4, 0)                     # registered: mirrored
        assert pinned.region(s, x).track == "mapped" and pinned.region(s, y).track != "mapped"
        x[:] = np.arange(n)
        s.launch(s.load_module(PK.PTX).function("pin_scale"), (n + 127) // 128, 128, (addr(x), addr(y), 3.0, n))
        s.synchronize()
        check(y, 3 * np.arange(n, dtype=F32) + 1)
        st = pinned.stats(s)
        assert st["pulls"] >= 1 and st["pushes"] >= 1     # only the registered one travelled
    finally:
        s.close()


@pytest.mark.parametrize("n", [4096, MIB + 12])
def test_copies_from_and_to_mapped_memory(s, n):
    rng = np.random.default_rng(n)
    a = s.host_alloc(n)
    a[:] = rng.integers(0, 256, n, dtype=np.uint8)
    d = s.alloc(n)
    s.cuMemcpyHtoDAsync(d, a, n, 0)                # async from the client's pages
    out = np.zeros(n, np.uint8)
    s.cuMemcpyDtoH(out, d, n)                      # plain buffer: over the wire
    check(out, a)
    a2 = s.host_alloc(n)
    s.cuMemsetD8Async(d, 7, n, 0)
    s.cuMemcpyDtoHAsync(a2, d, n, 0)               # async into the client's pages
    s.cuStreamSynchronize(0)
    assert (a2 == 7).all()
    s.cuMemsetD8Async(d, 9, n, 0)
    s.cuMemcpyDtoH(a2, d, n)                       # sync: in place when it returns
    assert (a2 == 9).all()
    a[:] = 3
    s.cuMemcpyHtoD(d, a, n)                        # sync: captured when it returns
    a[:] = 4
    s.cuMemcpyDtoH(out, d, n)
    assert (out == 3).all()
    assert pinned.stats(s)["copies_mapped"] == 4
    s.free_host(a)
    s.free_host(a2)
    s.sync()


def test_free_unmaps_and_the_cap_is_per_session(server, s):
    a = s.host_alloc(2 * MIB)
    assert pinned.region(s, a).track == "mapped"
    b = s.host_alloc(2 * MIB)                      # over the 3 MiB cap: mirrored, and says why
    assert pinned.region(s, b).track != "mapped"
    assert "rpc_hostmap_max_gib" in s.hostmap_note
    s.free_host(a)
    s.sync()
    c = s.host_alloc(2 * MIB)                      # the freed mapping no longer counts
    assert pinned.region(s, c).track == "mapped"
    c[:] = 1
    d = s.alloc(2 * MIB)
    s.cuMemcpyHtoD(d, c, 2 * MIB)
    out = np.zeros(2 * MIB, np.uint8)
    s.cuMemcpyDtoH(out, d, 2 * MIB)
    assert (out == 1).all()


def test_session_end_unmaps(server):
    if not thread_mode(server):
        pytest.skip("the session's worker process exits with it")
    base = server_memfds(server)
    with settings.override(rpc_hostmap="auto"):
        s = server.connect(name="test-hostmap-end")
    a = s.host_alloc(MIB)
    a[:] = 1
    s.sync()
    assert server_memfds(server) == base + 1
    s.close()
    assert wait_until(lambda: server_memfds(server) == base), server_memfds(server)


def test_client_killed_mid_batch_its_mappings_go(server):
    if not thread_mode(server):
        pytest.skip("the session's worker process exits with it")
    base = server_memfds(server)
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import gpuwire
        s = gpuwire.connect({server.address!r}, token={server.token!r})
        a = s.host_alloc(1 << 20); b = s.host_alloc(1 << 20)
        d = s.alloc(1 << 20)
        s.sync()
        for _ in range(50):
            s.cuMemcpyHtoDAsync(d, a, 1 << 20, 0)
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "GPUWIRE_RPC_HOSTMAP": "auto"})
    try:
        assert p.stdout.readline().strip() == "ready"
        assert server_memfds(server) == base + 2
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert wait_until(lambda: server_memfds(server) == base, timeout=15), server_memfds(server)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert server.alive()


# ----------------------------------------------------------------------------- when not to map

def test_off_and_auto_over_tcp_mirror(server):
    with settings.override(rpc_hostmap="off"):
        s = server.connect(name="test-hostmap-off")
    try:
        assert not s.hostmap and "off" in s.hostmap_note
        assert pinned.region(s, s.host_alloc(MIB)).track != "mapped"
    finally:
        s.close()
    with settings.override(rpc_hostmap="auto"):
        s = server.connect(name="test-hostmap-tcp", tls="tcp")
    try:
        assert not s.hostmap and "not shared memory" in s.hostmap_note
    finally:
        s.close()
    with settings.override(rpc_hostmap="on"):
        s = server.connect(name="test-hostmap-tcp-on", tls="tcp")
    try:
        assert s.hostmap, s.hostmap_note
        a = s.host_alloc(MIB)
        assert pinned.region(s, a).track == "mapped"
        a[:] = 2
        d = s.alloc(MIB)
        s.cuMemcpyHtoDAsync(d, a, MIB, 0)
        out = np.zeros(MIB, np.uint8)
        s.cuMemcpyDtoH(out, d, MIB)
        assert (out == 2).all()
    finally:
        s.close()


def test_bad_setting_is_named(server, monkeypatch):
    monkeypatch.setenv("GPUWIRE_RPC_HOSTMAP", "sometimes")
    settings.reload_environment()
    try:
        with pytest.raises(ValueError, match="GPUWIRE_RPC_HOSTMAP.*expected auto, on"):
            server.connect(name="test-hostmap-bad")
    finally:
        monkeypatch.delenv("GPUWIRE_RPC_HOSTMAP")
        settings.reload_environment()


# ----------------------------------------------------------------------------- what the server refuses

def _channel(s):
    offer = s.info["hostmap"]
    return hostmap.Channel(offer["sock"], bytes.fromhex(offer["secret"]))


def _refused(s, size, key):
    with pytest.raises(CudaError) as ei:
        s.gwHostMap(size, key)
    assert ei.value.result == CURESULT["CUDA_ERROR_INVALID_VALUE"]


def test_check_fd_names_what_is_wrong(tmp_path):
    fd = os.memfd_create("gpuwire-host", os.MFD_CLOEXEC)       # no seals: could shrink under a mapping
    os.ftruncate(fd, 8192)
    with pytest.raises(hostmap.HostMapError, match="not sealed"):
        hostmap.check_fd(fd, 8192)
    os.close(fd)
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    with open(p, "rb") as f:
        with pytest.raises(hostmap.HostMapError, match="memfd"):
            hostmap.check_fd(f.fileno(), 4096)
    fd, m = hostmap.make_memfd(8192)
    assert hostmap.check_fd(fd, 8000) == 8192
    with pytest.raises(hostmap.HostMapError, match="holds 8192 B, the call maps 32768 B"):
        hostmap.check_fd(fd, 4 * 8192)
    os.close(fd)
    m.close()


def test_listener_takes_only_the_sessions_descriptors():
    lst = hostmap.Listener()
    try:
        d = lst.describe()
        stranger = hostmap.Channel(d["sock"], b"\0" * 16)
        own = hostmap.Channel(d["sock"], bytes.fromhex(d["secret"]))
        fd, m = hostmap.make_memfd(4096)
        k1 = stranger.send(fd, 4096)
        with pytest.raises(hostmap.HostMapError, match=f"no descriptor arrived for key {k1}"):
            lst.take(k1, 4096, timeout=0.3)
        assert lst.refused == 1 and not lst.pending
        k2 = own.send(fd, 4096)
        with pytest.raises(hostmap.HostMapError, match="sent for 4096 B, the call maps 8192 B"):
            lst.take(k2, 8192, timeout=1)
        k3 = own.send(fd, 4096)
        got = lst.take(k3, 4096, timeout=1)
        assert os.fstat(got).st_ino == os.fstat(fd).st_ino
        os.close(got)
        os.close(fd)
        m.close()
        stranger.close()
        own.close()
    finally:
        lst.close()


def test_server_refuses_bad_descriptors_and_goes_on(s):
    ch = _channel(s)
    try:
        fd = os.memfd_create("gpuwire-host", os.MFD_CLOEXEC)     # unsealed
        os.ftruncate(fd, 8192)
        key = ch.send(fd, 8192)
        os.close(fd)
        _refused(s, 8192, key)
        with open(__file__, "rb") as f:                           # not a memfd
            key = ch.send(f.fileno(), 4096)
        _refused(s, 4096, key)
        fd, m = hostmap.make_memfd(8192)                         # the wrong size
        key = ch.send(fd, 4 * 8192)
        os.close(fd)
        _refused(s, 4 * 8192, key)
        m.close()
        _refused(s, 4096, 999)                                   # never sent
    finally:
        ch.close()
    a = s.host_alloc(4096)
    assert pinned.region(s, a).track == "mapped"


def test_a_stranger_on_the_socket_is_refused(s):
    offer = s.info["hostmap"]
    bad = hostmap.Channel(offer["sock"], b"\0" * 16)       # does not know the session's secret
    try:
        fd, m = hostmap.make_memfd(4096)
        key = bad.send(fd, 4096)
        os.close(fd)
        _refused(s, 4096, key)
        m.close()
    finally:
        bad.close()
    a = s.host_alloc(4096)                                 # the session's own channel still works
    assert pinned.region(s, a).track == "mapped"


def test_mappings_are_the_sessions_own(server, s):
    a = s.host_alloc(MIB)
    dptr = pinned.region(s, a).mirror
    with pytest.raises(CudaError, match="free it with cuMemFreeHost"):
        s.cuMemFree(dptr)
        s.sync()
    with settings.override(rpc_hostmap="auto"):
        other = server.connect(name="test-hostmap-other")
    try:
        d = other.alloc(MIB)
        with pytest.raises(CudaError, match="not inside an allocation of this session"):
            other.cuMemcpyDtoD(d, dptr, MIB)
            other.sync()
        with pytest.raises(CudaError, match="not a mapping of this session"):
            other.gwHostUnmap(dptr)
            other.sync()
    finally:
        other.close()
    a[:] = 8                                               # still mapped for its own session
    d = s.alloc(MIB)
    s.cuMemcpyHtoD(d, a, MIB)
    out = np.zeros(MIB, np.uint8)
    s.cuMemcpyDtoH(out, d, MIB)
    assert (out == 8).all()


def test_host_alloc_from_several_threads(s):
    import threading
    got, errors = [], []

    def one(i):
        try:
            a = s.host_alloc(64 << 10)
            a[:] = i
            got.append((i, a))
        except Exception as e:       # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len(got) == 8
    d = s.alloc(64 << 10)
    for i, a in got:
        assert pinned.region(s, a).track == "mapped"
        s.cuMemcpyHtoD(d, a, 64 << 10)
        out = np.zeros(64 << 10, np.uint8)
        s.cuMemcpyDtoH(out, d, 64 << 10)
        assert (out == i).all()


def test_first_pinned_calls_from_several_threads_share_one_manager(server):
    """The session's pinned manager is made once when threads make their first pinned call
    together (two managers: the regions registered in the lost one were not found)."""
    import threading
    sess = server.connect(name="mgr")
    try:
        bar = threading.Barrier(12)
        got = []

        def one():
            bar.wait()
            got.append(pinned.manager(sess))

        ts = [threading.Thread(target=one) for _ in range(12)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert len(got) == 12 and all(m is got[0] for m in got) and sess._pin is got[0]
    finally:
        sess.close()


def test_bw_bench_copies_mapped_memory_by_default_on_shared_memory(tmp_path):
    """`bench rpc --tests bw` over shared memory copies host_alloc memory, mapped; with --host-mem
    registered it takes the UCX path. The rows say which (the bytes of mapped copies are checked
    by test_copies_from_and_to_mapped_memory)."""
    import json
    rows = {}
    for mem in ("auto", "registered"):
        out = tmp_path / f"bw-{mem}.json"
        r = subprocess.run([sys.executable, "-m", "gpuwire.bench.rpc", "--executor", "cpu", "--tls", "sm",
                            "--tests", "bw", "--sizes", "256K", "--bw-count", "4", "--bw-reps", "1",
                            "--no-baseline", "--host-mem", mem, "--json", str(out)],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "GPUWIRE_RPC_HOSTMAP": "auto"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        rows[mem] = json.load(open(out))["rows"][0]
    assert rows["auto"]["host_mem"] == "alloc" and rows["auto"]["mapped"] is True
    assert rows["registered"]["host_mem"] == "registered" and rows["registered"]["mapped"] is False
    for row in rows.values():
        assert row["htod_async_MBps"] > 0 and row["dtoh_async_MBps"] > 0
