"""gpuwire.gds.dataset: record files, .npy headers, layout errors naming the file."""
import os
import struct

import numpy as np
import pytest

from gpuwire.gds import CorruptFileError, NpyDataset, RecordDataset, TruncatedFileError, parse_npy_header


def _npy_bytes(arr: np.ndarray, version=(1, 0), header: str = None) -> bytes:
    """A .npy file made by hand (not numpy.save), header padded to 64 bytes."""
    if header is None:
        header = repr({"descr": arr.dtype.str, "fortran_order": False, "shape": arr.shape})
    lensize = 2 if version[0] == 1 else 4
    pre = 6 + 2 + lensize
    text = header + " " * ((64 - (pre + len(header) + 1) % 64) % 64) + "\n"
    enc = text.encode("latin1" if version[0] < 3 else "utf8")
    fmt = "<H" if version[0] == 1 else "<I"
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, len(enc)) + enc + arr.tobytes()


# --------------------------------------------------------------------------- npy headers


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_hand_made_headers_of_each_version(tmp_path, version):
    a = np.arange(24, dtype=np.int16).reshape(6, 4)
    p = tmp_path / "a.npy"
    p.write_bytes(_npy_bytes(a, version))
    h = parse_npy_header(str(p))
    assert h.version == version
    assert h.dtype == np.int16 and h.shape == (6, 4) and not h.fortran_order
    assert h.data_offset == os.path.getsize(p) - a.nbytes
    ds = NpyDataset(str(p))
    assert [ds.read_record(i).tolist() for i in range(6)] == a.tolist()


def test_numpy_save_v1_and_v2(tmp_path):
    a = np.random.default_rng(0).random((10, 3), dtype=np.float32)
    p1 = tmp_path / "v1.npy"
    np.save(p1, a)
    p2 = tmp_path / "v2.npy"
    with open(p2, "wb") as f:
        np.lib.format.write_array(f, a, version=(2, 0))
    h1, h2 = parse_npy_header(str(p1)), parse_npy_header(str(p2))
    assert h1.version == (1, 0) and h2.version == (2, 0)
    for h, p in ((h1, p1), (h2, p2)):
        assert h.shape == (10, 3) and h.dtype == np.float32
        raw = p.read_bytes()[h.data_offset:]
        assert np.array_equal(np.frombuffer(raw, np.float32).reshape(10, 3), a)


def test_structured_dtype(tmp_path):
    dt = np.dtype([("x", "<i4"), ("y", "<f8", (2,))])
    a = np.zeros(5, dtype=dt)
    a["x"] = np.arange(5)
    np.save(tmp_path / "s.npy", a)
    ds = NpyDataset(str(tmp_path / "s.npy"))
    assert ds.dtype == dt and ds.record_shape == () and ds.record_nbytes == dt.itemsize
    assert int(ds.read_record(3)["x"]) == 3


def test_bad_magic_and_version_named(tmp_path):
    p = tmp_path / "bad.npy"
    p.write_bytes(b"NOTNUMPY" + b"\0" * 100)
    with pytest.raises(CorruptFileError, match="bad.npy.*bad magic"):
        NpyDataset(str(p))
    a = np.zeros(4, np.uint8)
    q = tmp_path / "v9.npy"
    q.write_bytes(_npy_bytes(a, (9, 0)))
    with pytest.raises(CorruptFileError, match="v9.npy.*version 9"):
        parse_npy_header(str(q))


def test_fortran_order_refused(tmp_path):
    a = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.save(tmp_path / "f.npy", a)
    with pytest.raises(CorruptFileError, match="f.npy.*Fortran"):
        NpyDataset(str(tmp_path / "f.npy"))


def test_garbage_header_named(tmp_path):
    p = tmp_path / "g.npy"
    p.write_bytes(_npy_bytes(np.zeros(2, np.uint8), header="{'descr': '<u1', 'oops'"))
    with pytest.raises(CorruptFileError, match="g.npy"):
        NpyDataset(str(p))
    q = tmp_path / "o.npy"
    q.write_bytes(_npy_bytes(np.zeros(2, np.uint8), header="{'descr': '|O', 'fortran_order': False, 'shape': (2,)}"))
    with pytest.raises(CorruptFileError, match="o.npy.*object"):
        NpyDataset(str(q))


def test_truncated_npy_named_with_sizes(tmp_path):
    a = np.arange(100, dtype=np.float64).reshape(25, 4)
    np.save(tmp_path / "t.npy", a)
    full = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(full[:-40])
    with pytest.raises(TruncatedFileError) as e:
        NpyDataset(str(tmp_path / "t.npy"))
    msg = str(e.value)
    assert "t.npy" in msg and str(len(full)) in msg and str(len(full) - 40) in msg
    assert e.value.expected == len(full) and e.value.actual == len(full) - 40
    (tmp_path / "t.npy").write_bytes(full[:20])  # inside the header
    with pytest.raises(TruncatedFileError, match="t.npy"):
        NpyDataset(str(tmp_path / "t.npy"))


def test_trailing_garbage_named(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2), np.int32))
    with open(tmp_path / "x.npy", "ab") as f:
        f.write(b"junk")
    with pytest.raises(CorruptFileError, match="x.npy.*4 bytes after the data"):
        NpyDataset(str(tmp_path / "x.npy"))


def test_dtype_and_shape_mismatch_across_shards_named(tmp_path):
    np.save(tmp_path / "s0.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "s1.npy", np.zeros((4, 3), np.float64))
    with pytest.raises(CorruptFileError, match=r"s1.npy: dtype float64 differs from float32 of .*s0.npy"):
        NpyDataset(str(tmp_path / "s*.npy"))
    os.remove(tmp_path / "s1.npy")
    np.save(tmp_path / "s1.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(CorruptFileError, match=r"s1.npy: record shape \(2,\) differs from \(3,\)"):
        NpyDataset(str(tmp_path / "s*.npy"))


def test_npy_shards_mapping(tmp_path):
    a = np.arange(70 * 5, dtype=np.int32).reshape(70, 5)
    cuts = [0, 10, 10, 45, 70]  # includes an empty shard
    for i in range(4):
        np.save(tmp_path / f"p{i}.npy", a[cuts[i]:cuts[i + 1]])
    ds = NpyDataset(sorted(str(p) for p in tmp_path.glob("p*.npy")))
    assert len(ds) == 70 and ds.record_shape == (5,) and ds.dtype == np.int32
    assert ds.record_nbytes == 20 and ds.nbytes == 70 * 20
    for i in (0, 9, 10, 44, 45, 69):
        assert ds.read_record(i).tolist() == a[i].tolist()
    path, off = ds.locate(45)
    assert path.endswith("p3.npy") and off == parse_npy_header(path).data_offset
    with pytest.raises(IndexError):
        ds.locate_many([70])


# --------------------------------------------------------------------------- raw records


def test_record_dataset_one_file_and_many(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 32 * 100, dtype=np.uint8)
    (tmp_path / "one.bin").write_bytes(data.tobytes())
    ds = RecordDataset(str(tmp_path / "one.bin"), 32)
    assert len(ds) == 100 and ds.dtype == np.uint8 and ds.record_shape == (32,)
    assert ds.read_record(57).tobytes() == data[57 * 32:58 * 32].tobytes()
    d = tmp_path / "many"
    d.mkdir()
    for i in range(4):
        (d / f"{i}.bin").write_bytes(data[i * 800:(i + 1) * 800].tobytes())
    for arg in (str(d), str(d / "*.bin"), [str(d / f"{i}.bin") for i in range(4)]):
        many = RecordDataset(arg, 32)
        assert len(many) == 100
        assert many.read_record(57).tobytes() == data[57 * 32:58 * 32].tobytes()


def test_record_dataset_dtype_and_shape(tmp_path):
    a = np.arange(60, dtype=np.float32)
    (tmp_path / "f.bin").write_bytes(a.tobytes())
    ds = RecordDataset(str(tmp_path / "f.bin"), 24, dtype=np.float32, record_shape=(2, 3))
    assert len(ds) == 10 and ds.record_shape == (2, 3)
    assert ds.read_record(1).tolist() == a[6:12].reshape(2, 3).tolist()
    with pytest.raises(ValueError):
        RecordDataset(str(tmp_path / "f.bin"), 24, dtype=np.float32, record_shape=(5,))


def test_record_size_not_dividing_file_is_named(tmp_path):
    (tmp_path / "ok.bin").write_bytes(b"\0" * 64)
    (tmp_path / "odd.bin").write_bytes(b"\0" * 70)
    with pytest.raises(CorruptFileError) as e:
        RecordDataset(str(tmp_path / "*.bin"), 16)
    assert "odd.bin" in str(e.value) and "70" in str(e.value) and "6 bytes left over" in str(e.value)


def test_header_bytes(tmp_path):
    (tmp_path / "h.bin").write_bytes(b"HDR!" + bytes(range(16)))
    ds = RecordDataset(str(tmp_path / "h.bin"), 8, header_bytes=4)
    assert len(ds) == 2 and ds.read_record(1).tolist() == list(range(8, 16))
    (tmp_path / "s.bin").write_bytes(b"HD")
    with pytest.raises(TruncatedFileError, match="s.bin"):
        RecordDataset(str(tmp_path / "s.bin"), 8, header_bytes=4)


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        RecordDataset(str(tmp_path / "nope.bin"), 8)
    with pytest.raises(FileNotFoundError, match=r"\*.zzz"):
        RecordDataset(str(tmp_path / "*.zzz"), 8)
