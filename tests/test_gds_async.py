"""Remote reads that do not block the session: ordering on the call's stream, errors of
reads that fail on the server's read workers (reported at the next sync, naming the
file), reads in flight when a client dies, and vectored reads split across workers.

A real ``gpuwire serve`` process on the CPU executor (its streams are host-ordered: a
read completes before the session's next call runs, its entries in parallel on the
workers); the same on the GPU executor where one is present (marked gpu), where reads
are ordered on the stream by a device-side wait and the server goes on meanwhile."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from gpuwire.gds.remote import RemoteArray, RemoteFiles, RemoteReader, RemoteRecordDataset, RemoteShortReadError
from gpuwire.gds.service import _any_overlap, _overlaps, _plan
from gpuwire.gds import DataLoader
from test_rpc_support import ServerProc, gpu_available

BIG = 6 * (1 << 20) + 4321


def _sha(b) -> str:
    return hashlib.sha256(bytes(b)).hexdigest()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("gdsasync")
    rng = np.random.default_rng(11)
    (root / "big.bin").write_bytes(rng.bytes(BIG))
    (root / "small").mkdir()
    for i in range(300):
        (root / "small" / f"{i:04d}.bin").write_bytes(rng.bytes(1 + 331 * i))
    (root / "recs.bin").write_bytes(rng.bytes(512 * 64))
    return root


def _serve(executor: str, root, **env):
    base = {"GPUWIRE_GDS_THREADS": "4", "GPUWIRE_GDS_STAGING_BYTES": str(64 << 10)}
    base.update(env)
    return ServerProc(executor, extra=["--data-root", str(root)], env=base)


@pytest.fixture(scope="module")
def server(tree):
    srv = _serve("cpu", tree)
    yield srv
    srv.stop()


@pytest.fixture()
def s(server):
    sess = server.connect(name="gds-async")
    yield sess
    sess.close()


# ----------------------------------------------------------------------------- planning (pure functions)

class _H:
    """What _plan takes of an open file (FileHandle's fd and size)."""

    def __init__(self, fd, size):
        self.fd, self.size = fd, size


def test_plan_splits_into_chunks_and_keeps_every_byte():
    ha, hb = _H(3, 10_000), _H(4, 500)
    entries = [(ha, "a", 0, 250, 1000), (ha, "a", 300, 10, 5000), (hb, "b", 0, 90, 6000)]
    tasks = [t.unpack() for t in _plan(entries, 100, serial=False)]   # packed for the C loop
    assert all(sum(p[4] for p in t) <= 100 for t in tasks)
    pieces = [p for t in tasks for p in t]
    # every destination byte once, each from the right file and offset
    got = {}
    for fd, path, size, off, n, dst in pieces:
        assert (fd, size) == ((3, 10_000) if path == "a" else (4, 500))
        for k in range(n):
            assert dst + k not in got
            got[dst + k] = (path, off + k)
    want = {}
    for _h, path, off, n, dst in entries:
        for k in range(n):
            want[dst + k] = (path, off + k)
    assert got == want
    serial = [t.unpack() for t in _plan(entries, 100, serial=True)]
    assert len(serial) == 1 and [p[5] for p in serial[0]][:3] == [1000, 1100, 1200]


def test_overlap_checks():
    assert not _overlaps([(0, 10), (10, 20), (30, 31)])
    assert _overlaps([(10, 20), (0, 11)])
    assert not _any_overlap([(0, 10), (20, 30)], [(10, 20), (30, 40)])
    assert _any_overlap([(0, 10), (20, 30)], [(29, 35)])


# ----------------------------------------------------------------------------- CPU executor

def test_backend_reports_order_and_workers(s):
    info = RemoteFiles(s).backend()
    assert info["mode"] == "posix-host"
    assert info["order"] == "host"
    assert int(info["workers"]) == 4


def test_read_waits_for_earlier_work_and_later_work_sees_it(s, tree):
    data = (tree / "big.bin").read_bytes()
    st = s.stream()
    n = len(data)
    out = np.empty(n, np.uint8)
    with s.alloc(n) as buf, s.alloc(n) as copy:
        buf.memset(0xAB, st)                                    # earlier work writing the buffer
        RemoteFiles(s).read(buf, "big.bin", 0, n, st)
        s.memset(buf.ptr, 0x11, 16, st)                         # later work: over the first 16 bytes
        s.cuMemcpyDtoDAsync(copy.ptr, buf.ptr, n, st)           # later work reading the buffer
        s.cuMemcpyDtoHAsync(out, copy.ptr, n, st)
        st.synchronize()
    assert (out[:16] == 0x11).all()
    assert _sha(out[16:]) == _sha(data[16:])


def test_vectored_reads_in_parallel_checksummed(s, tree):
    files = sorted((tree / "small").glob("*.bin"))
    blobs = [p.read_bytes() for p in files]
    big = (tree / "big.bin").read_bytes()
    reads, want, pos = [], [], 0
    with s.alloc(sum(map(len, blobs)) + 2 * len(big) + 4096) as buf:
        for p, b in zip(files, blobs):
            reads.append((f"small/{p.name}", 0, len(b), buf.ptr + pos))
            want.append(b)
            pos += len(b)
        for off in (0, 12345):                                  # large entries span many chunks
            reads.append(("big.bin", off, len(big) - off, buf.ptr + pos))
            want.append(big[off:])
            pos += len(big) - off
        reads.reverse()                                         # order of entries is not order of bytes
        RemoteFiles(s).read_many(reads, s.stream())
        got = RemoteArray(s, buf.ptr, np.uint8, (pos,)).to_host()
    assert _sha(got) == _sha(b"".join(want))


def test_vectored_entries_writing_the_same_bytes_keep_their_order(s, tree):
    big = (tree / "big.bin").read_bytes()
    n = 200_000
    with s.alloc(n) as buf:
        # three entries over the same destination: the last one's bytes must be what stays
        reads = [("big.bin", 0, n, buf.ptr), ("big.bin", 1000, n, buf.ptr), ("big.bin", 777, n, buf.ptr)]
        RemoteFiles(s).read_many(reads, s.stream())
        got = RemoteArray(s, buf.ptr, np.uint8, (n,)).to_host()
    assert _sha(got) == _sha(big[777:777 + n])


def test_a_read_failing_on_a_worker_is_reported_at_the_next_sync_naming_the_file(s, tree):
    p = tree / "shrinks.bin"
    p.write_bytes(os.urandom(300_000))
    rf = RemoteFiles(s)
    assert rf.stat("shrinks.bin") == 300_000     # the server holds the file open, size 300000
    os.truncate(p, 1000)                        # ... and it shrinks after the range check
    with s.alloc(300_000) as buf:
        rf.read(buf, "shrinks.bin", 0, 300_000)  # deferred: no error here
        with pytest.raises(RemoteShortReadError) as ei:
            rf.check()
        msg = str(ei.value)
        assert "shrinks.bin" in msg and "gwFileRead" in msg
        rf.check()                               # reported once
        got = []
        reads = [("big.bin", 0, 100, buf.ptr), ("shrinks.bin", 0, 5000, buf.ptr + 100)]
        os.truncate(p, 10)
        rf.read_many(reads)
        with pytest.raises(RemoteShortReadError, match="shrinks.bin") as ei:
            rf.check()
        assert ei.value.cause.call == "gwFileReadV"
        got = RemoteArray(s, buf.ptr, np.uint8, (100,)).to_host()
    assert _sha(got) == _sha((tree / "big.bin").read_bytes()[:100])   # the session goes on


_KILLED_CLIENT = textwrap.dedent("""
    import sys, gpuwire
    from gpuwire.gds.remote import RemoteFiles
    s = gpuwire.connect(sys.argv[1], token=sys.argv[2])
    n = int(sys.argv[3])
    buf = s.alloc(16 * n)
    s.synchronize()
    RemoteFiles(s).read_many([("big.bin", 0, n, buf.ptr + k * n) for k in range(16)])
    s.flush()
    print("sent", flush=True)
    sys.stdin.read()
""")


def test_client_killed_with_reads_in_flight(server, tree):
    other = server.connect(name="other")
    try:
        free0, total = other.mem_get_info()
        p = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, server.address, server.token, str(BIG)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "sent"
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=30)
        # the server goes on serving the other session, reads included
        big = (tree / "big.bin").read_bytes()
        with other.alloc(4096) as buf:
            RemoteFiles(other).read(buf, "big.bin", 100, 4096)
            assert _sha(RemoteArray(other, buf.ptr, np.uint8, (4096,)).to_host()) == _sha(big[100:4196])
        # and the dead session's memory comes back
        deadline = time.monotonic() + 30
        while other.mem_get_info()[0] < free0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert other.mem_get_info()[0] >= free0
    finally:
        other.close()
    assert server.p.poll() is None


def test_loader_over_the_workers(s, tree):
    recs = np.frombuffer((tree / "recs.bin").read_bytes(), np.uint8).reshape(64, 512)
    ds = RemoteRecordDataset(s, "recs.bin", 512)
    reader = RemoteReader(s)
    loader = DataLoader(ds, 5, shuffle="global", seed=3, prefetch=3, reader=reader)
    seen = []
    for b in loader.iter_batches():
        assert (b.data.to_host() == recs[b.indices]).all()
        seen += b.indices.tolist()
    assert sorted(seen) == list(range(64))
    loader.close()
    reader.close()


# ----------------------------------------------------------------------------- GPU executor

@pytest.fixture(scope="module", params=["auto", "posix"])
def gpu_server(request, tree):
    why = gpu_available()
    if why:
        pytest.skip(f"GPU executor: {why}")
    srv = _serve("gpu", tree, GPUWIRE_GDS_BACKEND=request.param)
    yield srv
    srv.stop()


@pytest.mark.gpu
def test_gpu_reads_are_stream_ordered_without_blocking_the_session(gpu_server, tree):
    data = (tree / "big.bin").read_bytes()
    s = gpu_server.connect()
    try:
        info = RemoteFiles(s).backend()
        assert info["order"] == "stream-wait", info      # the asynchronous engine is in use
        n = len(data)
        for st in (s.stream(0), s.stream(1), None):       # blocking, non-blocking, the NULL stream
            out = np.empty(n, np.uint8)
            with s.alloc(n) as buf, s.alloc(n) as copy:
                buf.memset(0xAB, st)
                RemoteFiles(s).read(buf, "big.bin", 0, n, st)
                s.memset(buf.ptr, 0x11, 16, st)
                s.cuMemcpyDtoDAsync(copy.ptr, buf.ptr, n, st or 0)
                if st is None:
                    s.cuMemcpyDtoH(out, copy.ptr, n)      # a synchronous copy on the NULL stream
                else:
                    s.cuMemcpyDtoHAsync(out, copy.ptr, n, st)
                    st.synchronize()
            assert (out[:16] == 0x11).all()
            assert _sha(out[16:]) == _sha(data[16:]), st
        # back-to-back reads into separate buffers run together; the data is all there
        bufs = [s.alloc(n) for _ in range(4)]
        st = s.stream(1)
        for k, b in enumerate(bufs):
            RemoteFiles(s).read(b, "big.bin", 0, n, st)
        for b in bufs:
            assert _sha(RemoteArray(s, b.ptr, np.uint8, (n,)).to_host(st)) == _sha(data)
            b.free()
        # a failing read is reported at the next sync, naming the file
        p = tree / "gpu-shrinks.bin"
        p.write_bytes(os.urandom(200_000))
        rf = RemoteFiles(s)
        assert rf.stat("gpu-shrinks.bin") == 200_000
        os.truncate(p, 100)
        with s.alloc(200_000) as buf:
            rf.read(buf, "gpu-shrinks.bin", 0, 200_000, st)
            with pytest.raises(RemoteShortReadError, match="gpu-shrinks.bin"):
                rf.check()
    finally:
        s.close()


@pytest.mark.gpu
def test_gpu_loader_with_the_consumer_on_the_null_stream(gpu_server, tree):
    """The consumer stream (the NULL stream) waits for reads through events: the server's
    read workers must not depend on it (no deadlock through legacy-stream synchronization)."""
    recs = np.frombuffer((tree / "recs.bin").read_bytes(), np.uint8).reshape(64, 512)
    s = gpu_server.connect()
    try:
        ds = RemoteRecordDataset(s, "recs.bin", 512)
        reader = RemoteReader(s)                                 # consumer_stream None: stream 0
        loader = DataLoader(ds, 5, shuffle="global", seed=4, prefetch=3, reader=reader)
        for _epoch in range(2):
            seen = []
            for b in loader.iter_batches():
                out = np.empty(b.data.nbytes, np.uint8)
                s.cuMemcpyDtoH(out, b.data.ptr, b.data.nbytes)   # synchronous, NULL stream
                assert (out.reshape(-1, 512) == recs[b.indices]).all()
                seen += b.indices.tolist()
            assert sorted(seen) == list(range(64))
        reader.check()
        loader.close()
        reader.close()
    finally:
        s.close()
