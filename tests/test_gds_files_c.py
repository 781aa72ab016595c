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
        assert fs._files.opens > len(reads)
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
    fs._files.max_open = 1
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
