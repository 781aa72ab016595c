"""Remote gds: a real `gpuwire serve --data-root DIR` process reads files into its
session's memory (gwFileRead / gwFileReadV / gwFileStat / gwFileBackend) and the
DataLoader runs over it through RemoteReader. CPU executor everywhere (its
host-memory "device"); the GPU executor with kvikio and posix+h2d engines where a
GPU is present (marked gpu). Contents are checked against the files byte for byte."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from gpuwire.gds import DataLoader, RecordDataset
from gpuwire.gds.remote import (
    RemoteArray, RemoteFileNotFoundError, RemoteFiles, RemoteNpyDataset, RemotePermissionError,
    RemoteReadError, RemoteReader, RemoteRecordDataset, RemoteShortReadError,
)
from gpuwire.gds.errors import CorruptFileError, TruncatedFileError
from gpuwire.gds.service import pack_reads, unpack_reads
from gpuwire.rpc import CudaError, DeferredCudaError
from test_rpc_support import ServerProc, gpu_available

REC = 256          # record bytes of the loader datasets
SHARDS = (7, 12, 5, 9)


def _sha(b) -> str:
    return hashlib.sha256(bytes(b)).hexdigest()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/ with a 3 MiB file, small files, record shards, .npy files; outside/ next to it."""
    base = tmp_path_factory.mktemp("gdsremote")
    root, outside = base / "root", base / "outside"
    (root / "small").mkdir(parents=True)
    (root / "ds").mkdir()
    outside.mkdir()
    rng = np.random.default_rng(7)
    (root / "big.bin").write_bytes(rng.bytes(3 * (1 << 20) + 123))
    for i in range(40):
        (root / "small" / f"{i:03d}.bin").write_bytes(rng.bytes(100 + 997 * i))
    for i, n in enumerate(SHARDS):
        (root / "ds" / f"shard{i}.bin").write_bytes(rng.bytes(n * REC))
    np.save(root / "ds" / "a.npy", np.arange(40 * 6, dtype=np.float32).reshape(40, 6))
    np.save(root / "ds" / "b.npy", np.arange(10 * 6, dtype=np.float32).reshape(10, 6) + 1000)
    raw = (root / "ds" / "b.npy").read_bytes()
    (root / "ds" / "cut.npy").write_bytes(raw[:-7])                     # truncated .npy
    (root / "ds" / "odd.bin").write_bytes(rng.bytes(3 * REC + 5))         # not whole records
    (outside / "secret.bin").write_bytes(b"top secret " * 100)
    os.symlink(outside / "secret.bin", root / "link-out.bin")            # leads out: refused
    os.symlink(root / "big.bin", root / "small" / "link-in.bin")         # stays inside: fine
    os.symlink(outside, root / "dir-out")                                 # a directory link out
    return root, outside


@pytest.fixture(scope="module")
def server(tree):
    root, _ = tree
    srv = ServerProc("cpu", extra=["--data-root", str(root)])
    yield srv
    srv.stop()


@pytest.fixture()
def s(server):
    sess = server.connect(name="gds-remote")
    yield sess
    sess.close()


def _read(s, path, offset, n, stream=None):
    files = RemoteFiles(s)
    with s.alloc(max(n, 1)) as buf:
        files.read(buf, path, offset, n, stream)
        return RemoteArray(s, buf.ptr, np.uint8, (n,)).to_host()


# ----------------------------------------------------------------------------- the calls


def test_backend_reports_the_engine_and_roots(s, tree):
    info = RemoteFiles(s).backend()
    assert info["mode"] == "posix-host"
    assert info["roots"] == os.path.realpath(tree[0])


def test_read_checksums_and_offsets(s, tree):
    root, _ = tree
    data = (root / "big.bin").read_bytes()
    st = s.stream()
    for off, n in ((0, len(data)), (1, 4097), (len(data) - 10, 10), (12345, 0), (1 << 20, 1 << 20)):
        got = _read(s, "big.bin", off, n, st)
        assert _sha(got) == _sha(data[off:off + n]), (off, n)
    assert RemoteFiles(s).stat("big.bin") == len(data)
    # absolute paths inside the root and symlinks staying inside are accepted
    assert _sha(_read(s, str(root / "big.bin"), 5, 100)) == _sha(data[5:105])
    assert _sha(_read(s, "small/link-in.bin", 7, 1000)) == _sha(data[7:1007])


def test_vectored_reads_of_many_small_files(s, tree):
    root, _ = tree
    files = sorted((root / "small").glob("[0-9]*.bin"))
    blobs = [p.read_bytes() for p in files]
    total = sum(map(len, blobs))
    rf = RemoteFiles(s)
    with s.alloc(total + 64) as buf:
        reads, pos = [], 0
        for p, b in zip(files, blobs):
            reads.append((f"small/{p.name}", 0, len(b), buf.ptr + pos))
            pos += len(b)
        reads.append((f"small/{files[3].name}", 10, 20, buf.ptr + pos))  # the same file twice
        assert rf.read_many(reads, s.stream()) == total + 20
        got = RemoteArray(s, buf.ptr, np.uint8, (total + 20,)).to_host()
    assert _sha(got) == _sha(b"".join(blobs) + blobs[3][10:30])


def test_read_list_format_round_trips_and_rejects_garbage():
    reads = [("a/x.bin", 0, 10, 0x1000), ("b.bin", 5, 7, 0x2000), ("a/x.bin", 99, 1, 0x3000)]
    blob = pack_reads(reads)
    assert unpack_reads(blob, 3) == reads
    assert blob.count(b"a/x.bin") == 1                      # path table: once per path
    with pytest.raises(ValueError, match="entries"):
        unpack_reads(blob, 2)
    with pytest.raises(ValueError):
        unpack_reads(blob[:-3], 3)


def test_short_read_is_reported_naming_the_file(s, tree):
    size = (tree[0] / "big.bin").stat().st_size
    rf = RemoteFiles(s)
    with s.alloc(4096) as buf:
        rf.read(buf, "big.bin", size - 100, 200)
        with pytest.raises(RemoteShortReadError) as ei:
            rf.check()
    msg = str(ei.value)
    assert "big.bin" in msg and "short read" in msg and "200" in msg
    assert isinstance(ei.value.cause, DeferredCudaError) and ei.value.cause.call == "gwFileRead"
    assert _read(s, "big.bin", 0, 16).size == 16            # the session goes on


def test_missing_file(s):
    rf = RemoteFiles(s)
    with pytest.raises(RemoteFileNotFoundError, match="nope/missing.bin"):
        rf.stat("nope/missing.bin")
    with s.alloc(64) as buf:
        rf.read(buf, "nope/missing.bin", 0, 8)
        with pytest.raises(RemoteFileNotFoundError, match="nope/missing.bin"):
            rf.check()


@pytest.mark.parametrize("path", ["../outside/secret.bin", "small/../../outside/secret.bin", "link-out.bin",
                                  "dir-out/secret.bin", "ABS"])
def test_escapes_are_refused(s, tree, path):
    if path == "ABS":
        path = str(tree[1] / "secret.bin")
    rf = RemoteFiles(s)
    with pytest.raises(RemotePermissionError, match="refused"):
        rf.stat(path)
    with s.alloc(64) as buf:
        buf.memset(0)
        rf.read(buf, path, 0, 16)
        with pytest.raises(RemotePermissionError) as ei:
            rf.check()
        assert path in str(ei.value) and "outside the data roots" in str(ei.value)
        # nothing was read: the buffer still holds zeros
        assert not RemoteArray(s, buf.ptr, np.uint8, (64,)).to_host().any()


def test_vectored_read_refuses_a_bad_entry_and_an_unowned_destination(s):
    rf = RemoteFiles(s)
    with s.alloc(4096) as buf:
        rf.read_many([("big.bin", 0, 16, buf.ptr), ("../outside/secret.bin", 0, 16, buf.ptr + 16)])
        with pytest.raises(RemotePermissionError, match="secret.bin"):
            rf.check()
        rf.read_many([("big.bin", 0, 16, buf.ptr), ("big.bin", 0, 16, buf.ptr + 4090)])
        with pytest.raises(RemoteReadError, match="not inside an allocation"):
            rf.check()
        rf.read(buf, "big.bin", 0, 8192)                       # the generated devptr check
        with pytest.raises(RemoteReadError, match="not inside an allocation"):
            rf.check()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(s, tree):
    p = tree[0] / "locked.bin"
    p.write_bytes(b"x" * 100)
    p.chmod(0)
    try:
        with pytest.raises(RemotePermissionError, match="locked.bin"):
            RemoteFiles(s).stat("locked.bin")
        with s.alloc(128) as buf:
            RemoteFiles(s).read(buf, "locked.bin", 0, 10)
            with pytest.raises(RemotePermissionError, match="locked.bin"):
                RemoteFiles(s).check()
    finally:
        p.chmod(0o644)


def test_without_data_roots_every_read_is_refused(tree):
    srv = ServerProc("cpu")
    try:
        s = srv.connect()
        rf = RemoteFiles(s)
        assert rf.backend()["roots"] == ""
        with pytest.raises(RemotePermissionError, match="no data root"):
            rf.stat("big.bin")
        with pytest.raises(CudaError) as ei:
            s.gwFileStat(str(tree[0] / "big.bin"))
        assert ei.value.name == "CUDA_ERROR_NOT_PERMITTED"
        with s.alloc(64) as buf:
            rf.read(buf, "big.bin", 0, 8)
            with pytest.raises(RemotePermissionError, match="no data roots are configured"):
                rf.check()
        s.close()
    finally:
        srv.stop()


def test_reopened_files_are_checked_again(tmp_path):
    """With one open file per session, every other read reopens: a directory (or the file)
    swapped for a symlink leading out after the first open is refused, not followed."""
    import shutil

    root, out = tmp_path / "root", tmp_path / "out"
    (root / "d").mkdir(parents=True)
    out.mkdir()
    (root / "d" / "f.bin").write_bytes(b"inside!!" * 8)
    (root / "g.bin").write_bytes(b"other" * 4)
    (root / "h.bin").write_bytes(b"third" * 4)
    (out / "f.bin").write_bytes(b"OUTSIDE!" * 8)
    (out / "g.bin").write_bytes(b"OUTSIDE!" * 8)
    srv = ServerProc("cpu", extra=["--data-root", str(root)], env={"GPUWIRE_GDS_MAX_OPEN_FILES": "1"})
    try:
        s = srv.connect()
        rf = RemoteFiles(s)
        assert bytes(_read(s, "d/f.bin", 0, 8)) == b"inside!!"
        assert bytes(_read(s, "g.bin", 0, 5)) == b"other"            # evicts d/f.bin
        assert bytes(_read(s, "d/f.bin", 0, 8)) == b"inside!!"       # reopened through the cache
        _read(s, "g.bin", 0, 5)
        shutil.rmtree(root / "d")
        os.symlink(out, root / "d")                                   # the directory now leads out
        with s.alloc(64) as buf:
            buf.memset(0)
            rf.read(buf, "d/f.bin", 0, 8)
            with pytest.raises(RemotePermissionError, match="d/f.bin"):
                rf.check()
            (root / "g.bin").unlink()
            os.symlink(out / "g.bin", root / "g.bin")                 # the file itself now leads out
            assert bytes(_read(s, "h.bin", 0, 5)) == b"third"        # evicts the open g.bin
            rf.read(buf, "g.bin", 0, 8)
            with pytest.raises(RemotePermissionError, match="g.bin"):
                rf.check()
            assert not RemoteArray(s, buf.ptr, np.uint8, (64,)).to_host().any()
        s.close()
    finally:
        srv.stop()


def test_serve_refuses_a_missing_data_root(tmp_path):
    missing = tmp_path / "not-there"
    p = subprocess.run([sys.executable, "-m", "gpuwire.rpc.cli", "--executor", "cpu", "--no-auth",
                        "--listen", "127.0.0.1:0", "--data-root", str(missing)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "not-there" in p.stderr and "data root" in p.stderr


# ----------------------------------------------------------------------------- datasets and the loader


def _paths():
    return [f"ds/shard{i}.bin" for i in range(len(SHARDS))]


def _local_records(root):
    return np.concatenate([np.frombuffer((root / p).read_bytes(), np.uint8).reshape(-1, REC) for p in _paths()])


def test_remote_datasets_match_local_ones_and_name_bad_files(s, tree):
    root, _ = tree
    ds = RemoteRecordDataset(s, _paths(), REC)
    local = RecordDataset([str(root / p) for p in _paths()], REC)
    assert len(ds) == len(local) == sum(SHARDS)
    assert [sh.nrecords for sh in ds.shards] == list(SHARDS)
    assert (ds.read_record(9) == local.read_record(9)).all()
    npy = RemoteNpyDataset(s, ["ds/a.npy", "ds/b.npy"])
    assert len(npy) == 50 and npy.dtype == np.float32 and npy.record_shape == (6,)
    assert (npy.read_record(41) == np.arange(6, dtype=np.float32) + 1006).all()
    with pytest.raises(CorruptFileError, match="ds/odd.bin"):
        RemoteRecordDataset(s, ["ds/odd.bin"], REC)
    with pytest.raises(TruncatedFileError, match="ds/cut.npy"):
        RemoteNpyDataset(s, ["ds/a.npy", "ds/cut.npy"])
    with pytest.raises(RemoteFileNotFoundError, match="ds/none.bin"):
        RemoteRecordDataset(s, ["ds/shard0.bin", "ds/none.bin"], REC)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_remote_loader_content_shuffle_and_epochs(s, tree, prefetch):
    root, _ = tree
    recs = _local_records(root)
    cs = s.stream()
    ds = RemoteRecordDataset(s, _paths(), REC)
    reader = RemoteReader(s, consumer_stream=cs)
    assert reader.mode == "remote:posix-host"
    loader = DataLoader(ds, 5, shuffle=True, seed=11, prefetch=prefetch, reader=reader)
    twin = DataLoader(RecordDataset([str(root / p) for p in _paths()], REC), 5, shuffle=True, seed=11,
                      prefetch=0, reader=_host_reader())
    orders = []
    for epoch in range(3):
        plan = loader.batch_plan(epoch)
        assert [list(x) for x in plan] == [list(x) for x in twin.batch_plan(epoch)]
        seen = []
        for k, b in enumerate(loader.iter_batches()):
            assert b.epoch == epoch and b.number == k            # in plan order, epoch by epoch
            assert list(b.indices) == list(plan[k])
            assert isinstance(b.data, RemoteArray) and b.data.shape == (len(b.indices), REC)
            got = b.data.to_host(cs)                               # ordered after the read on cs
            assert (got == recs[b.indices]).all()
            seen.extend(b.indices.tolist())
        assert sorted(seen) == list(range(len(ds)))               # every record once per epoch
        assert len(seen) == len(ds) and k + 1 == len(loader) == -(-len(ds) // 5)
        orders.append(seen)
    assert orders[0] != orders[1]                                  # epochs are reshuffled
    again = DataLoader(ds, 5, shuffle=True, seed=11, prefetch=prefetch, reader=reader)
    assert [b.indices.tolist() for b in again.iter_batches()] == [orders[0][i:i + 5]
                                                                  for i in range(0, len(ds), 5)]
    dl = DataLoader(ds, 4, shuffle=False, drop_last=True, prefetch=prefetch, reader=reader)
    batches = [b.data.to_host(cs) for b in dl.iter_batches()]
    assert len(batches) == len(ds) // 4 and all(x.shape == (4, REC) for x in batches)
    assert (np.concatenate(batches) == recs[:len(ds) // 4 * 4]).all()
    reader.check()
    loader.close()
    again.close()
    dl.close()
    reader.close()


def _host_reader():
    from gpuwire.gds import HostReader

    return HostReader()


def test_remote_loader_copy_outlives_the_ring(s, tree):
    recs = _local_records(tree[0])
    ds = RemoteRecordDataset(s, _paths(), REC)
    reader = RemoteReader(s)
    loader = DataLoader(ds, 6, shuffle=False, prefetch=1, copy=True, reader=reader)
    kept = list(loader)
    assert len({int(x) for x in kept}) == len(kept)              # each copy has its own memory
    for i, x in enumerate(kept):
        assert (x.to_host() == recs[i * 6:(i + 1) * 6]).all()
        x.free()
    loader.close()
    reader.close()


def test_remote_loader_reports_a_file_truncated_after_opening(s, tree):
    root, _ = tree
    p = root / "ds" / "shrink.bin"
    p.write_bytes(b"\1" * (8 * REC))
    ds = RemoteRecordDataset(s, ["ds/shrink.bin"], REC)
    reader = RemoteReader(s)
    p.write_bytes(b"\1" * (3 * REC))                               # shrinks behind the dataset's back
    loader = DataLoader(ds, 4, shuffle=False, prefetch=1, reader=reader)
    with pytest.raises(RemoteShortReadError, match="ds/shrink.bin"):
        for b in loader.iter_batches():
            b.data.to_host()
    loader.close()
    reader.close()


def test_dataset_larger_than_device_memory(tree, tmp_path):
    """A 1 MiB 'device' (CPU executor) and a 4 MiB dataset: the ring is reused."""
    root = tmp_path / "r"
    root.mkdir()
    rng = np.random.default_rng(3)
    data = rng.bytes(4 << 20)
    (root / "large.bin").write_bytes(data)
    srv = ServerProc("cpu", extra=["--data-root", str(root), "--cpu-mem-gib", str(1 / 1024)])
    try:
        s = srv.connect()
        with pytest.raises(CudaError):
            s.alloc(4 << 20)
            s.sync()
        ds = RemoteRecordDataset(s, "large.bin", 64 << 10)
        reader = RemoteReader(s)
        loader = DataLoader(ds, 2, shuffle=True, seed=5, prefetch=2, reader=reader)
        recs = np.frombuffer(data, np.uint8).reshape(-1, 64 << 10)
        n = 0
        for b in loader.iter_batches():
            assert (b.data.to_host() == recs[b.indices]).all()
            n += len(b.indices)
        assert n == 64 and reader.allocated_bytes == loader.ring_size * loader.batch_nbytes
        loader.close()
        reader.close()
        s.close()
    finally:
        srv.stop()


def test_bench_remote_mode_on_the_cpu_executor(tmp_path):
    import json

    from gpuwire.cli import main

    out = tmp_path / "r.json"
    rc = main(["bench", "gds", "--dir", str(tmp_path / "d"), "--size", "2M", "--chunk", "512K",
               "--small-count", "24", "--small-size", "8K", "--record-size", "16K", "--batch", "4",
               "--backends", "host", "--cache", "warm", "--remote", "--remote-executor", "cpu",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rem = [r for r in doc["rows"] if r["backend"] == "remote"]
    assert {r["case"] for r in rem} == {"seq", "small", "bare-seq", "loader"}
    assert all(r["mode"] == "remote:posix-host" and r["GBps"] > 0 for r in rem)
    assert {r["bytes"] for r in rem if r["case"] != "small"} == {2 << 20}
    assert doc["config"]["remote"]["embedded"] is True


# ----------------------------------------------------------------------------- GPU executor


@pytest.fixture(scope="module", params=["kvikio", "posix"])
def gpu_server(request, tree):
    why = gpu_available()
    if why:
        pytest.skip(f"GPU executor: {why}")
    if request.param == "kvikio":
        try:
            import kvikio  # noqa: F401
        except ImportError as e:
            pytest.skip(f"kvikio not importable: {e}")
    srv = ServerProc("gpu", extra=["--data-root", str(tree[0])], env={"GPUWIRE_GDS_BACKEND": request.param})
    srv.engine = request.param
    yield srv
    srv.stop()


@pytest.mark.gpu
def test_gpu_remote_reads_checksummed(gpu_server, tree):
    root, _ = tree
    s = gpu_server.connect()
    try:
        info = RemoteFiles(s).backend()
        mode = info["mode"]
        if gpu_server.engine == "kvikio":      # kvikio asked for: its synchronous engine
            assert mode in ("kvikio-compat", "kvikio-gds") and info["order"] == "sync"
        else:                                  # the asynchronous engine (docs/gds.md)
            assert mode == "posix+h2d" and info["order"] == "stream-wait", info
        data = (root / "big.bin").read_bytes()
        st = s.stream()
        for off, n in ((0, len(data)), (3, 100), (4096 * 7 + 1, (1 << 20) + 5)):   # staged and kvikio sizes
            assert _sha(_read(s, "big.bin", off, n, st)) == _sha(data[off:off + n]), (off, n)
        files = sorted((root / "small").glob("[0-9]*.bin"))
        blobs = [p.read_bytes() for p in files]
        total = sum(map(len, blobs))
        with s.alloc(total) as buf:
            pos, reads = 0, []
            for p, b in zip(files, blobs):
                reads.append((f"small/{p.name}", 0, len(b), buf.ptr + pos))
                pos += len(b)
            RemoteFiles(s).read_many(reads, st)
            assert _sha(RemoteArray(s, buf.ptr, np.uint8, (total,)).to_host(st)) == _sha(b"".join(blobs))
        with s.alloc(64) as buf:
            RemoteFiles(s).read(buf, "link-out.bin", 0, 8, st)
            with pytest.raises(RemotePermissionError, match="link-out.bin"):
                RemoteFiles(s).check()
            RemoteFiles(s).read(buf, "big.bin", len(data) - 4, 64, st)
            with pytest.raises(RemoteShortReadError, match="big.bin"):
                RemoteFiles(s).check()
    finally:
        s.close()


@pytest.mark.gpu
def test_gpu_remote_loader_epochs(gpu_server, tree):
    root, _ = tree
    recs = _local_records(root)
    s = gpu_server.connect()
    try:
        cs = s.stream(1)
        ds = RemoteRecordDataset(s, _paths(), REC)
        reader = RemoteReader(s, consumer_stream=cs)
        loader = DataLoader(ds, 4, shuffle="global", seed=2, prefetch=2, reader=reader)
        for epoch in range(2):
            seen = []
            for b in loader.iter_batches():
                assert (b.data.to_host(cs) == recs[b.indices]).all()
                seen += b.indices.tolist()
            assert sorted(seen) == list(range(len(ds)))
        reader.check()
        loader.close()
        reader.close()
    finally:
        s.close()


# ----------------------------------------------------------------------------- NUL bytes (audit)


def test_a_nul_byte_in_a_path_is_refused_never_truncated_at(s):
    """'big.bin\\0/../x' must not stat or read big.bin: refused by the client, and by the
    server for a client that sends it anyway."""
    rf = RemoteFiles(s)
    bad = "big.bin\x00/../../etc/passwd"
    with pytest.raises(RemotePermissionError, match="NUL"):
        rf.stat(bad)
    with pytest.raises(RemotePermissionError, match="NUL"):
        rf.read_bytes(bad, 0, 4)
    with s.alloc(64) as buf:
        with pytest.raises(RemotePermissionError, match="NUL"):
            rf.read(buf, bad, 0, 4)
    # the raw call: refused by the RPC client (ValueError) or else by the server (decode_path)
    with pytest.raises((CudaError, ValueError), match="NUL"):
        s.gwFileStat(bad)
    assert rf.stat("big.bin") == 3 * (1 << 20) + 123       # the session goes on


def test_decode_path_takes_only_a_trailing_terminator():
    from gpuwire.gds.service import decode_path
    assert decode_path(b"a.bin\x00") == "a.bin"
    assert decode_path(b"a.bin") == "a.bin"
    for raw in (b"a.bin\x00/../x\x00", b"a.bin\x00junk", b"\x00\x00"):
        with pytest.raises(PermissionError, match="NUL"):
            decode_path(raw)


def test_negative_header_bytes_is_refused(s):
    with pytest.raises(ValueError, match="header_bytes"):
        RemoteRecordDataset(s, "ds/shard0.bin", REC, header_bytes=-REC)
