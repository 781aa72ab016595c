"""Bench reports: configuration echo, statistics, JSON/CSV rows, plots, ratios."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence


def percentiles(samples_ns: Sequence[int]) -> Dict[str, float]:
    """min/p50/p99/p999/mean in microseconds from samples in nanoseconds."""
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    n = len(s)

    def q(p: float) -> float:
        i = min(n - 1, max(0, int(round(p * (n - 1)))))
        return s[i] / 1e3

    return {"min": s[0] / 1e3, "p50": q(0.5), "p99": q(0.99), "p999": q(0.999),
            "mean": sum(s) / n / 1e3}


def scale_stats(stats: Dict[str, float], k: float) -> Dict[str, float]:
    return {key: v * k for key, v in stats.items()}


def parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = 1
    for suf, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suf):
            t, mult = t[:-1], m
            break
    try:
        v = int(float(t) * mult)   # inf: OverflowError; nan: ValueError
    except (ValueError, OverflowError):
        raise ValueError(f"bad size {text!r} (examples: 8, 4K, 1M, 64MiB)") from None
    if v < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return v


def size_range(spec: str, min_size: int = 0) -> List[int]:
    """'8:64M' -> powers of two from 8 to 64 MiB; '8,1K,1M' -> those sizes. An empty list,
    a reversed range or a size below ``min_size`` raise ValueError."""
    if ":" in spec:
        lo, hi = (parse_size(x) for x in spec.split(":", 1))
        if lo <= 0 or hi < lo:
            raise ValueError(f"bad size range {spec!r} (LO:HI with 0 < LO <= HI)")
        out, v = [], lo
        while v <= hi:
            out.append(v)
            v *= 2
    else:
        out = [parse_size(x) for x in spec.split(",") if x.strip()]
    if not out:
        raise ValueError(f"no sizes in {spec!r} (examples: 8:64M, 8,1K,1M)")
    small = [v for v in out if v < min_size]
    if small:
        raise ValueError(f"size {small[0]} in {spec!r} is below the minimum {min_size}")
    return out


# argparse types: a bad value is a one-line usage error (rc 2), never a traceback


def size_arg(min_size: int = 0):
    """``type=`` of a size option (``4K``, ``1M``...) of at least ``min_size``."""
    def parse(text: str) -> int:
        try:
            v = parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if v < min_size:
            raise argparse.ArgumentTypeError(f"must be >= {min_size}, got {text!r}")
        return v
    parse.__name__ = "size"
    return parse


def sizes_arg(min_size: int = 1):
    """``type=`` of a ``--sizes`` option: a list (see :func:`size_range`)."""
    def parse(text: str) -> List[int]:
        try:
            return size_range(text, min_size)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "sizes"
    return parse


def int_arg(lo: Optional[int] = None, hi: Optional[int] = None):
    """``type=`` of an integer option within ``lo..hi`` (None: unbounded)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"in {lo}..{hi}" if lo is not None and hi is not None else (
                f">= {lo}" if lo is not None else f"<= {hi}")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


class UsageError(SystemExit):
    """Exit status 2 (like argparse's errors); ``str()`` is the message (printed on stderr)."""

    def __init__(self, msg: str):
        super().__init__(2)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


def usage_error(msg: str):
    """A one-line error on stderr and exit status 2 (like argparse's own errors)."""
    print(f"error: {msg}", file=sys.stderr)
    raise UsageError(msg)


def wait_ready_port(p, what: str, max_lines: int = 200, timeout: float = 180.0) -> int:
    """The port a spawned server (``--ready-stdout``) prints on its stdout. Lines that are not
    a port (a UCX warning printed there first) are skipped; if the server exits, or prints no
    port within ``timeout`` seconds, it is killed (never left running) and RuntimeError says so."""
    import threading

    timer = threading.Timer(timeout, lambda: p.poll() is None and p.kill())   # ends a silent wait
    timer.daemon = True
    timer.start()
    try:
        for _ in range(max_lines):
            line = p.stdout.readline()
            if not line:
                break
            text = line.strip()
            if text.isdigit():
                return int(text)
            print(f"# {what}: {text}", file=sys.stderr)
    except BaseException:
        _kill(p)
        raise
    finally:
        timer.cancel()
    _kill(p)
    raise RuntimeError(f"{what} failed to start (rc {p.returncode})")


def _kill(p) -> None:
    if p.poll() is None:
        p.kill()
    try:
        p.wait(timeout=10)
    except Exception:
        pass


#: UCX transport names and aliases that --tls accepts (UCX_TLS; ``^`` excludes, ``:aux`` too)
UCX_TLS_NAMES = frozenset((
    "all", "sm", "shm", "mm", "posix", "sysv", "xpmem", "cma", "knem", "self", "tcp",
    "ib", "rc", "rc_v", "rc_x", "rc_verbs", "rc_mlx5", "ud", "ud_v", "ud_x", "ud_verbs", "ud_mlx5",
    "dc", "dc_x", "dc_mlx5", "srd", "cuda", "cuda_copy", "cuda_ipc", "gdr_copy",
    "rocm", "rocm_copy", "rocm_ipc", "rocm_gdr", "ugni", "ugni_rdma", "ugni_udt", "ugni_smsg",
))


def check_tls(value: str, aliases: Iterable[str] = ()) -> None:
    """Refuse a --tls value naming a transport UCX does not know (one-line usage error)."""
    text = value[1:] if value.startswith("^") else value
    names = [x.strip() for x in text.split(",")]
    known = UCX_TLS_NAMES | set(aliases)
    bad = [x for x in names if (x[:-4] if x.endswith(":aux") else x) not in known]
    if bad or not names:
        usage_error(f"--tls {value!r}: unknown transport {', '.join(map(repr, bad)) or '(empty)'}; "
                    f"use {', '.join(sorted(aliases)) + ', ' if aliases else ''}or UCX_TLS names "
                    f"(tcp, sm, self, posix, cma, rc, ud, dc, cuda_copy, cuda_ipc, ...)")


def check_outputs_writable(args) -> None:
    """Refuse an unwritable ``--json`` / ``--csv`` / ``--plot`` path before the run (not after it)."""
    for flag in ("json", "csv", "plot"):
        path = getattr(args, flag, None)
        if not path:
            continue
        d = os.path.dirname(os.path.abspath(path)) or "."
        if os.path.isdir(path):
            usage_error(f"--{flag} {path}: is a directory")
        if not os.path.isdir(d):
            usage_error(f"--{flag} {path}: directory {d} does not exist")
        if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            usage_error(f"--{flag} {path}: not writable")


def human_size(n: int) -> str:
    for suf, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{suf}"
    return f"{n}B"


def config_echo(extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What the run ran on: versions, UCX settings, CPU affinity, GPUs."""
    import gpuwire
    cfg: Dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "gpuwire": gpuwire.__version__,
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "UCX_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
        "GPUWIRE_env": {k: v for k, v in os.environ.items() if k.startswith("GPUWIRE_")},
    }
    try:
        from gpuwire import transport as t
        cfg["ucx_runtime"] = ".".join(map(str, t.runtime_version()))
        cfg["ucx_built"] = ".".join(map(str, t.built_version()))
        cfg["ucx_library"] = t.library_path()
    except Exception as e:  # pragma: no cover
        cfg["ucx_error"] = str(e)
    try:
        from gpuwire.info import gpu_summary
        cfg["gpus"] = gpu_summary()
    except Exception as e:
        cfg["gpus"] = f"unavailable ({e.__class__.__name__})"
    if extra:
        cfg.update(extra)
    return cfg


def print_config(cfg: Dict[str, Any], out=sys.stdout) -> None:
    print("# configuration", file=out)
    for k, v in cfg.items():
        print(f"#   {k}: {v}", file=out)
    out.flush()


def _flat(row: Dict[str, Any]) -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = v2
        else:
            flat[k] = v
    return flat


def add_output_arguments(p) -> None:
    """``--json FILE`` and ``--csv FILE``, the row outputs every bench has."""
    p.add_argument("--json", help="write rows and configuration to this JSON file")
    p.add_argument("--csv", help="write rows to this CSV file")


def write_outputs(args, rows: List[Dict[str, Any]], config: Dict[str, Any]) -> None:
    """Write ``rows`` where ``--json`` / ``--csv`` asked for them."""
    if args.json:
        write_json(args.json, rows, config)
    if args.csv:
        write_csv(args.csv, rows)


def write_json(path: str, rows: List[Dict[str, Any]], config: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "rows": rows}, f, indent=1, default=str)


def write_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    flats = [_flat(r) for r in rows]
    keys: List[str] = []
    for r in flats:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in flats:
            w.writerow(r)


def plot(path: str, rows: List[Dict[str, Any]], title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'gpuwire[plot]'") from None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["backend"], r["tls"]), []).append(r)
    for (backend, tls), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["size_bytes"])
        lat = [r for r in rs if r.get("rtt_us")]
        bw = [r for r in rs if r.get("bw_MBps")]
        style = "-o" if backend == "gpuwire" else "--x"
        if lat:
            a1.plot([r["size_bytes"] for r in lat], [r["rtt_us"].get("p50", r["rtt_us"].get("mean")) for r in lat],
                    style, label=f"{backend} {tls}", ms=3)
        if bw:
            a2.plot([r["size_bytes"] for r in bw], [r["bw_MBps"] for r in bw], style,
                    label=f"{backend} {tls}", ms=3)
    for a, yl in ((a1, "round trip p50 (us)"), (a2, "bandwidth (MB/s, 10^6)")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("message size (bytes)")
        a.set_ylabel(yl)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratio_table(rows: List[Dict[str, Any]], out=sys.stdout) -> List[Dict[str, Any]]:
    """gpuwire/ucx_perftest per (tls, size): latency (mean RTT) and bandwidth ratios."""
    base = {(r["tls"], r["size_bytes"]): r for r in rows if r["backend"] == "ucx_perftest"}
    ratios = []
    print(f"{'tls':8} {'size':>8} {'rtt gw/pt':>10} {'bw gw/pt':>9}   (rtt: lower is better; bw: higher)",
          file=out)
    for r in rows:
        if r["backend"] != "gpuwire":
            continue
        b = base.get((r["tls"], r["size_bytes"]))
        if not b:
            continue
        lr = (r["rtt_us"]["mean"] / b["rtt_us"]["mean"]) if r.get("rtt_us") and b.get("rtt_us") else None
        br = (r["bw_MBps"] / b["bw_MBps"]) if r.get("bw_MBps") and b.get("bw_MBps") else None
        ratios.append({"tls": r["tls"], "size_bytes": r["size_bytes"], "rtt_ratio": lr, "bw_ratio": br})
        ls = f"{lr:10.3f}" if lr is not None else f"{'-':>10}"
        bs = f"{br:9.3f}" if br is not None else f"{'-':>9}"
        print(f"{r['tls']:8} {human_size(r['size_bytes']):>8} {ls} {bs}", file=out)
    return ratios
