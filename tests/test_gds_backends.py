"""gpuwire.gds.backends on the CPU: the host reader, short reads, the file cache,
backend selection and kvikio settings/mode handling (against stand-in kvikio modules)."""
import hashlib
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.gds import BackendUnavailable, HostReader, ShortReadError, backends, gpu_status, select_reader


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(7).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return str(p), data


def test_host_reader_reads_ranges_at_offsets(blob):
    path, data = blob
    r = HostReader()
    assert r.mode == "posix-host" and r.device == "host"
    buf = r.alloc(5000)
    assert r.read_into(path, 1234, 3000, buf, dst_offset=1000) == 3000
    assert buf[1000:4000].tobytes() == data[1234:4234]
    reqs = [(path, 0, 100, 0), (path, 60000, 5536, 100)]
    buf2 = r.alloc(6000)
    assert r.read_batch(reqs, buf2) == 5636
    assert hashlib.sha256(buf2[:5636].tobytes()).digest() == hashlib.sha256(data[:100] + data[60000:]).digest()
    r.close()


def test_read_into_a_typed_array(blob):
    path, data = blob
    r = HostReader()
    out = np.empty((4, 8), dtype=np.float32)
    r.read_into(path, 64, out.nbytes, out)
    assert out.tobytes() == data[64:64 + out.nbytes]


def test_short_read_names_file_offset_and_sizes(blob):
    path, data = blob
    r = HostReader()
    buf = r.alloc(1000)
    with pytest.raises(ShortReadError) as e:
        r.read_into(path, len(data) - 10, 100, buf)
    msg = str(e.value)
    assert path in msg and str(len(data) - 10) in msg and "100 bytes" in msg and "got 10" in msg
    assert isinstance(e.value, EOFError)


def test_file_shrinking_after_open_is_a_short_read(blob):
    path, data = blob
    r = HostReader()
    h = r.open(path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    buf = r.alloc(4096)
    with pytest.raises(ShortReadError, match="blob.bin"):
        r.read_into(h, 0, 4096, buf)
    h.close()


def test_file_growing_after_open_is_read(blob):
    path, data = blob
    r = HostReader()
    h = r.open(path)
    with open(path, "ab") as f:
        f.write(b"tail")
    buf = r.alloc(4)
    assert r.read_into(h, len(data), 4, buf) == 4 and buf.tobytes() == b"tail"
    h.close()


def test_destination_too_small(blob):
    path, _ = blob
    r = HostReader()
    with pytest.raises(ValueError, match="destination too small"):
        r.read_into(path, 0, 100, r.alloc(50))


def test_files_are_opened_once_and_lru_bounded(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * 64)
        paths.append(str(p))
    r = HostReader(max_open=2)
    buf = r.alloc(64)
    for _ in range(5):
        r.read_into(paths[0], 0, 64, buf)
    assert r.files_opened == 1
    for i, p in enumerate(paths):
        r.read_into(p, 0, 64, buf)
        assert buf.tobytes() == bytes([i]) * 64
    assert r.open_files <= 2
    assert r.files_opened == 6
    r.close()
    assert r.open_files == 0


def test_a_handle_in_use_is_not_evicted(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * 16)
        paths.append(str(p))
    r = HostReader(max_open=1)
    h = r.open(paths[0])
    fd = h.fd
    buf = r.alloc(16)
    for p in paths[1:]:
        r.read_into(p, 0, 16, buf)
    os.fstat(fd)  # still open: raises if it had been closed
    r.read_into(h, 0, 16, buf)
    assert buf.tobytes() == bytes([0]) * 16
    h.close()
    r.read_into(paths[3], 0, 16, buf)
    with pytest.raises(OSError):
        os.fstat(fd)  # released and evicted now


def test_concurrent_reads_share_the_cache(tmp_path):
    paths = []
    for i in range(8):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]) * 4096)
        paths.append(str(p))
    r = HostReader(max_open=3)
    errors = []

    def work(k):
        buf = np.empty(4096, np.uint8)
        for j in range(200):
            i = (k + j) % 8
            r.read_into(paths[i], 0, 4096, buf)
            if buf.tobytes() != bytes([i]) * 4096:
                errors.append((k, j, i))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert r.open_files <= 3


def test_host_capacity_limits_alloc():
    r = HostReader(capacity=100)
    r.alloc(60)
    with pytest.raises(MemoryError, match="capacity 100"):
        r.alloc(60)


def test_select_reader_without_gpu_falls_back_to_host():
    if gpu_status()[0]:
        pytest.skip("a GPU is present here; the fallback is what CPU-only machines get")
    assert isinstance(select_reader("auto"), HostReader)
    assert isinstance(select_reader(), HostReader)
    with pytest.raises(BackendUnavailable, match="cupy|GPU|kvikio"):
        select_reader("kvikio")
    with pytest.raises(BackendUnavailable, match="cupy|GPU"):
        select_reader("posix")


def test_select_reader_honours_the_setting_and_validates():
    with settings.override(gds_backend="host"):
        assert isinstance(select_reader(), HostReader)
    with pytest.raises(ValueError):
        select_reader("floppy")
    with pytest.raises(ValueError, match="GPUWIRE_GDS_BACKEND|gds_backend"):
        with settings.override(gds_backend="floppy"):
            pass


def test_importing_gds_pulls_in_no_optional_dependency(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "import gpuwire.gds as g\n"
        f"open({str(tmp_path / 'x.bin')!r}, 'wb').write(bytes(64))\n"
        f"ds = g.RecordDataset({str(tmp_path / 'x.bin')!r}, 8)\n"
        "list(g.DataLoader(ds, 2, reader=g.HostReader()))\n"
        "print(sorted(m for m in ('torch', 'cupy', 'kvikio') if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# --------------------------------------------------------------------------- kvikio API generations


def _fake_kvikio(monkeypatch, defaults: types.SimpleNamespace):
    mod = types.ModuleType("kvikio")
    dmod = types.ModuleType("kvikio.defaults")
    dmod.__dict__.update(vars(defaults))
    mod.defaults = dmod
    monkeypatch.setitem(sys.modules, "kvikio", mod)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", dmod)
    return mod


def test_new_kvikio_api_set_and_get(monkeypatch):
    state = {"num_threads": 1, "task_size": 4 << 20}
    calls = []

    def set_(*cfg):
        calls.append(cfg)
        state.update(cfg[0] if len(cfg) == 1 else {cfg[0]: cfg[1]})

    kv = _fake_kvikio(monkeypatch, types.SimpleNamespace(
        get=lambda k: state[k], set=set_, is_compat_mode_preferred=lambda: True))
    got = backends.apply_kvikio_settings(threads=12, task_size=1 << 20)
    assert got == {"num_threads": 12, "task_size": 1 << 20}
    assert calls == [({"num_threads": 12, "task_size": 1 << 20},)]
    backends.apply_kvikio_settings(threads=12, task_size=1 << 20)
    assert len(calls) == 1  # unchanged values: the pool is not rebuilt
    assert backends.kvikio_mode(kv)[0] == "kvikio-compat"


def test_old_kvikio_api_resets(monkeypatch):
    state = {"n": 1, "t": 4 << 20}
    kv = _fake_kvikio(monkeypatch, types.SimpleNamespace(
        get_num_threads=lambda: state["n"], num_threads_reset=lambda n: state.update(n=n),
        task_size=lambda: state["t"], task_size_reset=lambda t: state.update(t=t),
        compat_mode=lambda: False))
    with settings.override(gds_threads=6, gds_task_size=0):
        got = backends.apply_kvikio_settings()
    assert got == {"num_threads": 6, "task_size": 4 << 20}  # task size 0: left alone
    monkeypatch.setattr(backends, "_nvidia_fs_loaded", lambda: True)
    assert backends.kvikio_mode(kv)[0] == "kvikio-gds"
    monkeypatch.setattr(backends, "_nvidia_fs_loaded", lambda: False)
    mode, detail = backends.kvikio_mode(kv)
    assert mode == "kvikio-compat" and "nvidia-fs" in detail


def test_enum_compat_mode(monkeypatch):
    import enum

    class CompatMode(enum.Enum):
        OFF = 0
        ON = 1
        AUTO = 2

    value = {"v": CompatMode.ON}
    kv = _fake_kvikio(monkeypatch, types.SimpleNamespace(get=lambda k: value["v"]))
    assert backends._kvikio_compat(kv) is True
    value["v"] = CompatMode.OFF
    assert backends._kvikio_compat(kv) is False
    value["v"] = CompatMode.AUTO
    monkeypatch.setattr(backends, "_nvidia_fs_loaded", lambda: False)
    assert backends._kvikio_compat(kv) is True


# --------------------------------------------------------------------------- posix+h2d gathering (no GPU)


class _FakeEvent:
    def __init__(self):
        self.records = 0
        self.syncs = 0

    def record(self, stream):
        self.records += 1

    def synchronize(self):
        self.syncs += 1


def _fake_staging(nbytes):
    bufs = [np.zeros(nbytes, np.uint8) for _ in range(2)]
    return types.SimpleNamespace(nbytes=nbytes, view=[memoryview(b) for b in bufs],
                                 ptr=[b.ctypes.data for b in bufs], event=[_FakeEvent(), _FakeEvent()],
                                 busy=[False, False], next=0, bufs=bufs)


def _gather_into(requests, dst, staging):
    """Run posix+h2d's gathering with memmove standing in for cudaMemcpyAsync."""
    import ctypes

    copies = []

    def memcpy(d, s, n, kind, stream):
        copies.append(n)
        ctypes.memmove(d, s, n)

    r = HostReader()
    g = backends._Gather(staging, dst.ctypes.data, types.SimpleNamespace(ptr=0), memcpy, 1)
    for path, off, n, doff in requests:
        h = r.open(path)
        g.add(h, off, n, doff)
        h.close()
    g.flush()
    return copies


def test_posix_staging_gathers_contiguous_destinations(blob):
    path, data = blob
    rec = 100
    order = np.random.default_rng(0).permutation(300)
    reqs = [(path, int(i) * rec, rec, j * rec) for j, i in enumerate(order)]  # a shuffled batch
    dst = np.zeros(300 * rec, np.uint8)
    st = _fake_staging(4096)
    copies = _gather_into(reqs, dst, st)
    want = b"".join(data[int(i) * rec:(int(i) + 1) * rec] for i in order)
    assert dst.tobytes() == want
    assert len(copies) == -(-300 * rec // 4096)  # full staging buffers, not one copy per record
    assert sum(copies) == 300 * rec
    assert sum(e.syncs for e in st.event) == len(copies) - 2  # a buffer is reused after its copy


def test_posix_staging_splits_at_gaps_and_large_reads(blob):
    path, data = blob
    dst = np.zeros(20000, np.uint8)
    reqs = [(path, 0, 5000, 0), (path, 9000, 3000, 10000), (path, 100, 50, 14000), (path, 7, 10, 14050)]
    copies = _gather_into(reqs, dst, _fake_staging(2048))
    assert dst[:5000].tobytes() == data[:5000]
    assert dst[10000:13000].tobytes() == data[9000:12000]
    assert dst[14000:14060].tobytes() == data[100:150] + data[7:17]
    assert not dst[5000:10000].any() and not dst[13000:14000].any()
    assert copies == [2048, 2048, 904, 2048, 952, 60]  # split at gaps and full buffers


def test_file_cache_never_closes_held_files_and_evicts_the_longest_idle(tmp_path):
    from gpuwire.gds._files import FileCache, close_fd, open_fd

    paths = []
    for i in range(6):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * (i + 1))
        paths.append(str(p))
    closed = []

    def closer(fd):
        closed.append(fd)
        close_fd(fd)

    c = FileCache(open_fd, closer, 2)
    held = [c.acquire(p) for p in paths[:5]]          # 5 in use, max 2 idle: nothing closes
    assert closed == [] and len(c) == 5
    assert [h.size for h in held] == [1, 2, 3, 4, 5]
    order = [3, 0, 4, 1, 2]                            # released in this order
    for k in order:
        held[k].close()
    # the three released first are closed, oldest release first; two idle stay open
    assert closed == [held[3].fd, held[0].fd, held[4].fd] and len(c) == 2
    again = c.acquire(paths[1])                        # an idle file is reused, not reopened
    assert again is held[1] and c.opens == 5
    again.close()
    c.close_all()
    assert len(c) == 0


# ----------------------------------------------------------------------------- Direct I/O decision (gds_direct)

def test_gds_direct_setting_values():
    from gpuwire import settings

    for raw, want in (("auto", "auto"), ("ON", "on"), ("1", "on"), ("off", "off"), ("0", "off")):
        with settings.override(gds_direct=raw):
            assert settings.get("gds_direct") == want
    with pytest.raises(ValueError, match="auto, on or off"):
        with settings.override(gds_direct="sometimes"):
            pass


def test_kvikio_direct_decision_follows_the_page_cache(tmp_path):
    """KvikioReader._want_direct (no GPU needed): auto asks mincore; on / off decide alone."""
    import types
    from gpuwire.gds.backends import KvikioReader, page_residency

    p = tmp_path / "big.bin"
    p.write_bytes(os.urandom(8 << 20))
    fd = os.open(p, os.O_RDONLY)
    try:
        os.pread(fd, 8 << 20, 0)
        h = types.SimpleNamespace(fd=fd)
        big = [(h, 0, 4 << 20), (h, 4 << 20, 4 << 20)]
        me = types.SimpleNamespace(direct="auto")
        assert page_residency(fd, 0, 8 << 20) == (16, 16)                  # 16 pages sampled
        assert page_residency(fd, 4096, 40 << 10) == (10, 10)              # a short range: every page
        assert KvikioReader._want_direct(me, big) is False                 # cached: buffered
        assert KvikioReader._want_direct(types.SimpleNamespace(direct="on"), big) is True
        assert KvikioReader._want_direct(types.SimpleNamespace(direct="off"), big) is False
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if page_residency(fd, 0, 8 << 20)[0] > 8:
            pytest.skip("the page cache kept the file (tmpfs?)")
        assert KvikioReader._want_direct(me, big) is True                  # cold: Direct I/O
        os.pread(fd, 6 << 20, 0)                                            # 3/4 cached again
        assert KvikioReader._want_direct(me, big) is False
    finally:
        os.close(fd)
