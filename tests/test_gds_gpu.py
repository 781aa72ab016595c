"""gpuwire.gds on a GPU: kvikio and posix+h2d reads checksummed against the files,
the dataloader's stream/event ordering, and the torch wrapper. Skipped (with the
reason) where cupy, a GPU, kvikio or torch is missing."""
import hashlib
import time

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.gds import DataLoader, NpyDataset, RecordDataset, ShortReadError, gpu_status, kvikio_status

pytestmark = pytest.mark.gpu


def _need_gpu():
    ok, why = gpu_status()
    if not ok:
        pytest.skip(f"no usable GPU: {why}")
    import cupy

    return cupy


@pytest.fixture(params=["posix", "kvikio", "kvikio-only"])
def reader(request):
    """posix+h2d; kvikio (small requests staged); kvikio for every request."""
    _need_gpu()
    from gpuwire.gds import KvikioReader, PosixH2DReader

    if request.param.startswith("kvikio"):
        ok, why = kvikio_status()
        if not ok:
            pytest.skip(f"kvikio unavailable: {why}")
        r = KvikioReader(small_bytes=0 if request.param == "kvikio-only" else 4096,
                         staging_bytes=8192 + 5)
    else:
        r = PosixH2DReader(staging_bytes=64 * 1024 + 13)  # odd size: many chunks, both buffers
    yield r
    r.close()


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(11).integers(0, 256, 3 * (1 << 20) + 777, dtype=np.uint8).tobytes()
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return str(p), data


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_reads_checksummed_against_the_file(reader, blob):
    path, data = blob
    assert reader.device == "cuda"
    assert reader.mode in ("kvikio-gds", "kvikio-compat", "posix+h2d")
    buf = reader.alloc(len(data) + 100)
    s = reader.new_stream()
    assert reader.read_into(path, 0, len(data), buf, dst_offset=100, stream=s) == len(data)
    reader.synchronize(s)
    assert _sha(reader.to_host(buf[100:]).tobytes()) == _sha(data)
    reqs = [(path, 5, 1000, 0), (path, 1 << 20, 300001, 1000), (path, len(data) - 17, 17, 301001)]
    assert reader.read_batch(reqs, buf, s) == 1000 + 300001 + 17
    reader.synchronize(s)
    want = data[5:1005] + data[1 << 20:(1 << 20) + 300001] + data[-17:]
    assert _sha(reader.to_host(buf[:len(want)]).tobytes()) == _sha(want)


def test_gpu_short_read_names_the_file(reader, blob):
    path, data = blob
    buf = reader.alloc(4096)
    with pytest.raises(ShortReadError, match="blob.bin"):
        reader.read_into(path, len(data) - 100, 4096, buf)


def test_kvikio_reports_mode_and_applies_settings():
    _need_gpu()
    ok, why = kvikio_status()
    if not ok:
        pytest.skip(f"kvikio unavailable: {why}")
    from gpuwire.gds import KvikioReader

    for direct in ("off", "auto"):
        with settings.override(gds_threads=3, gds_task_size=1 << 20, gds_direct=direct):
            r = KvikioReader()
        assert r.mode in ("kvikio-gds", "kvikio-compat") and r.mode_detail
        # Direct I/O applies in compat mode only (cuFile GDS does its own DMA)
        from gpuwire.gds import backends as _b
        want = direct if r.mode == "kvikio-compat" and _b._kvikio_direct_known(r._kvikio) else "off"
        assert r.kvikio_settings == {"num_threads": 3, "task_size": 1 << 20, "direct": want}
        r.close()


def test_select_reader_auto_uses_the_gpu():
    _need_gpu()
    from gpuwire.gds import select_reader

    r = select_reader("auto")
    assert r.device == "cuda"
    assert r.mode.startswith("kvikio") == kvikio_status()[0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_epoch_checksummed(reader, tmp_path, shuffle):
    cp = _need_gpu()
    data = np.random.default_rng(5).random((1000, 7), dtype=np.float32)
    np.save(tmp_path / "a.npy", data[:400])
    np.save(tmp_path / "b.npy", data[400:])
    ds = NpyDataset(str(tmp_path / "*.npy"))
    loader = DataLoader(ds, 64, shuffle=shuffle, seed=4, prefetch=3, reader=reader)
    order = loader.epoch_order(0)
    stream = cp.cuda.Stream(non_blocking=True)
    parts = []
    with stream:
        for x in loader:
            assert isinstance(x, cp.ndarray) and x.dtype == cp.float32 and x.shape[1:] == (7,)
            parts.append(x.copy())  # queued on the consumer stream, after the batch's event
    stream.synchronize()
    got = cp.asnumpy(cp.concatenate(parts))
    assert _sha(got.tobytes()) == _sha(data[order].tobytes())


_SPIN_SUM = r"""
extern "C" __global__ void spin_sum(const unsigned char* x, unsigned long long n,
                                    unsigned long long* out, long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
    unsigned long long s = 0;
    for (unsigned long long i = 0; i < n; ++i) s += x[i];
    *out = s;
}
"""


def _spin_kernel(cp):
    return cp.RawKernel(_SPIN_SUM, "spin_sum")


def _cycles(cp, seconds: float) -> int:
    rate_khz = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id).get("clockRate", 1_500_000)
    return int(seconds * rate_khz * 1000)


def test_slot_reuse_waits_for_the_consumers_gpu_work(reader, tmp_path):
    """Kernels still reading a batch delay the refill of its slot (stream/event order)."""
    cp = _need_gpu()
    raw = np.random.default_rng(9).integers(0, 256, 40 * 4096, dtype=np.uint8)
    (tmp_path / "r.bin").write_bytes(raw.tobytes())
    ds = RecordDataset(str(tmp_path / "r.bin"), 4096)
    loader = DataLoader(ds, 4, shuffle=False, prefetch=1, reader=reader)  # ring of 2 slots
    kern = _spin_kernel(cp)
    stream = cp.cuda.Stream(non_blocking=True)
    sums = cp.zeros(10, dtype=cp.uint64)
    with stream:
        for i, x in enumerate(loader):
            # the kernel spins, then sums the batch: by then the loader has moved on and
            # (without the release event) would have refilled this slot
            kern((1,), (1,), (x, cp.uint64(x.nbytes), sums[i:], cp.int64(_cycles(cp, 0.02))))
    stream.synchronize()
    want = [int(raw[i * 4 * 4096:(i + 1) * 4 * 4096].sum(dtype=np.uint64)) for i in range(10)]
    assert cp.asnumpy(sums).tolist() == want


def test_next_does_not_block_the_host_on_the_consumers_stream(reader, tmp_path):
    cp = _need_gpu()
    raw = np.random.default_rng(2).integers(0, 256, 16 * 4096, dtype=np.uint8)
    (tmp_path / "r.bin").write_bytes(raw.tobytes())
    ds = RecordDataset(str(tmp_path / "r.bin"), 4096)
    loader = DataLoader(ds, 4, shuffle=False, prefetch=2, reader=reader)
    kern = _spin_kernel(cp)
    stream = cp.cuda.Stream(non_blocking=True)
    out = cp.zeros(1, dtype=cp.uint64)
    with stream:
        it = iter(loader)
        x = next(it)
        time.sleep(0.2)  # batches 1 and 2 are prefetched meanwhile
        kern((1,), (1,), (x, cp.uint64(x.nbytes), out, cp.int64(_cycles(cp, 0.5))))
        t0 = time.perf_counter()
        y = next(it)
        dt = time.perf_counter() - t0
        busy = not stream.done
        y2 = y.copy()
    stream.synchronize()
    assert busy, "the spin kernel finished too early for the check to mean anything"
    assert dt < 0.25, f"next() waited {dt:.3f}s for the consumer's stream"
    assert cp.asnumpy(y2).tobytes() == raw[4 * 4096:8 * 4096].tobytes()
    assert int(out.get()[0]) == int(raw[:4 * 4096].sum(dtype=np.uint64))
    list(it)


def test_torch_wrapper_on_gpu(reader, tmp_path):
    _need_gpu()
    torch = pytest.importorskip("torch", reason="torch is not installed here")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from gpuwire.gds import TorchLoader

    data = np.random.default_rng(8).random((300, 5), dtype=np.float32)
    np.save(tmp_path / "t.npy", data)
    tl = TorchLoader(DataLoader(NpyDataset(str(tmp_path / "t.npy")), 32, seed=1, reader=reader))
    assert len(tl) == 10
    tl.set_epoch(3)
    order = tl.loader.epoch_order(3)
    side = torch.cuda.Stream()
    outs = []
    with torch.cuda.stream(side):
        for t in tl:
            assert t.is_cuda and t.dtype == torch.float32 and t.shape[1:] == (5,)
            outs.append(t * 2)  # queued on torch's stream, after the batch's event
    torch.cuda.synchronize()
    got = (torch.cat(outs) / 2).cpu().numpy()
    assert _sha(got.tobytes()) == _sha(data[order].tobytes())


@pytest.mark.parametrize("direct", ["on", "auto"])
def test_kvikio_direct_io_reads_checksummed(blob, direct):
    """kvikio with Direct I/O (compat mode): unaligned heads and tails, whole file; auto
    takes Direct I/O for a range evicted from the page cache and buffered reads once cached."""
    import os

    cp = _need_gpu()
    ok, why = kvikio_status()
    if not ok:
        pytest.skip(f"kvikio unavailable: {why}")
    from gpuwire.gds import KvikioReader

    path, data = blob
    r = KvikioReader(direct=direct, small_bytes=4096)
    try:
        if r.direct == "off":
            pytest.skip(f"Direct I/O not available here (mode {r.mode})")
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        buf = r.alloc(len(data) + (1 << 20) + 8192)
        reqs = [(path, 0, len(data), 0), (path, 4097, (1 << 20) + 3, len(data) + 1)]
        for src, off, n, d in reqs:
            before = r.direct_batches
            r.read_into(src, off, n, buf, d)
            got = cp.asnumpy(buf[d:d + n]).tobytes()
            assert _sha(got) == _sha(data[off:off + n]), (off, n)
            if direct == "on":
                assert r.direct_batches == before + 1
        assert r.direct_batches == 2             # auto: both cold (Direct I/O leaves nothing cached)
        with open(path, "rb") as f:             # now cached: auto reads buffered
            f.read()
        buf[:] = 0
        r.read_into(path, 0, len(data), buf, 0)
        assert _sha(cp.asnumpy(buf[:len(data)]).tobytes()) == _sha(data)
        assert r.direct_batches == (3 if direct == "on" else 2)
    finally:
        r.close()


def test_kvikio_batches_under_1mib_read_buffered(blob):
    """Opening a file turns kvikio's Direct I/O flag on (for its O_DIRECT descriptor); a
    batch of requests under DIRECT_MIN_BYTES must still read buffered (warm small files)."""
    cp = _need_gpu()
    ok, why = kvikio_status()
    if not ok:
        pytest.skip(f"kvikio unavailable: {why}")
    import kvikio.defaults

    from gpuwire.gds import KvikioReader

    path, data = blob
    r = KvikioReader(direct="on", small_bytes=4096)
    try:
        if r.direct == "off":
            pytest.skip(f"Direct I/O not available here (mode {r.mode})")
        buf = r.alloc(256 << 10)
        r.read_into(path, 4096, 256 << 10, buf)
        assert r.direct_batches == 0 and kvikio.defaults.get("auto_direct_io_read") is False
        assert _sha(cp.asnumpy(buf).tobytes()) == _sha(data[4096:4096 + (256 << 10)])
    finally:
        r.close()
