"""`gpuwire bench rpc`: the RPC layer against its targets, in one run.

Tests (``--tests``, comma-separated; default all that apply):

* ``rtt``      sync no-op call (gwSync) round trip vs the transport's 8 B round trip
               (``Endpoint.call`` against a C echo server), same transports, same run.
* ``issue``    cost of issuing a deferred call from Python: bursts that fit one batch
               are timed on the client (the batch is sent and run untimed), for the
               struct.pack_into stubs and the C encoder, the kinds interleaved over 9
               rounds (``X_us`` median, ``X_min_us`` fastest; ``*_int``: plain integer
               pointers and handles; ``ref_python``: the same steps in plain Python on
               a bare object, how fast the host ran Python meanwhile); ``sustained`` is
               the wall time per call of a long stream including sends and server
               back-pressure.
* ``launch``   a launch-heavy loop (thousands of tiny kernels, a stream sync every
               ``--sync-every``) forwarded async vs fully synchronously (every launch
               waits for the server), at each ``--rtt-us`` emulated round trip.
* ``bw``       cuMemcpyHtoD / cuMemcpyDtoH from pinned (UCX-registered) client memory
               vs ucx_perftest tag_bw at the same size and transports; ``*_issue_us``: the
               client's time per async copy to issue them. With ``--trace`` each size runs
               in a session of its own and its row gets ``srv_*`` columns from the server's
               trace: busy fraction and, from the C bulk handler, each phase's time per copy
               (receive post / wait, the driver's copy call, event record / waits, sends).
* ``mlp``      (GPU) a small MLP training loop as CUDA kernels from the same PTX: local
               through cuda.bindings vs remote through gpuwire. With ``--trace`` the
               loopback server records per-frame timestamps (GPUWIRE_RPC_TRACE_DIR) and
               each row gets ``boundary_split_us``: where the GPU's idle time between two
               steps goes (server, wire + client return, client issue), and each frame's
               arrival and issue time within a step.
* ``dispatch`` (GPU) local per-launch cost: cuda.bindings, cupy, gpuwire's C helper.

By default a loopback ``gpuwire serve`` process is started (``--executor cpu|gpu``);
``--server HOST:PORT --token T`` points at another. Rows go to ``--json``/``--csv``
like the transport bench. RTT emulation: the client's worker delays every message it
receives (setting ``emulate_rtt_us``), so each request/reply round trip grows by the
given amount; async frames have no reply and are not delayed.
"""
from __future__ import annotations

import argparse
import os
import secrets
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import _cli
from .report import (config_echo, human_size, print_config, size_range, add_output_arguments, write_outputs,
                     check_outputs_writable, check_tls, int_arg, usage_error, wait_ready_port)

TLS_MAP = {"tcp": "tcp,self", "sm": "tcp,sm,self", "shm": "tcp,sm,self"}
TESTS = ("rtt", "issue", "launch", "bw", "mlp", "dispatch")
PTX_CANDIDATES = [Path(__file__).resolve().parents[1] / "rpc" / "kernels" / "gw_test_kernels.ptx"]
TARGETS = {"rtt_ratio": 1.3, "issue_us": 1.0, "launch_speedup": 5.0, "bw_ratio": 0.95, "mlp_ratio": 1.10}


def find_ptx(path: Optional[str]) -> Path:
    if path:
        return Path(path)
    for p in PTX_CANDIDATES:
        if p.exists():
            return p
    raise SystemExit("gpuwire bench rpc: the packaged test kernels (gpuwire/rpc/kernels/gw_test_kernels.ptx) "
                     "are missing; pass --ptx FILE (build: nvcc -ptx -arch=compute_80 gw_test_kernels.cu)")


def tls_of(name: str) -> str:
    return TLS_MAP.get(name, name if "tcp" in name.split(",") else "tcp," + name)


# ----------------------------------------------------------------------------- servers

def start_rpc_server(executor: str, tls: str, token: str, extra: List[str] = (),
                     env: Optional[Dict[str, str]] = None, cpus=None) -> tuple:
    """A loopback ``gpuwire serve`` in its own process (on ``cpus`` when given: --pin)."""
    cmd = [sys.executable, "-m", "gpuwire.rpc.cli", "--executor", executor, "--listen", "127.0.0.1:0",
           "--token", token, "--tls", tls, "--ready-stdout", "--log-level", "warning"] + list(extra)
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pre)
    return p, f"127.0.0.1:{wait_ready_port(p, f'gpuwire serve --executor {executor}')}"


def stop(p) -> None:
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- tests

def bench_rtt(s, args, tls: str) -> List[Dict[str, Any]]:
    """gwSync's round trip against the transport's 8 B round trip, in alternating rounds
    (``--rtt-rounds``): each round times the RPC call, the fast stub's C call alone and the
    transport, so drift of the machine lands on both sides; the means are the medians of
    the rounds' means and the ratio the median of the rounds' ratios. Percentiles come from
    one pass with a timestamp per call on each side."""
    from statistics import median
    from .report import percentiles
    from time import perf_counter_ns as pc
    rows = []
    for _ in range(args.warmup):
        s.gwSync()
    ts = [0] * (args.iters + 1)
    ts[0] = pc()
    sync = s.gwSync
    for i in range(1, args.iters + 1):
        sync()
        ts[i] = pc()
    st = percentiles([ts[i] - ts[i - 1] for i in range(1, args.iters + 1)])
    # the transport's 8 B round trip against its C echo server, same transports
    from . import transport as tb
    pin = getattr(args, "pin_plan", None)
    srv, addr = tb._start_local_server(tls, 64, min(pin.server) if pin else None)
    try:
        cl = tb._Client(addr, tls)
        try:
            lat = cl.latency(8, args.warmup, args.iters)       # its percentiles
            rounds = max(1, int(getattr(args, "rtt_rounds", 7)))
            per = max(100, args.iters // rounds)
            m_rpc, m_raw, m_tr = [], [], []
            for _ in range(rounds):
                # an untimed pass per side (no timestamp per call), as the transport's mean
                t0 = pc()
                for _i in range(per):
                    sync()
                m_rpc.append((pc() - t0) / per / 1e3)
                raw = _fsync_raw_mean(s, per)
                if raw is not None:
                    m_raw.append(raw)
                m_tr.append(cl.latency(8, 200, per)["rtt_us"]["mean"])
        finally:
            cl.close()
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
    st["mean"] = median(m_rpc)
    lat["rtt_us"]["mean"] = median(m_tr)
    rows.append({"bench": "rpc", "test": "rtt", "what": "gwSync (sync no-op call)", "rtt_us": st,
                 "round_means_us": [round(x, 3) for x in m_rpc]})
    if m_raw:
        # the fast stub's C call alone in a Python loop (no session bookkeeping): what gwSync
        # costs above it is the Python wrapper, below the transport is server + frame
        rows.append({"bench": "rpc", "test": "rtt", "what": "gwSync's C call alone (gw_rpc_fsync_w in a loop)",
                     "rtt_us": {"mean": median(m_raw)}, "round_means_us": [round(x, 3) for x in m_raw]})
    rows.append({"bench": "rpc", "test": "rtt", "what": "transport 8 B round trip (Endpoint.call, C echo)",
                 "rtt_us": lat["rtt_us"], "round_means_us": [round(x, 3) for x in m_tr]})
    ratios = [a / b for a, b in zip(m_rpc, m_tr)]
    ratio = median(ratios)
    ratio50 = st["p50"] / lat["rtt_us"]["p50"]
    rows.append({"bench": "rpc", "test": "rtt", "what": "ratio rpc/transport (median of rounds)", "rtt_ratio": ratio,
                 "rtt_ratio_p50": ratio50, "round_ratios": [round(x, 3) for x in ratios],
                 "target": TARGETS["rtt_ratio"]})
    return rows


def _fsync_raw_mean(s, iters: int) -> Optional[float]:
    """Mean us of the fast sync stub's C call (gw_rpc_fsync_w: wire lock, frame, round trip,
    reply check) in a bare loop; None without it or when the session is not idle."""
    from time import perf_counter_ns as pc
    from gpuwire.rpc import client as C
    f = getattr(s, "_fs_gwSync", None)
    fs = C._fsync
    if f is None or fs is None:
        return None
    t0 = pc()
    for _ in range(iters):
        st = fs(f, 0)
        if st:
            if st != 2:
                C._rpc_lib.gw_rpc_wire_unlock(s._wire)
            return None
    return (pc() - t0) / iters / 1e3


_LOOPS: Dict[int, Any] = {}


def _call_loop(nargs: int):
    """``run(fn, n, *args)``: n calls ``fn(a0, a1, ...)`` written out, as a program makes
    them (``fn(*args)`` would add the argument tuple's unpacking to every call timed)."""
    run = _LOOPS.get(nargs)
    if run is None:
        names = ", ".join(f"a{i}" for i in range(nargs))
        ns: Dict[str, Any] = {}
        exec(f"def run(fn, n{', ' if names else ''}{names}):\n    for _ in range(n):\n        fn({names})\n", ns)
        run = _LOOPS[nargs] = ns["run"]
    return run


def _issue_burst(s, fn, args, burst: int, reps: int) -> float:
    """Client-side seconds per call (median of ``reps`` bursts): bursts that fit one batch
    (no send inside)."""
    run = _call_loop(len(args))
    best = []
    for _ in range(reps):
        s.gwSync()
        t0 = time.perf_counter()
        run(fn, burst, *args)
        dt = time.perf_counter() - t0
        best.append(dt / burst)
        s.gwSync()
    best.sort()
    return best[len(best) // 2]


class _RefSession:
    """The reference of the issue test: the state a deferred stub touches, on a bare object."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buf = bytearray(1 << 20)
        self._pos, self._lim, self._ncalls, self._fa = 16, 1 << 20, 0, 1 << 62


_REF_REC = struct.Struct("<HHIQIIQ")


def _ref_stub(S, dst, value, count, stream, _pack=_REF_REC.pack_into):
    """What a generated cuMemsetD32Async stub does per call (lock, one byte test, one
    pack_into, position and count, one count test), in plain Python: timed next to the real
    stubs, it shows how fast the host ran Python during the same bursts (a VM's vCPU can run
    at half speed for a while; session 16 saw a pure-Python loop flip between 0.45 and 0.95
    µs per call on the GPU box)."""
    _l = S._lock
    _l.acquire()
    try:
        p = S._pos
        if p + 32 > S._lim:
            p = S._pos = 16
        _pack(S._buf, p, 35, 0, 32, dst, value, count, stream)
        S._pos = p + 32
        k = S._ncalls = S._ncalls + 1
        if k >= S._fa:
            S._ncalls = 0
    finally:
        _l.release()


def bench_issue(connect, args, ptx: bytes) -> List[Dict[str, Any]]:
    """Client-side cost per deferred call: bursts of one call that fit one batch (no send
    inside), the kinds interleaved round by round (``rounds``); ``X_us`` is the median of
    the rounds, ``X_min_us`` the fastest. ``*_int_us``: plain integers for pointers and
    handles, as a remoting runtime forwards them (a DeviceBuffer or Stream costs its
    ``__index__``). ``ref_python_us``: the reference (:func:`_ref_stub`)."""
    from gpuwire import settings
    rows = []
    rounds = 9
    for enc in ("py", "c"):
        # one batch per burst (no ramp, no timer): the client's own cost; back-pressure from
        # the server shows in `sustained`
        with settings.override(rpc_c_encoder=(enc == "c"), rpc_flush_us=0, rpc_batch_calls=1 << 20,
                               rpc_batch_first=1 << 20, rpc_batch_bytes=900 << 10):
            try:
                s = connect()
            except ImportError as e:
                rows.append({"bench": "rpc", "test": "issue", "encoder": enc, "error": str(e)})
                continue
        try:
            d = s.alloc(1 << 16)
            st = s.stream()
            mod = s.load_module(ptx)
            fn = mod.function("noop")
            sx = mod.function("saxpy")
            s.gwSync()
            burst = min(args.burst, 12000)
            p28 = struct.pack("<f4xQQi", 1.0, d.ptr, d.ptr, 0)     # saxpy's parameters (n = 0)
            kinds = [("memsetD32Async", s.cuMemsetD32Async, (d, 7, 16, st)),
                     ("memsetD32Async_int", s.cuMemsetD32Async, (d.ptr, 7, 16, st.handle)),
                     ("launchKernel", s.cuLaunchKernel, (fn.handle, 1, 1, 1, 1, 1, 1, 0, st, b"")),
                     ("launchKernel_p28", s.cuLaunchKernel, (sx.handle, 1, 1, 1, 1, 1, 1, 0, st, p28)),
                     ("launchKernel_p28_int", s.cuLaunchKernel, (sx.handle, 1, 1, 1, 1, 1, 1, 0, st.handle, p28))]
            times: Dict[str, List[float]] = {k: [] for k, _f, _a in kinds}
            times["ref_python"] = []
            ref, run = _RefSession(), _call_loop(4)
            ref_call = _ref_stub.__get__(ref)
            for _ in range(rounds):
                for k, f, a in kinds:
                    times[k].append(_issue_burst(s, f, a, burst, 1))
                t0 = time.perf_counter()
                run(ref_call, burst, d.ptr, 7, 16, st.handle)
                times["ref_python"].append((time.perf_counter() - t0) / burst)
            row = {"bench": "rpc", "test": "issue", "encoder": enc, "burst": burst, "rounds": rounds}
            for k, v in times.items():
                v.sort()
                row[f"{k}_us"] = v[len(v) // 2] * 1e6
                row[f"{k}_min_us"] = v[0] * 1e6
            t0 = time.perf_counter()
            for _ in range(min(args.burst, 2000)):
                s.launch(fn, 1, 1, (), stream=st)
            row["launch_wrapper_us"] = (time.perf_counter() - t0) / min(args.burst, 2000) * 1e6
            s.gwSync()
            # sustained: many batches, sends and server included
            n = args.sustained
            t0 = time.perf_counter()
            f = s.cuMemsetD32Async
            for i in range(n):
                f(d, i, 16, st)
            s.gwSync()
            row["sustained_memsetD32Async_us"] = (time.perf_counter() - t0) / n * 1e6
            row["target_us"] = TARGETS["issue_us"]
            rows.append(row)
        finally:
            s.close()
    return rows


def bench_launch(connect, args, ptx: bytes) -> List[Dict[str, Any]]:
    import numpy as np
    rows = []
    rtts = [float(x) for x in args.rtt_us.split(",") if x.strip()]
    n = args.launches
    every = args.sync_every
    for rtt in rtts:
        s = connect()
        try:
            # the client's receives are held for rtt (the setting is a round trip, applied as
            # half on each receive; only this side receives a reply): each round trip +rtt.
            # The transport's wait does not wake for a held message, so spin through it.
            s._w.emulate_rtt_us = 2 * rtt
            if rtt:
                s._w.spin_us = max(s._w.spin_us, rtt + 2000)
            f = s.load_module(ptx).function("fill_f32")
            buf = s.alloc(256 * 4)
            st = s.stream()
            params = f.pack((buf, 1.0, 256))
            h = f.handle
            L = s.cuLaunchKernel
            sync = s.cuStreamSynchronize
            s.gwSync()
            # async: deferred launches, a stream sync every `every`
            t0 = time.perf_counter()
            for i in range(n):
                L(h, 1, 1, 1, 256, 1, 1, 0, st, params)
                if (i + 1) % every == 0:
                    sync(st)
            sync(st)
            t_async = time.perf_counter() - t0
            # fully synchronous: every launch waits for the server (one round trip each)
            m = max(every, n // 10 if rtt else n // 4)
            g = s.gwSync
            t0 = time.perf_counter()
            for i in range(m):
                L(h, 1, 1, 1, 256, 1, 1, 0, st, params)
                g()
            sync(st)
            t_sync = (time.perf_counter() - t0) / m * n
            out = s.copy_to_host(np.zeros(256, np.float32), buf)
            ok = bool((out == 1.0).all())
        finally:
            s.close()
        rows.append({"bench": "rpc", "test": "launch", "rtt_emulated_us": rtt, "launches": n, "sync_every": every,
                     "async_us_per_launch": t_async / n * 1e6, "sync_us_per_launch": t_sync / n * 1e6,
                     "speedup": t_sync / t_async, "correct": ok, "target": TARGETS["launch_speedup"]})
    return rows


def bench_bw(connect, args, tls: str) -> List[Dict[str, Any]]:
    """Copies from/to pinned (UCX-registered) client memory: ``async`` = cuMemcpy*Async on a
    stream with one stream sync at the end (how a program streams data; the target row),
    ``sync`` = cuMemcpyHtoD / cuMemcpyDtoH one at a time. ``htod_issue_us`` /
    ``dtoh_issue_us``: the client's wall time per async copy to issue them (before the sync).
    With ``--trace`` (loopback server with GPUWIRE_RPC_TRACE_DIR) each size runs in a session
    of its own, whose trace file (written when it ends) gives the ``srv_*`` columns
    (:func:`_bw_trace_cols`)."""
    from . import perftest
    from ..rpc import pinned as _pinned
    rows = []
    sizes = size_range(args.sizes)
    tdir = getattr(args, "trace_dir", None)
    # ucx_perftest placed like the client and server (with --pin): its server on the loopback
    # server's first CPU, its client on the client's (else both would inherit this process's
    # affinity, the client's CPUs only, and the baseline would share one core)
    pin = getattr(args, "pin_plan", None)
    pcpu = {"server_cpu": min(pin.server), "client_cpu": min(pin.main or pin.client)} if pin else {}

    def open_session(big):
        s = connect()
        # --host-mem: cuMemHostAlloc memory (mapped by the server on the same host, a mirrored
        # region otherwise) or a UCX-registered numpy buffer (payloads over the transport)
        mode = args.host_mem
        if mode == "auto":
            mode = "alloc" if s.hostmap else "registered"
        host = s.host_alloc(big) if mode == "alloc" else s.pinned(big)
        mem = {"host_mem": mode, "mapped": mode == "alloc" and _pinned.region(s, host).track == "mapped"}
        host[:] = 1
        dev = s.alloc(big)
        st = s.stream()
        s.gwSync()
        return s, host, dev, st, mem

    import statistics
    s = None
    try:
        if not tdir:     # one session for every size
            s, host, dev, st, mem = open_session(max(sizes))
        for size in sizes:
            if tdir:     # one session per size: its trace file holds this size's copies only
                s, host, dev, st, mem = open_session(size)
            n = max(4, min(args.bw_count, (2 << 30) // size))
            row = {"bench": "rpc", "test": "bw", "size_bytes": size, "count": n, "reps": args.bw_reps, **mem}
            samples: Dict[str, List[float]] = {}
            windows: Dict[str, List[tuple]] = {"htod": [], "dtoh": []}   # async timed loops (monotonic ns, copies)
            for _rep in range(args.bw_reps):      # interleaved with the baseline: the medians
                for mode in ("async", "sync"):
                    if mode == "async":
                        h2d = lambda: s.cuMemcpyHtoDAsync(dev, host, size, st)  # noqa: E731
                        d2h = lambda: s.cuMemcpyDtoHAsync(host, dev, size, st)  # noqa: E731
                    else:
                        h2d = lambda: s.cuMemcpyHtoD(dev, host, size)  # noqa: E731
                        d2h = lambda: s.cuMemcpyDtoH(host, dev, size)  # noqa: E731
                    for name, op in (("htod", h2d), ("dtoh", d2h)):
                        op()
                        st.synchronize()
                        m0 = time.monotonic_ns()
                        t0 = time.perf_counter()
                        for _ in range(n):
                            op()
                        t1 = time.perf_counter()
                        st.synchronize()
                        t2 = time.perf_counter()
                        m2 = time.monotonic_ns()
                        samples.setdefault(f"{name}_{mode}_MBps", []).append(size * n / (t2 - t0) / 1e6)
                        if mode == "async":   # the client's own bound: issuing a copy (us)
                            samples.setdefault(f"{name}_issue_us", []).append((t1 - t0) / n * 1e6)
                            windows[name].append((m0, m2, n))
                if not args.no_baseline:
                    try:
                        res = perftest.run_local("tag_bw", size, n, tls.replace("tcp,sm,self", "sm,self"),
                                                 warmup=2, window=args.window, **pcpu)
                        samples.setdefault("perftest_MBps", []).append(
                            res["bw_overall_MiBps"] * perftest.MIB_TO_MB)
                    except Exception as e:
                        row["perftest_error"] = " | ".join(str(e).split("\n"))[:600]
                    for w in [int(x) for x in str(args.extra_windows or "").split(",") if x.strip()]:
                        # like for like: ucx_perftest with as many messages in flight as the
                        # copy path keeps receives posted (the GPU server: 2)
                        try:
                            res = perftest.run_local("tag_bw", size, n, tls.replace("tcp,sm,self", "sm,self"),
                                                     warmup=2, window=w, **pcpu)
                            samples.setdefault(f"perftest_w{w}_MBps", []).append(
                                res["bw_overall_MiBps"] * perftest.MIB_TO_MB)
                        except Exception as e:
                            row[f"perftest_w{w}_error"] = str(e)[:300]
            for k, v in samples.items():
                row[k] = statistics.median(v)
            base = row.get("perftest_MBps")
            if base:
                row.update({"htod_ratio": row["htod_async_MBps"] / base, "dtoh_ratio": row["dtoh_async_MBps"] / base,
                            "htod_sync_ratio": row["htod_sync_MBps"] / base,
                            "dtoh_sync_ratio": row["dtoh_sync_MBps"] / base, "target": TARGETS["bw_ratio"]})
            if tdir:
                before = set(os.listdir(tdir))
                span = (windows["htod"][0][0], windows["dtoh"][-1][1])
                s.close()
                s = None
                # the file of this session: the one whose span holds the timed loops (another
                # session's, of an earlier test, may still be written meanwhile)
                doc = _new_trace(tdir, before, accept=lambda d: d.get("t_start", 1 << 63) <= span[0]
                                 and d.get("t_end", 0) >= span[1])
                row.update(_bw_trace_cols(doc, windows) if doc else {"srv_trace_error": "no server trace file"})
            rows.append(row)
    finally:
        if s is not None:
            s.close()
    return rows


# the C bulk handler's phases (gpuwire.rpc.executors._cfast.BULK_PHASES) in the bw rows, per
# copy of their direction; "other" (classify, scan, bookkeeping) per copy of either
BW_H2D_PHASES = ("prescan", "recv_post", "recv_wait", "htod_call", "evrec_h2d", "evwait_h2d", "inflight")
BW_D2H_PHASES = ("dtoh_call", "evrec_d2h", "evwait_d2h", "send_post", "send_wait")
BW_INCL_PHASES = ("prescan", "evwait_h2d", "evwait_d2h", "inflight")    # containers: also entry to exit


def _bw_trace_cols(doc: Dict[str, Any], windows: Dict[str, List[tuple]]) -> Dict[str, Any]:
    """The ``srv_*`` columns of a bw row from its session's trace file (us per copy):

    * ``srv_<dir>_busy_frac``: of the async timed loops of a direction (client clock, first
      copy issued .. stream sync returned), the fraction the server spent handling the
      loop's frames other than the sync frame (whose GPU wait is not server work);
      ``srv_<dir>_frame_us``: that time per copy; ``srv_<dir>_frames``: frames per copy.
      Time in the serve loop between frames (waiting for the next, progress it makes
      there) is idle time here.
    * from the C bulk handler's counters (``bulk`` in the file; absent if the session had
      none, e.g. rpc_c_bulk off): ``srv_h2d_copies`` / ``srv_d2h_copies`` it ran (all reps and
      warm-ups), ``srv_h2d_chunks`` per copy, ``srv_<phase>_us`` each phase's exclusive time
      per copy of its direction (BW_H2D_PHASES, BW_D2H_PHASES; ``srv_other_us`` per copy of
      either), and for the phases that contain others ``srv_<phase>_incl_us``."""
    out: Dict[str, Any] = {}
    fields = doc["fields"]
    frames = [dict(zip(fields, r)) for r in doc.get("frames", ())]
    if doc.get("frames_total", len(frames)) > len(frames):
        out["srv_trace_truncated"] = True     # (rpc_trace_frames: the earliest frames are gone)
    for name, wins in windows.items():
        busy = wall = nf = copies = 0
        for a, b, n in wins:
            wall += b - a
            copies += n
            for f in frames:
                if a <= f["t_in"] <= b and f["t_out"] and not f["flags"] & 1:
                    busy += min(f["t_out"], b) - f["t_in"]
                    nf += 1
        if wall and copies:
            out[f"srv_{name}_busy_frac"] = busy / wall
            out[f"srv_{name}_frame_us"] = busy / copies / 1e3
            out[f"srv_{name}_frames"] = nf / copies
    bs = doc.get("bulk")
    if not bs:
        out["srv_bulk"] = "absent"
        return out
    h, d = int(bs.get("h2d", 0)), int(bs.get("d2h", 0))
    out["srv_h2d_copies"], out["srv_d2h_copies"] = h, d
    if h:
        out["srv_h2d_chunks"] = bs.get("recv_post_n", 0) / h
    for phases, cnt in ((BW_H2D_PHASES, h), (BW_D2H_PHASES, d), (("other",), h + d)):
        if not cnt:
            continue
        for p in phases:
            out[f"srv_{p}_us"] = bs.get(f"{p}_ns", 0) / cnt / 1e3
            if p in BW_INCL_PHASES:
                out[f"srv_{p}_incl_us"] = bs.get(f"{p}_incl_ns", 0) / cnt / 1e3
    return out


# -- MLP (GPU): the same kernels, local through cuda.bindings vs remote through gpuwire

MLP_KERNELS = ("mlp_linear_fwd", "mlp_mse_grad", "mlp_relu_bwd", "mlp_linear_bwd_data", "mlp_linear_bwd_weight",
               "sgd_update")


def _mlp_plan(B: int, I: int, H: int, O: int):
    """One training step as (kernel, grid, args-with-buffer-names) in launch order."""
    g = lambda n: (n + 255) // 256  # noqa: E731
    lr = 0.01
    return [
        ("mlp_linear_fwd", g(B * H), ("x", "W1", "b1", "h", B, I, H, 1)),
        ("mlp_linear_fwd", g(B * O), ("h", "W2", "b2", "y", B, H, O, 0)),
        ("mlp_mse_grad", g(B * O), ("y", "t", "dy", "loss", B * O)),
        ("mlp_linear_bwd_weight", g(H * O + O), ("h", "dy", "dW2", "db2", B, H, O)),
        ("mlp_linear_bwd_data", g(B * H), ("dy", "W2", "dh", B, H, O)),
        ("mlp_relu_bwd", g(B * H), ("h", "dh", B * H)),
        ("mlp_linear_bwd_weight", g(I * H + H), ("x", "dh", "dW1", "db1", B, I, H)),
        ("sgd_update", g(I * H), ("W1", "dW1", lr, I * H)),
        ("sgd_update", g(H), ("b1", "db1", lr, H)),
        ("sgd_update", g(H * O), ("W2", "dW2", lr, H * O)),
        ("sgd_update", g(O), ("b2", "db2", lr, O)),
    ]


def _mlp_buffers(B, I, H, O):
    return {"x": B * I, "t": B * O, "W1": I * H, "b1": H, "W2": H * O, "b2": O, "h": B * H, "y": B * O,
            "dy": B * O, "dh": B * H, "dW1": I * H, "db1": H, "dW2": H * O, "db2": O, "loss": 1}


def _mlp_init(B, I, H, O):
    import numpy as np
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((B, I)).astype(np.float32), "t": rng.standard_normal((B, O)).astype(np.float32),
            "W1": (rng.standard_normal((I, H)) * 0.05).astype(np.float32), "b1": np.zeros(H, np.float32),
            "W2": (rng.standard_normal((H, O)) * 0.05).astype(np.float32), "b2": np.zeros(O, np.float32)}


def _ck(r):
    """A cuda.bindings result tuple: raise on an error code, else its value(s)."""
    if int(r[0]):
        raise RuntimeError(f"CUDA error {r[0]}")
    return r[1] if len(r) == 2 else r[1:]


def primary_module(d, ptx: bytes):
    """Device 0's primary context made current and ``ptx`` loaded into it (the local, no
    gpuwire, baselines): (the device, to release the context with, and the module)."""
    _ck(d.cuInit(0))
    dev = _ck(d.cuDeviceGet(0))
    _ck(d.cuCtxSetCurrent(_ck(d.cuDevicePrimaryCtxRetain(dev))))
    return dev, _ck(d.cuModuleLoadData(ptx))


def _timed_steps(step, n: int, losses: List[float]) -> float:
    """Seconds for ``n`` calls of ``step`` (a training step returning its loss); the losses
    are appended to ``losses`` after the clock stops."""
    t0 = time.perf_counter()
    out = [step() for _ in range(n)]
    dt = time.perf_counter() - t0
    losses.extend(out)
    return dt


class LocalMLP:
    """The MLP through cuda.bindings in a context of this process (the local baseline):
    ``timed(n)`` runs n steps and returns their seconds; ``extras()`` the per-step split,
    the GPU's idle gap between steps and the kernels' GPU time; ``close()`` destroys the
    context."""

    def __init__(self, ptx: bytes, B, I, H, O):
        import numpy as np
        from cuda.bindings import driver as d
        self.d = d
        _ck(d.cuInit(0))
        dev = _ck(d.cuDeviceGet(0))
        try:
            self.ctx = _ck(d.cuCtxCreate(None, 0, dev))
        except TypeError:
            self.ctx = _ck(d.cuCtxCreate(0, dev))
        try:
            mod = _ck(d.cuModuleLoadData(ptx))
            fns = {k: _ck(d.cuModuleGetFunction(mod, k.encode())) for k in MLP_KERNELS}
            layout = {}
            for k, f in fns.items():
                lay = []
                while True:
                    r = d.cuFuncGetParamInfo(f, len(lay))
                    if int(r[0]):
                        break
                    lay.append((int(r[1]), int(r[2])))
                layout[k] = lay
            self.bufs = bufs = {k: int(_ck(d.cuMemAlloc(4 * n))) for k, n in _mlp_buffers(B, I, H, O).items()}
            for k, v in _mlp_init(B, I, H, O).items():
                _ck(d.cuMemcpyHtoD(bufs[k], v, v.nbytes))
            self.st = _ck(d.cuStreamCreate(0))
            # (kernel, grid, kernelParams address): the addresses read once (numpy's .ctypes.data
            # costs ~1.4 us a call), so the baseline's Python does per step only what a local
            # runtime must; _keep holds the arrays they point into
            self.plan, self._keep = [], []
            for name, grid, args in _mlp_plan(B, I, H, O):
                vals = [bufs[a] if isinstance(a, str) else a for a in args]
                # kernelParams: an array of pointers to each argument value (what a local runtime does)
                storage = []
                for (off, size), v in zip(layout[name], vals):
                    if isinstance(v, float):
                        storage.append(np.array([v], np.float32))
                    elif size == 8:
                        storage.append(np.array([v], np.uint64))
                    else:
                        storage.append(np.array([v], np.int32))
                ptrs = np.array([a.ctypes.data for a in storage], np.uint64)
                self._keep.append((ptrs, storage))
                self.plan.append((fns[name], grid, int(ptrs.ctypes.data)))
            self.loss = np.zeros(1, np.float32)
            self.loss_ptr = int(self.loss.ctypes.data)
            self.losses: List[float] = []
        except BaseException:
            self.close()
            raise

    def timed(self, n: int) -> float:
        d, st, loss, plan, lp = self.d, self.st, self.loss, self.plan, self.loss_ptr
        lossbuf = self.bufs["loss"]

        def step():     # (locals only: the baseline pays no attribute lookups per call)
            _ck(d.cuMemsetD32Async(lossbuf, 0, 1, st))
            for f, grid, ptr in plan:
                _ck(d.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, 0, st, ptr, 0))
            _ck(d.cuMemcpyDtoHAsync(lp, lossbuf, 4, st))
            _ck(d.cuStreamSynchronize(st))
            return float(loss[0])
        return _timed_steps(step, n, self.losses)

    def extras(self, steps: int) -> Dict[str, Any]:
        d, st, bufs, plan, lp = self.d, self.st, self.bufs, self.plan, self.loss_ptr

        def parts():   # the same step with timestamps: issue (memset .. D2H) and the sync
            a = time.perf_counter_ns()
            _ck(d.cuMemsetD32Async(bufs["loss"], 0, 1, st))
            for f, grid, ptr in plan:
                _ck(d.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, 0, st, ptr, 0))
            _ck(d.cuMemcpyDtoHAsync(lp, bufs["loss"], 4, st))
            b = time.perf_counter_ns()
            _ck(d.cuStreamSynchronize(st))
            return b - a, time.perf_counter_ns() - b
        split = _median_parts([parts() for _ in range(max(10, steps // 2))])
        # the GPU's idle time between steps: an event before the memset and one after the D2H
        evs = [(_ck(d.cuEventCreate(0)), _ck(d.cuEventCreate(0))) for _ in range(_GAP_STEPS)]
        for ea, eb in evs:
            _ck(d.cuEventRecord(ea, st))
            _ck(d.cuMemsetD32Async(bufs["loss"], 0, 1, st))
            for f, grid, ptr in plan:
                _ck(d.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, 0, st, ptr, 0))
            _ck(d.cuMemcpyDtoHAsync(lp, bufs["loss"], 4, st))
            _ck(d.cuEventRecord(eb, st))
            _ck(d.cuStreamSynchronize(st))
        gap = _gap_stats([float(_ck(d.cuEventElapsedTime(evs[i - 1][1], evs[i][0]))) for i in range(1, len(evs))],
                         [float(_ck(d.cuEventElapsedTime(ea, eb))) for ea, eb in evs])
        # GPU time of a step's kernels (events around them), a few extra steps
        e0, e1 = _ck(d.cuEventCreate(0)), _ck(d.cuEventCreate(0))
        gms = []
        for _ in range(5):
            _ck(d.cuEventRecord(e0, st))
            for f, grid, ptr in plan:
                _ck(d.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, 0, st, ptr, 0))
            _ck(d.cuEventRecord(e1, st))
            _ck(d.cuEventSynchronize(e1))
            gms.append(float(_ck(d.cuEventElapsedTime(e0, e1))))
        return {"gpu_ms_per_step": sorted(gms)[2], "issue_us": split[0], "sync_us": split[1], **gap}

    def close(self) -> None:
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx is not None:
            self.d.cuCtxDestroy(ctx)


def interleave(local_timed, remote_timed, steps: int, block: int, warm: int = 0) -> Dict[str, Any]:
    """``steps`` steps of each loop in alternating blocks of ``block`` (the last one shorter;
    which loop goes first alternates too), so both see the same host conditions (on the GPU
    VMs a vCPU's speed moves by up to 2x within a second). ``*_timed(n)`` runs n steps and
    returns their seconds. Returns the summed seconds per loop and each block pair's ratio.

    ``warm``: each block starts with that many steps of its loop outside the block's time
    (timed on their own: ``*_warm_s``; the first of them, the first step after the other loop
    ran, in ``*_first_s``). A training loop runs its steps back to back; here each loop sat
    idle for a block of the other's, and its first step pays for that (session 9, GPU box:
    the remote loop's first step 0.3-0.5 ms, the second ~0.21, then 0.19)."""
    if steps < 1 or block < 1:
        raise ValueError(f"interleave: steps ({steps}) and block ({block}) must be >= 1")
    if warm < 0:
        raise ValueError(f"interleave: warm ({warm}) must be >= 0")
    acc = {"local_s": 0.0, "remote_s": 0.0, "local_warm_s": 0.0, "remote_warm_s": 0.0}
    first: Dict[str, List[float]] = {"local_first_s": [], "remote_first_s": []}
    ratios = []
    done, k = 0, 0

    def run(name, timed, n):
        if warm:
            f = timed(1)
            first[name + "_first_s"].append(f)
            acc[name + "_warm_s"] += f + (timed(warm - 1) if warm > 1 else 0.0)
        t = timed(n)
        acc[name + "_s"] += t
        return t
    while done < steps:
        n = min(block, steps - done)
        if k % 2 == 0:
            a = run("local", local_timed, n)
            b = run("remote", remote_timed, n)
        else:
            b = run("remote", remote_timed, n)
            a = run("local", local_timed, n)
        ratios.append(b / a if a > 0 else float("inf"))
        done += n
        k += 1
    return {**acc, **first, "block_ratios": ratios, "warm": warm}


_GAP_STEPS = 21


def _pcts(v, ps):
    v = sorted(v)
    return [v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] for p in ps] if v else []


def _median_us(secs: List[float]) -> Optional[float]:
    v = sorted(secs)
    return round(v[len(v) // 2] * 1e6, 1) if v else None


def _gap_stats(gaps_ms, busy_ms):
    """Medians (us) of the GPU's idle time from one step's last operation (the loss D2H) to
    the next step's first (the memset), and of a step's GPU span (memset .. D2H)."""
    g, b = sorted(gaps_ms), sorted(busy_ms)
    return {"gpu_gap_us": g[len(g) // 2] * 1e3, "gpu_span_us": b[len(b) // 2] * 1e3}


def _median_parts(samples):
    """Per-part medians (us) of (issue_ns, sync_ns[, frames]) samples."""
    out = []
    for i in range(len(samples[0])):
        v = sorted(x[i] for x in samples)
        out.append(v[len(v) // 2] / (1e3 if i < 2 else 1))
    return out


class RemoteMLP:
    """The same loop through a gpuwire session (``timed`` / ``extras`` as :class:`LocalMLP`)."""

    def __init__(self, s, ptx: bytes, B, I, H, O):
        import numpy as np
        self.s = s
        mod = s.load_module(ptx)
        fns = {k: mod.function(k) for k in MLP_KERNELS}
        self.bufs = bufs = {k: s.alloc(4 * n) for k, n in _mlp_buffers(B, I, H, O).items()}
        for k, v in _mlp_init(B, I, H, O).items():
            s.copy_to_device(bufs[k], v)
        self.st = s.stream()
        self.plan = [(fns[name].handle, grid, fns[name].pack([bufs[a] if isinstance(a, str) else a for a in args]))
                     for name, grid, args in _mlp_plan(B, I, H, O)]
        self.loss = np.zeros(1, np.float32)
        self.losses: List[float] = []

    def timed(self, n: int) -> float:
        s, st, plan, loss = self.s, self.st, self.plan, self.loss
        L = s.cuLaunchKernel
        lossbuf = self.bufs["loss"]

        def step():
            s.cuMemsetD32Async(lossbuf, 0, 1, st)
            for h, grid, params in plan:
                L(h, grid, 1, 1, 256, 1, 1, 0, st, params)
            s.cuMemcpyDtoHAsync(loss, lossbuf, 4, st)
            s.cuStreamSynchronize(st)
            return float(loss[0])
        return _timed_steps(step, n, self.losses)

    def extras(self, steps: int, trace: bool = False) -> Dict[str, Any]:
        s, st, plan, loss = self.s, self.st, self.plan, self.loss
        L = s.cuLaunchKernel
        lossbuf = self.bufs["loss"]
        split = _median_parts([_mlp_remote_parts(s, st, plan, loss, lossbuf) for _ in range(max(10, steps // 2))])
        evs = [(s.event(), s.event()) for _ in range(_GAP_STEPS)]
        for ea, eb in evs:
            ea.record(st)
            s.cuMemsetD32Async(lossbuf, 0, 1, st)
            for h, grid, params in plan:
                L(h, grid, 1, 1, 256, 1, 1, 0, st, params)
            s.cuMemcpyDtoHAsync(loss, lossbuf, 4, st)
            eb.record(st)
            s.cuStreamSynchronize(st)
        gap = _gap_stats([evs[i - 1][1].elapsed_ms(evs[i][0]) for i in range(1, len(evs))],
                         [ea.elapsed_ms(eb) for ea, eb in evs])
        e0, e1 = s.event(), s.event()
        gms = []
        for _ in range(5):
            e0.record(st)
            for h, grid, params in plan:
                L(h, grid, 1, 1, 256, 1, 1, 0, st, params)
            e1.record(st)
            e1.synchronize()
            gms.append(e0.elapsed_ms(e1))
        ctrace = _mlp_remote_trace(s, st, plan, loss, lossbuf, max(20, steps // 2)) if trace else None
        return {"gpu_ms_per_step": sorted(gms)[2], "issue_us": split[0], "sync_us": split[1],
                "frames_per_step": split[2], "client_trace": ctrace,
                "reply_tail_max": int(getattr(s, "_tail_max", 0)), **gap}


def _mlp_remote_trace(s, st, plan, loss, lossbuf, steps: int):
    """Steps with client timestamps on the server trace's clock (time.monotonic_ns =
    CLOCK_MONOTONIC): per step (frame seq at its start, start ns, [(ns, seq) after each
    call], ns when the sync call starts, ns when it returned)."""
    mono = time.monotonic_ns
    L = s.cuLaunchKernel
    out = []
    for _ in range(steps):
        seq0 = s._seq
        a = mono()
        s.cuMemsetD32Async(lossbuf, 0, 1, st)
        marks = [(mono(), s._seq)]
        for h, grid, params in plan:
            L(h, grid, 1, 1, 256, 1, 1, 0, st, params)
            marks.append((mono(), s._seq))
        s.cuMemcpyDtoHAsync(loss, lossbuf, 4, st)
        b = mono()
        marks.append((b, s._seq))
        s.cuStreamSynchronize(st)
        c = mono()
        float(loss[0])
        out.append((seq0, a, marks, b, c))
    return out


# where the GPU's idle time between two steps goes (us, medians), from the client's and the
# server's timestamps of the same frames: the chain from the server seeing the last step's
# work done (its wait for the loss copy returned) to the next step's first driver call
SPLIT_PARTS = (
    ("srv_reply", "server: wait returned -> reply and push handed to the transport"),
    ("reply_to_client", "server send + wire + client receive + client's sync-call return path (Python)"),
    ("client_loop", "client: sync returned -> next step's first call (the training loop's own Python)"),
    ("client_issue", "client: first calls of the step until the one that sent the first batch returned"),
    ("batch_to_server", "first batch: client call returned -> server handler entered (wire, server wake); "
                        "negative when the frame arrived before the client's send call returned"),
    ("srv_decode", "server: frame decoded and checked"),
    ("srv_first_call", "server: the first driver call (the step's memset) returned"),
    ("boundary", "sum: server wait returned -> next step's first driver call returned"),
)


def _trace_split(ctrace, doc, raw: bool = False) -> Dict[str, Any]:
    """Join the client's step timestamps with the server's frame trace by frame seq
    (medians; ``raw``: the per-step lists)."""
    fields = doc["fields"]
    fr = {}
    for row in doc["frames"]:
        r = dict(zip(fields, row))
        fr[r["seq"]] = r
    samples: Dict[str, List[float]] = {k: [] for k, _ in SPLIT_PARTS}
    extra: Dict[str, List[float]] = {"sync_frame_arrival": [], "srv_gpu_wait": [], "srv_frames_per_step": []}
    for j in range(len(ctrace) - 1):
        seq0, a, marks, b, c = ctrace[j]
        nseq0, na, nmarks, _nb, _nc = ctrace[j + 1]
        last, f1 = fr.get((nseq0 - 1) & 0xFFFFFFFF), fr.get(nseq0)
        if last is None or f1 is None or (last["flags"] & 3) != 1 or (f1["flags"] & 2):
            continue
        if not (last["t_waited"] and f1["t_first"]):
            continue
        flush = next((t for t, sq in nmarks if sq != nseq0), None)
        if flush is None:
            continue
        vals = {"srv_reply": last["t_out"] - last["t_waited"], "reply_to_client": c - last["t_out"],
                "client_loop": na - c, "client_issue": flush - na, "batch_to_server": f1["t_in"] - flush,
                "srv_decode": f1["t_scan"] - f1["t_in"], "srv_first_call": f1["t_first"] - f1["t_scan"],
                "boundary": f1["t_first"] - last["t_waited"]}
        for k, v in vals.items():
            samples[k].append(v / 1e3)
        extra["sync_frame_arrival"].append((last["t_in"] - b) / 1e3)
        extra["srv_gpu_wait"].append((last["t_waited"] - last["t_issued"]) / 1e3)
        extra["srv_frames_per_step"].append(float((nseq0 - seq0) & 0xFFFFFFFF))
        # step j's own timeline from its start (us): each frame received / its calls issued
        # (before any wait), the sync call made, the loss copy done; and the server-seen GPU
        # span (first driver call .. loss copy done; > the kernels' time = the GPU starved)
        own = [fr.get((seq0 + k) & 0xFFFFFFFF) for k in range((nseq0 - seq0) & 0xFFFFFFFF)]
        if own and all(x is not None and not x["flags"] & 2 for x in own) and own[0]["t_first"]:
            for k, x in enumerate(own, 1):
                extra.setdefault(f"at_f{k}_in", []).append((x["t_in"] - a) / 1e3)
                extra.setdefault(f"at_f{k}_issued", []).append((x["t_issued"] - a) / 1e3)
            extra.setdefault("at_sync_call", []).append((b - a) / 1e3)
            extra.setdefault("at_done", []).append((last["t_waited"] - a) / 1e3)
            extra.setdefault("srv_span", []).append((last["t_waited"] - own[0]["t_first"]) / 1e3)

    def med(v):
        v = sorted(v)
        return v[len(v) // 2] if v else None
    if raw:
        return {**samples, **extra}
    out = {k: med(v) for k, v in samples.items()}
    out.update({k: med(v) for k, v in extra.items()})
    out["steps_joined"] = len(samples["boundary"])
    out["ssync_skipped"] = doc.get("ssync_skipped")
    return out


def _new_trace(tdir: str, before: set, want_seq: Optional[int] = None,
               timeout: float = 10.0, accept=None) -> Optional[Dict[str, Any]]:
    """The trace file a session wrote when it ended: the first one not in ``before`` (that
    has a frame ``want_seq``, when given, and that ``accept(doc)`` takes: another session's
    file may appear meanwhile)."""
    import json
    end = time.monotonic() + timeout
    seen = set(before)
    while time.monotonic() < end:
        for f in sorted(f for f in os.listdir(tdir) if f.endswith(".json") and f not in seen):
            seen.add(f)
            with open(os.path.join(tdir, f)) as fh:
                doc = json.load(fh)
            if (want_seq is None or any(r[0] == want_seq for r in doc.get("frames", ()))) and (
                    accept is None or accept(doc)):
                return doc
        time.sleep(0.02)
    return None


def _mlp_remote_parts(s, st, plan, loss, lossbuf):
    """One remote step with timestamps: (issue ns: memset .. D2H, sync ns: the stream sync
    call, frames sent for the step). Frames are the session's frame sequence numbers: every
    flush and the sync round trip each take one; one of them per step waits for a reply."""
    L = s.cuLaunchKernel
    f0 = s._seq
    a = time.perf_counter_ns()
    s.cuMemsetD32Async(lossbuf, 0, 1, st)
    for h, grid, params in plan:
        L(h, grid, 1, 1, 256, 1, 1, 0, st, params)
    s.cuMemcpyDtoHAsync(loss, lossbuf, 4, st)
    b = time.perf_counter_ns()
    s.cuStreamSynchronize(st)
    c = time.perf_counter_ns()
    return b - a, c - b, (s._seq - f0) & 0xFFFFFFFF


def bench_mlp(connect, args, ptx: bytes) -> List[Dict[str, Any]]:
    """Per shape, ``--mlp-rounds`` rounds (a session each). In a round the local loop (a
    context of this process) and the remote loop are both set up and warmed, then run in
    alternating blocks of ``--mlp-block`` steps until each ran ``--mlp-steps``
    (:func:`interleave`): both see the same host conditions. Each block starts with
    ``--mlp-warm`` steps outside its time (the first step after the other loop's block pays
    for the idle: ``*_first_step_us``; ``ratio_incl_warm`` counts them in). A round's ratio
    is the remote loop's summed time over the local one's; ``ratio`` is the median of the
    rounds' ratios (``round_ratios``), the other columns are the last round's (one round
    with --trace)."""
    import statistics
    rows = []
    tdir = getattr(args, "trace_dir", None)
    rounds = 1 if tdir else max(1, int(getattr(args, "mlp_rounds", 1)))
    block = max(1, int(getattr(args, "mlp_block", 0) or args.mlp_steps))
    warm = max(0, int(getattr(args, "mlp_warm", 0) or 0))
    for shape in args.mlp_shapes.split(";"):
        B, I, H, O = (int(x) for x in shape.split(","))
        ratios, blocks_all, ratios_w, firsts = [], [], [], {"local_first_s": [], "remote_first_s": []}
        for _r in range(rounds):
            before = set(os.listdir(tdir)) if tdir else set()
            locr = LocalMLP(ptx, B, I, H, O)
            try:
                s = connect()
                try:
                    remr = RemoteMLP(s, ptx, B, I, H, O)
                    for r_ in (locr, remr):          # warm both, then the timed blocks
                        r_.timed(3)
                        r_.losses.clear()
                    iv = interleave(locr.timed, remr.timed, args.mlp_steps, block, warm)
                    loc = {"ms_per_step": iv["local_s"] / args.mlp_steps * 1e3,
                           "first_loss": locr.losses[0], "last_loss": locr.losses[-1], **locr.extras(args.mlp_steps)}
                    rem = {"ms_per_step": iv["remote_s"] / args.mlp_steps * 1e3,
                           "first_loss": remr.losses[0], "last_loss": remr.losses[-1],
                           **remr.extras(args.mlp_steps, trace=bool(tdir))}
                finally:
                    s.close()
            finally:
                locr.close()
            ratios.append(iv["remote_s"] / iv["local_s"])
            ratios_w.append((iv["remote_s"] + iv["remote_warm_s"]) / (iv["local_s"] + iv["local_warm_s"]))
            blocks_all.extend(iv["block_ratios"])
            for k_ in firsts:
                firsts[k_].extend(iv[k_])
        split = None
        if tdir:
            ct = rem["client_trace"]
            doc = _new_trace(tdir, before, ct[-1][0] if ct else None)
            split = _trace_split(ct, doc) if doc else {"error": "no server trace file"}
        rows.append({"bench": "rpc", "test": "mlp", "shape": f"B{B} I{I} H{H} O{O}", "steps": args.mlp_steps,
                     "launches_per_step": len(_mlp_plan(B, I, H, O)) + 2,
                     "local_ms_per_step": loc["ms_per_step"], "remote_ms_per_step": rem["ms_per_step"],
                     "ratio": statistics.median(ratios), "round_ratios": [round(r, 3) for r in ratios],
                     "block": block, "blocks": len(blocks_all), "warm": warm,
                     # with each block's warm-up steps counted in (what --mlp-warm 0 measures, with
                     # blocks of block + warm steps), and the first step after the other loop's block
                     "ratio_incl_warm": round(statistics.median(ratios_w), 4),
                     "local_first_step_us": _median_us(firsts["local_first_s"]),
                     "remote_first_step_us": _median_us(firsts["remote_first_s"]),
                     # spread of the block pairs' ratios over all rounds (host noise, per block)
                     "block_ratio_p10_p50_p90": [round(x, 3) for x in _pcts(blocks_all, (10, 50, 90))],
                     "local_gpu_ms_per_step": loc["gpu_ms_per_step"], "remote_gpu_ms_per_step": rem["gpu_ms_per_step"],
                     # an extra timestamped pass (medians, us): where a step's host time goes
                     "local_issue_us": loc["issue_us"], "local_sync_us": loc["sync_us"],
                     "remote_issue_us": rem["issue_us"], "remote_sync_us": rem["sync_us"],
                     "remote_frames_per_step": rem["frames_per_step"],
                     "reply_tail_max": rem["reply_tail_max"],     # loss read in the sync reply (>= 4)
                     # events (us): the GPU's idle time between steps and a step's GPU span
                     "local_gpu_gap_us": loc["gpu_gap_us"], "remote_gpu_gap_us": rem["gpu_gap_us"],
                     "local_gpu_span_us": loc["gpu_span_us"], "remote_gpu_span_us": rem["gpu_span_us"],
                     "local_loss": [loc["first_loss"], loc["last_loss"]],
                     "remote_loss": [rem["first_loss"], rem["last_loss"]],
                     # the losses' largest relative difference (float atomics: ~1e-5 on the big shape)
                     "loss_rel_diff": max(abs(a - b) / max(abs(a), 1e-30) for a, b in
                                          ((loc["first_loss"], rem["first_loss"]), (loc["last_loss"], rem["last_loss"]))),
                     "target": TARGETS["mlp_ratio"]})
        if split is not None:   # --trace: where the GPU's idle time between steps goes (us)
            rows[-1]["boundary_split_us"] = split
    return rows


def bench_dispatch(args, ptx: bytes) -> List[Dict[str, Any]]:
    """Local per-launch cost of a no-op kernel: cuda.bindings vs cupy vs gpuwire's C helper."""
    import numpy as np
    from cuda.bindings import driver as d
    rows = []
    n = args.dispatch_n

    dev, mod = primary_module(d, ptx)
    f = _ck(d.cuModuleGetFunction(mod, b"fill_f32"))
    buf = int(_ck(d.cuMemAlloc(1024)))
    st = _ck(d.cuStreamCreate(0))
    vals = [np.array([buf], np.uint64), np.array([1.0], np.float32), np.array([256], np.int32)]
    ptrs = np.array([v.ctypes.data for v in vals], np.uint64)

    def timeit(fn):
        for _ in range(200):
            fn()
        _ck(d.cuStreamSynchronize(st))
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        _ck(d.cuStreamSynchronize(st))
        return (t1 - t0) / n * 1e6
    p = ptrs.ctypes.data
    rows.append({"bench": "rpc", "test": "dispatch", "path": "cuda.bindings cuLaunchKernel",
                 "us_per_launch": timeit(lambda: d.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, st, p, 0))})
    try:
        from gpuwire.rpc.executors import _cfast
        fns = _cfast.driver_fns(d)
        la = _cfast.Launcher(fns[0])
        import struct
        packed = struct.pack("<Qfi", buf, 1.0, 256)
        fp, sp = int(f), int(st)
        rows.append({"bench": "rpc", "test": "dispatch", "path": "gpuwire C helper (gw_rpc_launch)",
                     "us_per_launch": timeit(lambda: la.launch(fp, 1, 1, 1, 256, 1, 1, 0, sp, packed, 16))})
    except Exception as e:
        rows.append({"bench": "rpc", "test": "dispatch", "path": "gpuwire C helper", "error": str(e)[:200]})
    try:
        import cupy as cp
        with cp.cuda.Device(0):
            mod2 = cp.cuda.function.Module()
            mod2.load(ptx)
            k = mod2.get_function("fill_f32")
            a = cp.zeros(256, cp.float32)
            s2 = cp.cuda.Stream(non_blocking=True)
            args2 = (a, np.float32(1.0), np.int32(256))
            with s2:
                for _ in range(200):
                    k((1,), (256,), args2)
                s2.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    k((1,), (256,), args2)
                t1 = time.perf_counter()
                s2.synchronize()
        rows.append({"bench": "rpc", "test": "dispatch", "path": "cupy Function.__call__",
                     "us_per_launch": (t1 - t0) / n * 1e6})
    except Exception as e:
        rows.append({"bench": "rpc", "test": "dispatch", "path": "cupy", "error": str(e)[:200]})
    d.cuMemFree(buf)
    d.cuDevicePrimaryCtxRelease(dev)
    return rows


# ----------------------------------------------------------------------------- driver

def _print(rows: List[Dict[str, Any]]) -> None:
    for r in rows:
        items = []
        for k, v in r.items():
            if k == "bench":
                continue
            if isinstance(v, float):
                v = f"{v:.3f}"
            elif isinstance(v, dict):
                v = "{" + ", ".join(f"{a}={b:.2f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()) + "}"
            items.append(f"{k}={v}")
        print("  ".join(items), flush=True)


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for r in rows:
        t = r.get("test")
        if t == "rtt" and "rtt_ratio" in r:
            out["rtt_ratio"] = r["rtt_ratio"]
        elif t == "issue" and r.get("encoder") == "py" and "launchKernel_us" in r:
            out["issue_us_py"] = r["launchKernel_us"]
            if "launchKernel_min_us" in r:
                out["issue_us_py_min"] = r["launchKernel_min_us"]
        elif t == "issue" and r.get("encoder") == "c" and "launchKernel_us" in r:
            out["issue_us_c"] = r["launchKernel_us"]
        elif t == "launch":
            out[f"launch_speedup_rtt{int(r['rtt_emulated_us'])}"] = r["speedup"]
        elif t == "bw" and "htod_ratio" in r:
            out[f"bw_{human_size(r['size_bytes'])}"] = (r["htod_ratio"], r["dtoh_ratio"])
        elif t == "mlp" and "ratio" in r:
            out[f"mlp_{r['shape']}"] = r["ratio"]
    return out


def run(args: argparse.Namespace) -> int:
    import gpuwire
    from gpuwire import settings
    import gpuwire.rpc.client  # noqa: F401 - registers the rpc settings
    check_tls(args.tls, TLS_MAP)
    tls = tls_of(args.tls)
    tests = [x for x in args.tests.split(",") if x]
    bad = [x for x in tests if x not in TESTS]
    if bad or not tests:
        usage_error((f"--tests: unknown test {bad[0]!r}" if bad else f"--tests {args.tests!r}: no test named")
                    + f"; choose from {', '.join(TESTS)}")
    if "bw" in tests:
        try:
            size_range(args.sizes, 1)
        except ValueError as e:
            usage_error(f"--sizes: {e}")
    check_outputs_writable(args)
    if getattr(args, "mlp_warm", 0) < 0:
        usage_error(f"--mlp-warm must be >= 0 (got {args.mlp_warm})")
    gpu_ok = args.executor == "gpu" or args.server
    ptx_path = find_ptx(args.ptx)
    ptx = ptx_path.read_bytes()
    token = args.token or secrets.token_hex(16)
    from . import _pin
    try:
        args.pin_plan = _pin.plan(None if args.server else args.pin)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    _pin.settle(args.pin_plan)      # this process: the client (and the local runs)
    cfg = config_echo({"bench": "rpc", "tls": tls, "executor": args.executor, "tests": tests,
                       "server": args.server or "loopback (own process)", "rtt_us": args.rtt_us,
                       "ptx": str(ptx_path), "pin": _pin.describe(args.pin_plan)})
    print_config(cfg)
    srv = None
    address = args.server
    args.trace_dir = None
    env = None
    if args.trace and not address:
        import tempfile
        args.trace_dir = tempfile.mkdtemp(prefix="gpuwire-trace-")
        env = dict(os.environ, GPUWIRE_RPC_TRACE_DIR=args.trace_dir)
    if not address:
        if args.pin_plan and args.pin_plan.session is not None:
            # like the client's calling thread: the server's session thread alone on a CPU of its
            # own, the worker's other threads on the other server CPUs (rpc_server_session_cpu)
            env = dict(env or os.environ, GPUWIRE_RPC_SERVER_SESSION_CPU=str(args.pin_plan.session))
            if args.pin_plan.spawn:   # spare workers start off the server's CPUs (each connect refills the pool)
                env["GPUWIRE_RPC_WORKER_SPAWN_CPUS"] = ",".join(map(str, sorted(args.pin_plan.spawn)))
        try:
            srv, address = start_rpc_server(args.executor, tls, token, ["--isolation", args.isolation]
                                            if args.isolation else [], env=env,
                                            cpus=args.pin_plan.server if args.pin_plan else None)
        except RuntimeError as e:
            usage_error(str(e))

    def connect():
        s = gpuwire.connect(address, token=token, tls=tls, name="bench")
        _pin.settle(args.pin_plan)  # the session's threads (and CUDA's of a local run) off the calling thread's core
        return s
    rows: List[Dict[str, Any]] = []
    try:
        with settings.override(rpc_flush_us=args.flush_us):
            from gpuwire.transport.errors import TransportError
            try:
                s0 = connect()
            except (TransportError, OSError) as e:   # refused, unreachable, timed out
                usage_error(f"cannot connect to {address}: {type(e).__name__}: {e}")
            print(f"# connected: executor {s0.executor}, {s0._ep.transports}", flush=True)
            s0.load_module(ptx)
            s0.gwSync()
            kind = s0.executor
            s0.close()          # one session at a time: each test opens its own
            for test in tests:
                t0 = time.perf_counter()
                if test == "rtt":
                    s1 = connect()
                    try:
                        new = bench_rtt(s1, args, tls)
                    finally:
                        s1.close()
                elif test == "issue":
                    new = bench_issue(connect, args, ptx)
                elif test == "launch":
                    new = bench_launch(connect, args, ptx)
                elif test == "bw":
                    new = bench_bw(connect, args, tls)
                elif test == "mlp":
                    new = bench_mlp(connect, args, ptx) if gpu_ok else [
                        {"bench": "rpc", "test": "mlp", "skipped": "needs --executor gpu and a GPU"}]
                elif test == "dispatch":
                    new = bench_dispatch(args, ptx) if gpu_ok else [
                        {"bench": "rpc", "test": "dispatch", "skipped": "needs a GPU"}]
                else:
                    raise SystemExit(f"--tests: unknown test {test!r}")
                for r in new:
                    r["tls"] = args.tls
                    r["executor"] = kind
                    r["seconds"] = round(time.perf_counter() - t0, 2)
                _print(new)
                rows.extend(new)
    finally:
        stop(srv)
    summ = summary(rows)
    print("# summary vs targets:", summ, flush=True)
    cfg["summary"] = summ
    write_outputs(args, rows, cfg)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("cpu", "gpu"), default="gpu",
                   help="executor of the loopback server (default gpu)")
    p.add_argument("--isolation", choices=("process", "thread"), default=None, help="loopback server isolation")
    p.add_argument("--tls", default="tcp", help="tcp (default), sm, or a UCX_TLS value")
    p.add_argument("--tests", default="rtt,issue,launch,bw,mlp,dispatch",
                   help="rtt, issue, launch, bw, mlp, dispatch (comma-separated)")
    p.add_argument("--server", help="HOST:PORT of a running `gpuwire serve` (else a loopback one)")
    p.add_argument("--pin", default="none",
                   help="CPU placement of client and loopback server: none (default), auto (a whole "
                        "core for the client's calling thread, the next for its other threads, the next two "
                        "for the server), CLIENT:SERVER cpu lists such as 2,3:4-7, or the auto plan by hand, "
                        "MAIN/HELPERS:SESSION/SERVER_REST such as 1/2:3/4")
    p.add_argument("--token", help="token of --server")
    p.add_argument("--ptx", help="the test kernels (default: the packaged gpuwire/rpc/kernels/gw_test_kernels.ptx)")
    p.add_argument("--iters", type=int_arg(1), default=20000, help="timed round trips (rtt)")
    p.add_argument("--warmup", type=int_arg(0), default=2000, help="untimed round trips (rtt)")
    p.add_argument("--rtt-rounds", type=int_arg(1), default=7,
                   help="rtt: alternating rounds of RPC and transport round trips (medians)")
    p.add_argument("--burst", type=int_arg(1), default=10000, help="calls per timed burst (issue)")
    p.add_argument("--sustained", type=int_arg(1), default=100000, help="calls of the sustained issue run")
    p.add_argument("--launches", type=int_arg(1), default=20000, help="kernels of the launch loop")
    p.add_argument("--sync-every", type=int_arg(1), default=100, help="launch loop: a stream sync every N launches")
    p.add_argument("--rtt-us", default="0,50,100,200", help="emulated extra round trip (us) for the launch loop")
    p.add_argument("--flush-us", type=float, default=200.0, help="rpc_flush_us of the bench sessions")
    p.add_argument("--sizes", default="1M,16M,64M,256M", help="bw: copy sizes")
    p.add_argument("--bw-count", type=int_arg(1), default=64, help="bw: copies per size (capped by 2 GiB)")
    p.add_argument("--window", type=int_arg(1, 1024), default=32, help="bw: ucx_perftest outstanding messages")
    p.add_argument("--bw-reps", type=int_arg(1), default=3, help="bw: repetitions (interleaved with ucx_perftest; medians)")
    p.add_argument("--host-mem", choices=("auto", "alloc", "registered"), default="auto",
                   help="bw: the client memory copied from and to: alloc (cuMemHostAlloc through the session: "
                        "mapped by the server when on its host, rpc_hostmap), registered (a UCX-registered "
                        "numpy buffer: the bytes travel over the transport), auto (default: alloc when the "
                        "session maps host memory, else registered)")
    p.add_argument("--no-baseline", action="store_true", help="bw: skip ucx_perftest")
    p.add_argument("--extra-windows", default="", help="bw: also run ucx_perftest with these windows "
                   "(comma-separated; e.g. 1,2 for like-for-like rows: the copy path keeps 1-2 receives posted)")
    p.add_argument("--mlp-shapes", default="4096,512,1024,64;2048,512,512,32;1024,256,256,16",
                   help="mlp: 'B,I,H,O;...' (batch, in, hidden, out)")
    p.add_argument("--mlp-steps", type=int_arg(1), default=50, help="mlp: timed training steps")
    p.add_argument("--mlp-block", type=int_arg(1), default=100,
                   help="mlp: steps per block; a round runs the local and the remote loop in alternating "
                        "blocks (0: one block each, the whole --mlp-steps)")
    p.add_argument("--mlp-warm", type=int, default=3,
                   help="mlp: steps each block starts with outside its time (the first step after the other "
                        "loop's block pays for the idle; reported as *_first_step_us, and ratio_incl_warm "
                        "counts them in); 0: none")
    p.add_argument("--mlp-rounds", type=int_arg(1), default=3,
                   help="mlp: alternating rounds of the local and the remote loop per shape; the ratio is "
                        "the median of the rounds' ratios (the local loop's own time moves by ~10 %% between "
                        "runs on the GPU hosts)")
    p.add_argument("--trace", action="store_true",
                   help="mlp, bw: start the loopback server with per-frame timestamps (GPUWIRE_RPC_TRACE_DIR); "
                        "mlp: report where the GPU's idle time between steps goes (boundary_split_us); "
                        "bw: one session per size, with the server's busy fraction and the C bulk handler's "
                        "phase times per copy (srv_* columns)")
    p.add_argument("--dispatch-n", type=int_arg(1), default=20000, help="dispatch: launches timed per path")
    add_output_arguments(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    return _cli.subcommand(subparsers, "rpc", "RPC round trip, async issue cost, launch loop, copies, MLP",
                           __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(_cli.main("rpc", add_arguments, run))
