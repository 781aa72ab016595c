"""Pinned host buffers in kernel parameters (gpuwire.rpc.pinned, docs/pinned.md), end to end:
a real `gpuwire serve` subprocess (CPU executor in CI, the GPU executor with the nvcc-built
PTX where there is a GPU: marked gpu), kernels that read pinned input and write pinned
output through their parameters. Every result is checked against numpy and by checksum."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.rpc import CudaError, pinned
from gpuwire.rpc.kernels import pinned as PK
from pinned_support import addr, check, f32, mod, mirrored, server  # noqa: F401 (fixtures: mirrored, mod, server)

# host_alloc memory is mirrored in these tests (a same-host session would map it: test_hostmap.py)
pytestmark = pytest.mark.usefixtures("mirrored")

F32 = np.float32


@pytest.fixture()
def s(server):
    sess = server.connect(name="test-pinned")
    yield sess
    sess.close()


# ----------------------------------------------------------------------------- basics

def test_no_hooks_without_pinned_memory(s):
    assert "cuLaunchKernel" not in s.__dict__          # generated stubs run untouched
    a = s.host_alloc(4096)
    assert "cuLaunchKernel" in s.__dict__
    s.free_host(a)
    assert "cuLaunchKernel" not in s.__dict__


def test_kernel_reads_pinned_input_writes_pinned_output(s, mod):
    n = 5000
    x, y = f32(s, n), f32(s, n)
    x[:] = np.arange(n, dtype=F32)
    y[:] = -1
    s.launch(mod.function("pin_scale"), (n + 255) // 256, 256, (addr(x), addr(y), 3.0, n))
    s.synchronize()
    check(y, 3 * np.arange(n, dtype=F32) + 1)
    check(x, np.arange(n, dtype=F32))                   # the input is unchanged
    # the host changes the input: the next launch sees it (default tracking: the diff finds it)
    x[:] = 7
    st = s.stream()
    s.launch(mod.function("pin_scale"), (n + 255) // 256, 256, (addr(x), addr(y), 2.0, n), stream=st)
    st.synchronize()
    check(y, np.full(n, 15, F32))
    st.destroy()
    R = pinned.region(s, y)
    assert R.mirror != addr(y) and not R.device_owned
    s.free_host(x)
    s.free_host(y)


def test_raw_cuLaunchKernel_with_packed_params_is_rewritten(s, mod):
    n = 64
    x, y = f32(s, n), f32(s, n)
    x[:] = np.arange(n)
    f = mod.function("pin_scale")
    s.cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 0, 0, struct.pack("<QQfi", addr(x), addr(y), 0.5, n))
    s.cuCtxSynchronize()
    check(y, 0.5 * np.arange(n, dtype=F32) + 1)


def test_interior_pointers_several_params_into_one_region(s, mod):
    n = 3000
    buf = f32(s, 3 * n + 16)                     # x | y | out | slack in one region
    x, y, out = buf[:n], buf[n:2 * n], buf[2 * n:3 * n]
    x[:] = np.arange(n)
    y[:] = 1000 * np.arange(n) % 977
    out[:] = 0
    buf[3 * n:] = 42
    s.launch(mod.function("pin_add"), (n + 127) // 128, 128, (addr(x), addr(y), addr(out), n))
    s.synchronize()
    check(out, np.arange(n, dtype=F32) + (1000 * np.arange(n) % 977).astype(F32))
    check(buf[3 * n:], np.full(16, 42, F32))
    assert pinned.stats(s)["pushes"] >= 1


def test_begin_end_pointer_pair_including_one_past_the_end(s, mod):
    n = 1024
    src = f32(s, n)
    dst = f32(s, n)
    src[:] = np.arange(n) % 251
    # end == one past the end of the region: rewritten alike, so end - begin == n
    s.launch(mod.function("pin_span"), n // 128, 128, (addr(src), addr(src) + 4 * n, addr(dst)))
    s.synchronize()
    check(dst, 2 * (np.arange(n) % 251).astype(F32))
    dst[:] = 0
    s.launch(mod.function("pin_span"), n // 128, 128, (addr(src) + 400, addr(src) + 800, addr(dst)))
    s.synchronize()
    exp = np.zeros(n, F32)
    exp[:100] = 2 * (np.arange(100, 200) % 251)
    check(dst, exp)


def test_host_register_of_an_existing_buffer(s, mod):
    n = 2048
    x = np.arange(n, dtype=F32)
    y = np.zeros(n, F32)
    s.cuMemHostRegister(x, x.nbytes, 0)
    s.cuMemHostRegister(y, y.nbytes, 0)
    s.launch(mod.function("pin_scale"), n // 256, 256, (addr(x), addr(y), -1.0, n))
    s.synchronize()
    check(y, 1 - np.arange(n, dtype=F32))
    with pytest.raises(CudaError) as ei:
        s.cuMemHostRegister(y[10:], 100, 0)              # overlaps a registered range
    assert ei.value.name == "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"
    s.cuMemHostUnregister(x)
    s.cuMemHostUnregister(y)
    # no longer registered: passed through, the server says so at the next sync point
    s.cuMemHostUnregister(x)
    with pytest.raises(CudaError):
        s.gwSync()


def test_bad_sizes_are_clear_errors(s):
    with pytest.raises(CudaError, match="bytesize must be a positive int"):
        s.cuMemHostAlloc(0, 0)
    with pytest.raises(CudaError, match="bytesize must be a positive int"):
        s.cuMemHostRegister(np.zeros(8, np.uint8), -1, 0)
    with pytest.raises(CudaError, match="holds 8 B"):
        s.cuMemHostRegister(np.zeros(8, np.uint8), 64, 0)


# ----------------------------------------------------------------------------- streams and events

def test_one_region_two_streams(s, mod):
    n = 4096
    data = s.host_alloc(2 * n * 4).view(np.int32)
    data[:] = np.arange(2 * n)
    a, b = s.stream(), s.stream()
    inc = mod.function("pin_inc")
    for k in range(5):
        s.launch(inc, n // 256, 256, (addr(data), 1, n), stream=a)              # first half
        s.launch(inc, n // 256, 256, (addr(data) + 4 * n, 10, n), stream=b)     # second half (interior)
    a.synchronize()
    b.synchronize()
    exp = np.arange(2 * n, dtype=np.int32)
    exp[:n] += 5
    exp[n:] += 50
    check(data, exp)
    # both streams again, one context synchronize pulls once after both
    s.launch(inc, n // 256, 256, (addr(data), 2, n), stream=a)
    s.launch(inc, n // 256, 256, (addr(data) + 4 * n, 3, n), stream=b)
    s.synchronize()
    exp[:n] += 2
    exp[n:] += 3
    check(data, exp)
    assert not pinned.region(s, data).device_owned


def test_event_ordered_consumer_on_another_stream(s, mod):
    n = 8192
    x, mid, out = f32(s, n), f32(s, n), f32(s, n)
    x[:] = np.arange(n) % 1000
    a, b = s.stream(), s.stream()
    ev = s.event()
    scale = mod.function("pin_scale")
    s.launch(scale, n // 256, 256, (addr(x), addr(mid), 2.0, n), stream=a)      # mid = 2x + 1
    ev.record(a)
    b.wait(ev)
    s.launch(scale, n // 256, 256, (addr(mid), addr(out), 3.0, n), stream=b)    # reads the mirror of mid
    b.synchronize()          # covers b's write of out and, through the event, a's write of mid
    xm = (np.arange(n) % 1000).astype(F32)
    check(out, 3 * (2 * xm + 1) + 1)
    check(mid, 2 * xm + 1)


def test_event_synchronize_pulls_what_the_event_covers(s, mod):
    n = 1000
    x, y = f32(s, n), f32(s, n)
    x[:] = 5
    st = s.stream()
    ev = s.event()
    s.launch(mod.function("pin_scale"), 4, 256, (addr(x), addr(y), 4.0, n), stream=st)
    ev.record(st)
    ev.synchronize()
    check(y, np.full(n, 21, F32))
    # a completed query is an observation point too
    s.launch(mod.function("pin_scale"), 4, 256, (addr(x), addr(y), 1.0, n), stream=st)
    ev.record(st)
    while not ev.query():
        pass
    check(y, np.full(n, 6, F32))


def test_later_async_copies_on_the_stream_see_the_kernel_writes(s, mod):
    n = 4096
    x, y = f32(s, n), f32(s, n)
    x[:] = np.arange(n)
    st = s.stream()
    with s.alloc(n * 4) as d:
        s.launch(mod.function("pin_scale"), n // 256, 256, (addr(x), addr(y), 2.0, n), stream=st)
        # y is device-owned: an H2D copy from it reads the mirror, in stream order
        s.copy_to_device(d, y, stream=st)
        back = np.zeros(n, F32)
        s.copy_to_host(back, d, stream=st)
        st.synchronize()
        check(back, 2 * np.arange(n, dtype=F32) + 1)
        # an async D2H copy into a pinned region, then a kernel on the same stream reading it
        s.cuMemsetD32Async(d, np.float32(9.0).view(np.uint32).item(), n, st)
        s.copy_to_host(x, d, stream=st)                 # lands in x's mirror in stream order
        s.launch(mod.function("pin_scale"), n // 256, 256, (addr(x), addr(y), 1.0, n), stream=st)
        st.synchronize()
        check(x, np.full(n, 9, F32))
        check(y, np.full(n, 10, F32))


def test_sync_copy_into_a_device_owned_region_lands_after_the_kernel(s, mod):
    n = 4096
    x, y = f32(s, n), f32(s, n)
    x[:] = 1
    st = s.stream()
    with s.alloc(64 * 4) as d:
        s.cuMemsetD32(d, np.float32(-4.0).view(np.uint32).item(), 64)
        s.launch(mod.function("pin_scale"), n // 256, 256, (addr(x), addr(y), 2.0, n), stream=st)
        s.copy_to_host(y[:64], d)            # sync copy (legacy stream: after the kernel) into y
        exp = np.full(n, 3, F32)
        exp[:64] = -4
        check(y, exp)
        st.synchronize()                     # nothing left to pull over the copied bytes
        check(y, exp)


# ----------------------------------------------------------------------------- free while in flight

def test_free_while_a_kernel_using_it_is_in_flight(s, mod):
    n = 1 << 16
    free0 = s.mem_get_info()[0]
    doomed = s.host_alloc(n * 4).view(np.int32)
    keep = s.host_alloc(n * 4).view(np.int32)
    doomed[:] = 1
    keep[:] = 2
    st = s.stream()
    inc = mod.function("pin_inc")
    s.launch(inc, n // 256, 256, (addr(doomed), 5, n), stream=st)
    s.launch(inc, n // 256, 256, (addr(keep), 7, n), stream=st)
    s.free_host(doomed)                  # deferred free: no error, the kernel's writes are dropped
    st.synchronize()
    check(keep, np.full(n, 9, np.int32))
    assert pinned.stats(s)["pulls"] >= 1
    with pytest.raises(ValueError, match="not inside a pinned region"):
        pinned.region(s, doomed)
    check(doomed, np.full(n, 1, np.int32))   # the Python view stays valid; no pull wrote into it
    s.free_host(keep)
    s.synchronize()
    if s.executor == "cpu":
        assert s.mem_get_info()[0] == free0      # both mirrors are gone


# ----------------------------------------------------------------------------- annotations

DESC = struct.Struct("<QQfi")


def test_struct_parameter_with_annotated_pointers(s, mod):
    n = 3000
    x, y = f32(s, n), f32(s, n)
    x[:] = np.arange(n) % 17
    f = mod.function("pin_struct")
    assert f.param_layout() == [(0, 24)]
    pinned.annotate(f, struct_pointers={0: (0, 8)})
    s.cuLaunchKernel(f, (n + 255) // 256, 1, 1, 256, 1, 1, 0, 0, DESC.pack(addr(x), addr(y), 0.5, n))
    s.synchronize()
    check(y, 0.5 * (np.arange(n) % 17).astype(F32))


def test_struct_pointers_without_annotation_are_not_found(server, s, mod):
    if server.executor != "cpu":
        pytest.skip("an unrewritten host pointer faults the GPU context; the CPU executor reports it cleanly")
    n = 64
    x, y = f32(s, n), f32(s, n)
    f = mod.function("pin_struct")
    s.cuLaunchKernel(f, 1, 1, 1, 64, 1, 1, 0, 0, DESC.pack(addr(x), addr(y), 1.0, n))
    with pytest.raises(CudaError) as ei:
        s.synchronize()
    assert ei.value.name == "CUDA_ERROR_ILLEGAL_ADDRESS"


def test_integer_equal_to_a_pinned_address_and_the_opt_out(s, mod):
    key = s.host_alloc(4096)
    out = s.host_alloc(8).view(np.uint64)
    k = addr(key) + 128
    f = mod.function("pin_key")
    s.launch(f, 1, 1, (k, addr(out)))
    s.synchronize()
    R = pinned.region(s, key)
    check(out, np.array([R.mirror + 128], np.uint64))      # the documented false positive
    pinned.annotate(f, ignore=(0,))
    s.launch(f, 1, 1, (k, addr(out)))
    s.synchronize()
    check(out, np.array([k], np.uint64))                   # opted out: passed as is


def test_readonly_annotation_skips_the_pull(s, mod):
    n = 4096
    x, total = f32(s, n), f32(s, 1)
    x[:] = np.arange(n) % 7
    f = mod.function("pin_sum")
    pinned.annotate(f, readonly=(0,))
    s.launch(f, 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([(np.arange(n) % 7).sum()], F32))
    assert not pinned.region(s, x).device_owned
    st = pinned.stats(s)
    assert st["pulls"] == 1 and st["pull_bytes"] == 4                      # only total came back


def test_slots_whose_size_is_not_8_are_never_scanned(s):
    a = s.host_alloc(4096)
    m = pinned.manager(s)
    fi = pinned._Func("k", [(0, 8), (8, 4), (12, 4), (16, 8)], None, m.version)
    assert fi.offs == [0, 16]
    p = addr(a) + 8
    params = struct.pack("<QIIQ", 5, p & 0xFFFFFFFF, p >> 32, p)   # bytes 8..16 spell a pinned address
    newp, used, _written = m._rewrite(fi, params)
    R = pinned.region(s, a)
    assert struct.unpack("<QIIQ", newp) == (5, p & 0xFFFFFFFF, p >> 32, R.mirror + 8)
    assert used == (R.id,)


def test_bad_struct_annotation_is_a_clear_error(s, mod):
    s.host_alloc(64)
    f = mod.function("pin_struct")
    pinned.annotate(f, struct_pointers={0: (20,)})
    with pytest.raises(ValueError, match="struct pointer offset 20"):
        s.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, 0, bytes(24))


# ----------------------------------------------------------------------------- change tracking

def test_tracking_explicit_and_compare(s, mod):
    n = 1 << 14
    x, total = f32(s, n), f32(s, 1)
    x[:] = 1
    f = mod.function("pin_sum")
    pinned.annotate(f, readonly=(0,))
    R = pinned.set_tracking(s, x, "explicit")
    base = pinned.stats(s)["push_bytes"]
    for _ in range(3):
        s.launch(f, 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([n], F32))
    # x once (unchanged, explicit); total once: after the first launch its mirror holds the
    # kernel's write (device owned) until the sync pulls it, so it is not pushed over
    assert pinned.stats(s)["push_bytes"] - base == 4 * n + 4
    R.write(np.full(16, 3, F32).view(np.uint8), offset=0)          # explicit write through gpuwire
    s.launch(f, 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([n + 32], F32))
    pinned.set_tracking(s, x, "compare")
    s.launch(f, 1, 256, (addr(x), addr(total), n))                 # first launch in compare: full push
    b1 = pinned.stats(s)["push_bytes"]
    x[5000] = 101                                                   # a plain numpy write: found by the diff
    s.launch(f, 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([n + 32 + 100], F32))
    assert pinned.stats(s)["push_bytes"] - b1 <= 4096 + 4           # one 4 KiB granule of x (+ total)
    with pytest.raises(ValueError, match="tracking mode"):
        pinned.set_tracking(s, x, "sometimes")


def test_c_encoder_sessions_are_mirrored_too(server, mod):
    from gpuwire.rpc.codegen import c_encoder_available
    if not c_encoder_available():
        pytest.skip("gpuwire._rpc not built")
    with settings.override(rpc_c_encoder=True):
        s2 = server.connect(name="c-encoder")
    try:
        m2 = s2.load_module(PK.PTX)
        n = 256
        x, y = f32(s2, n), f32(s2, n)
        x[:] = 2
        s2.launch(m2.function("pin_scale"), 1, 256, (addr(x), addr(y), 5.0, n))
        s2.synchronize()
        check(y, np.full(n, 11, F32))
    finally:
        s2.close()


def test_setting_rejects_unknown_tracking_mode(s):
    with pytest.raises(ValueError, match="GPUWIRE_PINNED_TRACK"):     # refused when set, naming it
        with settings.override(pinned_track="sometimes"):
            pass
    assert settings.get("pinned_track") == "auto"
    s.host_alloc(64)


def test_close_releases_regions(server):
    s2 = server.connect(name="close")
    a = s2.host_alloc(8192)
    R = pinned.region(s2, a)
    locked = R.locked
    assert locked or "mlock" in R.lock_error            # page-locked, or says why not
    s2.close()
    assert R.freed and not R.locked and R.mr is None
    a[:] = 5                                               # the caller's view stays usable memory
    assert int(a.sum()) == 5 * 8192


# ----------------------------------------------------------------------------- PTX read-only scan

def test_plain_program_pulls_only_what_the_kernel_writes(s, mod):
    """No annotation: the PTX scan finds pin_scale's `in` load-only, so only `out` comes back."""
    n = 4096
    x, y = f32(s, n), f32(s, n)
    x[:] = np.arange(n) % 101
    st0 = pinned.stats(s)
    s.launch(mod.function("pin_scale"), n // 256, 256, (addr(x), addr(y), 2.0, n))
    assert not pinned.region(s, x).device_owned and pinned.region(s, y).device_owned
    s.synchronize()
    check(y, 2 * (np.arange(n) % 101).astype(F32) + 1)
    check(x, (np.arange(n) % 101).astype(F32))
    st1 = pinned.stats(s)
    assert st1["pulls"] - st0["pulls"] == 1 and st1["pull_bytes"] - st0["pull_bytes"] == 4 * n


def test_kernel_that_writes_nothing_to_a_region_is_not_pulled(s, mod):
    n = 1 << 14
    x, total = f32(s, n), f32(s, 1)
    x[:] = np.arange(n) % 5
    before = pinned.stats(s)
    for _ in range(3):
        s.launch(mod.function("pin_sum"), 1, 256, (addr(x), addr(total), n))
    s.synchronize()
    check(total, np.array([(np.arange(n) % 5).sum()], F32))
    check(x, (np.arange(n) % 5).astype(F32))          # the client copy is intact
    after = pinned.stats(s)
    assert after["pull_bytes"] - before["pull_bytes"] == 4       # only total


def test_ptx_scan_off_pulls_every_region(server):
    with settings.override(pinned_ptx_readonly=False):
        s2 = server.connect(name="no-ptx-scan")
        try:
            f = s2.load_module(PK.PTX).function("pin_scale")
            n = 1024
            x, y = f32(s2, n), f32(s2, n)
            x[:] = 3
            s2.launch(f, n // 256, 256, (addr(x), addr(y), 1.0, n))
            s2.synchronize()
            check(y, np.full(n, 4, F32))
            assert pinned.stats(s2)["pull_bytes"] == 8 * n          # x came back too
        finally:
            s2.close()


def test_read_modify_write_kernel_is_still_pulled(s, mod):
    n = 2048
    d = s.host_alloc(4 * n).view(np.int32)
    d[:] = np.arange(n)
    s.launch(mod.function("pin_inc"), n // 256, 256, (addr(d), 4, n))
    s.synchronize()
    check(d, np.arange(n, dtype=np.int32) + 4)


# ----------------------------------------------------------------------------- compare: rewritten regions

def test_compare_region_rewritten_every_launch_stays_correct(s, mod):
    n = 1 << 15                                  # 128 KiB: big enough for the rewrite streak
    x, y = f32(s, n), f32(s, n)
    pinned.set_tracking(s, x, "compare")
    pinned.set_tracking(s, y, "compare")
    R = pinned.region(s, x)
    f = mod.function("pin_scale")
    base = (np.arange(n) % 1000).astype(F32)
    hot_seen = False
    for i in range(12):
        if i < 8:
            np.add(base, F32(i), out=x)          # every byte changes
        elif i == 10:
            x[7] = -1                            # a small change while the diff is off or back on
        s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
        hot_seen |= R.hot > 0
        s.synchronize()
        exp_x = base + F32(min(i, 7))
        if i >= 10:
            exp_x[7] = -1
        check(y, 2 * exp_x + 1)
    assert hot_seen                              # the streak turned the diff off for a while
    for _ in range(65):                          # unchanged launches until the diff is back on
        if not R.hot:
            break
        s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
    assert R.hot == 0
    s.synchronize()
    check(y, 2 * exp_x + 1)
    b0 = pinned.stats(s)["push_bytes"]
    s.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
    s.synchronize()
    assert pinned.stats(s)["push_bytes"] == b0    # nothing changed: nothing pushed (diff back on)


# ----------------------------------------------------------------------------- protect tracking

@pytest.fixture()
def ps(server):
    with settings.override(pinned_track="protect"):
        sess = server.connect(name="protect")
        yield sess
        sess.close()


def test_protect_pushes_only_after_host_writes(ps):
    f = ps.load_module(PK.PTX).function("pin_scale")
    n = 1 << 20                                     # 4 MiB: huge-page backed where the OS allows
    x, y = f32(ps, n), f32(ps, n)
    R = pinned.region(ps, x)
    assert R.track == "protect" and pinned.region(ps, y).track == "protect"
    x[:] = np.arange(n) % 977
    ps.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))
    ps.synchronize()
    exp = 2 * (np.arange(n) % 977).astype(F32) + 1
    check(y, exp)
    st0 = pinned.stats(ps)
    ps.launch(f, n // 256, 256, (addr(x), addr(y), 2.0, n))        # nothing written by the host
    ps.synchronize()
    st1 = pinned.stats(ps)
    assert st1["push_bytes"] == st0["push_bytes"]                   # neither x nor y pushed
    check(y, exp)
    faults = pinned._c()[1].gw_wp_faults()
    x[12345] = 5                                                    # one host store: caught
    assert pinned._c()[1].gw_wp_faults() == faults + 1
    ps.launch(f, n // 256, 256, (addr(x), addr(y), 3.0, n))
    ps.synchronize()
    st2 = pinned.stats(ps)
    assert st2["push_bytes"] - st1["push_bytes"] == 4 * n           # x only: y was pulled, not written
    exp = 3 * (np.arange(n) % 977).astype(F32) + 1
    exp[12345] = 16
    check(y, exp)
    y[:10] = 0                                                      # host writes the output too
    pinned.region(ps, y).write(np.zeros(8, np.uint8), 0)
    ps.launch(f, 1, 4, (addr(x), addr(y) + 40, 1.0, 4))             # y[10:14] = x[0:4] + 1 only
    ps.synchronize()
    exp[:10] = 0
    exp[10:14] = np.arange(4, dtype=F32) + 1
    check(y, exp)


def test_protect_sync_copy_into_a_region_and_free(ps):
    n = 4096
    y = f32(ps, n)
    y[:] = 1
    f = ps.load_module(PK.PTX).function("pin_sum")
    total = f32(ps, 1)
    ps.launch(f, 1, 256, (addr(y), addr(total), n))
    ps.synchronize()
    check(total, np.array([n], F32))
    with ps.alloc(4 * n) as d:
        ps.cuMemsetD32(d, np.float32(2.0).view(np.uint32).item(), n)
        ps.copy_to_host(y, d)                 # a reply written into a protected region: no EFAULT
        check(y, np.full(n, 2, F32))
        ps.launch(f, 1, 256, (addr(y), addr(total), n))
        ps.synchronize()
        check(total, np.array([2 * n], F32))  # the copied bytes were pushed
    ps.free_host(y)
    y[:] = 7                                  # unprotected when freed: an ordinary write
    assert int(y.sum()) == 7 * n


def test_protect_system_calls_into_a_protected_region(ps, tmp_path):
    """With the userfaultfd backend (gw_wp_backend() == 1) a read(2) into a protected region
    works and marks it written (its bytes are pushed); with the mprotect backend it fails with
    EFAULT (the documented caveat), never a crash."""
    import errno
    import os
    backend = pinned._c()[1].gw_wp_backend()
    n = 2048
    x = f32(ps, n)
    x[:] = 1
    f = ps.load_module(PK.PTX).function("pin_sum")
    total = f32(ps, 1)
    ps.launch(f, 1, 256, (addr(x), addr(total), n))     # pushes x, then x is write-protected
    ps.synchronize()
    check(total, np.array([n], F32))
    p = tmp_path / "data"
    p.write_bytes(np.full(1024, 3, F32).tobytes())
    fd = os.open(p, os.O_RDONLY)
    try:
        if backend == 1:
            assert os.readv(fd, [memoryview(x.view(np.uint8))[:4096]]) == 4096
        else:
            with pytest.raises(OSError) as ei:
                os.readv(fd, [memoryview(x.view(np.uint8))[:4096]])
            assert ei.value.errno == errno.EFAULT
    finally:
        os.close(fd)
    if backend != 1:
        pinned.set_tracking(ps, x, "compare")               # unprotected again
        with open(p, "rb") as fh:
            assert fh.readinto(memoryview(x.view(np.uint8))[:4096]) == 4096
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    check(total, np.array([n + 2 * 1024], F32))             # the bytes read reached the mirror


_PROTECT_SCRIPT = """
import errno, mmap, os, sys
import numpy as np
import gpuwire.transport
from gpuwire import _pinned
lib, ffi = _pinned.lib, _pinned.ffi
assert lib.gw_wp_use_uffd(int(sys.argv[1])) == 0
mm = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = np.frombuffer(mm, np.uint8)
a[:] = 1
slot = lib.gw_wp_add(a.ctypes.data, a.nbytes)
assert slot >= 0, slot
assert lib.gw_wp_protect(slot) == 0 and not lib.gw_wp_dirty(slot)
f0 = lib.gw_wp_faults()
a[5000] = 2                                     # a store: caught once, the region writable again
assert lib.gw_wp_dirty(slot) and lib.gw_wp_faults() == f0 + 1 and a[5000] == 2
a[60000] = 3
assert lib.gw_wp_faults() == f0 + 1             # (one fault per protect cycle)
assert lib.gw_wp_protect(slot) == 0 and not lib.gw_wp_dirty(slot)
r, w = os.pipe()
os.write(w, b"xyz")
try:
    got = os.readv(r, [memoryview(a)[100:103]])
    res = "read" if got == 3 and bytes(a[100:103]) == b"xyz" and lib.gw_wp_dirty(slot) else "bad"
except OSError as e:
    res = "efault" if e.errno == errno.EFAULT else "bad"
import time
for spin_ns, pause in ((50_000_000, 0.0), (1_000_000, 0.02), (0, 0.0)):
    # the handler polling awake (gw_wp_spin), after its spin ran out (asleep in poll again), none
    assert lib.gw_wp_protect(slot) == 0 and not lib.gw_wp_dirty(slot)
    lib.gw_wp_spin(spin_ns)
    time.sleep(pause)
    f1 = lib.gw_wp_faults()
    a[4242] = 5
    assert lib.gw_wp_dirty(slot) and lib.gw_wp_faults() == f1 + 1 and a[4242] == 5
lib.gw_wp_remove(slot)
a[7] = 9                                        # removed: an ordinary store
print(lib.gw_wp_backend(), res)
"""


@pytest.mark.parametrize("uffd", ["1", "0"])
def test_protect_backends(uffd):
    """Both write-protect backends in a process of their own: a store is caught once per
    protect cycle and leaves the region writable; a read(2) into a protected region works with
    the userfaultfd backend and fails with EFAULT with mprotect (gw_wp_use_uffd(0): the setting
    pinned_protect_uffd off)."""
    import os
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _PROTECT_SCRIPT, uffd], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    backend, res = p.stdout.split()
    if uffd == "0":
        assert (backend, res) == ("0", "efault")
    elif backend == "1":
        assert res == "read"
    else:                                        # (no userfaultfd here: the mprotect backend)
        assert res == "efault"


_GRANULE_SCRIPT = """
import mmap, sys
import numpy as np
import gpuwire.transport
from gpuwire import _pinned
lib, ffi = _pinned.lib, _pinned.ffi
assert lib.gw_wp_use_uffd(int(sys.argv[1])) == 0
M, G = 16 << 20, 2 << 20
mm = mmap.mmap(-1, M, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = np.frombuffer(mm, np.uint8)
a[:] = 1
slot = lib.gw_wp_add(a.ctypes.data, M)
assert slot >= 0, slot
assert lib.gw_wp_set_granule(slot, 12345) != 0          # not a page multiple
assert lib.gw_wp_set_granule(slot, 4096) != 0           # 4096 granules: more than the bitmap holds
assert lib.gw_wp_set_granule(slot, G) == 0
runs = ffi.new("uint64_t[]", 16)
assert lib.gw_wp_protect(slot) == 0 and not lib.gw_wp_dirty(slot) and lib.gw_wp_take(slot, runs, 8) == 0
f0 = lib.gw_wp_faults()
a[5 << 20] = 2                                          # granule 2
a[(5 << 20) + 100] = 3                                  # same granule: writable already, no fault
assert lib.gw_wp_faults() == f0 + 1 and lib.gw_wp_dirty(slot)
assert lib.gw_wp_take(slot, runs, 8) == 1 and (runs[0], runs[1]) == (4 << 20, 6 << 20)
assert not lib.gw_wp_dirty(slot) and lib.gw_wp_take(slot, runs, 8) == 0
a[(5 << 20) + 8] = 4                                    # protected again by the take: caught
assert lib.gw_wp_faults() == f0 + 2 and lib.gw_wp_take(slot, runs, 8) == 1
a[0] = 5                                                # two granules in one cycle: the 2nd fault
a[M - 1] = 6                                            # unprotects the whole region
a[M // 2] = 7                                           # (no fault: writable)
assert lib.gw_wp_faults() == f0 + 4 and lib.gw_wp_dirty(slot)
assert lib.gw_wp_take(slot, runs, 8) == -1              # push it whole
assert lib.gw_wp_protect(slot) == 0 and lib.gw_wp_take(slot, runs, 8) == 0
a[3 << 20] = 8
assert lib.gw_wp_faults() == f0 + 5 and lib.gw_wp_take(slot, runs, 8) == 1 and (runs[0], runs[1]) == (2 << 20, 4 << 20)
assert int(a[5 << 20]) == 2 and int(a[(5 << 20) + 8]) == 4 and int(a[M - 1]) == 6 and int(a[3 << 20]) == 8
lib.gw_wp_remove(slot)
a[9] = 9
print(lib.gw_wp_backend(), lib.gw_wp_faults() - f0)
"""


@pytest.mark.parametrize("uffd", ["1", "0"])
def test_protect_granules(uffd):
    """Granule mode of both backends, each in a process of its own: the first store of a protect
    cycle unprotects and marks only its granule; gw_wp_take returns the written granules,
    protected again (the next store there is caught); a second store elsewhere in one cycle
    unprotects the whole region (take: -1, push whole); bad granules are refused."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", _GRANULE_SCRIPT, uffd], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    backend, faults = p.stdout.split()
    assert faults == "5"
    if uffd == "0":
        assert backend == "0"


def test_protect_granules_push_the_written_granule(ps):
    """A 16 MiB protect region (2 MiB granules): one host store pushes its granule only, two far
    apart push the region whole, and the kernel always sees the host's bytes."""
    f = ps.load_module(PK.PTX).function("pin_sum")
    n = 4 << 20                                    # 16 MiB of float32
    x, total = f32(ps, n), f32(ps, 1)
    R = pinned.region(ps, x)
    assert R.track == "protect" and R.wpgran == 2 << 20
    x[:] = 1
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    check(total, np.array([n], F32))
    st0 = pinned.stats(ps)
    ps.launch(f, 1, 256, (addr(x), addr(total), n))        # unchanged: nothing pushed
    ps.synchronize()
    st1 = pinned.stats(ps)
    assert st1["push_bytes"] == st0["push_bytes"]
    x[3_000_000] = 5                                        # byte 12e6: granule 5
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    st2 = pinned.stats(ps)
    assert st2["push_bytes"] - st1["push_bytes"] == 2 << 20
    assert st2.get("granule_pushes", 0) == st1.get("granule_pushes", 0) + 1
    check(total, np.array([n + 4], F32))
    x[0] = 2                                                # two granules in one cycle: whole
    x[n - 1] = 3
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    st3 = pinned.stats(ps)
    assert st3["push_bytes"] - st2["push_bytes"] == 4 * n
    check(total, np.array([n + 4 + 1 + 2], F32))
    x[1_000_000] = 0                                        # back to one granule a cycle
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    assert pinned.stats(ps)["push_bytes"] - st3["push_bytes"] == 2 << 20
    check(total, np.array([n + 4 + 1 + 2 - 1], F32))


def test_auto_picks_protect_for_large_host_alloc_regions(server):
    """'auto': host_alloc regions of pinned_protect_min or more use 'protect' where its
    userfaultfd backend works (else 'written', or 'compare' where the kernel cannot), smaller
    ones 'written' / 'compare'; pinned_protect_min=0 turns it off; registered memory never."""
    backend = pinned._c()[1].gw_wp_backend()
    with settings.override(pinned_track="auto", pinned_protect_min=8 << 20):
        s = server.connect(name="auto-protect")
        try:
            big, mid = f32(s, 2 << 20), f32(s, 1 << 20)        # 8 MiB, 4 MiB
            want = "protect" if backend == 1 else ("written" if pinned.written_support()[0] else "compare")
            assert pinned.region(s, big).track == want
            assert pinned.region(s, mid).track in ("written", "compare") and pinned.region(s, mid).track != "protect"
            a = np.zeros(2 << 20, np.float32)
            s.cuMemHostRegister(a, a.nbytes, 0)
            assert pinned.region(s, a).track != "protect"
            with settings.override(pinned_protect_min=0):
                assert pinned.set_tracking(s, big, "auto").track != "protect"
            assert pinned.set_tracking(s, big, "auto").track == want
            s.cuMemHostUnregister(a)
        finally:
            s.close()


def test_protect_region_written_every_launch_goes_hot(ps):
    """A protect region the host rewrites before every launch: after two whole pushes in a row it
    is left unprotected (no more faults) and pushed whole for a while, then protected again; the
    kernel sees the host's bytes throughout, and unchanged launches after that push nothing."""
    f = ps.load_module(PK.PTX).function("pin_sum")
    n = 1 << 18                                              # 1 MiB
    x, total = f32(ps, n), f32(ps, 1)
    lib = pinned._c()[1]
    R = pinned.region(ps, x)
    faults = []
    for i in range(8):
        f0 = lib.gw_wp_faults()
        x[:] = i + 1                                         # the whole region, every launch
        faults.append(lib.gw_wp_faults() - f0)
        ps.launch(f, 1, 256, (addr(x), addr(total), n))
        ps.synchronize()
        check(total, np.array([n * (i + 1)], F32))
    assert faults[1] == 1 and faults[2] == 1                # protected: one fault per cycle
    assert faults[3:7] == [0, 0, 0, 0]                      # hot for 4 launches: no faults
    assert faults[7] == 1 and R.hot == 8                    # protected again, caught, hot for 8
    for _ in range(R.hot):                                  # the host stops writing: pushed whole
        ps.launch(f, 1, 256, (addr(x), addr(total), n))     # until the period ends, protected then
        ps.synchronize()
    assert not R.hot
    b0 = pinned.stats(ps)["push_bytes"]
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    assert pinned.stats(ps)["push_bytes"] == b0              # unchanged: nothing pushed
    f0 = lib.gw_wp_faults()
    x[5] = 0                                                # caught again
    assert lib.gw_wp_faults() == f0 + 1
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    check(total, np.array([n * 8 - 8], F32))


def test_set_tracking_between_protect_and_written(ps):
    """Switching a region between the two userfaultfd modes (a range is registered with one at a
    time) keeps every host write: bytes stored before a switch reach the kernel after it."""
    if not pinned.written_support()[0]:
        pytest.skip("no 'written' tracking on this kernel")
    f = ps.load_module(PK.PTX).function("pin_sum")
    n = 4 << 20
    x, total = f32(ps, n), f32(ps, 1)
    x[:] = 1
    ps.launch(f, 1, 256, (addr(x), addr(total), n))
    ps.synchronize()
    for mode, val in (("written", 2), ("protect", 3), ("written", 4), ("compare", 5), ("protect", 6)):
        x[n // 2] = val                         # stored under the old mode, not pushed yet
        assert pinned.set_tracking(ps, x, mode).track == mode
        ps.launch(f, 1, 256, (addr(x), addr(total), n))
        ps.synchronize()
        check(total, np.array([n - 1 + val], F32))
        x[7] = 1                                # a store under the new mode is seen too
        ps.launch(f, 1, 256, (addr(x), addr(total), n))
        ps.synchronize()
        check(total, np.array([n - 1 + val], F32))


def test_protect_needs_a_host_alloc_region(ps):
    a = np.zeros(4096, np.uint8)
    ps.cuMemHostRegister(a, a.nbytes, 0)
    assert pinned.region(ps, a).track == "compare"          # the setting falls back
    with pytest.raises(ValueError, match="needs a host_alloc region"):
        pinned.set_tracking(ps, a, "protect")
    ps.cuMemHostUnregister(a)
