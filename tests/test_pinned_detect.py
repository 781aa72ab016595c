"""Server-side detection of what a kernel wrote (gwMirrorPull, docs/pinned.md "Server-side
detection"): the server keeps a device copy of the bytes the client holds for each pinned
region (the *reference*), and a pull sends back only the granules whose mirror bytes differ
from it. Real `gpuwire serve` subprocesses: the CPU executor (numpy compare) in CI, the GPU
executor (the nvcc-built gw_mirror_diff kernel) where there is a GPU (marked gpu), including
a kernel loaded from a cubin (no PTX to scan: only detection avoids pulling its inputs).
Every result is checked against numpy and by checksum."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.rpc import DeferredCudaError, pinned
from gpuwire.rpc.kernels import pinned as PK
from pinned_support import addr, check, mod, mirrored, server  # noqa: F401 (fixtures: mirrored, mod, server)

# host_alloc memory is mirrored in these tests (a same-host session would map it: test_hostmap.py)
pytestmark = pytest.mark.usefixtures("mirrored")

F32 = np.float32
I32 = np.int32
KIB = 1024


@pytest.fixture()
def s(server):
    # 16 KiB granules for regions of 1 MiB (64 messages), detection from 64 KiB up
    with settings.override(pinned_pull_granule=4096, pinned_detect_min=64 * KIB, pinned_track="compare"):
        sess = server.connect(name="test-pinned-detect")
        yield sess
        sess.close()


def delta(s, before, key):
    return pinned.stats(s).get(key, 0) - before.get(key, 0)


def prime(s, mod, d):
    """A first launch that may write int32 region d and its pull: the first pull of a region is
    whole and makes the server's reference copy; the pulls after it are detected."""
    R = pinned.region(s, d)
    assert R.detect and not R.ref
    s.launch(mod.function("pin_inc"), 1, 32, (addr(d), 0, 1))
    s.synchronize()
    assert R.ref
    return R


def no_scan_module(s):
    """The pinned kernels without a PTX text the client can scan: a cubin compiled here with
    nvcc on a GPU server, the CPU executor's JSON kernel list otherwise. Every pointer
    parameter then counts as written, as for any cubin/fatbin kernel."""
    if s.info.get("executor") == "gpu":
        return s.load_module(_cubin(s))
    return s.load_module(json.dumps({"gpuwire_cpu_kernels": ["pin_scale", "pin_inc", "pin_add"]}).encode())


_CUBIN = {}


def _cubin(s):
    if "img" not in _CUBIN:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            pytest.skip("nvcc not found: cannot build the cubin")
        major = s.cuDeviceGetAttribute(75, 0)
        minor = s.cuDeviceGetAttribute(76, 0)
        import tempfile
        with tempfile.TemporaryDirectory() as td:
            out = f"{td}/k.cubin"
            subprocess.run([nvcc, "-cubin", f"-arch=sm_{major}{minor}", "-o", out, str(PK.SOURCE)], check=True,
                           capture_output=True, timeout=300)
            with open(out, "rb") as f:
                _CUBIN["img"] = f.read()
    assert _CUBIN["img"][:4] == b"\x7fELF"
    return _CUBIN["img"]


# ----------------------------------------------------------------------------- what comes back

def test_kernel_writing_part_of_a_region_pulls_only_those_granules(s, mod):
    n = 1 << 18                                        # 1 MiB of int32: 64 granules of 16 KiB
    d = s.host_alloc(4 * n).view(I32)
    d[:] = np.arange(n, dtype=I32)
    R = prime(s, mod, d)
    assert R.granule == 16 * KIB
    b = pinned.stats(s)
    s.launch(mod.function("pin_inc"), (5000 + 255) // 256, 256, (addr(d), 3, 5000))   # first 20,000 B
    s.synchronize()
    exp = np.arange(n, dtype=I32)
    exp[:5000] += 3
    check(d, exp)
    assert delta(s, b, "pull_bytes") == 32 * KIB                 # two granules
    assert delta(s, b, "pull_bytes_saved") == 4 * n - 32 * KIB
    assert delta(s, b, "pull_detected") == 1


def test_unchanged_granules_keep_the_client_bytes(s, mod):
    """A granule the kernel did not change is not sent: a host store made there while the
    region was device owned survives (a whole-region pull would have overwritten it)."""
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 0
    prime(s, mod, d)
    st = s.stream()
    s.launch(mod.function("pin_inc"), 4, 256, (addr(d), 1, 1024), stream=st)   # granule 0 only
    s.gwSync()                                     # the push has been read (gwSync pulls nothing)
    d[-1] = 42                                     # another granule, while the region is device owned
    st.synchronize()
    exp = np.zeros(n, I32)
    exp[:1024] = 1
    exp[-1] = 42
    check(d, exp)
    # the host store is pushed with the next launch (compare: the shadow has the old byte)
    s.launch(mod.function("pin_inc"), n // 256, 256, (addr(d), 1, n), stream=st)
    st.synchronize()
    check(d, exp + 1)


def test_kernel_writing_all_of_a_region(s, mod):
    n = 1 << 18
    x = s.host_alloc(4 * n).view(F32)
    y = s.host_alloc(4 * n).view(F32)
    f = mod.function("pin_scale")
    base = (np.arange(n) % 777).astype(F32)
    R = pinned.region(s, y)
    b = pinned.stats(s)
    skipped_seen = False
    for i in range(16):
        v = F32(i if i < 8 else i // 2)     # from i = 8 on, odd i rewrite the bytes y already holds
        np.add(base, v, out=x)
        s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
        skipped_seen |= R.dskip > 0
        s.synchronize()
        check(y, 2 * (base + v) + 1)
    assert skipped_seen                          # rewritten whole twice: pulled whole without the diff
    assert delta(s, b, "pull_detected") >= 3     # ... and the diff comes back after a while
    assert delta(s, b, "pulls") == 16


def test_identical_rewrite_needs_no_pull(s, mod):
    n = 1 << 18
    x = s.host_alloc(4 * n).view(F32)
    y = s.host_alloc(4 * n).view(F32)
    x[:] = 5
    f = mod.function("pin_scale")
    s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
    s.synchronize()
    check(y, np.full(n, 11, F32))
    b = pinned.stats(s)
    s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))   # writes the same 11s again
    s.synchronize()
    check(y, np.full(n, 11, F32))
    assert delta(s, b, "pull_bytes") == 0 and delta(s, b, "pull_detected") == 1


def test_no_scan_kernel_inputs_are_detected_unchanged(s):
    """A kernel without PTX (cubin on the GPU, a JSON image on the CPU executor): its input
    counts as written, so it is pulled, and detection sends none of it back."""
    m = no_scan_module(s)
    f = m.function("pin_scale")
    n = 1 << 16                                   # 256 KiB regions
    x = s.host_alloc(4 * n).view(F32)
    y = s.host_alloc(4 * n).view(F32)
    for i in range(4):
        x[:] = np.arange(n, dtype=F32) + i
        b = pinned.stats(s)
        s.launch(f, n // 256, 256, (addr(x), addr(y), 3.0, n))
        assert pinned.region(s, x).device_owned          # no scan: may have been written
        s.synchronize()
        check(y, 3 * (np.arange(n, dtype=F32) + i) + 1)
        check(x, np.arange(n, dtype=F32) + i)
        assert delta(s, b, "pulls") == 2
        # the first pulls are whole (they make the reference copies); later ones bring y only:
        # x comes back as empty messages
        assert delta(s, b, "pull_bytes") == (8 if i == 0 else 4) * n


def test_after_an_unchanged_pull_the_next_asks_for_one_coarse_message(s, mod):
    """A detected pull that found nothing changed makes the next one use coarse granules (one
    message here instead of 64 empty ones); a change found that way comes back whole, and the
    pull after it is fine-grained again."""
    n = 1 << 18                                        # 1 MiB of int32: 64 granules of 16 KiB
    d = s.host_alloc(4 * n).view(I32)
    d[:] = np.arange(n, dtype=I32)
    R = prime(s, mod, d)
    inc = mod.function("pin_inc")
    exp = np.arange(n, dtype=I32)
    steps = [(0, 64, 0), (0, 1, 0), (3, 1, 4 * n), (3, 64, 32 * KIB)]   # (v, messages, bytes back)
    for v, msgs, back in steps:
        b = pinned.stats(s)
        s.launch(inc, (5000 + 255) // 256, 256, (addr(d), v, 5000))     # v = 0 rewrites the same bytes
        s.synchronize()
        exp[:5000] += v
        check(d, exp)
        assert (delta(s, b, "pull_messages"), delta(s, b, "pull_bytes")) == (msgs, back), (v, msgs, back)
    assert not R.quiet


def test_small_regions_are_pulled_whole(s, mod):
    n = 1024                                      # 4 KiB < pinned_detect_min
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 7
    assert not pinned.region(s, d).detect
    b = pinned.stats(s)
    s.launch(mod.function("pin_inc"), 1, 256, (addr(d), 1, 10))
    s.synchronize()
    exp = np.full(n, 7, I32)
    exp[:10] = 8
    check(d, exp)
    assert delta(s, b, "pull_bytes") == 4 * n and delta(s, b, "pull_detected") == 0


# ----------------------------------------------------------------------------- ordering

def test_two_streams_write_different_granules(s, mod):
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 0
    prime(s, mod, d)
    a, b_ = s.stream(), s.stream()
    inc = mod.function("pin_inc")
    half = n // 2
    s.launch(inc, 4, 256, (addr(d), 5, 1024), stream=a)                          # first granule
    s.launch(inc, 4, 256, (addr(d) + 4 * half, 7, 1024), stream=b_)              # interior pointer
    b = pinned.stats(s)
    s.cuCtxSynchronize()
    exp = np.zeros(n, I32)
    exp[:1024] = 5
    exp[half:half + 1024] = 7
    check(d, exp)
    assert delta(s, b, "pulls") == 1 and delta(s, b, "pull_bytes") == 2 * 16 * KIB


def test_stream_synchronize_of_each_writer(s, mod):
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 1
    a, b_ = s.stream(), s.stream()
    inc = mod.function("pin_inc")
    s.launch(inc, 4, 256, (addr(d), 2, 1024), stream=a)
    a.synchronize()
    exp = np.ones(n, I32)
    exp[:1024] = 3
    check(d, exp)
    s.launch(inc, 4, 256, (addr(d) + 4 * (n - 1024), 4, 1024), stream=b_)
    b_.synchronize()
    exp[-1024:] = 5
    check(d, exp)


def test_event_ordered_consumer_reads_the_writes(s, mod):
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    out = s.host_alloc(4 * n).view(F32)
    src = s.host_alloc(4 * n).view(F32)
    d[:] = 0
    src[:] = np.arange(n, dtype=F32)
    a, b_ = s.stream(), s.stream()
    s.launch(mod.function("pin_scale"), n // 256, 256, (addr(src), addr(src), 2.0, 4096), stream=a)  # in place
    ev = s.cuEventCreate(0)
    s.cuEventRecord(ev, a)
    s.cuStreamWaitEvent(b_, ev, 0)
    s.launch(mod.function("pin_scale"), n // 256, 256, (addr(src), addr(out), 1.0, n), stream=b_)
    b_.synchronize()
    exp_src = np.arange(n, dtype=F32)
    exp_src[:4096] = 2 * exp_src[:4096] + 1
    check(out, exp_src + 1)
    s.cuEventSynchronize(ev)
    check(src, exp_src)
    s.cuEventDestroy(ev)


def test_async_copy_into_a_region_then_detected_pull(s, mod):
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 9
    prime(s, mod, d)
    st = s.stream()
    dev = s.alloc(4096)
    s.cuMemcpyHtoD(dev, np.full(1024, 77, I32), 4096)
    s.cuMemcpyDtoHAsync(d[4096:], dev, 4096, st)           # into the mirror, in stream order
    b = pinned.stats(s)
    st.synchronize()
    exp = np.full(n, 9, I32)
    exp[4096:5120] = 77
    check(d, exp)
    assert delta(s, b, "pull_bytes") == 16 * KIB
    dev.free()


def test_free_while_in_flight_with_a_detected_pull_pending(s, mod):
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 0
    st = s.stream()
    s.launch(mod.function("pin_inc"), n // 256, 256, (addr(d), 1, n), stream=st)
    s.free_host(d)                    # deferred free: the writes are dropped, no pull
    st.synchronize()
    s.gwSync()


# ----------------------------------------------------------------------------- the call itself

def test_raw_mirror_pull_sends_only_changed_granules(s):
    n = 64 * KIB
    host = np.full(n, 1, np.uint8)
    mirror, ref = s.alloc(n), s.alloc(n)
    s.cuMemcpyHtoD(mirror, np.full(n, 1, np.uint8), n)
    s.cuMemcpyHtoD(ref, np.full(n, 1, np.uint8), n)
    s.cuMemsetD8(mirror.ptr + 8 * KIB, 5, 100)                  # granule 2 of 4 KiB granules
    host[40 * KIB] = 9                                           # a client byte in an unchanged granule
    s.gwMirrorPull(host, mirror.ptr, ref.ptr, n, 4096)
    s.gwSync()
    exp = np.full(n, 1, np.uint8)
    exp[8 * KIB:8 * KIB + 100] = 5
    exp[40 * KIB] = 9
    check(host, exp)
    back = np.zeros(n, np.uint8)
    s.cuMemcpyDtoH(back, ref, n)                                 # ref now equals the mirror
    exp[40 * KIB] = 1
    check(back, exp)
    mirror.free()
    ref.free()


def test_raw_mirror_pull_bad_arguments_are_clear_errors(s):
    n = 64 * KIB
    host = np.zeros(n, np.uint8)
    with s.alloc(n) as m:
        with pytest.raises(ValueError, match="65536 messages"):
            s.gwMirrorPull(host, m.ptr, m.ptr, n, -1)
        with pytest.raises(ValueError, match="65536 messages"):
            s.gwMirrorPull(np.zeros(1 << 17, np.uint8), m.ptr, m.ptr, 1 << 17, 1)
        chunk = int(s.info.get("bulk_chunk", 0) or 0)
        if chunk:
            big = np.zeros(2 * chunk, np.uint8)
            with pytest.raises(ValueError, match="bulk message size"):
                s.gwMirrorPull(big, m.ptr, m.ptr, 2 * chunk, 0)
        s.gwMirrorPull(host, m.ptr, m.ptr + 4096, n, 4096)           # ref runs past the allocation
        with pytest.raises(DeferredCudaError) as ei:
            s.gwSync()
        assert ei.value.call == "gwMirrorPull" and "refDevice" in str(ei.value)
        s.gwMirrorPull(host, m.ptr, m.ptr, n, 4096)                  # the session goes on
        s.gwSync()
    s.get_last_error()


def test_diff_overlapped_with_the_sends_in_flight(s, mod):
    """A big compare-mode region diffed on the pool while the push of another region is on the
    wire: host stores it finds (in bytes the kernel does not write) reach the next kernel."""
    n = 4 << 20                                   # 16 MiB regions (overlapped from 16 MiB up)
    x = s.host_alloc(4 * n).view(F32)
    y = s.host_alloc(4 * n).view(F32)
    z = s.host_alloc(4 * n).view(F32)
    x[:] = 1
    y[:] = 0
    f = mod.function("pin_scale")
    k = n // 2                                    # the first kernel writes y[:k] only
    b = pinned.stats(s)
    for i in range(6):
        x[:] = i                                  # rewritten: a zero-copy push on the wire
        y[-1] = i                                 # a host store into y where no kernel writes
        s.launch(f, k // 256, 256, (addr(x), addr(y), 2.0, k))
        s.launch(f, n // 256, 256, (addr(y), addr(z), 1.0, n))          # reads all of y
        s.synchronize()
        ex = np.full(n, i, F32)
        ey = np.zeros(n, F32)
        ey[:k] = 2 * ex[:k] + 1
        ey[-1] = i
        check(y, ey)
        check(z, ey + 1)
    assert delta(s, b, "overlapped_diffs") >= 4


def test_big_region_pulled_granules_reach_the_shadow_as_they_arrive(s, mod):
    """Compare-mode regions of 16 MiB or more: a detected pull's granules are received before
    the sync call goes out and copied into the shadow one by one; the host stores made after
    the sync (in pulled and in unpulled granules) are still found and pushed."""
    n = 4 << 20                                    # 16 MiB of int32: 64 granules of 256 KiB
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 1
    R = prime(s, mod, d)
    assert R.granule == 256 * KIB and pinned.PinnedManager._drains(pinned.manager(s), R)
    inc = mod.function("pin_inc")
    exp = np.ones(n, I32)
    exp[0] = 1
    b = pinned.stats(s)
    for i in range(4):
        s.launch(inc, 1024 // 256, 256, (addr(d) + 4 * 70000 * i, 10, 1024))   # one granule each time
        s.synchronize()
        exp[70000 * i:70000 * i + 1024] += 10
        check(d, exp)
        assert R.dskip == 0
        d[5] = 100 + i                              # in granule 0 (pulled at i == 0)
        exp[5] = 100 + i
        if i == 1:
            d[-3] = 200                             # in the last granule (never pulled)
            exp[-3] = 200
        d[70000 * i + 1] -= 10                      # back to the bytes before the kernel: only a
        exp[70000 * i + 1] -= 10                    # shadow refreshed by the pull tells it changed
        assert R.hot == 0                           # (a region pushed whole would hide a stale shadow)
    assert delta(s, b, "pull_detected") == 4 and delta(s, b, "pull_bytes") == 4 * 256 * KIB
    s.launch(inc, 1, 32, (addr(d) + 4 * 900000, 10, 1))         # one element
    s.synchronize()
    exp[900000] += 10
    check(d, exp)
    d[900000] -= 10                                 # the only host store: back to the old bytes
    exp[900000] -= 10
    assert R.hot == 0
    # the host stores were found against the shadow and pushed: a kernel reads and bumps all of d
    s.launch(inc, n // 256, 256, (addr(d), 1, n))
    s.synchronize()
    check(d, exp + 1)


def test_host_store_restoring_pulled_bytes_is_pushed(s, mod):
    """After a detected pull the shadow holds the pulled granules: a host store that puts back
    the bytes from before the kernel is a change (the mirror has the kernel's) and is pushed."""
    n = 1 << 18
    d = s.host_alloc(4 * n).view(I32)
    d[:] = 3
    R = prime(s, mod, d)
    inc = mod.function("pin_inc")
    s.launch(inc, 1, 32, (addr(d) + 4 * 100000, 5, 1))          # one element
    s.synchronize()
    assert d[100000] == 8
    d[100000] = 3                                               # the old bytes again
    assert R.hot == 0
    s.launch(inc, n // 256, 256, (addr(d), 1, n))
    s.synchronize()
    check(d, np.full(n, 4, I32))
