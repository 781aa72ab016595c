"""The C loop of remote file reads (gpuwire._files, cffi_src/gw_files.c): content, order
and errors, through the server's FileService on the CPU executor (host-memory "device")
and through the module itself. CPU only; the GPU loop runs in tests/test_gds_remote.py's
gpu tests on the GPU machine."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

import gpuwire.transport  # noqa: F401  (the transport's libucp first)
from gpuwire._files import ffi, lib
from gpuwire.gds.errors import ShortReadError
from gpuwire.gds.service import FileService, _PIECE, _plan, _task_error
from gpuwire.rpc.executors.cpu import CPUExecutor

MEM = 64 << 20


@pytest.fixture
def session():
    es = CPUExecutor(256 << 20).open_session(0, 1 << 30)
    es.mm.alloc(es.va_base, MEM)
    yield es


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(7)
    out = {}
    for i in range(600):
        n = int(rng.integers(1, 20_000)) if i % 7 else 0   # some empty files
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        p = tmp_path / f"f{i:04d}.bin"
        p.write_bytes(data)
        out[p.name] = data
    return tmp_path, out


def _service(root, es, **kw):
    fs = FileService([str(root)], es)
    for k, v in kw.items():
        setattr(fs, k, v)
    return fs


def test_many_small_files_and_offsets_checksummed(session, files):
    root, data = files
    fs = _service(root, session, chunk=64 << 10)   # several tasks per call, pieces split across tasks
    try:
        reads, want, pos = [], [], session.va_base
        for k, (name, b) in enumerate(sorted(data.items())):
            off = (k * 37) % (len(b) + 1)
            n = len(b) - off - (k % 3 if len(b) - off > 3 else 0)
            reads.append((name, off, n, pos))
            want.append(b[off:off + n])
            pos += n + (k % 5)           # gaps between destinations
        for _ in range(2):   # the second pass reopens evicted files (600 > gds_max_open_files)
            session.view(session.va_base, pos - session.va_base)[:] = 0
            fs.read_many(reads, None)
            for (name, off, n, dst), w in zip(reads, want):
                got = bytes(session.view(dst, n))
                assert hashlib.sha256(got).digest() == hashlib.sha256(w).digest(), (name, off, n)
        assert fs.reads == 2 * sum(1 for r in reads if r[2])
        assert fs.file_stats()["opens"] > len(reads)
    finally:
        fs.close()


def test_overlapping_destinations_keep_call_order(session, files):
    root, data = files
    names = [n for n, b in sorted(data.items()) if len(b) >= 4096][:50]
    fs = _service(root, session, chunk=8 << 10)
    try:
        d = session.va_base
        # every entry overwrites the one before at a shifting offset: only in-order writes
        # leave the last file's bytes on top and each earlier file's tail beyond it
        reads = [(nm, 0, 4096, d + 16 * k) for k, nm in enumerate(names)]
        fs.read_many(reads, None)
        want = bytearray(4096 + 16 * (len(names) - 1))
        for k, nm in enumerate(names):
            want[16 * k:16 * k + 4096] = data[nm][:4096]
        assert bytes(session.view(d, len(want))) == bytes(want)
    finally:
        fs.close()


def test_range_past_the_end_is_named_before_any_byte_moves(session, files):
    root, data = files
    name = next(n for n, b in sorted(data.items()) if len(b) > 100)
    fs = _service(root, session)
    try:
        session.view(session.va_base, 64)[:] = 0xAB
        with pytest.raises(ShortReadError, match=name):
            fs.read_many([(name, 0, 64, session.va_base), (name, len(data[name]) - 10, 20, session.va_base + 64)],
                         None)
        assert bytes(session.view(session.va_base, 64)) == b"\xab" * 64
    finally:
        fs.close()


def test_destination_outside_the_session_memory_is_refused(session, files):
    root, data = files
    name = next(n for n, b in sorted(data.items()) if len(b) > 100)
    fs = _service(root, session)
    try:
        with pytest.raises(ValueError, match="outside the session's memory"):
            fs.read_many([(name, 0, 100, session.va_base + session.va_size - 50)], None)
        with pytest.raises(ValueError, match=name):
            fs.read_many([(name, 0, 100, 4096)], None)
    finally:
        fs.close()


class _H:
    def __init__(self, fd, size):
        self.fd, self.size = fd, size


def _run_host(entries, cancel=0):
    tasks = _plan(entries, 1 << 20, serial=False)
    assert len(tasks) == 1
    t = tasks[0]
    st = ffi.new("gw_fr_status_t *")
    flag = ffi.new("int *", cancel)
    rc = lib.gw_fr_read_host(ffi.from_buffer("gw_fr_piece_t[]", t.buf), t.n, flag, st)
    return rc, st, t


def test_c_loop_short_read_names_the_file_and_what_came(tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(b"x" * 1000)
    buf = bytearray(4096)
    dst = ffi.cast("uintptr_t", ffi.from_buffer(buf))
    fd = os.open(p, os.O_RDONLY)
    try:
        # the file shrank after the range was checked: the C loop sees EOF
        rc, st, t = _run_host([(_H(fd, 1000), str(p), 0, 100, int(dst)),
                               (_H(fd, 1000), str(p), 900, 300, int(dst) + 100)])
        assert rc == lib.GW_FR_EOF and st.index == 1 and st.got == 100
        e = _task_error(t, st)
        assert isinstance(e, ShortReadError) and str(p) in str(e) and "got 100" in str(e)
        assert bytes(buf[:200]) == b"x" * 200
    finally:
        os.close(fd)


def test_c_loop_os_error_names_the_file(tmp_path):
    buf = bytearray(64)
    dst = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    d = os.open(tmp_path, os.O_RDONLY)   # pread of a directory: EISDIR
    try:
        rc, st, t = _run_host([(_H(d, 64), "some/dir", 0, 64, dst)])
        assert rc == lib.GW_FR_OS and st.err == 21
        e = _task_error(t, st)
        assert isinstance(e, OSError) and e.filename == "some/dir" and "offset 0" in str(e)
    finally:
        os.close(d)


def test_c_loop_cancel_stops_before_reading(tmp_path):
    p = tmp_path / "c.bin"
    p.write_bytes(b"y" * 64)
    buf = bytearray(64)
    dst = int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))
    fd = os.open(p, os.O_RDONLY)
    try:
        rc, st, t = _run_host([(_H(fd, 64), str(p), 0, 64, dst)], cancel=1)
        assert rc == lib.GW_FR_CANCELLED and _task_error(t, st) is None
        assert bytes(buf) == bytes(64)
    finally:
        os.close(fd)


def test_piece_layout_matches_the_c_struct():
    assert _PIECE.size == ffi.sizeof("gw_fr_piece_t")
    t = _plan([(_H(5, 100), "p", 7, 9, 0x1234)], 64, serial=False)[0]
    c = ffi.from_buffer("gw_fr_piece_t[]", t.buf)
    assert (c[0].dst, c[0].offset, c[0].nbytes, c[0].fd, c[0].tag) == (0x1234, 7, 9, 5, 0)


@pytest.mark.skipif(lib.gw_fr_cuda_load() == 0, reason="libcuda present: the GPU loop is tested on the GPU")
def test_gpu_loop_without_libcuda_fails_clearly():
    st = ffi.new("gw_fr_status_t *")
    t = _plan([(_H(0, 10), "f", 0, 10, 0x1000)], 64, serial=False)[0]
    rc = lib.gw_fr_read_gpu(ffi.from_buffer("gw_fr_piece_t[]", t.buf), 1, 0, 64, 0, ffi.NULL, st)
    assert rc == lib.GW_FR_BADARG
    assert "libcuda.so.1" in str(_task_error(t, st))


def test_reopen_through_a_swapped_directory_into_a_sibling_root_name_is_refused(session, tmp_path):
    """The reopen of an evicted file checks what was opened against the roots by prefix
    at a separator: ``<root>2/...`` (same string prefix, another directory) is outside."""
    from gpuwire.gds.roots import OutsideDataRootsError

    root, sib = tmp_path / "r", tmp_path / "r2"
    (root / "d").mkdir(parents=True)
    (sib / "d").mkdir(parents=True)
    (root / "d" / "f.bin").write_bytes(b"inside")
    (root / "g.bin").write_bytes(b"other!")
    (sib / "d" / "f.bin").write_bytes(b"SECRET")
    fs = _service(root, session)
    fs.set_max_open(1)
    d = session.va_base
    try:
        fs.read_many([("d/f.bin", 0, 6, d)], None)
        fs.read_many([("g.bin", 0, 6, d + 8)], None)          # evicts d/f.bin
        assert bytes(session.view(d, 14)) == b"inside\0\0other!"
        (root / "d" / "f.bin").unlink()
        (root / "d").rmdir()
        os.symlink(sib / "d", root / "d")                     # the directory now leads to r2
        session.view(d, 6)[:] = 0
        with pytest.raises(OutsideDataRootsError, match="d/f.bin"):
            fs.read_many([("d/f.bin", 0, 6, d)], None)
        assert bytes(session.view(d, 6)) == bytes(6)
    finally:
        fs.close()


# ----------------------------------------------------------------------------- the C file table (gw_ft_*)

def test_paths_are_resolved_once_and_reopened_in_c(session, files):
    """The table remembers each client path's validated real path: a second pass over more
    files than gds_max_open_files reopens them in C without resolving them again."""
    root, data = files
    fs = _service(root, session)
    assert fs._ft is not None
    fs.set_max_open(50)
    try:
        names = sorted(data)
        reads, pos = [], session.va_base
        for name in names:
            reads.append((name, 0, len(data[name]), pos))
            pos += len(data[name])
        for _ in range(2):
            fs.read_many(reads, None)
        st = fs.file_stats()
        assert st["resolves"] == len(names) and st["paths"] == len(names)
        assert st["opens"] >= 2 * len(names) - 50 and st["open"] <= 50
        for name, _o, n, dst in reads:
            assert bytes(session.view(dst, n)) == data[name]
    finally:
        fs.close()


def test_a_replaced_file_is_resolved_again(session, tmp_path):
    """The remembered real path no longer opens (deleted; replaced by a symlink inside the
    root): the path is resolved again and the new file is read."""
    (tmp_path / "a.bin").write_bytes(b"first!")
    (tmp_path / "other.bin").write_bytes(b"second")
    (tmp_path / "z.bin").write_bytes(b"zzzzzz")
    fs = _service(tmp_path, session)
    fs.set_max_open(1)
    d = session.va_base
    try:
        fs.read_many([("a.bin", 0, 6, d)], None)
        fs.read_many([("z.bin", 0, 6, d + 8)], None)        # evicts a.bin
        (tmp_path / "a.bin").unlink()
        os.symlink("other.bin", tmp_path / "a.bin")        # inside the root: fine
        fs.read_many([("a.bin", 0, 6, d)], None)
        assert bytes(session.view(d, 6)) == b"second"
        assert fs.file_stats()["resolves"] == 3
        fs.read_many([("z.bin", 0, 6, d + 8)], None)        # evicts a.bin
        (tmp_path / "a.bin").unlink()
        os.symlink("z.bin", tmp_path / "a.bin")            # retargeted: a symlinked path is
        fs.read_many([("a.bin", 0, 6, d)], None)            # resolved again at every reopen
        assert bytes(session.view(d, 6)) == b"zzzzzz"
        fs.read_many([("other.bin", 0, 6, d + 8)], None)    # evicts a.bin
        (tmp_path / "a.bin").unlink()                      # gone: named
        with pytest.raises(FileNotFoundError, match="a.bin"):
            fs.read_many([("a.bin", 0, 6, d)], None)
    finally:
        fs.close()


def test_escapes_are_refused_through_the_table(session, tmp_path):
    from gpuwire.gds.roots import OutsideDataRootsError

    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"SECRET")
    (root / "ok.bin").write_bytes(b"ok")
    os.symlink(tmp_path / "secret.bin", root / "link.bin")
    fs = _service(root, session)
    d = session.va_base
    try:
        for bad in ("../secret.bin", "link.bin", str(tmp_path / "secret.bin")):
            with pytest.raises(OutsideDataRootsError, match="secret.bin|link.bin"):
                fs.read_many([("ok.bin", 0, 2, d), (bad, 0, 6, d + 8)], None)
        with pytest.raises(IsADirectoryError):
            fs.read_many([(".", 0, 1, d)], None)
        assert fs.file_stats()["open"] <= 1          # nothing stays held after a refusal
        fs.read_many([("ok.bin", 0, 2, d)], None)
        assert bytes(session.view(d, 2)) == b"ok"
    finally:
        fs.close()


def test_malformed_request_lists_are_named(session, files):
    from gpuwire.gds.service import pack_reads

    root, data = files
    name = next(n for n, b in sorted(data.items()) if len(b) > 10)
    fs = _service(root, session)
    try:
        blob = pack_reads([(name, 0, 10, session.va_base)])
        with pytest.raises(ValueError, match="bytes of entries for 2 reads"):
            fs.read_packed(blob, 2, None)
        with pytest.raises(ValueError, match="path index"):
            fs.read_packed(blob[:-4] + (7).to_bytes(4, "little"), 1, None)
        with pytest.raises(ValueError, match="shorter than its path count"):
            fs.read_packed(b"\x01", 1, None)
        with pytest.raises(ValueError, match="runs past"):
            fs.read_packed(b"\x01\0\0\0\xff\0\0\0ab", 0, None)
        fs.read_packed(blob, 1, None)
        assert bytes(session.view(session.va_base, 10)) == data[name][:10]
    finally:
        fs.close()


def test_destinations_are_checked_per_interval_then_per_entry(session, files):
    """check_dst (the server's devptr check) sees the merged intervals; where one spans two
    allocations back to back each entry is checked on its own, and a bad one is named."""
    from gpuwire.gds.service import pack_reads

    root, data = files
    names = [n for n, b in sorted(data.items()) if len(b) >= 1000][:4]
    base = session.va_base
    allocs = [(base, base + 2000), (base + 2000, base + 4000)]   # two allocations, back to back
    calls = []

    def check_dst(ptr, n, what):
        calls.append((ptr, n))
        if not any(lo <= ptr and ptr + n <= hi for lo, hi in allocs):
            raise ValueError(f"{what}: device range {ptr:#x}+{n} is not inside an allocation")

    fs = _service(root, session)
    try:
        reads = [(nm, 0, 1000, base + 1000 * k) for k, nm in enumerate(names)]
        fs.read_packed(pack_reads(reads), 4, None, check_dst=check_dst)
        assert calls[0] == (base, 4000) and len(calls) == 1 + 4    # one interval, then each entry
        for nm, _o, n, dst in reads:
            assert bytes(session.view(dst, n)) == data[nm][:n]
        calls.clear()
        fs.read_packed(pack_reads(reads[:2]), 2, None, check_dst=check_dst)
        assert calls == [(base, 2000)]                               # inside one: one check
        bad = reads[:3] + [(names[3], 0, 1000, base + 3500)]
        with pytest.raises(ValueError, match=hex(base + 3500)):
            fs.read_packed(pack_reads(bad), 4, None, check_dst=check_dst)
    finally:
        fs.close()


@pytest.mark.parametrize("c_plan", [True, False])
def test_c_and_python_planners_read_the_same_bytes(session, files, c_plan):
    from gpuwire import settings

    root, data = files
    with settings.override(gds_c_plan=c_plan):
        fs = _service(root, session, chunk=32 << 10)
    assert (fs._ft is not None) == c_plan
    try:
        reads, want, pos = [], [], session.va_base
        for k, (name, b) in enumerate(sorted(data.items())):
            off = (k * 13) % (len(b) + 1)
            reads.append((name, off, len(b) - off, pos))
            want.append(b[off:])
            pos += len(b) - off
        fs.read_many(reads, None)
        assert bytes(session.view(session.va_base, pos - session.va_base)) == b"".join(want)
        assert fs.reads == sum(1 for r in reads if r[2]) and fs.bytes == pos - session.va_base
    finally:
        fs.close()


def test_stat_and_reads_share_the_open_file(session, tmp_path):
    """gwFileStat opens through the same table: a file that shrinks after stat fails on the
    read worker (the range was checked against the size at open), naming the file."""
    p = tmp_path / "s.bin"
    p.write_bytes(b"x" * 5000)
    fs = _service(tmp_path, session)
    try:
        assert fs.stat("s.bin") == 5000
        os.truncate(p, 100)
        assert fs.stat("s.bin") == 100       # stat re-reads the size
        fs.read_many([("s.bin", 0, 5000, session.va_base)], None)   # checked against 5000 at open
        call, text, code, _seq, _later = fs.take_error()
        assert call == "gwFileReadV" and "s.bin" in text and "got 100" in text
    finally:
        fs.close()


# ----------------------------------------------------------------------------- Direct I/O (gds_direct)

def _odirect_works(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    try:
        import mmap
        return os.preadv(fd, [mmap.mmap(-1, 4096)], 0) >= 0
    except OSError:
        return False
    finally:
        os.close(fd)


def _direct_reads(base):
    """Entries mixing unaligned heads and tails with aligned megabytes (file offset, nbytes, dst)."""
    return [(7, 1000, base + 3), (4096, 2 << 20, base + 8192), (8192, (3 << 19) + 123, base + (3 << 20)),
            (1 << 20, 1 << 20, base + (5 << 20) + 100)]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_direct_io_reads_the_same_bytes(session, tmp_path, mode):
    from gpuwire import settings

    data = np.random.default_rng(3).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "d.bin").write_bytes(data)
    with settings.override(gds_direct=mode):
        fs = _service(tmp_path, session, chunk=256 << 10)
    try:
        reads = [("d.bin", o, n, d) for o, n, d in _direct_reads(session.va_base)]
        fs.read_many(reads, None)
        for _p, o, n, d in reads:
            assert bytes(session.view(d, n)) == data[o:o + n], (o, n)
        st = fs.file_stats()
        if mode == "on" and _odirect_works(tmp_path / "d.bin"):
            # host destinations: only pieces whose file offset, size and destination are aligned
            assert st["direct_entries"] == 3 and 0 < st["direct_bytes"] < sum(r[2] for r in reads)
        else:
            assert st["direct_bytes"] == 0
    finally:
        fs.close()


def test_direct_auto_follows_the_page_cache(session, tmp_path):
    from gpuwire import settings
    from gpuwire.gds.backends import page_residency

    p = tmp_path / "c.bin"
    data = os.urandom(4 << 20)
    p.write_bytes(data)
    if not _odirect_works(p):
        pytest.skip("no O_DIRECT on this filesystem")
    with settings.override(gds_direct="auto"):
        fs = _service(tmp_path, session)
    try:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.pread(fd, len(data), 0)
            assert page_residency(fd, 0, len(data)) == (16, 16)
            fs.read_many([("c.bin", 0, len(data), session.va_base)], None)     # warm: buffered
            assert fs.file_stats()["direct_entries"] == 0
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if page_residency(fd, 0, len(data))[0] > 0:
                pytest.skip("the page cache kept the file")
        finally:
            os.close(fd)
        session.view(session.va_base, len(data))[:] = 0
        fs.read_many([("c.bin", 0, len(data), session.va_base)], None)         # cold: direct
        assert fs.file_stats()["direct_entries"] == 1
        assert bytes(session.view(session.va_base, len(data))) == data
    finally:
        fs.close()


@pytest.mark.gpu
def test_gpu_direct_io_pieces_checksummed(tmp_path):
    """The GPU loop with O_DIRECT pieces: each lands at an aligned place of the worker's
    pinned buffer (after unaligned ones), and every byte arrives."""
    from test_rpc_support import ServerProc, gpu_available
    from gpuwire.gds.remote import RemoteArray, RemoteFiles

    why = gpu_available()
    if why:
        pytest.skip(f"GPU executor: {why}")
    data = np.random.default_rng(5).integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "d.bin").write_bytes(data)
    srv = ServerProc("gpu", extra=["--data-root", str(tmp_path)],
                     env={"GPUWIRE_GDS_DIRECT": "on", "GPUWIRE_GDS_STAGING_BYTES": str(256 << 10)})
    try:
        s = srv.connect()
        info = RemoteFiles(s).backend()
        assert info.get("direct") == "on" and info.get("plan") == "c", info
        with s.alloc(8 << 20) as buf:
            reads = [("d.bin", o, n, buf.ptr + d) for o, n, d in _direct_reads(0)]
            RemoteFiles(s).read_many(reads)
            RemoteFiles(s).check()
            got = RemoteArray(s, buf.ptr, np.uint8, (8 << 20,)).to_host()
        for _p, o, n, d in reads:
            off = d - buf.ptr
            assert hashlib.sha256(got[off:off + n].tobytes()).digest() == hashlib.sha256(data[o:o + n]).digest()
        s.close()
    finally:
        srv.stop()


def test_a_full_path_table_drops_idle_paths_only(session, files):
    """More distinct paths than the table holds: idle ones are dropped (and resolved again
    when used), files held by a read in flight keep their entries."""
    root, data = files
    names = [n for n, b in sorted(data.items()) if b][:40]
    fs = _service(root, session)
    lib.gw_ft_set_max_paths(fs._ft, 16)
    try:
        pos = session.va_base
        reads = []
        for nm in names:
            reads.append((nm, 0, len(data[nm]), pos))
            pos += len(data[nm])
        for k in range(0, len(reads), 8):                   # 8 paths a call: fits
            fs.read_many(reads[k:k + 8], None)
        for nm, _o, n, dst in reads:
            assert bytes(session.view(dst, n)) == data[nm]
        st = fs.file_stats()
        assert st["paths"] <= 16 and st["resolves"] == len(names)
        fs.read_many(reads[:8], None)                       # dropped: resolved again, read again
        assert fs.file_stats()["resolves"] > len(names)
        with pytest.raises(OSError, match="path table"):     # one call naming more than fit
            fs.read_many(reads[:20], None)
    finally:
        fs.close()


# ----------------------------------------------------------------------------- review of the file table (issue 5)

def test_many_evicted_indirect_paths_reopen_in_one_call(session, tmp_path):
    """Files under a later data root (indirect paths: every reopen is resolved again)
    evicted from the table: one call naming many of them reads them all (the plan asks
    for every path to resolve at once, not one per attempt)."""
    r0, r1 = tmp_path / "a", tmp_path / "b"
    r0.mkdir()
    r1.mkdir()
    data = {}
    for i in range(12):
        data[f"f{i:02d}.bin"] = bytes([i]) * (100 + i)
        (r1 / f"f{i:02d}.bin").write_bytes(data[f"f{i:02d}.bin"])
    fs = FileService([str(r0), str(r1)], session)
    assert fs._ft is not None
    fs.set_max_open(1)
    try:
        reads, pos = [], session.va_base
        for nm, b in sorted(data.items()):
            reads.append((nm, 0, len(b), pos))
            pos += len(b)
        for _ in range(3):              # the second and third passes reopen evicted files
            session.view(session.va_base, pos - session.va_base)[:] = 0
            fs.read_many(reads, None)
            for nm, _o, n, dst in reads:
                assert bytes(session.view(dst, n)) == data[nm]
    finally:
        fs.close()


@pytest.mark.parametrize("how", ["openat2", "walk", "python"])
def test_a_swapped_directory_is_refused_before_anything_outside_is_looked_at(session, tmp_path, how):
    """A directory of a validated path is swapped for a symlink leading out of the root;
    outside, the name is a directory (or a FIFO). The reopen must not report what lies
    outside (IsADirectoryError, 'not a regular file'): the path is refused as outside.
    C table with openat2 and with its component walk; the Python planner."""
    from gpuwire import settings
    from gpuwire.gds.roots import OutsideDataRootsError

    root, out = tmp_path / "r", tmp_path / "out"
    (root / "d").mkdir(parents=True)
    (out / "f.bin").mkdir(parents=True)          # outside: a directory named like the file
    os.mkfifo(out / "g.bin")
    (root / "d" / "f.bin").write_bytes(b"inside")
    (root / "d" / "g.bin").write_bytes(b"inside")
    (root / "z.bin").write_bytes(b"zzzzzz")
    with settings.override(gds_c_plan=how != "python"):
        fs = _service(root, session)
    fs.set_max_open(1)
    lib.gw_ft_use_openat2(how != "walk")
    d = session.va_base
    try:
        fs.read_many([("d/f.bin", 0, 6, d), ("d/g.bin", 0, 6, d + 8)], None)
        fs.read_many([("z.bin", 0, 6, d + 16)], None)          # evicts both
        for p in ("f.bin", "g.bin"):
            (root / "d" / p).unlink()
        (root / "d").rmdir()
        os.symlink(out, root / "d")
        for p in ("d/f.bin", "d/g.bin"):
            with pytest.raises(OutsideDataRootsError, match=p):
                fs.read_many([(p, 0, 6, d)], None)
        assert fs.file_stats()["open"] <= 1
    finally:
        lib.gw_ft_use_openat2(1)
        fs.close()


def _no_hang(fn, timeout=10.0):
    """fn() in a thread; the exception it raised (None), or fails when it blocks."""
    import threading

    box = []

    def run():
        try:
            fn()
            box.append(None)
        except BaseException as e:   # noqa: BLE001
            box.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    return th, box


@pytest.mark.parametrize("c_plan", [True, False])
def test_a_fifo_under_the_root_is_refused_not_waited_on(session, tmp_path, c_plan):
    """A FIFO inside a data root: the read and the stat fail naming it (no open that waits
    for a writer forever), with the C and with the Python planner."""
    from gpuwire import settings

    os.mkfifo(tmp_path / "pipe.bin")
    with settings.override(gds_c_plan=c_plan):
        fs = _service(tmp_path, session)
    try:
        for fn in (lambda: fs.stat("pipe.bin"), lambda: fs.read_many([("pipe.bin", 0, 4, session.va_base)], None)):
            th, box = _no_hang(fn)
            if th.is_alive():   # unblock the stuck open before failing
                fd = os.open(tmp_path / "pipe.bin", os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
                th.join(5)
                pytest.fail("opening a FIFO under the data root blocked")
            assert isinstance(box[0], OSError) and "pipe.bin" in str(box[0]) and "regular file" in str(box[0])
    finally:
        fs.close()


def test_a_data_root_replaced_by_a_new_directory_is_followed(session, tmp_path):
    """The root directory itself replaced (a dataset updated by renaming a new directory
    into place): reopens open the new root's files, as a path open would."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "x.bin").write_bytes(b"old!")
    (root / "z.bin").write_bytes(b"zzzz")
    fs = _service(root, session)
    fs.set_max_open(1)
    d = session.va_base
    try:
        fs.read_many([("x.bin", 0, 4, d)], None)
        fs.read_many([("z.bin", 0, 4, d + 8)], None)        # evicts x.bin
        os.rename(root, tmp_path / "r.old")
        root.mkdir()
        (root / "x.bin").write_bytes(b"new!")
        fs.read_many([("x.bin", 0, 4, d)], None)
        assert bytes(session.view(d, 4)) == b"new!"
    finally:
        fs.close()


def test_a_path_repeated_in_the_path_table_is_planned(session, tmp_path):
    """A hand-made request list naming one path twice in its path table (pack_reads never
    does): planned and read, also when the path must be resolved again at its reopen."""
    import struct

    r0, r1 = tmp_path / "a", tmp_path / "b"
    r0.mkdir()
    r1.mkdir()
    (r1 / "x.bin").write_bytes(b"0123456789")
    (r0 / "z.bin").write_bytes(b"zz")
    fs = FileService([str(r0), str(r1)], session)
    fs.set_max_open(1)
    d = session.va_base
    blob = struct.pack("<I", 2) + (struct.pack("<I", 5) + b"x.bin") * 2
    blob += struct.pack("<QQQI", d, 0, 4, 0) + struct.pack("<QQQI", d + 4, 4, 6, 1)
    try:
        for k in range(4):
            session.view(d, 10)[:] = 0
            fs.read_packed(blob, 2, None)
            assert bytes(session.view(d, 10)) == b"0123456789"
            fs.read_many([("z.bin", 0, 2, d + 16)], None)     # evicts x.bin
            if k == 1:   # now under the first root (direct), then its real path stops opening
                os.rename(r1 / "x.bin", r0 / "x.bin")
            elif k == 2:
                os.rename(r0 / "x.bin", r1 / "x.bin")
    finally:
        fs.close()


@pytest.mark.parametrize("openat2", [1, 0])
def test_open_beneath_follows_nothing(tmp_path, openat2):
    """gw_fr_open_beneath (reopens of the Python planner): a directory swapped for a symlink
    fails (ELOOP / ENOTDIR) whatever lies where it leads; `..`, paths outside the root and
    non-regular files are refused; a regular file opens, with its size and /proc link."""
    import errno

    root, out = tmp_path / "r", tmp_path / "out"
    (root / "d").mkdir(parents=True)
    (out / "f.bin").mkdir(parents=True)
    (root / "d" / "f.bin").write_bytes(b"12345")
    os.mkfifo(root / "fifo")
    link, n, size = ffi.new("char[]", 4096), ffi.new("int64_t *"), ffi.new("uint64_t *")
    r = os.fsencode(root)
    lib.gw_ft_use_openat2(openat2)
    try:
        def op(p):
            return lib.gw_fr_open_beneath(r, os.fsencode(p), link, 4096, n, size)

        fd = op(root / "d" / "f.bin")
        assert fd >= 0 and size[0] == 5 and ffi.unpack(link, n[0]) == os.fsencode(root / "d" / "f.bin")
        os.close(fd)
        assert op(root / "fifo") == -errno.EINVAL
        assert op(root / "d") == -errno.EISDIR
        assert op(str(root / "d" / ".." / ".." / "out" / "f.bin")) == -errno.EXDEV   # `..` leading out
        fd = op(str(root / "d" / ".." / "d" / "f.bin"))    # staying inside: openat2 allows it
        assert fd == -errno.EXDEV if not openat2 else fd >= 0
        if fd >= 0:
            os.close(fd)
        assert op(out / "f.bin") == -errno.EXDEV
        assert op(str(root) + "2/d/f.bin") == -errno.EXDEV        # a sibling with the root's name as prefix
        os.rename(root / "d", root / "d.old")
        os.symlink(out, root / "d")
        assert op(root / "d" / "f.bin") in (-errno.ELOOP, -errno.ENOTDIR)
    finally:
        lib.gw_ft_use_openat2(1)


def test_close_with_a_stuck_worker_keeps_its_descriptors(session, tmp_path):
    """Session end while a read worker is stuck (python planner): its files are not closed
    under it (a closed descriptor's number is reused by the next open: the stuck read
    would land another file's bytes)."""
    import threading

    from gpuwire import settings

    (tmp_path / "a.bin").write_bytes(b"a" * 100)
    with settings.override(gds_c_plan=False):
        fs = _service(tmp_path, session)
    gate, entered = threading.Event(), threading.Event()
    seen = []

    def stuck(w, t):
        seen.extend(fd for fd, *_ in t.unpack())
        entered.set()
        gate.wait(30)

    fs._task_host = stuck
    th = threading.Thread(target=lambda: fs.read_many([("a.bin", 0, 100, session.va_base)], None), daemon=True)
    th.start()
    assert entered.wait(10)
    fs.close(timeout=0.2)
    try:
        os.fstat(seen[0])          # still the worker's file
    finally:
        gate.set()
        th.join(10)
