"""'written' change tracking of pinned regions (docs/pinned.md "Change tracking"): the kernel
records which pages the host wrote (userfaultfd in asynchronous write-protect mode, read with
PAGEMAP_SCAN; Linux >= 6.7), so a launch pushes only those pages and an unchanged region costs
one scan. The default ('auto') for regions of 64 KiB or more where the kernel supports it.
Real `gpuwire serve` subprocesses (CPU executor in CI, the GPU executor where there is one:
marked gpu); every result is checked against numpy and by checksum."""
from __future__ import annotations

import os

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.rpc import pinned
from pinned_support import addr, check, f32, mod, mirrored, server  # noqa: F401 (fixtures: mirrored, mod, server)

# host_alloc memory is mirrored in these tests (a same-host session would map it: test_hostmap.py)
pytestmark = pytest.mark.usefixtures("mirrored")

F32 = np.float32
KIB = 1024
PAGE = os.sysconf("SC_PAGE_SIZE")

OK, WHY = pinned.written_support()
needs_written = pytest.mark.skipif(not OK, reason=WHY or "written tracking unavailable")


@pytest.fixture()
def s(server):
    # the defaults, with 4 KiB detection granules so partial pulls are visible, and 'auto' never
    # picking 'protect' (pinned_protect_min=0: from 1 MiB it would where the userfaultfd allows)
    with settings.override(pinned_track="auto", pinned_pull_granule=4096, pinned_detect_min=64 * KIB,
                           pinned_protect_min=0):
        sess = server.connect(name="test-pinned-written")
        yield sess
        sess.close()


def pushed(s):
    return pinned.stats(s)["push_bytes"]


@needs_written
def test_auto_tracks_big_regions_by_written_pages(s):
    big, small = f32(s, 1 << 16), f32(s, 1024)                 # 256 KiB and 4 KiB
    assert pinned.region(s, big).track == "written"
    assert pinned.region(s, small).track == "compare"          # a diff of 4 KiB costs ~nothing
    assert pinned.set_tracking(s, small, "auto").track == "compare"
    assert pinned.set_tracking(s, small, "written").track == "written"    # asked for: allowed
    assert pinned.set_tracking(s, big, "compare").uf is None
    assert pinned.set_tracking(s, big, "auto").track == "written"
    s.free_host(big)
    s.free_host(small)


@needs_written
def test_only_the_written_pages_are_pushed(s, mod):
    f = mod.function("pin_scale")
    n = 1 << 18                                                 # 1 MiB
    x, y = f32(s, n), f32(s, n)
    src = (np.arange(n) % 977).astype(F32)
    x[:] = src
    s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
    s.synchronize()
    check(y, 2 * src + 1)
    b0 = pushed(s)
    scans = pinned._c()[1].gw_uf_scans()
    s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))     # nothing written by the host
    s.synchronize()
    assert pushed(s) == b0                                      # neither x nor y (pulled, not written)
    check(y, 2 * src + 1)
    x[5000] = 7                                                 # one page
    x[200000] = 9                                               # another, far away
    src[5000], src[200000] = 7, 9
    s.launch(f, n // 256, 256, (addr(x), addr(y), 3.0, n))
    s.synchronize()
    assert pushed(s) - b0 == 2 * PAGE                           # the two written pages only
    check(y, 3 * src + 1)
    assert pinned._c()[1].gw_uf_scans() - scans >= 3            # the kernel was asked, not the bytes read


@needs_written
def test_system_calls_may_write_into_a_written_region(s, mod, tmp_path):
    """Unlike 'protect' (EFAULT), a read(2) into the region works and its pages are pushed."""
    f = mod.function("pin_sum")
    n = 1 << 16
    x, total = f32(s, n), f32(s, 1)
    x[:] = 1
    s.launch(f, 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([n], F32))
    p = tmp_path / "data"
    p.write_bytes(np.full(1024, 3, F32).tobytes())             # 4 KiB of 3.0
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.readv(fd, [memoryview(x.view(np.uint8))[8192:8192 + 4096]]) == 4096
    finally:
        os.close(fd)
    b0 = pushed(s)
    s.launch(f, 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([n + 2 * 1024], F32))
    assert pushed(s) - b0 == PAGE


@needs_written
def test_host_writes_while_device_owned_are_pushed_after_the_pull(s, mod):
    """The host writes a part of an output region the kernel does not write while the kernel's
    writes are not pulled yet: the pull (server-side detection: only the changed granule comes
    back) keeps the host's bytes, and the next launch that reads the region sees them."""
    scale, total = mod.function("pin_scale"), mod.function("pin_sum")
    n = 1 << 18
    x, y, t = f32(s, 1024), f32(s, n), f32(s, 1)
    x[:] = 1
    y[:] = 0
    s.launch(scale, 1, 256, (addr(x), addr(y), 0.0, 4))        # first push and (whole) pull of y
    s.synchronize()
    p0 = pinned.stats(s)["pull_bytes"]
    s.launch(scale, 1, 256, (addr(x), addr(y), 1.0, 4))        # y[0:4] = 2 on the device
    s.flush()
    y[100000] = 5                                               # host, another granule, before the sync
    s.synchronize()
    assert pinned.stats(s)["pull_bytes"] - p0 == pinned.region(s, y).granule   # only the kernel's granule
    exp = np.zeros(n, F32)
    exp[:4] = 2
    exp[100000] = 5
    check(y, exp)
    b0 = pushed(s)
    s.launch(total, 1, 256, (addr(y), addr(t), n))
    s.synchronize()
    check(t, np.array([13], F32))                               # 4 * 2 + 5: the host write reached the mirror
    assert pushed(s) - b0 == PAGE + 4                           # that page of y, and t (first use)


@needs_written
def test_a_region_rewritten_whole_goes_unprotected_and_comes_back(s, mod):
    f = mod.function("pin_scale")
    n = 1 << 16
    x, y = f32(s, n), f32(s, n)
    R = pinned.region(s, x)
    for i in range(4):                                          # rewritten whole at every launch
        x[:] = i
        s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
        s.synchronize()
        check(y, np.full(n, 2 * i + 1, F32))
    assert R.hot > 0                                            # pushed whole, no fault per page
    i = 10
    while R.hot:                                                # the hot period runs out
        b0 = pushed(s)
        x[:] = i
        s.launch(f, n // 256, 256, (addr(x), addr(y), 1.0, n))
        s.synchronize()
        check(y, np.full(n, i + 1, F32))
        assert pushed(s) - b0 == 4 * n                          # pushed whole
        i += 1
    b0 = pushed(s)
    x[7] = 100                                                  # tracked by page again
    s.launch(f, n // 256, 256, (addr(x), addr(y), 1.0, n))
    s.synchronize()
    exp = np.full(n, i, F32)
    exp[7] = 101
    check(y, exp)
    assert pushed(s) - b0 == PAGE
    assert R.hot == 0 and R.streak == 0


@needs_written
def test_registered_buffers_and_a_shared_page(s, mod):
    """cuMemHostRegister of ordinary numpy memory is tracked too; a second region whose first
    page is the first region's last page falls back to 'compare' (saying why), and both
    compute right. Unregistering ends the tracking of its pages."""
    f = mod.function("pin_sum")
    a = np.zeros(300000, np.uint8)
    lo, hi = a[:100000], a[100000:]                             # 100000 is not a page boundary
    s.cuMemHostRegister(lo, lo.nbytes, 0)
    s.cuMemHostRegister(hi, hi.nbytes, 0)
    Rlo, Rhi = pinned.region(s, lo), pinned.region(s, hi)
    assert Rlo.track == "written"
    assert Rhi.track == "compare" and "shares the page" in Rhi.track_note
    t = f32(s, 1)
    xs = [lo[:99996].view(F32), hi[:199996].view(F32)]
    for k, xv in enumerate(xs):
        xv[:] = 1 + k
        s.launch(f, 1, 256, (addr(xv), addr(t), xv.size))
        s.synchronize()
        check(t, np.array([xv.size * (1 + k)], F32))
    xs[0][10] = 11
    s.launch(f, 1, 256, (addr(xs[0]), addr(t), xs[0].size))
    s.synchronize()
    check(t, np.array([xs[0].size + 10], F32))
    start, span = Rlo.uf
    lib = pinned._c()[1]
    out = pinned._c()[0].new("uint64_t[]", 16)
    assert lib.gw_uf_scan(start, span, 0, out, 8) >= 0          # tracked
    s.cuMemHostUnregister(lo)
    assert lib.gw_uf_scan(start, span, 0, out, 8) < 0           # no longer (unregistered)
    s.cuMemHostUnregister(hi)


def test_written_unavailable_falls_back_or_says_why(s, monkeypatch):
    """Where the kernel cannot track writes: 'auto' uses 'compare' (Region.track_note says why)
    and an explicit 'written' is refused with the reason."""
    monkeypatch.setattr(pinned, "_uf_state", (False, "'written' tracking unavailable: test (errno 95)"))
    x = f32(s, 1 << 16)
    R = pinned.region(s, x)
    assert R.track == "compare" and "test (errno 95)" in R.track_note
    with pytest.raises(RuntimeError, match=r"tracking mode 'written'.*test \(errno 95\)"):
        pinned.set_tracking(s, x, "written")
    assert pinned.set_tracking(s, x, "auto").track == "compare"
    with pytest.raises(ValueError, match="tracking mode"):
        pinned.set_tracking(s, x, "sometimes")
    s.free_host(x)


@needs_written
def test_set_tracking_switches_into_and_out_of_written(s, mod):
    f = mod.function("pin_sum")
    n = 1 << 16
    x, t = f32(s, n), f32(s, 1)
    x[:] = 1
    R = pinned.set_tracking(s, x, "compare")
    assert R.track == "compare" and R.uf is None
    s.launch(f, 1, 256, (addr(x), addr(t), n))
    s.synchronize()
    check(t, np.array([n], F32))
    R = pinned.set_tracking(s, x, "written")
    assert R.track == "written" and R.uf is not None
    x[3] = 4                                                    # first launch in 'written': whole push
    s.launch(f, 1, 256, (addr(x), addr(t), n))
    s.synchronize()
    check(t, np.array([n + 3], F32))
    b0 = pushed(s)
    x[4] = 4
    s.launch(f, 1, 256, (addr(x), addr(t), n))
    s.synchronize()
    check(t, np.array([n + 6], F32))
    assert pushed(s) - b0 == PAGE
    pinned.set_tracking(s, x, "explicit")
    assert R.uf is None
    x[:] = 2                                                    # plain writes: untracked in 'explicit'
    R.mark_dirty()
    s.launch(f, 1, 256, (addr(x), addr(t), n))
    s.synchronize()
    check(t, np.array([2 * n], F32))


@needs_written
def test_a_forked_child_does_not_touch_the_parents_tracking():
    """The userfaultfd names the parent's address space: in a child every call refuses, so a
    child can neither protect the parent's pages nor register its own."""
    _ffi, lib = pinned._c()
    pid = os.fork()
    if pid == 0:                                              # pragma: no cover - the child
        ok = lib.gw_uf_init() != 0 and lib.gw_uf_protect(PAGE, PAGE, 1) != 0 and \
            lib.gw_uf_scan(PAGE, PAGE, 1, _ffi.new("uint64_t[]", 2), 1) < 0
        os._exit(0 if ok else 3)
    assert os.waitpid(pid, 0)[1] == 0
    assert lib.gw_uf_init() == 0                              # the parent is unaffected


@needs_written
def test_shared_memory_is_not_tracked_by_written_pages(s, mod):
    """Memory shared with other processes (another process's writes never touch this
    process's page tables) is diffed instead ('compare'), saying why, and its changes arrive."""
    import mmap
    f = mod.function("pin_sum")
    m = mmap.mmap(-1, 1 << 17)                                  # MAP_SHARED anonymous
    a = np.frombuffer(m, F32)
    a[:] = 1
    s.cuMemHostRegister(a, a.nbytes, 0)
    R = pinned.region(s, a)
    assert R.track == "compare" and "shared" in R.track_note
    t = f32(s, 1)
    s.launch(f, 1, 256, (addr(a), addr(t), a.size))
    s.synchronize()
    check(t, np.array([a.size], F32))
    a[100] = 3                                                  # (as another process's write would be)
    s.launch(f, 1, 256, (addr(a), addr(t), a.size))
    s.synchronize()
    check(t, np.array([a.size + 2], F32))
    s.cuMemHostUnregister(a)
    del a


def test_written_ranges_are_merged_and_capped():
    """What a push sends of the written pages: sorted, ranges closer than 64 KiB joined, at most
    8 ranges (the rest merged into the last), empty ranges dropped."""
    K = 1 << 10
    m = pinned._merge_runs
    assert m([]) == [] and m([(5, 5)]) == []
    assert m([(200 * K, 204 * K), (0, 4 * K)]) == [(0, 4 * K), (200 * K, 204 * K)]
    assert m([(0, 4 * K), (60 * K, 64 * K), (8 * K, 12 * K)]) == [(0, 64 * K)]
    far = [(i * 256 * K, i * 256 * K + 4 * K) for i in range(12)]
    out = m(far)
    assert len(out) == 8 and out[:7] == far[:7] and out[7] == (far[7][0], far[-1][1])
