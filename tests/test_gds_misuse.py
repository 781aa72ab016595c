"""Misuse of the local gds API (audit fixes): FIFOs and directories refused by name, never
waited on; arguments checked up front; corrupt .npy headers reported as CorruptFileError."""
from __future__ import annotations

import io
import os
import struct
import threading

import numpy as np
import pytest

from gpuwire.gds import DataLoader, DataRoots, HostReader, NpyDataset, RecordDataset
from gpuwire.gds.dataset import parse_npy_header
from gpuwire.gds.errors import CorruptFileError, TruncatedFileError


def _bounded(fn, fifo, seconds=10.0):
    """Run ``fn``; if it blocks (on the FIFO), unblock it by opening the FIFO's other end
    and fail: a regression must not hang the test run."""
    out = {}

    def go():
        try:
            out["ret"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            out["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)   # releases an open/read waiting on it
        os.close(fd)
        t.join(5)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return out


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "sub").mkdir()
    return tmp_path


@pytest.mark.parametrize("roots", [False, True])
def test_reader_refuses_a_fifo_by_name(tree, roots):
    r = HostReader(roots=DataRoots([tree]) if roots else None)
    buf = r.alloc(16)
    src = "fifo" if roots else str(tree / "fifo")
    out = _bounded(lambda: r.read_into(src, 0, 10, buf), tree / "fifo")
    assert isinstance(out.get("err"), OSError) and "fifo" in str(out["err"])
    assert "not a regular file" in str(out["err"])


def test_datasets_refuse_a_fifo_by_name(tree):
    for make in (lambda: RecordDataset(str(tree / "fifo"), 4), lambda: NpyDataset(str(tree / "fifo")),
                 lambda: parse_npy_header(str(tree / "fifo"))):
        out = _bounded(make, tree / "fifo")
        assert isinstance(out.get("err"), OSError), out
        assert "fifo" in str(out["err"]) and "not a regular file" in str(out["err"])


def test_reading_a_directory_names_it(tree):
    r = HostReader()
    buf = r.alloc(16)
    with pytest.raises(IsADirectoryError) as ei:
        r.read_into(str(tree / "sub"), 0, 10, buf)
    assert ei.value.filename == str(tree / "sub")


def test_pread_errors_name_the_file(tree):
    from gpuwire.gds.backends import _pread_full
    fd = os.open(tree / "sub", os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError) as ei:
            _pread_full(fd, memoryview(bytearray(8)), 0, "the/file.bin", 8)
    finally:
        os.close(fd)
    assert ei.value.filename == "the/file.bin"


def test_regular_files_still_read(tree):
    r = HostReader(roots=DataRoots([tree]))
    buf = r.alloc(16)
    assert r.read_into("a.bin", 3, 10, buf) == 10
    assert bytes(buf[:10]) == bytes(range(3, 13))


# ----------------------------------------------------------------------------- arguments


def test_arguments_are_checked_up_front(tree):
    p = str(tree / "a.bin")
    with pytest.raises(ValueError, match="header_bytes"):
        RecordDataset(p, 4, header_bytes=-4)
    with pytest.raises(ValueError, match="header_bytes"):
        RecordDataset._shard(p, 4, -4)
    with pytest.raises(TypeError, match="record_bytes"):
        RecordDataset(p, 4.7)
    assert RecordDataset(p, 4.0).record_nbytes == 4
    with pytest.raises(ValueError, match="record_shape"):
        RecordDataset(p, 4, record_shape=(-2, -2))
    ds = RecordDataset(p, 4)
    r = HostReader()
    with pytest.raises(TypeError, match="batch_size"):
        DataLoader(ds, 2.5, reader=r)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(ds, 0, reader=r)
    with pytest.raises(ValueError, match="workers"):
        DataLoader(ds, 1, workers=-1, reader=r)
    with pytest.raises(ValueError, match="prefetch"):
        DataLoader(ds, 1, prefetch=-1, reader=r)
    r.alloc(100)
    with pytest.raises(ValueError, match="nbytes"):
        r.alloc(-5)
    assert r.allocated_bytes == 100


# ----------------------------------------------------------------------------- .npy headers


def _npy(text: str, payload: bytes = b"") -> bytes:
    h = text.encode("latin1")
    h += b" " * (117 - len(h)) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + payload


def test_unhashable_header_key_is_a_corrupt_file(tmp_path):
    p = tmp_path / "unhash.npy"
    p.write_bytes(_npy("{[]: 1}"))
    with pytest.raises(CorruptFileError, match="unhash.npy"):
        NpyDataset(str(p))
    p.write_bytes(_npy("[" * 200 + "]" * 200))          # nesting (RecursionError on some Pythons)
    with pytest.raises(CorruptFileError, match="unhash.npy"):
        NpyDataset(str(p))


def test_subarray_descr_is_folded_into_the_shape(tmp_path):
    p = tmp_path / "sub.npy"
    data = np.arange(6, dtype="<f4")
    p.write_bytes(_npy("{'descr': ('<f4', (2,)), 'fortran_order': False, 'shape': (3,)}", data.tobytes()))
    ds = NpyDataset(str(p))
    assert ds.dtype == np.float32 and ds.record_shape == (2,) and len(ds) == 3
    assert np.array_equal(ds.read_record(1), [2.0, 3.0])
    batch = next(iter(DataLoader(ds, 3, shuffle=False, prefetch=0, reader=HostReader())))
    assert np.array_equal(batch, data.reshape(3, 2))
    np.save(tmp_path / "np.npy", np.zeros(3, dtype=[("x", "<f4", (2,))]))   # a structured field stays
    assert NpyDataset(str(tmp_path / "np.npy")).record_shape == ()


def test_a_huge_header_length_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.npy"
    p.write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFF00) + b"{")
    with pytest.raises(CorruptFileError, match="header length"):
        NpyDataset(str(p))

    class Counting(io.BytesIO):
        asked = 0

        def read(self, n=-1):
            Counting.asked = max(Counting.asked, n)
            return super().read(n)
    with pytest.raises(CorruptFileError):
        parse_npy_header("x.npy", Counting(p.read_bytes()))
    assert Counting.asked < 1 << 20


def test_remote_npy_header_longer_than_the_file_reads_nothing_more(tmp_path):
    """RemoteNpyDataset._header: a length field past the end of the file is a truncated
    file, found without reading (min(size, need) used to read up to 4 GiB)."""
    from gpuwire.gds.remote import RemoteNpyDataset

    class Files:
        def __init__(self, data):
            self.data, self.asked = data, []

        def stat(self, path):
            return len(self.data)

        def read_bytes(self, path, off, n):
            self.asked.append(n)
            return self.data[off:off + n]
    data = b"\x93NUMPY\x02\x00" + struct.pack("<I", 500_000) + b"{" * 8000   # under the cap, past the end
    f = Files(data)
    with pytest.raises(TruncatedFileError):
        RemoteNpyDataset._header(RemoteNpyDataset.__new__(RemoteNpyDataset), f, "h.npy", len(data))
    assert max(f.asked) <= RemoteNpyDataset.HEAD
    f = Files(b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFF00) + b"{" * 8000)
    with pytest.raises(CorruptFileError, match="header length"):
        RemoteNpyDataset._header(RemoteNpyDataset.__new__(RemoteNpyDataset), f, "h.npy", len(f.data))
    assert max(f.asked) <= RemoteNpyDataset.HEAD


def test_remote_files_refuse_nul_without_a_call():
    from gpuwire.gds.remote import RemoteFiles, RemotePermissionError

    class Session:
        calls = []

        def __getattr__(self, name):
            Session.calls.append(name)
            raise AssertionError(f"{name} called")
    rf = RemoteFiles(Session())
    for fn in (lambda: rf.stat("a\x00b"), lambda: rf.read(0, "a\x00b", 0, 4), lambda: rf.read_bytes("a\x00b", 0, 4)):
        with pytest.raises(RemotePermissionError, match="NUL"):
            fn()
    assert Session.calls == []


def test_translate_names_a_non_regular_file():
    from gpuwire.gds.remote import RemoteReadError, _translate

    class E(Exception):
        call, result, call_args = "gwFileStat", 304, ""
    out = _translate(E(), "some/dir")
    assert isinstance(out, RemoteReadError) and "not a regular file or unreadable" in str(out)
