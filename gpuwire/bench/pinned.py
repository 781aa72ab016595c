"""`gpuwire bench pinned`: pinned-buffer mirroring (docs/pinned.md) against its targets.

Tests (``--tests``, comma-separated):

* ``lookup``    the C registry with ``--regions`` (10,000) real pinned regions of one
                session: ns per interval lookup (C loop over random interior
                addresses), µs per uncached scan call (Python→C: find and rewrite the
                pointer slots of a 3-pointer kernel), and the extra issue cost of a
                launch on pinned pointers over the same launch on device pointers.
* ``mirror``    per size (``--sizes``, default 4K,1M,64M): a stream loop of ``--iters``
                iterations of "write a new input (every byte changes), pin_scale(in,
                out), synchronize" where
                the kernel's in/out are pinned regions mirrored by gpuwire, against the
                same program doing the copies itself (fill a registered host buffer,
                cuMemcpyHtoDAsync, launch on device buffers, cuMemcpyDtoHAsync, sync).
                Both programs allocate their buffers once per case (a warm-up, then
                ``--reps`` interleaved repetitions). Cases: the *plain* program (no
                annotation, no mark_dirty; the PTX scan finds `in` read-only) in the
                default configuration (``--modes default``), tracking modes always /
                compare (server-side detection off and on) / written / protect; explicit with mark_dirty and
                `in` annotated read-only by hand; always with the PTX scan off (what the
                earlier default did). Same run, same server; ratio = mirrored / explicit
                (median of iterations; means are in the rows too).
* ``detect``    the plain program with pin_scale loaded from a cubin (built with nvcc for
                the server's GPU; the CPU executor: a JSON kernel list): no PTX to scan, so
                `in` is pulled at every sync; server-side detection (gwMirrorPull) off vs
                on, against the explicit-copy program.
* ``pool``      (local) the compare mode's client passes: shadow copy and diff of an
                unchanged region on one thread, on the pool after an idle gap, armed.
* ``unchanged`` per size: ``--launches`` async launches of pin_touch(in, out) whose
                pinned input did not change (read-only annotated), one sync at the end
                (included in the time), vs the same launches on device pointers: extra
                µs per launch, per tracking mode.
* ``placement`` (GPU, local through cuda.bindings, no gpuwire) where a mirror should
                live: a kernel reading/writing a region in device memory (after an H2D
                copy from pinned staging, and a D2H copy back: what a mirror push/pull
                costs on the server) vs the same kernel on pinned host memory mapped
                for the device (the push would land there, no copy): once, and 10× on
                unchanged data.

Rows go to ``--json``/``--csv`` like the other benches.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from typing import Any, Dict, List

from . import _cli
from .report import (config_echo, human_size, parse_size, print_config, add_output_arguments, write_outputs,
                     check_outputs_writable, check_tls, int_arg, usage_error)
from .rpc import TLS_MAP, start_rpc_server, stop, tls_of

TARGETS = {"mirror_ratio": 1.10, "unchanged_extra_us": 1.0, "lookup_us": 1.0}


def _addr(a) -> int:
    return int(a.ctypes.data)


# ----------------------------------------------------------------------------- lookup

def bench_lookup(connect, args, ptx) -> List[Dict[str, Any]]:
    import numpy as np
    from gpuwire.rpc import pinned
    rows = []
    s = connect()
    try:
        m = None
        arrs = []
        t0 = time.perf_counter()
        for _ in range(args.regions):
            arrs.append(s.host_alloc(4096))
        made_s = time.perf_counter() - t0
        s.gwSync()
        m = pinned.manager(s)
        ffi, lib = m.ffi, m.lib
        rng = np.random.default_rng(1)
        pick = rng.integers(0, len(arrs), 4096)
        vals = np.array([_addr(arrs[i]) + int(o) for i, o in zip(pick, rng.integers(0, 4096, 4096))], np.uint64)
        iters = 200
        cv = ffi.cast("uint64_t *", vals.ctypes.data)
        lib.gw_pin_bench_find(m.reg, cv, len(vals), 10)
        t0 = time.perf_counter_ns()
        hits = lib.gw_pin_bench_find(m.reg, cv, len(vals), iters)
        ns = (time.perf_counter_ns() - t0) / (len(vals) * iters)
        assert hits == len(vals) * iters
        fi = pinned._Func("pin_add", [(0, 8), (8, 8), (16, 8), (24, 4)], None, m.version)
        import struct
        params = [struct.pack("<QQQi", int(vals[i]), int(vals[i + 1]), 12345, 7) for i in range(0, 2000, 2)]

        def rewrite_us(blobs):
            rw = m._rewrite
            t0 = time.perf_counter()
            for _ in range(20):
                for p in blobs:
                    rw(fi, p)
            return (time.perf_counter() - t0) / (20 * len(blobs)) * 1e6
        rewrite_us(params)
        us = statistics.median(rewrite_us(params) for _ in range(5))
        miss = [struct.pack("<QQQi", 1 << 40, 2 << 40, 3, 7)] * 1000
        us_miss = statistics.median(rewrite_us(miss) for _ in range(5))
        # the launch path itself: pin_add(x, y, out) on pinned pointers vs device pointers, both
        # issued async (the per-function rewrite cache hits after the first launch)
        mod = s.load_module(ptx)
        f = mod.function("pin_add")
        f.param_layout()
        st = s.stream()
        dbuf = s.alloc(3 * 4096)
        a0, a1, a2 = arrs[0], arrs[1], arrs[2]

        def issue(ptrs, reps=2000):
            t0 = time.perf_counter()
            for _ in range(reps):
                s.launch(f, 1, 32, ptrs + (32,), stream=st)
            t1 = time.perf_counter()
            st.synchronize()
            return (t1 - t0) / reps * 1e6
        pp = (_addr(a0), _addr(a1), _addr(a2))
        dp = (dbuf.ptr, dbuf.ptr + 4096, dbuf.ptr + 8192)
        pinned.annotate(f, readonly=(0, 1, 2))          # measure the lookup, not the pull of out
        for a in (a0, a1, a2):
            pinned.set_tracking(s, a, "explicit")      # ... nor pushes of unchanged bytes
        issue(pp, 200)
        issue(dp, 200)
        lp, ld = [], []
        for _ in range(5):
            ld.append(issue(dp))
            lp.append(issue(pp))
        launch_extra = statistics.median(lp) - statistics.median(ld)
        dbuf.free()
        rows.append({"bench": "pinned", "test": "lookup", "regions": lib.gw_pin_count(m.reg),
                     "c_lookup_ns": round(ns, 2), "c_lookups_per_launch_us": round(3 * ns / 1e3, 3),
                     "scan_call_us_2hits": round(us, 3), "scan_call_us_no_hit": round(us_miss, 3),
                     "launch_device_ptrs_us": round(statistics.median(ld), 3),
                     "launch_pinned_ptrs_us": round(statistics.median(lp), 3),
                     "launch_extra_us": round(launch_extra, 3), "create_s": round(made_s, 2),
                     "target_us": TARGETS["lookup_us"],
                     "met_c_lookup": 3 * ns / 1e3 <= TARGETS["lookup_us"],
                     "met_scan_call": us <= TARGETS["lookup_us"],
                     "met_launch_extra": launch_extra <= TARGETS["lookup_us"]})
        for a in arrs:
            s.free_host(a)
        s.gwSync()
    finally:
        s.close()
    return rows


# ----------------------------------------------------------------------------- mirror vs explicit copies

class _Explicit:
    """The program that moves its data itself: a registered host buffer pair, device buffers,
    cuMemcpyHtoDAsync + launch + cuMemcpyDtoHAsync + sync (allocated once, like a real program)."""

    def __init__(self, s, n):
        import numpy as np
        self.s, self.n = s, n
        self.hin, self.hout = s.pinned(4 * n).view(np.float32), s.pinned(4 * n).view(np.float32)
        self.din, self.dout = s.alloc(4 * n), s.alloc(4 * n)

    def loop(self, f, iters, src, st):
        import numpy as np
        s, n, hin, hout, din, dout = self.s, self.n, self.hin, self.hout, self.din, self.dout
        g = (n + 255) // 256
        ts = []
        for i in range(iters):
            t0 = time.perf_counter()
            np.add(src, np.float32(i), out=hin)      # every byte of the input changes
            s.cuMemcpyHtoDAsync(din, hin, 4 * n, st)
            s.launch(f, g, 256, (din.ptr, dout.ptr, 2.0, n), stream=st)
            s.cuMemcpyDtoHAsync(hout, dout, 4 * n, st)
            st.synchronize()
            ts.append(time.perf_counter() - t0)
        ok = hout[0] == 2 * (iters - 1) + 1 and hout[-1] == 2 * (src[-1] + iters - 1) + 1
        return ts, bool(ok)

    def free(self):
        self.din.free()
        self.dout.free()


class _Mirrored:
    """The same program on pinned regions passed to the kernel (allocated once): write a new
    input, launch on the host pointers, synchronize. ``mode`` None: the default tracking."""

    def __init__(self, s, n, mode):
        import numpy as np
        from gpuwire.rpc import pinned
        self.s, self.n, self.mode = s, n, mode
        self.hin, self.hout = s.host_alloc(4 * n).view(np.float32), s.host_alloc(4 * n).view(np.float32)
        if mode is not None:
            pinned.set_tracking(s, self.hin, mode)
            pinned.set_tracking(s, self.hout, mode)
        self.R = pinned.region(s, self.hin)

    def loop(self, f, iters, src, st):
        import numpy as np
        s, n, hin, hout, R = self.s, self.n, self.hin, self.hout, self.R
        g = (n + 255) // 256
        ai, ao = _addr(hin), _addr(hout)
        explicit = self.mode == "explicit"
        ts = []
        for i in range(iters):
            t0 = time.perf_counter()
            np.add(src, np.float32(i), out=hin)      # every byte of the input changes
            if explicit:
                R.mark_dirty()           # what the explicit mode needs (the other modes find changes)
            s.launch(f, g, 256, (ai, ao, 2.0, n), stream=st)
            st.synchronize()
            ts.append(time.perf_counter() - t0)
        ok = hout[0] == 2 * (iters - 1) + 1 and hout[-1] == 2 * (src[-1] + iters - 1) + 1
        return ts, bool(ok)

    def free(self):
        self.s.free_host(self.hin)
        self.s.free_host(self.hout)


# (tracking mode (None: the default setting), `in` annotated readonly by hand, PTX read-only scan on,
# server-side pull detection on). "plain" rows: no annotation, no mark_dirty: what a program gets
# without telling gpuwire anything. The first row is the default configuration.
_MIRROR_CASES = ((None, False, True, True), ("always", False, True, True), ("compare", False, True, False),
                 ("compare", False, True, True), ("written", False, True, True), ("protect", False, True, True),
                 ("explicit", True, True, True), ("always", False, False, False))


def _mirror_cases(args):
    """(size, float32 count, iterations, input values) per --sizes entry of the mirror runs
    (fewer iterations for big sizes: about 2 GiB moved per case at most)."""
    import numpy as np
    for size in [parse_size(x) for x in args.sizes.split(",") if x]:
        n = size // 4
        iters = max(5, min(args.iters, (2 << 30) // max(size, 1) // 4))
        yield size, n, iters, (np.arange(n) % 1000).astype(np.float32)


def _interleaved(ex, mi, f, iters, src, st, reps):
    """The explicit-copy and the mirrored program in turn, reps times (drift hits both alike):
    (explicit times, mirrored times, both results right)."""
    te, tm, ok = [], [], True
    for _rep in range(reps):
        a, ok1 = ex.loop(f, iters, src, st)
        b, ok2 = mi.loop(f, iters, src, st)
        te += a
        tm += b
        ok = ok and ok1 and ok2
    return te, tm, ok


def _mirrored_run(s, ex, n, mode, f, iters, src, st, reps):
    """A fresh mirrored program (tracking ``mode``; None: the default) warmed up (first pushes,
    streaks), then timed against ``ex`` by :func:`_interleaved`: (explicit times, mirrored
    times, both results right, the pinned counters' change per timed iteration)."""
    from gpuwire.rpc import pinned
    mi = _Mirrored(s, n, mode)
    try:
        mi.loop(f, max(3, min(iters, 8)), src, st)
        before = pinned.stats(s)
        te, tm, ok = _interleaved(ex, mi, f, iters, src, st, reps)
        after = pinned.stats(s)
    finally:
        mi.free()
    k = reps * iters
    return te, tm, ok, {c: (after.get(c, 0) - before.get(c, 0)) // k for c in after}


def _written_note() -> str:
    from gpuwire.rpc import pinned
    ok, why = pinned.written_support()
    return "available" if ok else why


def bench_mirror(connect, args, ptx) -> List[Dict[str, Any]]:
    from gpuwire import settings
    from gpuwire.rpc import pinned
    rows = []
    default_mode = str(settings.get("pinned_track"))
    for size, n, iters, src in _mirror_cases(args):
        s = connect()
        try:
            mod = s.load_module(ptx)
            f = mod.function("pin_scale")
            st = s.stream()
            ex = _Explicit(s, n)
            ex.loop(f, 3, src, st)
            for mode, ro, ptx_ro, detect in _MIRROR_CASES:
                name = mode or "default"
                if args.modes and name not in args.modes.split(",") and (mode or default_mode) not in \
                        args.modes.split(","):
                    continue
                if mode == "written" and not pinned.written_support()[0]:
                    continue        # (this kernel cannot: the config rows say why)
                # the plain program: no annotation, `in` found read-only by the PTX scan (ptx_ro);
                # readonly=(0,) is the hand annotation; ptx_ro False: the PTX scan off
                f.param_layout()
                pinned.annotate(f, readonly=(0,) if ro else ())
                with settings.override(pinned_ptx_readonly=ptx_ro, pinned_pull_detect=detect):
                    te, tm, ok, per = _mirrored_run(s, ex, n, mode, f, iters, src, st, args.reps)
                me, mm = statistics.median(te), statistics.median(tm)
                k = args.reps * iters
                rows.append({"bench": "pinned", "test": "mirror", "size_bytes": size, "size": human_size(size),
                             "mode": name if mode else f"default ({default_mode})", "in_readonly": ro,
                             "ptx_readonly": ptx_ro, "pull_detect": detect,
                             "plain": not ro and ptx_ro and mode != "explicit", "iters": k,
                             "explicit_us": round(me * 1e6, 1), "mirrored_us": round(mm * 1e6, 1),
                             "ratio": round(mm / me, 3),
                             "explicit_mean_us": round(statistics.mean(te) * 1e6, 1),
                             "mirrored_mean_us": round(statistics.mean(tm) * 1e6, 1),
                             "push_bytes_per_iter": per["push_bytes"], "pull_bytes_per_iter": per["pull_bytes"],
                             "results_ok": ok, "target": TARGETS["mirror_ratio"],
                             "met": mm / me <= TARGETS["mirror_ratio"]})
            ex.free()
            st.destroy()
        finally:
            s.close()
    return rows


def bench_unchanged(connect, args, ptx) -> List[Dict[str, Any]]:
    import numpy as np
    from gpuwire import settings
    from gpuwire.rpc import pinned
    rows = []
    L = args.launches
    for size in [parse_size(x) for x in args.sizes.split(",") if x]:
        s = connect()
        try:
            mod = s.load_module(ptx)
            f = mod.function("pin_touch")
            f.param_layout()
            pinned.annotate(f, readonly=(0,))
            st = s.stream()
            din, dout = s.alloc(size), s.alloc(64)
            hin = s.host_alloc(size).view(np.float32)
            hin[:] = 1.5


            def run(ptr, reps=None):
                reps = reps or L
                t0 = time.perf_counter()
                for _ in range(reps):
                    s.launch(f, 1, 32, (ptr, dout.ptr), stream=st)
                st.synchronize()      # included: pushes in flight finish here
                return (time.perf_counter() - t0) / reps * 1e6
            default_mode = str(settings.get("pinned_track"))
            if default_mode == "auto":      # what 'auto' picks for a region of this size
                default_mode = pinned.auto_track(size)
                if default_mode == "written" and not pinned.written_support()[0]:
                    default_mode = "compare"
            for mode in ("explicit", "compare", "written", "protect", "always"):
                if args.modes and mode not in args.modes.split(",") and not (
                        mode == default_mode and "default" in args.modes.split(",")):
                    continue
                if mode == "written" and not pinned.written_support()[0]:
                    continue
                # compare diffs and 'always' pushes the whole region per launch: fewer launches for big
                # ones (the other modes cost the same at every size: all launches, steadier medians)
                L = args.launches if mode in ("explicit", "written", "protect") or size <= (64 << 10) else \
                    max(20, min(args.launches, (256 << 20) // size))
                pinned.set_tracking(s, hin, mode)
                run(_addr(hin), min(200, L))
                run(din.ptr, min(200, L))
                b0 = pinned.stats(s)["push_bytes"]
                base, mir = [], []
                for _ in range(5):
                    base.append(run(din.ptr))
                    mir.append(run(_addr(hin)))
                pushed = pinned.stats(s)["push_bytes"] - b0
                out = np.zeros(1, np.float32)
                s.copy_to_host(out, dout)
                extra = statistics.median(mir) - statistics.median(base)
                hook = _hook_extra_us(s, f, _addr(hin), din.ptr, dout.ptr, st,
                                      20000 if L == args.launches else max(20, min(2000, (64 << 20) // size)))
                rows.append({"bench": "pinned", "test": "unchanged", "size_bytes": size, "size": human_size(size),
                             "mode": mode, "launches": 5 * L, "device_ptr_us": round(statistics.median(base), 3),
                             "pinned_us": round(statistics.median(mir), 3), "extra_us": round(extra, 3),
                             "hook_extra_us": round(hook, 3),
                             "push_bytes": pushed, "result_ok": bool(out[0] == 1.5),
                             "target_us": TARGETS["unchanged_extra_us"],
                             "met": extra <= TARGETS["unchanged_extra_us"],
                             "met_hook": hook <= TARGETS["unchanged_extra_us"]})
            din.free()
            dout.free()
            s.free_host(hin)
        finally:
            s.close()
    return rows


def _hook_extra_us(s, f, pin_ptr: int, dev_ptr: int, out_ptr: int, st, n: int = 20000) -> float:
    """The client's own extra time per launch on a pinned pointer (nothing changed), without the
    wire and the GPU: the session's launch with the transport's launch call replaced by a no-op,
    pinned pointer vs device pointer, 5 interleaved rounds of n launches, difference of medians.
    (The end-to-end extra_us carries the network's and GPU's jitter, ±1-5 µs on the H100 hosts.)"""
    from gpuwire.rpc import pinned
    m = pinned.manager(s, create=False)
    if m is None:
        return float("nan")
    orig = m.orig["cuLaunchKernel"]
    m.orig["cuLaunchKernel"] = lambda *a, **k: 0
    try:
        def loop(ptr):
            t0 = time.perf_counter()
            for _ in range(n):
                s.launch(f, 1, 32, (ptr, out_ptr), stream=st)
            return (time.perf_counter() - t0) / n * 1e6
        loop(pin_ptr)
        loop(dev_ptr)
        a, b = [], []
        for _ in range(5):
            b.append(loop(dev_ptr))
            a.append(loop(pin_ptr))
        return statistics.median(a) - statistics.median(b)
    finally:
        m.orig["cuLaunchKernel"] = orig


# ----------------------------------------------------------------------------- detect (no PTX to scan)

def _no_scan_image(s) -> bytes:
    """pin_scale without a PTX text the client can scan: a cubin built here with nvcc for the
    server's GPU, or the CPU executor's JSON kernel list."""
    import json
    if s.info.get("executor") != "gpu":
        return json.dumps({"gpuwire_cpu_kernels": ["pin_scale"]}).encode()
    import shutil
    import subprocess
    import tempfile
    from gpuwire.rpc.kernels import pinned as PK
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found: the detect test builds a cubin")
    major, minor = s.cuDeviceGetAttribute(75, 0), s.cuDeviceGetAttribute(76, 0)
    with tempfile.TemporaryDirectory() as td:
        subprocess.run([nvcc, "-cubin", f"-arch=sm_{major}{minor}", "-o", f"{td}/k.cubin", str(PK.SOURCE)],
                       check=True, capture_output=True, timeout=300)
        with open(f"{td}/k.cubin", "rb") as fh:
            return fh.read()


def bench_detect(connect, args, ptx) -> List[Dict[str, Any]]:
    """The plain program with a kernel loaded from a cubin (nothing to scan: `in` counts as
    written and is pulled at every sync): server-side detection off vs on (the default), vs
    the explicit-copy program, in the same run."""
    from gpuwire import settings
    rows = []
    for size, n, iters, src in _mirror_cases(args):
        s = connect()
        try:
            f = s.load_module(_no_scan_image(s)).function("pin_scale")
            st = s.stream()
            ex = _Explicit(s, n)
            ex.loop(f, 3, src, st)
            for detect in (False, True):
                with settings.override(pinned_pull_detect=detect):
                    te, tm, ok, per = _mirrored_run(s, ex, n, None, f, iters, src, st, args.reps)
                me, mm = statistics.median(te), statistics.median(tm)
                k = args.reps * iters
                rows.append({"bench": "pinned", "test": "detect", "size_bytes": size, "size": human_size(size),
                             "image": "cubin" if s.info.get("executor") == "gpu" else "json (cpu executor)",
                             "pull_detect": detect, "iters": k, "explicit_us": round(me * 1e6, 1),
                             "mirrored_us": round(mm * 1e6, 1), "ratio": round(mm / me, 3),
                             "push_bytes_per_iter": per["push_bytes"], "pull_bytes_per_iter": per["pull_bytes"],
                             "pull_bytes_saved_per_iter": per.get("pull_bytes_saved", 0),
                             "results_ok": ok, "target": TARGETS["mirror_ratio"],
                             "met": mm / me <= TARGETS["mirror_ratio"]})
            ex.free()
            st.destroy()
        finally:
            s.close()
    return rows


# ----------------------------------------------------------------------------- pool (client memory passes)

def bench_pool(args) -> List[Dict[str, Any]]:
    """The client-side passes of 'compare' on this machine: the shadow copy after a pull and the
    diff of an unchanged region before a push, on the calling thread alone, on the pool with
    workers asleep (a job after an idle gap), and on the pool armed (gw_pin_arm) or spinning."""
    from gpuwire.rpc import pinned
    from gpuwire import settings
    ffi, lib = pinned._c()
    rows = []
    threads = max(1, int(settings.get("pinned_threads")))
    gap_s = 0.0005                      # idle time before each job (a sync round trip, the user's code)
    for size in [parse_size(x) for x in args.sizes.split(",") if x]:
        a = pinned._shadow(size)
        b = pinned._shadow(size)
        a[:] = 1
        b[:] = 1
        pa, pb = ffi.cast("uint8_t *", a.ctypes.data), ffi.cast("uint8_t *", b.ctypes.data)
        lo, hi = ffi.new("size_t *"), ffi.new("size_t *")
        reps = max(5, min(200, (512 << 20) // size))

        def timed(fn, arm_ns=0):
            out = []
            for _ in range(reps):
                if arm_ns:
                    lib.gw_pin_arm(arm_ns)
                time.sleep(gap_s)
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return statistics.median(out) * 1e6

        def copy():
            lib.gw_pin_copy_mt(pa, pb, size)

        def diff():
            lib.gw_pin_span_mt(pa, pb, size, lo, hi)
        row = {"bench": "pinned", "test": "pool", "size_bytes": size, "size": human_size(size), "threads": threads,
               "gap_us": gap_s * 1e6}
        for name, nth, spin, arm in (("one_thread", 1, 0, 0), ("pool_asleep", threads, 0, 0),
                                     ("pool_armed", threads, 1000, 2_000_000)):
            lib.gw_pin_threads(nth)
            lib.gw_pin_spin(spin * 1000)
            copy()
            diff()
            row[f"copy_us_{name}"] = round(timed(copy, arm), 1)
            row[f"diff_us_{name}"] = round(timed(diff, arm), 1)
        rows.append(row)
    pinned._threads = pinned._spin = None        # the next session sets the pool up again
    return rows


# ----------------------------------------------------------------------------- placement (GPU, local)

def bench_placement(args, ptx) -> List[Dict[str, Any]]:
    import numpy as np
    from cuda.bindings import driver as d

    from .rpc import _ck as ck, primary_module
    dev, mod = primary_module(d, ptx)
    f = ck(d.cuModuleGetFunction(mod, b"pin_scale"))
    st = ck(d.cuStreamCreate(1))
    e0, e1 = ck(d.cuEventCreate(0)), ck(d.cuEventCreate(0))
    rows = []
    for size in [parse_size(x) for x in args.sizes.split(",") if x]:
        n = size // 4
        g = (n + 255) // 256
        stage_in = int(ck(d.cuMemHostAlloc(size, 0)))
        stage_out = int(ck(d.cuMemHostAlloc(size, 0)))
        mapped_in = int(ck(d.cuMemHostAlloc(size, 2)))     # DEVICEMAP
        mapped_out = int(ck(d.cuMemHostAlloc(size, 2)))
        dm_in = int(ck(d.cuMemHostGetDevicePointer(mapped_in, 0)))
        dm_out = int(ck(d.cuMemHostGetDevicePointer(mapped_out, 0)))
        din, dout = int(ck(d.cuMemAlloc(size))), int(ck(d.cuMemAlloc(size)))
        keep = []

        def launch(pin, pout):
            vals = [np.array([pin], np.uint64), np.array([pout], np.uint64), np.array([2.0], np.float32),
                    np.array([n], np.int32)]
            ptrs = np.array([v.ctypes.data for v in vals], np.uint64)
            keep.append((vals, ptrs))
            ck(d.cuLaunchKernel(f, g, 1, 1, 256, 1, 1, 0, st, ptrs.ctypes.data, 0))

        def timed(fn, reps=5):
            fn()
            ck(d.cuStreamSynchronize(st))
            out = []
            for _ in range(reps):
                ck(d.cuEventRecord(e0, st))
                fn()
                ck(d.cuEventRecord(e1, st))
                ck(d.cuEventSynchronize(e1))
                out.append(ck(d.cuEventElapsedTime(e0, e1)) * 1e3)
            keep.clear()
            return statistics.median(out)

        def dev_once():
            ck(d.cuMemcpyHtoDAsync(din, stage_in, size, st))
            launch(din, dout)
            ck(d.cuMemcpyDtoHAsync(stage_out, dout, size, st))

        def dev_10():
            ck(d.cuMemcpyHtoDAsync(din, stage_in, size, st))
            for _ in range(10):
                launch(din, dout)
            ck(d.cuMemcpyDtoHAsync(stage_out, dout, size, st))
        a1, a10 = timed(dev_once), timed(dev_10)
        b1, b10 = timed(lambda: launch(dm_in, dm_out)), timed(lambda: [launch(dm_in, dm_out) for _ in range(10)])
        k_dev = timed(lambda: launch(din, dout))
        rows.append({"bench": "pinned", "test": "placement", "size_bytes": size, "size": human_size(size),
                     "device_mirror_once_us": round(a1, 1), "mapped_pinned_once_us": round(b1, 1),
                     "device_mirror_10x_us": round(a10, 1), "mapped_pinned_10x_us": round(b10, 1),
                     "kernel_on_device_mem_us": round(k_dev, 1)})
        for p in (stage_in, stage_out, mapped_in, mapped_out):
            d.cuMemFreeHost(p)
        d.cuMemFree(din)
        d.cuMemFree(dout)
    d.cuStreamDestroy(st)
    d.cuModuleUnload(mod)
    d.cuDevicePrimaryCtxRelease(dev)
    return rows


# ----------------------------------------------------------------------------- driver

TESTS = ("lookup", "mirror", "unchanged", "detect", "pool", "placement")
MODES = ("default", "explicit", "compare", "written", "protect", "always")


def _check_args(args, tests: List[str]) -> None:
    """--tests, --modes and --sizes checked before anything runs (one-line errors)."""
    bad = [x for x in tests if x not in TESTS]
    if bad or not tests:
        usage_error((f"--tests: unknown test {bad[0]!r}" if bad else f"--tests {args.tests!r}: no test named")
                    + f"; choose from {', '.join(TESTS)}")
    bad = [x for x in args.modes.split(",") if x and x not in MODES]
    if bad:
        usage_error(f"--modes: unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    sizes = [x for x in args.sizes.split(",") if x.strip()]
    if not sizes:
        usage_error(f"--sizes {args.sizes!r}: no sizes")
    for x in sizes:
        try:
            v = parse_size(x)
        except ValueError as e:
            usage_error(f"--sizes: {e}")
        if v <= 0:
            usage_error(f"--sizes: size must be > 0, got {x!r}")
    check_outputs_writable(args)


def run(args: argparse.Namespace) -> int:
    import gpuwire
    from gpuwire import settings
    import gpuwire.rpc.client  # noqa: F401 - registers the rpc settings
    from gpuwire.rpc.kernels import pinned as PK
    check_tls(args.tls, TLS_MAP)
    tls = tls_of(args.tls)
    tests = [x for x in args.tests.split(",") if x]
    _check_args(args, tests)
    ptx = PK.PTX.read_bytes()
    token = args.token or secrets.token_hex(16)
    cfg = config_echo({"bench": "pinned", "tls": tls, "executor": args.executor, "tests": tests,
                       "sizes": args.sizes, "server": args.server or "loopback (own process)",
                       "pinned_track_default": settings.get("pinned_track"),
                       "written_tracking": _written_note(),
                       "pinned_threads": settings.get("pinned_threads"),
                       "pinned_ptx_readonly": settings.get("pinned_ptx_readonly")})
    print_config(cfg)
    srv = None
    address = args.server
    if not address and any(x not in ("placement", "pool") for x in tests):
        try:
            srv, address = start_rpc_server(args.executor, tls, token,
                                            ["--cpu-kernels", "gpuwire.rpc.kernels.pinned"])
        except RuntimeError as e:
            usage_error(str(e))

    def connect():
        # the mirrors are what this bench measures: a same-host session would map host_alloc
        # memory instead (rpc_hostmap; `bench rpc --tests bw` measures that path)
        with settings.override(rpc_hostmap="off"):
            return gpuwire.connect(address, token=token, tls=tls, name="bench-pinned")
    rows: List[Dict[str, Any]] = []
    try:
        with settings.override(rpc_flush_us=args.flush_us):
            for test in tests:
                t0 = time.perf_counter()
                if test == "lookup":
                    new = bench_lookup(connect, args, ptx)
                elif test == "mirror":
                    new = bench_mirror(connect, args, ptx)
                elif test == "unchanged":
                    new = bench_unchanged(connect, args, ptx)
                elif test == "detect":
                    new = bench_detect(connect, args, ptx)
                elif test == "pool":
                    new = bench_pool(args)
                elif test == "placement":
                    try:
                        new = bench_placement(args, ptx)
                    except Exception as e:   # no GPU / no cuda.bindings here
                        new = [{"bench": "pinned", "test": "placement", "skipped": f"{type(e).__name__}: {e}"[:200]}]
                else:
                    usage_error(f"--tests: unknown test {test!r}")
                for r in new:
                    r["tls"] = args.tls
                    r["executor"] = args.executor if not args.server else "remote"
                    r["seconds"] = round(time.perf_counter() - t0, 2)
                    print("  ".join(f"{k}={v}" for k, v in r.items() if k != "bench"), flush=True)
                rows.extend(new)
    finally:
        stop(srv)
    write_outputs(args, rows, cfg)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("cpu", "gpu"), default="gpu", help="loopback server executor (default gpu)")
    p.add_argument("--tls", default="tcp", help="tcp (default), sm, or a UCX_TLS value")
    p.add_argument("--tests", default="lookup,mirror,unchanged,placement",
                   help="lookup, mirror, unchanged, detect, pool, placement (comma-separated)")
    p.add_argument("--server", help="HOST:PORT of a running `gpuwire serve --cpu-kernels gpuwire.rpc.kernels.pinned`")
    p.add_argument("--token", help="token of --server")
    p.add_argument("--sizes", default="4K,1M,64M", help="region sizes (mirror, unchanged, placement)")
    p.add_argument("--regions", type=int_arg(1), default=10000, help="lookup: registered regions")
    p.add_argument("--iters", type=int_arg(1), default=30, help="mirror: iterations per repetition (fewer for big sizes)")
    p.add_argument("--launches", type=int_arg(1), default=2000, help="unchanged: launches per timed run")
    p.add_argument("--reps", type=int_arg(1), default=3, help="mirror: interleaved repetitions of both programs")
    p.add_argument("--modes", default="", help="mirror/unchanged: only these tracking modes (comma-separated; "
                   "default all: always, compare, written, protect, explicit)")
    p.add_argument("--flush-us", type=float, default=200.0, help="rpc_flush_us of the bench sessions")
    add_output_arguments(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    return _cli.subcommand(subparsers, "pinned", "pinned-buffer mirroring: lookup, mirror vs explicit copies, "
                           "placement", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(_cli.main("pinned", add_arguments, run))
