"""The C pinned-region registry (cffi_src/gw_pinned.c, gpuwire._pinned) on its own:
interval lookup, overlap refusal, removal, the launch scan/rewrite and the compare-mode
diff, against a Python model on random data."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest

import gpuwire.transport  # noqa: F401 - loads libucp first (project rule for C modules)
from gpuwire.rpc import pinned

ffi, lib = pinned._c()


@pytest.fixture()
def reg():
    r = lib.gw_pin_new()
    yield r
    lib.gw_pin_destroy(r)


def _find(r, a, ends=1):
    off = ffi.new("uint64_t *")
    rid = lib.gw_pin_find(r, a, ends, off)
    return (rid, off[0]) if rid >= 0 else None


def test_lookup_matches_a_python_model(reg):
    rng = random.Random(7)
    model = {}
    cur = 1 << 20
    for rid in range(1, 2001):
        cur += rng.choice([0, 64, 4096, 12345])          # 0: adjacent regions
        n = rng.randrange(1, 1 << 16)
        assert lib.gw_pin_add(reg, cur, n, (1 << 40) + cur, rid) == 0
        model[rid] = (cur, n)
        cur += n
    assert lib.gw_pin_count(reg) == 2000
    starts = sorted(model.values())
    for _ in range(20000):
        a = rng.randrange(1 << 20, cur + 100)
        want = None
        for rid, (s, n) in model.items():
            if s <= a < s + n:
                want = (rid, a - s)
                break
        if want is None:      # one past the end counts, unless another region starts there
            for rid, (s, n) in model.items():
                if a == s + n:
                    want = (rid, n)
        assert _find(reg, a) == want, hex(a)
    assert starts


def test_overlaps_are_refused_and_remove_works(reg):
    assert lib.gw_pin_add(reg, 1000, 100, 0, 1) == 0
    for s, n in ((1000, 1), (999, 2), (1099, 10), (900, 1000), (1050, 10)):
        assert lib.gw_pin_add(reg, s, n, 0, 9) == -1
    assert lib.gw_pin_add(reg, 5, 0, 0, 9) == -1                 # empty
    assert lib.gw_pin_add(reg, (1 << 64) - 10, 20, 0, 9) == -1   # wraps
    assert lib.gw_pin_add(reg, 1100, 10, 0, 2) == 0              # adjacent is fine
    assert _find(reg, 1100) == (2, 0)                              # a start wins over an end
    assert _find(reg, 1099) == (1, 99)
    assert _find(reg, 1110) == (2, 10)
    assert _find(reg, 1110, ends=0) is None
    assert lib.gw_pin_covers(reg, 1000, 100) and not lib.gw_pin_covers(reg, 1000, 101)
    assert lib.gw_pin_remove(reg, 1000) == 0 and lib.gw_pin_remove(reg, 1000) == -1
    assert _find(reg, 1050) is None and lib.gw_pin_count(reg) == 1


def test_scan_rewrites_only_the_given_slots(reg):
    lib.gw_pin_add(reg, 0x10000, 0x1000, 0x900000, 4)
    params = bytearray(struct.pack("<QQQQ", 0x10010, 0x10000 + 0x1000, 0x10000, 0x20000))
    offs = ffi.new("uint32_t[]", [0, 8, 24])                    # slot at 16 is not scanned
    hits = ffi.new("gw_pin_hit_t[]", 1)
    buf = ffi.from_buffer("uint8_t[]", params)
    n = lib.gw_pin_rewrite(reg, buf, len(params), offs, 3, hits, 1)
    assert n == 2                                                 # more hits than room: count, no overflow
    hits = ffi.new("gw_pin_hit_t[]", 4)
    params = bytearray(struct.pack("<QQQQ", 0x10010, 0x10000 + 0x1000, 0x10000, 0x20000))
    buf = ffi.from_buffer("uint8_t[]", params)
    n = lib.gw_pin_rewrite(reg, buf, len(params), offs, 3, hits, 4)
    assert n == 2
    assert [(hits[i].slot, hits[i].id, hits[i].value) for i in range(n)] == [(0, 4, 0x900010), (1, 4, 0x901000)]
    assert struct.unpack("<QQQQ", params) == (0x900010, 0x901000, 0x10000, 0x20000)
    # offsets past the buffer are skipped, not read
    short = bytearray(12)
    assert lib.gw_pin_rewrite(reg, ffi.from_buffer("uint8_t[]", short), 12, ffi.new("uint32_t[]", [8]), 1, hits, 4) == 0


def test_diff_finds_the_changed_span():
    rng = np.random.default_rng(3)
    for n in (1, 100, 4096, 4097, 100000):
        live = rng.integers(0, 255, n, dtype=np.uint8)
        shadow = live.copy()
        lo, hi = ffi.new("size_t *"), ffi.new("size_t *")
        cs, cl = ffi.from_buffer("uint8_t[]", shadow), ffi.from_buffer("uint8_t[]", live)
        assert lib.gw_pin_diff(cs, cl, n, lo, hi) == 0
        for _ in range(5):
            i, j = sorted(rng.integers(0, n, 2))
            live[i] ^= 0xFF
            live[j] ^= 0x0F if j != i else 0
            assert lib.gw_pin_diff(cs, cl, n, lo, hi) == 1
            assert lo[0] <= i and hi[0] >= j + 1 and hi[0] <= n
            assert lo[0] % 4096 == 0
            np.testing.assert_array_equal(shadow, live)              # the shadow is refreshed


@pytest.mark.parametrize("threads,spin_us", [(1, 0), (3, 0), (4, 0), (3, 300), (4, 2000)])
def test_multithreaded_span_diff_and_copy_match_the_single_thread_diff(threads, spin_us):
    """gw_pin_span_mt / gw_pin_diff_mt / gw_pin_copy_mt (compare mode, regions >= 1 MiB) on a
    pool of `threads` give the same span and bytes as gw_pin_diff, with the workers sleeping
    between jobs or spinning (gw_pin_spin, and woken early by gw_pin_arm)."""
    rng = np.random.default_rng(threads)
    assert lib.gw_pin_threads(threads) == threads
    lib.gw_pin_spin(spin_us * 1000)
    if spin_us:
        lib.gw_pin_arm(spin_us * 1000)
    try:
        for n in (1 << 20, (5 << 20) + 12345):            # the pool works on 1 MiB and more
            live = rng.integers(0, 256, n, dtype=np.uint8)
            for changes in ([], [0], [n - 1], [5000, min(2 << 20, n - 100)], list(rng.integers(0, n, 9))):
                sh1, sh2 = live.copy(), live.copy()
                for c in changes:
                    sh1[c] ^= 0xFF
                    sh2[c] ^= 0xFF
                c1 = ffi.cast("uint8_t *", sh1.ctypes.data)
                c2 = ffi.cast("uint8_t *", sh2.ctypes.data)
                cl = ffi.cast("uint8_t *", live.ctypes.data)
                a, b = ffi.new("size_t[2]"), ffi.new("size_t[2]")
                span = lib.gw_pin_span_mt(c2, cl, n, b, b + 1)
                r1 = lib.gw_pin_diff(c1, cl, n, a, a + 1)
                r2 = lib.gw_pin_diff_mt(c2, cl, n, b, b + 1)
                assert (r1, a[0], a[1]) == (r2, b[0], b[1]) and span == r1, (changes, n)
                if changes:
                    assert a[0] <= min(changes) and a[1] > max(changes)
                assert (sh2 == live).all() and (sh1 == live).all()
            dst = np.zeros(n, np.uint8)
            lib.gw_pin_copy_mt(ffi.cast("uint8_t *", dst.ctypes.data), ffi.cast("uint8_t *", live.ctypes.data), n)
            assert (dst == live).all()
    finally:
        lib.gw_pin_spin(0)
        lib.gw_pin_threads(int(pinned.settings.get("pinned_threads")))
        pinned._threads = pinned._spin = None


def test_pool_shrinks_while_workers_spin():
    """Workers spinning (armed) leave when the pool shrinks; the smaller pool still works."""
    lib.gw_pin_threads(4)
    lib.gw_pin_spin(50_000_000)
    lib.gw_pin_arm(50_000_000)
    try:
        assert lib.gw_pin_threads(2) == 2
        n = 3 << 20
        a, b = np.arange(n, dtype=np.uint64).view(np.uint8)[:n].copy(), np.zeros(n, np.uint8)
        lib.gw_pin_copy_mt(ffi.cast("uint8_t *", b.ctypes.data), ffi.cast("uint8_t *", a.ctypes.data), n)
        assert (a == b).all()
    finally:
        lib.gw_pin_spin(0)
        lib.gw_pin_threads(int(pinned.settings.get("pinned_threads")))
        pinned._threads = pinned._spin = None


def test_pool_in_a_forked_child_does_not_hang():
    """A forked child has no pool threads: gw_pin_*_mt fall back to the calling thread."""
    import os
    import time
    lib.gw_pin_threads(4)
    n = 2 << 20
    a = np.arange(n, dtype=np.uint8)
    b = a.copy()
    b[n - 3] ^= 1
    pid = os.fork()
    if pid == 0:                                   # child: must finish, with the right span
        code = 1
        try:
            lh = ffi.new("size_t[2]")
            r = lib.gw_pin_diff_mt(ffi.cast("uint8_t *", b.ctypes.data), ffi.cast("uint8_t *", a.ctypes.data),
                                   n, lh, lh + 1)
            code = 0 if (r, lh[1]) == (1, n) and (a == b).all() else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("gw_pin_diff_mt hung in a forked child")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
