"""`gpuwire bench gds`: file reads into device memory, backend against backend.

Same files for every backend: one large file read sequentially (``seq``), many small
files read whole (``small``), and a DataLoader epoch over the large file next to a
bare sequential read of the same bytes in batch-sized requests (``loader`` and
``bare-seq``; their ratio is the dataloader overhead). Each case runs with a cold
page cache (``posix_fadvise(DONTNEED)``, checked with ``mincore``; when eviction does
not work the row says ``warm`` and why) and then warm. Throughput is GB/s (10^9).

Backends are small objects (:class:`BenchBackend`) with ``read_file_range`` /
``read_ranges``; local ones wrap a :class:`gpuwire.gds.Reader` (kvikio, posix+h2d,
host). Those that cannot run here are reported as skipped with the reason.

The remote backend (``remote``) has a gpuwire server read the same files into its
session's device memory (:mod:`gpuwire.gds.remote`): ``--server HOST:PORT`` uses a
running ``gpuwire serve --data-root DIR`` whose data root holds the bench directory's
files (paths are sent relative to ``--dir``); ``--remote`` starts a server of its own
on loopback tcp (``--data-root`` the bench directory; ``--remote-executor``). Its
mode column says which engine the server read with (``remote:posix+h2d`` ...; ``order`` in the config);
``remote/kvikio`` ratios are printed per case.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _cli
from .report import (config_echo, human_size, parse_size, print_config, add_output_arguments, write_outputs,
                     check_outputs_writable, int_arg, size_arg, usage_error)

CASES = ("seq", "small", "loader")
LOCAL_BACKENDS = ("kvikio", "posix", "host")


# ----------------------------------------------------------------------------- backends


class BenchBackend:
    """What the bench needs from a backend; a remote one implements the same.

    ``read_ranges([(path, offset, nbytes, dst_offset)], dst)`` reads into ``dst`` (from
    :meth:`alloc`) and returns the bytes read; the data is complete once :meth:`sync`
    returns. ``reader`` is a :class:`gpuwire.gds.Reader` for the dataloader case (None
    skips it).
    """

    name = "?"
    mode = "?"
    reader = None

    def alloc(self, nbytes: int):
        raise NotImplementedError

    def read_file_range(self, path: str, offset: int, nbytes: int, dst, dst_offset: int = 0) -> int:
        return self.read_ranges([(path, offset, nbytes, dst_offset)], dst)

    def read_ranges(self, requests: Sequence[Tuple[str, int, int, int]], dst) -> int:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until every read issued so far has landed."""

    def to_host(self, arr):
        raise NotImplementedError

    def dataset(self, path: str, record: int):
        """The dataloader case's dataset over ``path`` (local files by default)."""
        from gpuwire.gds import RecordDataset

        return RecordDataset(path, record)

    def close(self) -> None:
        pass


class LocalBackend(BenchBackend):
    """A local :class:`gpuwire.gds.Reader` on one stream of its own."""

    def __init__(self, name: str, reader):
        self.name, self.reader = name, reader
        self.mode = reader.mode
        self.stream = reader.new_stream()

    def alloc(self, nbytes: int):
        return self.reader.alloc(nbytes)

    def read_ranges(self, requests, dst) -> int:
        return self.reader.read_batch(requests, dst, self.stream)

    def sync(self) -> None:
        self.reader.synchronize(self.stream)

    def to_host(self, arr):
        return self.reader.to_host(arr)

    def close(self) -> None:
        self.reader.close()


class RemoteBackend(BenchBackend):
    """Reads by a gpuwire server into its session's device memory (gpuwire.gds.remote).

    Paths go to the server relative to ``root`` (the bench directory, which is, or is
    mirrored by, the server's data root). Buffers are reused across runs by size.
    """

    def __init__(self, name: str, session, root: str, server: Optional["_EmbeddedServer"] = None):
        from gpuwire.gds.remote import RemoteReader

        self.name, self.session, self.root, self.server = name, session, root, server
        self._prefix = os.path.join(os.path.abspath(root), "")
        self.reader = RemoteReader(session)
        self.mode = self.reader.mode
        self.stream = self.reader.new_stream()
        self._pool: Dict[int, list] = {}
        self._turn: Dict[int, int] = {}

    def _rel(self, path: str) -> str:
        pre = self._prefix   # the bench's own paths: a slice (os.path.relpath costs ~3 us a file)
        return path[len(pre):] if path.startswith(pre) else os.path.relpath(path, self.root)

    def alloc(self, nbytes: int):
        bufs = self._pool.setdefault(nbytes, [])
        k = self._turn.get(nbytes, 0)
        self._turn[nbytes] = k + 1
        if len(bufs) < 2:
            bufs.append(self.reader.alloc(nbytes))
            return bufs[-1]
        return bufs[k % 2]

    def read_ranges(self, requests, dst) -> int:
        return self.reader.read_batch([(self._rel(p), o, n, d) for p, o, n, d in requests], dst, self.stream)

    def sync(self) -> None:
        self.reader.synchronize(self.stream)

    def to_host(self, arr):
        return arr.to_host()

    def dataset(self, path: str, record: int):
        from gpuwire.gds.remote import RemoteRecordDataset

        return RemoteRecordDataset(self.session, self._rel(path), record)

    def close(self) -> None:
        try:
            self.reader.close()
            self.session.close()
        finally:
            if self.server is not None:
                self.server.stop()


class _EmbeddedServer:
    """``gpuwire serve`` on loopback with ``--data-root`` the bench directory."""

    def __init__(self, root: str, executor: str, tls: str, env: Dict[str, str]):
        self.token = secrets.token_hex(16)
        cmd = [sys.executable, "-m", "gpuwire.rpc.cli", "--executor", executor, "--listen", "127.0.0.1:0",
               "--ready-stdout", "--token", self.token, "--data-root", root, "--log-level", "warning"]
        if tls:
            cmd += ["--tls", tls]
        e = dict(os.environ)
        e.update(env)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=e)
        line = self.p.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"embedded gpuwire serve --executor {executor} did not start "
                               f"(rc {self.p.returncode})")
        self.address = f"127.0.0.1:{int(line)}"

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    """The remote backend's options."""
    g = p.add_argument_group("remote backend (gpuwire.gds.remote)")
    g.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="also measure reads by this gpuwire server into its device memory; its --data-root "
                        "must hold --dir's files (paths are sent relative to --dir)")
    g.add_argument("--token", default=None, help="token of --server (default: GPUWIRE_RPC_TOKEN)")
    g.add_argument("--remote", action="store_true",
                   help="also measure a gpuwire server this bench starts on loopback (--data-root the bench "
                        "directory)")
    g.add_argument("--remote-executor", choices=("auto", "gpu", "cpu"), default="auto",
                   help="executor of the --remote server (auto: gpu where cupy sees one, else cpu)")
    g.add_argument("--remote-tls", default="tcp,self",
                   help="UCX_TLS of the --remote server and its client (default tcp,self: loopback tcp)")


def remote_backends(args: argparse.Namespace) -> List[Tuple[str, Optional[BenchBackend], str]]:
    """``[(name, backend or None, reason)]``: ``remote`` for --server or --remote."""
    if not (getattr(args, "server", None) or getattr(args, "remote", False)):
        return []
    root = os.path.realpath(args._root)
    server = None
    try:
        import gpuwire

        if args.server:
            session = gpuwire.connect(args.server, token=args.token, name="bench gds")
        else:
            ex = args.remote_executor
            if ex == "auto":
                from gpuwire.gds import gpu_status

                ex = "gpu" if gpu_status()[0] else "cpu"
            from gpuwire import settings

            env = {"GPUWIRE_GDS_THREADS": str(settings.get("gds_threads")),
                   "GPUWIRE_GDS_TASK_SIZE": str(settings.get("gds_task_size"))}
            server = _EmbeddedServer(root, ex, args.remote_tls, env)
            session = gpuwire.connect(server.address, token=server.token, tls=args.remote_tls or None,
                                      name="bench gds")
        return [("remote", RemoteBackend("remote", session, root, server), "")]
    except Exception as e:
        if server is not None:
            server.stop()
        return [("remote", None, f"{type(e).__name__}: {e}")]


def local_backends(names: Iterable[str]) -> List[Tuple[str, Optional[BenchBackend], str]]:
    """``[(name, backend or None, reason it cannot run)]`` for kvikio, posix, host."""
    from gpuwire.gds import backends as b

    makers = {"kvikio": b.KvikioReader, "posix": b.PosixH2DReader, "host": b.HostReader}
    out = []
    for name in names:
        try:
            out.append((name, LocalBackend(name, makers[name]()), ""))
        except Exception as e:  # BackendUnavailable, or a CUDA error while setting up
            out.append((name, None, str(e)))
    return out


# ----------------------------------------------------------------------------- page cache


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_fraction(path: str) -> Optional[float]:
    """Fraction of ``path``'s pages in the page cache (mincore), or None if unknown."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
        libc = _libc()
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vec = (ctypes.c_ubyte * npages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return sum(v & 1 for v in bytes(vec)) / npages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def drop_cache(paths: Sequence[str]) -> Tuple[bool, str]:
    """Evict ``paths`` from the page cache; (worked, how we know)."""
    if not hasattr(os, "posix_fadvise"):
        return False, "posix_fadvise unavailable"
    try:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError as e:
        return False, f"posix_fadvise(DONTNEED) failed: {e}"
    sample = list(paths[:: max(1, len(paths) // 16)])
    fracs = [f for f in (resident_fraction(p) for p in sample) if f is not None]
    if not fracs:
        return True, "posix_fadvise(DONTNEED) done; residency unverified (mincore unavailable)"
    left = sum(fracs) / len(fracs)
    if left > 0.05:
        return False, f"posix_fadvise(DONTNEED) left {left:.0%} of the pages cached (tmpfs?)"
    return True, f"posix_fadvise(DONTNEED): {left:.1%} of the pages still cached"


def warm_cache(paths: Sequence[str], chunk: int = 16 << 20) -> None:
    buf = bytearray(chunk)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ----------------------------------------------------------------------------- files


def _write_file(path: str, size: int, seed: int, chunk: int = 64 << 20) -> None:
    import numpy as np

    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def make_files(root: str, size: int, small_count: int, small_size: int, cases: Sequence[str]) -> Dict[str, Any]:
    """The bench's files under ``root`` (reused when already there with the right sizes)."""
    files: Dict[str, Any] = {}
    if "seq" in cases or "loader" in cases:
        files["large"] = os.path.join(root, f"gds-large-{size}.bin")
        _write_file(files["large"], size, seed=1)
    if "small" in cases:
        d = os.path.join(root, f"gds-small-{small_count}x{small_size}")
        os.makedirs(d, exist_ok=True)
        files["small"] = [os.path.join(d, f"{i:06d}.bin") for i in range(small_count)]
        for i, p in enumerate(files["small"]):
            _write_file(p, small_size, seed=100 + i)
    return files


def _fs_type(path: str) -> str:
    best, kind = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and real.startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


# ----------------------------------------------------------------------------- cases


class _Meter:
    """Progress bar in bytes with the running GB/s."""

    def __init__(self, total: int, label: str, enabled: Optional[bool]):
        from ._progress import Progress

        self.p = Progress(max(total, 1), label, enabled=enabled)
        self.t0 = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        dt = time.perf_counter() - self.t0
        self.p.update(n, f"{self.done / dt / 1e9:6.2f} GB/s" if dt > 0 else "")

    def close(self) -> None:
        self.p.close()


def run_seq(be: BenchBackend, path: str, chunk: int, progress: Optional[bool]) -> Tuple[int, float]:
    """One large file, ``chunk``-byte requests in order; returns (bytes, seconds)."""
    size = os.path.getsize(path)
    bufs = [be.alloc(min(chunk, size) or 1) for _ in range(2)]
    meter = _Meter(size, f"{be.name} seq", progress)
    t0 = time.perf_counter()
    off, k = 0, 0
    while off < size:
        n = min(chunk, size - off)
        be.read_ranges([(path, off, n, 0)], bufs[k])
        off += n
        k ^= 1
        meter.update(n)
    be.sync()
    dt = time.perf_counter() - t0
    meter.close()
    _verify_tail(be, path, bufs[k ^ 1], size, chunk)
    return size, dt


def _verify_tail(be: BenchBackend, path: str, buf, size: int, chunk: int) -> None:
    """The last request's bytes must equal the file's: a fast backend must not be a wrong one."""
    if size == 0:
        return
    n = size % chunk or min(chunk, size)
    with open(path, "rb") as f:
        f.seek(size - n)
        want = f.read(n)
    got = be.to_host(buf[:n]).tobytes()
    if got != want:
        raise RuntimeError(f"{be.name}: data read from {path} does not match the file")


def run_small(be: BenchBackend, paths: Sequence[str], chunk: int, progress: Optional[bool]) -> Tuple[int, float]:
    """Many small files read whole, grouped into ``chunk``-byte batches of requests."""
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    cap = max(chunk, max(sizes, default=1))
    buf = be.alloc(cap)
    meter = _Meter(total, f"{be.name} small", progress)
    t0 = time.perf_counter()
    reqs: List[Tuple[str, int, int, int]] = []
    used = 0
    for p, n in zip(paths, sizes):
        if used + n > cap and reqs:
            be.read_ranges(reqs, buf)
            meter.update(used)
            reqs, used = [], 0
        reqs.append((p, 0, n, used))
        used += n
    if reqs:
        be.read_ranges(reqs, buf)
        meter.update(used)
    be.sync()
    dt = time.perf_counter() - t0
    meter.close()
    return total, dt


def run_loader(be: BenchBackend, path: str, record: int, batch: int, prefetch: int,
               shuffle: bool, progress: Optional[bool]) -> Tuple[int, float]:
    """One DataLoader epoch over the large file; the consumer does no work."""
    from gpuwire.gds import DataLoader

    ds = be.dataset(path, record)
    loader = DataLoader(ds, batch, shuffle=shuffle, prefetch=prefetch, reader=be.reader)
    meter = _Meter(ds.nbytes, f"{be.name} loader", progress)
    loader.allocate()  # allocation is setup, not reading
    t0 = time.perf_counter()
    for x in loader:
        meter.update(x.nbytes)
    be.reader.synchronize(None)
    dt = time.perf_counter() - t0
    meter.close()
    loader.close()
    return ds.nbytes, dt


# ----------------------------------------------------------------------------- driver


def _row(be_name: str, mode: str, case: str, cache: str, nbytes: int = 0, seconds: Optional[float] = None,
         **extra) -> Dict[str, Any]:
    row = {"bench": "gds", "backend": be_name, "mode": mode, "case": case, "bytes": nbytes,
           "seconds": seconds, "GBps": (nbytes / seconds / 1e9) if seconds else None, "cache": cache}
    row.update(extra)
    return row


def _case_files(files: Dict[str, Any], case: str) -> List[str]:
    return list(files["small"]) if case == "small" else [files["large"]]


def _measure(be: BenchBackend, case: str, files: Dict[str, Any], cache: str, args) -> List[Dict[str, Any]]:
    """Rows for ``case`` under ``cache`` ("cold"/"warm"); the loader case is two or three runs.

    With ``--repeat N`` each run is made N times (cache prepared each time) and the
    median by time is reported.
    """
    paths = _case_files(files, case)
    runs = [("bare-seq", False), ("loader", False)] if case == "loader" else [(case, False)]
    if case == "loader" and args.shuffled:
        runs.append(("loader-shuffled", True))
    rows = []
    for name, shuffle in runs:
        trials = []
        for _ in range(max(1, args.repeat)):
            label, note = _prepare_cache(paths, cache)
            nbytes, dt = _timed(be, name, shuffle, files, args)
            trials.append((dt, nbytes, label, note))
        trials.sort(key=lambda t: t[0])
        dt, nbytes, label, note = trials[len(trials) // 2]
        rows.append(_row(be.name, be.mode, name, label, nbytes, dt, files=len(paths),
                         trials=len(trials), note=note))
    return rows


def _timed(be: BenchBackend, name: str, shuffle: bool, files: Dict[str, Any], args) -> Tuple[int, float]:
    prog = False if args.no_progress else None
    if name.startswith("loader"):
        return run_loader(be, files["large"], args.record_size, args.batch, args.prefetch, shuffle, prog)
    if name == "bare-seq":
        return run_seq(be, files["large"], args.record_size * args.batch, prog)
    if name == "small":
        return run_small(be, files["small"], args.chunk, prog)
    return run_seq(be, files["large"], args.chunk, prog)


def _prepare_cache(paths: Sequence[str], cache: str) -> Tuple[str, str]:
    if cache == "warm":
        warm_cache(paths)
        return "warm", ""
    ok, how = drop_cache(paths)
    return ("cold", how) if ok else ("warm", f"cold requested but not achieved: {how}")


def ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """kvikio / posix per (case, cache), and loader / bare-seq time per (backend, cache)."""
    by = {(r["backend"], r["case"], r["cache"]): r for r in rows if r.get("seconds")}
    out = []
    for (be, case, cache), r in by.items():
        if be == "remote" and ("kvikio", case, cache) in by:
            out.append({"what": f"remote/kvikio throughput, {case}", "cache": cache,
                        "ratio": r["GBps"] / by[("kvikio", case, cache)]["GBps"], "target": ">= 0.95"})
        if be == "kvikio" and ("posix", case, cache) in by:
            out.append({"what": f"kvikio/posix+h2d throughput, {case}", "cache": cache,
                        "ratio": r["GBps"] / by[("posix", case, cache)]["GBps"], "target": ">= 1.3 (seq)"})
        if case.startswith("loader") and (be, "bare-seq", cache) in by:
            out.append({"what": f"{case} epoch time / bare sequential read, {be}", "cache": cache,
                        "ratio": r["seconds"] / by[(be, "bare-seq", cache)]["seconds"],
                        "target": "<= 1.10" if case == "loader" else "(shuffled: informative)"})
    return out


def _print_rows(rows: List[Dict[str, Any]], out=sys.stdout) -> None:
    print(f"{'backend':8} {'mode':20} {'case':16} {'cache':5} {'bytes':>10} {'seconds':>9} {'GB/s':>8}  note",
          file=out)
    for r in rows:
        if r.get("skipped"):
            print(f"{r['backend']:8} {'-':20} {r['case']:16} {'-':5} {'':>10} {'':>9} {'':>8}  "
                  f"skipped: {r['skipped']}", file=out)
            continue
        print(f"{r['backend']:8} {r['mode']:20} {r['case']:16} {r['cache']:5} {human_size(r['bytes']):>10} "
              f"{r['seconds']:9.3f} {r['GBps']:8.2f}  {r.get('note', '')}", file=out)


def _check_args(args, cases: Sequence[str]) -> None:
    """Sizes and counts the cases can run with (a 0 chunk would loop forever): one-line errors."""
    for flag, v in (("--size", args.size), ("--chunk", args.chunk), ("--small-size", args.small_size),
                    ("--record-size", args.record_size), ("--small-count", args.small_count),
                    ("--batch", args.batch), ("--repeat", args.repeat)):
        if v is None or v <= 0:
            usage_error(f"{flag} must be > 0, got {v}")
    if not 0 <= args.prefetch <= 1024:
        usage_error(f"--prefetch must be in 0..1024, got {args.prefetch}")
    if args.threads is not None and args.threads < 0:
        usage_error(f"--threads must be >= 0, got {args.threads}")
    if "loader" in cases and args.size % args.record_size:
        usage_error(f"--size {args.size} is not a whole number of --record-size {args.record_size} "
                    f"records (the loader case reads the large file as records)")
    if args.dir is not None and os.path.exists(args.dir) and not os.path.isdir(args.dir):
        usage_error(f"--dir {args.dir}: not a directory")
    check_outputs_writable(args)


def run(args: argparse.Namespace) -> int:
    cases = _split(args.cases, CASES, "--cases")
    caches = _split(args.cache, ("cold", "warm"), "--cache")
    names = _split(args.backends, LOCAL_BACKENDS, "--backends")
    _check_args(args, cases)
    own_dir = args.dir is None
    root = tempfile.mkdtemp(prefix="gpuwire-bench-gds-") if own_dir else args.dir
    os.makedirs(root, exist_ok=True)
    _apply_kvikio_args(args)
    args._root = root
    try:
        files = make_files(root, args.size, args.small_count, args.small_size, cases)
        backends = local_backends(names) + remote_backends(args)
        cfg = _config(args, root, cases, caches, backends)
        print_config(cfg)
        rows = _run_all(backends, cases, caches, files, args)
    finally:
        if own_dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    _print_rows(rows)
    rs = ratios(rows)
    for r in rs:
        print(f"# {r['what']} ({r['cache']}): {r['ratio']:.3f}  target {r['target']}")
    cfg["ratios"] = rs
    write_outputs(args, rows, cfg)
    return 0


def _run_all(backends, cases, caches, files, args) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for name, be, why in backends:
        if be is None:
            rows.extend(_row(name, "-", case, "-", skipped=why) for case in cases)
            print(f"# {name}: skipped ({why})", file=sys.stderr)
            continue
        try:
            for case in cases:
                if case == "loader" and be.reader is None:
                    rows.append(_row(name, be.mode, case, "-", skipped="no Reader for the dataloader"))
                    continue
                for cache in caches:
                    rows.extend(_measure(be, case, files, cache, args))
        finally:
            be.close()
    return rows


def _apply_kvikio_args(args) -> None:
    from gpuwire import settings
    import gpuwire.gds  # noqa: F401  (registers the gds settings)

    if args.threads is not None:
        settings.set("gds_threads", args.threads)
    if args.task_size is not None:
        settings.set("gds_task_size", args.task_size)


def _config(args, root, cases, caches, backends) -> Dict[str, Any]:
    from gpuwire import settings
    import gpuwire.gds  # noqa: F401

    extra = {
        "bench": "gds", "dir": root, "filesystem": _fs_type(root), "cases": list(cases),
        "cache": list(caches), "large_file": human_size(args.size), "chunk": human_size(args.chunk),
        "small_files": f"{args.small_count} x {human_size(args.small_size)}",
        "loader": f"records of {human_size(args.record_size)}, batch {args.batch}, prefetch {args.prefetch}",
        "backends": {n: (be.mode if be is not None else f"skipped: {why}") for n, be, why in backends},
        "gds_threads": settings.get("gds_threads"), "gds_task_size": settings.get("gds_task_size"),
        "gds_staging_bytes": settings.get("gds_staging_bytes"),
    }
    for n, be, _ in backends:
        if be is not None and isinstance(be, RemoteBackend):
            extra["remote"] = {"address": getattr(be.session, "address", "?"), "mode": be.mode,
                               "detail": getattr(be.reader, "mode_detail", ""),
                               "kvikio": getattr(be.reader, "kvikio_settings", None),
                               "order": getattr(be.reader, "order", ""),
                               "workers": getattr(be.reader, "workers", ""),
                               "embedded": be.server is not None}
        elif be is not None and getattr(be.reader, "kvikio_settings", None):
            extra["kvikio"] = dict(be.reader.kvikio_settings, detail=getattr(be.reader, "mode_detail", ""))
    return config_echo(extra)


def _split(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        usage_error(f"{flag}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


_size = size_arg(0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None, help="where the test files go (default: a temporary "
                   "directory, removed afterwards); existing files of the right size are reused")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory's files")
    p.add_argument("--size", type=size_arg(1), default=1 << 30, help="large file size (default 1G)")
    p.add_argument("--chunk", type=size_arg(1), default=64 << 20, help="request size of the seq case and "
                   "batch size of the small case (default 64M)")
    p.add_argument("--small-count", type=int_arg(1), default=4096, help="number of small files (default 4096)")
    p.add_argument("--small-size", type=size_arg(1), default=256 << 10, help="small file size (default 256K)")
    p.add_argument("--record-size", type=size_arg(1), default=1 << 20, help="loader record size (default 1M)")
    p.add_argument("--batch", type=int_arg(1), default=32, help="loader batch size in records (default 32)")
    p.add_argument("--prefetch", type=int_arg(0, 1024), default=2, help="loader prefetch depth (default 2)")
    p.add_argument("--shuffled", action="store_true", help="also time a shuffled loader epoch")
    p.add_argument("--repeat", type=int_arg(1), default=1, help="runs per measurement; the median is reported")
    p.add_argument("--backends", default=",".join(LOCAL_BACKENDS),
                   help="local backends: kvikio,posix,host (default all; missing ones are skipped)")
    p.add_argument("--cases", default=",".join(CASES), help="seq,small,loader (default all)")
    p.add_argument("--cache", default="cold,warm", help="cold,warm (default both)")
    p.add_argument("--threads", type=int_arg(0), default=None, help="kvikio threads (default: gds_threads)")
    p.add_argument("--task-size", type=_size, default=None, help="kvikio task size (default: gds_task_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_output_arguments(p)
    add_remote_arguments(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    return _cli.subcommand(subparsers, "gds", "file reads into GPU memory: kvikio vs POSIX+H2D vs host; "
                           "many small files; dataloader overhead", __doc__, add_arguments, run)


def main(argv=None) -> int:
    return _cli.main("gds", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
