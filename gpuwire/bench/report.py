"""Bench reports: configuration echo, statistics, JSON/CSV rows, plots, ratios."""
from __future__ import annotations

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
        v = int(float(t) * mult)
    except ValueError:
        raise ValueError(f"bad size {text!r} (examples: 8, 4K, 1M, 64MiB)") from None
    if v < 0:
        raise ValueError(f"size must be >= 0, got {text!r}")
    return v


def size_range(spec: str) -> List[int]:
    """'8:64M' -> powers of two from 8 to 64 MiB; '8,1K,1M' -> those sizes."""
    if ":" in spec:
        lo, hi = (parse_size(x) for x in spec.split(":", 1))
        if lo <= 0 or hi < lo:
            raise ValueError(f"bad size range {spec!r}")
        out, v = [], lo
        while v <= hi:
            out.append(v)
            v *= 2
        return out
    return [parse_size(x) for x in spec.split(",") if x.strip()]


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
