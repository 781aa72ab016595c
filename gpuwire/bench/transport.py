"""`gpuwire bench transport`: latency/bandwidth sweep of gpuwire.transport against
ucx_perftest, same transports and sizes, same run.

Latency: ping-pong with ``Endpoint.call`` (client, Python API) against a server
that echoes from C (``Endpoint.serve_echo``); every round trip is timed, so rows
carry min/p50/p99/p99.9 of the round trip and one-way (= half). Bandwidth: the
client streams ``count`` messages with a window of outstanding sends; the clock
stops at the server's final ack. Message rate = messages / that time.

By default a loopback server process is started; ``--serve`` runs the server
for a second host and ``--server HOST:PORT`` points the client at it (the
server also starts ucx_perftest servers on request, so the baseline runs
between the same two hosts).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from . import _cli
from .report import (
    config_echo, human_size, percentiles, plot, print_config, ratio_table, scale_stats,
    size_range, add_output_arguments, write_outputs, check_outputs_writable, check_tls, int_arg,
    size_arg, sizes_arg, usage_error, wait_ready_port,
)

CTRL = 0xFFFFF0
ACK = 0xFFFFF1
DATA = 0x10
MAX_CTRL = 4096

# --tls names -> (UCX_TLS for gpuwire, UCX_TLS for ucx_perftest). gpuwire needs tcp for
# its sockaddr control endpoint; its data endpoint then picks shared memory on one node.
TLS_MAP = {
    "tcp": ("tcp,self", "tcp,self"),
    "sm": ("tcp,sm,self", "sm,self"),
    "shm": ("tcp,sm,self", "sm,self"),
}


def tls_pair(name: str):
    if name in TLS_MAP:
        return TLS_MAP[name]
    # anything else is passed through as UCX_TLS to both (tcp added for our listener)
    ours = name if "tcp" in name.split(",") else "tcp," + name
    return ours, name


def lat_iters(size: int, iters: int) -> int:
    return max(16, min(iters, (1 << 30) // max(size, 1)))


def bw_count(size: int, count: int) -> int:
    return max(16, min(count, (1 << 31) // max(size, 1)))


# ----------------------------------------------------------------------------- server

def serve(listen: str, tls: str, max_size: int, once: bool = False, ready_fd=None) -> int:
    """Bench server: accepts clients one at a time and runs what they ask."""
    import numpy as np
    from gpuwire import transport as t

    ctx = t.Context({"TLS": tls})
    w = ctx.worker()
    host, port = t.parse_hostport(listen, default_port=0)
    lst = w.listen(host, port)
    msg = f"gpuwire bench server listening on {lst.address} (UCX_TLS={tls})"
    print(msg, file=sys.stderr, flush=True)
    if ready_fd is not None:
        from .._ready import announce
        announce(ready_fd, str(lst.port))   # (stdout: then pointed at stderr)
    buf = np.zeros(2 * max(max_size, 64), dtype=np.uint8)
    ctrl = bytearray(MAX_CTRL)
    perftests: List[subprocess.Popen] = []
    try:
        while True:
            ep = lst.accept(timeout=None)
            try:
                _serve_client(ep, buf, ctrl, perftests)
            except t.ConnectionLost as e:
                print(f"client gone: {e}", file=sys.stderr)
            except Exception as e:   # one bad client must not end a shared server
                print(f"client dropped: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                ep.close()
                for p in perftests:
                    if p.poll() is None:
                        p.kill()
                perftests.clear()
            if once:
                return 0
    finally:
        w.close()
        ctx.close()


def _serve_client(ep, buf, ctrl, perftests) -> None:
    from gpuwire import transport as t
    from . import perftest
    view = t.Buffer(buf, writable=True)
    while True:
        r = ep.recv(ctrl, tag=CTRL, tag_mask=t.EXACT_TAG)
        cmd = json.loads(bytes(ctrl[:r.nbytes]))
        op = cmd["op"]
        if op == "bye":
            return
        if op == "lat":
            if cmd.get("size", 0) > buf.nbytes:   # older clients send no size
                ep.send(json.dumps({"error": f"size {cmd['size']} above the server's --max-size "
                                             f"({buf.nbytes // 2})"}).encode(), tag=CTRL)
                continue
            ep.send(b"ok", tag=CTRL)
            ep.serve_echo(view, cmd["count"])
        elif op == "bw":
            size, count, window = cmd["size"], cmd["count"], cmd["window"]
            if size > buf.nbytes:
                ep.send(json.dumps({"error": "size too large"}).encode(), tag=CTRL)
                continue
            if not (isinstance(window, int) and 1 <= window <= 1024):
                ep.send(json.dumps({"error": f"window {window!r} not in 1..1024"}).encode(), tag=CTRL)
                continue
            ep.send(b"ok", tag=CTRL)
            target = t.Buffer(t.RawBuffer(view.ptr, size), writable=True) if size else t.Buffer(bytearray(1), True)
            # the receiving end runs in C (as ucx_perftest's does): with shared memory
            # the receiver does the copying (rendezvous get), so a Python loop here
            # would stall the data path between messages
            ep.serve_sink(target, count, window=min(window, 1024), tag=DATA, timeout=60)
            ep.send(b"ack", tag=ACK)
        elif op == "perftest":
            port = perftest.free_port()
            exe = perftest.perftest_path()
            p = subprocess.Popen([exe, "-p", str(port)], env=perftest.perftest_env(cmd["tls"]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            perftests.append(p)
            time.sleep(0.3)
            ep.send(json.dumps({"port": port}).encode(), tag=CTRL)
        else:
            ep.send(json.dumps({"error": f"unknown op {op!r}"}).encode(), tag=CTRL)


# ----------------------------------------------------------------------------- client

class ServerError(RuntimeError):
    """The bench server refused a command (the message is its reason)."""


class _Client:
    def __init__(self, server: str, tls: str):
        from gpuwire import transport as t
        self.t = t
        self.ctx = t.Context({"TLS": tls})
        self.w = self.ctx.worker()
        self.ep = self.w.connect(server, timeout=20)
        self.ctrl = bytearray(MAX_CTRL)

    def command(self, **cmd) -> Dict[str, Any]:
        t = self.t
        req = self.ep.recv_nb(self.ctrl, tag=CTRL, tag_mask=t.EXACT_TAG)
        self.ep.send(json.dumps(cmd).encode(), tag=CTRL)
        r = req.wait(timeout=60)
        body = bytes(self.ctrl[:r.nbytes])
        if body == b"ok":
            return {}
        out = json.loads(body)
        if "error" in out:
            raise ServerError(f"bench server: {out['error']}")
        return out

    def latency(self, size: int, warmup: int, iters: int) -> Dict[str, Any]:
        import numpy as np
        t = self.t
        msg = t.Buffer(np.full(max(size, 1), 7, dtype=np.uint8)[:size] if size else bytearray(0))
        rep = t.Buffer(np.zeros(max(size, 1), dtype=np.uint8), writable=True)
        # warm-up, a timed pass with a timestamp per round trip (distribution), and an
        # untimed pass whose total gives the mean without the timestamps' cost
        self.command(op="lat", count=warmup + 2 * iters, size=size)
        call = self.ep.prepare_call(msg, rep)
        for _ in range(warmup):
            call()
        from time import perf_counter_ns as pc
        ts = [0] * (iters + 1)
        ts[0] = pc()
        for i in range(1, iters + 1):
            call()
            ts[i] = pc()
        samples = [ts[i] - ts[i - 1] for i in range(1, iters + 1)]
        t0 = pc()
        for _ in range(iters):
            call()
        t1 = pc()
        rtt = percentiles(samples)
        rtt["mean"] = (t1 - t0) / iters / 1e3
        return {"rtt_us": rtt, "one_way_us": scale_stats(rtt, 0.5), "iters": iters}

    def bandwidth(self, size: int, count: int, window: int) -> Dict[str, Any]:
        import numpy as np
        t = self.t
        payload = t.Buffer(np.ones(max(size, 1), dtype=np.uint8)[:size] if size else bytearray(0))
        ack = bytearray(16)
        self.command(op="bw", size=size, count=count, window=window)
        ack_req = self.ep.recv_nb(ack, tag=ACK, tag_mask=t.EXACT_TAG)
        send_nb = self.ep.send_nb
        t0 = time.perf_counter()
        inflight = []
        for i in range(count):
            if len(inflight) >= window:
                inflight.pop(0).wait(timeout=60)
            inflight.append(send_nb(payload, tag=DATA))
        for r in inflight:
            r.wait(timeout=60)
        ack_req.wait(timeout=60)
        dt = time.perf_counter() - t0
        return {"bw_MBps": size * count / dt / 1e6, "msg_rate": count / dt, "count": count,
                "seconds": dt}

    def close(self):
        try:
            self.ep.send(json.dumps({"op": "bye"}).encode(), tag=CTRL)
        except Exception:
            pass
        self.ep.close()
        self.w.close()
        self.ctx.close()


def _start_local_server(tls: str, max_size: int, cpu: Optional[int]) -> tuple:
    cmd = [sys.executable, "-m", "gpuwire.bench.transport", "--serve", "--listen", "127.0.0.1:0",
           "--tls-raw", tls, "--max-size", str(max_size), "--once", "--ready-stdout"]
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    return p, f"127.0.0.1:{wait_ready_port(p, 'bench server')}"


def run(args: argparse.Namespace) -> int:
    if args.serve:
        if not args.tls_raw:
            check_tls(args.tls.split("+")[0], TLS_MAP)
        tls = args.tls_raw or tls_pair(args.tls.split("+")[0])[0]
        return serve(args.listen, tls, args.max_size, once=args.once,
                     ready_fd=sys.stdout if args.ready_stdout else None)
    from . import perftest
    from ._progress import Progress

    sizes = args.sizes if isinstance(args.sizes, list) else size_range(args.sizes)
    tls_names = [x for x in args.tls.split("+") if x]
    if not tls_names:
        usage_error(f"--tls {args.tls!r}: no transport named")
    for n in tls_names:
        check_tls(n, TLS_MAP)
    tests = [x for x in args.tests.split(",") if x]
    for x in tests:
        if x not in ("lat", "bw"):
            usage_error(f"--tests: unknown test {x!r} (lat, bw)")
    if not tests:
        usage_error(f"--tests {args.tests!r}: no test named (lat, bw)")
    check_outputs_writable(args)
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    cfg = config_echo({"bench": "transport", "tls": {n: tls_pair(n) for n in tls_names},
                       "sizes": [human_size(s) for s in sizes], "tests": tests,
                       "warmup": args.warmup, "iters": args.iters, "bw_count": args.count,
                       "window": args.window, "repeat": args.repeat, "server": args.server or "loopback (own process)",
                       "server_cpu": args.server_cpu, "client_cpu": args.client_cpu,
                       "baseline": "none" if args.no_baseline else (perftest.perftest_path() or "missing")})
    print_config(cfg)
    rows: List[Dict[str, Any]] = []
    steps = len(tls_names) * len(sizes) * len(tests) * (1 if args.no_baseline else 2)
    prog = Progress(steps, "transport")
    for name in tls_names:
        ours, theirs = tls_pair(name)
        srv = None
        server = args.server
        if not server:
            try:
                srv, server = _start_local_server(ours, max(sizes), args.server_cpu)
            except RuntimeError as e:
                usage_error(f"{e} (UCX_TLS={ours})")
        try:
            cl = _Client(server, ours)
        except Exception as e:
            if srv is not None:
                srv.kill()
                srv.wait()
            usage_error(f"cannot connect to the bench server at {server} (UCX_TLS={ours}): "
                        f"{type(e).__name__}: {e}")
        transports = cl.ep.transports
        print(f"# {name}: gpuwire UCX_TLS={ours} data path {transports}; "
              f"ucx_perftest UCX_TLS={theirs}", flush=True)
        try:
            for size in sizes:
                for test in tests:
                    row: Dict[str, Any] = {"bench": "transport", "backend": "gpuwire", "tls": name,
                                           "size_bytes": size, "test": test, "transports": transports}
                    # Trials alternate gpuwire / ucx_perftest so that drift of the machine
                    # during the run (other load, frequency) hits both backends alike.
                    trials, base = [], []
                    for _ in range(args.repeat):
                        if test == "lat":
                            trials.append(cl.latency(size, args.warmup, lat_iters(size, args.iters)))
                        else:
                            trials.append(cl.bandwidth(size, bw_count(size, args.count), args.window))
                        if not args.no_baseline:
                            base.append(_baseline(perftest, args, cl, name, theirs, size, test))
                    row.update(_median(trials, test))
                    rows.append(row)
                    prog.update(1, f"gpuwire {name} {human_size(size)} {test}")
                    if not args.no_baseline:
                        rows.append(_median(base, test))
                        prog.update(1, f"perftest {name} {human_size(size)} {test}")
        except ServerError as e:
            prog.close()
            usage_error(str(e))
        finally:
            cl.close()
            if srv is not None:
                try:
                    srv.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    srv.kill()
    prog.close()
    merged = _merge(rows)
    _print_rows(merged)
    if not args.no_baseline:
        print()
        ratios = ratio_table(merged)
        cfg["ratios"] = ratios
    write_outputs(args, merged, cfg)
    if args.plot:
        plot(args.plot, merged, f"gpuwire transport vs ucx_perftest ({cfg['host']})")
    return 0


def _baseline(perftest, args, cl, name, tls, size, test) -> Dict[str, Any]:
    row: Dict[str, Any] = {"bench": "transport", "backend": "ucx_perftest", "tls": name,
                           "size_bytes": size, "test": test, "transports": tls}
    ptest = "tag_lat" if test == "lat" else "tag_bw"
    n = lat_iters(size, args.iters) if test == "lat" else bw_count(size, args.count)
    warm = args.warmup if test == "lat" else max(4, n // 10)
    try:
        if args.server:
            port = cl.command(op="perftest", tls=tls)["port"]
            host = args.server.rsplit(":", 1)[0].strip("[]")
            res = perftest.run_client(ptest, size, n, host, port, tls, args.client_cpu, warm,
                                      window=args.window)
        else:
            res = perftest.run_local(ptest, size, n, tls, args.server_cpu, args.client_cpu, warm,
                                     window=args.window)
    except Exception as e:
        row["error"] = str(e)[:500]
        return row
    if test == "lat":
        # perftest prints one-way latency; the round trip is twice that
        row["rtt_us"] = {"p50": 2 * res["lat_p50_us"], "mean": 2 * res["lat_avg_us"]}
        row["one_way_us"] = {"p50": res["lat_p50_us"], "mean": res["lat_avg_us"]}
        row["iters"] = int(res["iters"])
    else:
        row["bw_MBps"] = res["bw_overall_MiBps"] * perftest.MIB_TO_MB
        row["msg_rate"] = res["rate_overall"]
        row["count"] = int(res["iters"])
    return row


def _median(trials: List[Dict[str, Any]], test: str) -> Dict[str, Any]:
    """The median trial by the test's main metric (mean RTT for lat, bandwidth for bw);
    the same rule for gpuwire and ucx_perftest."""
    ok = [t for t in trials if "error" not in t]
    if not ok:
        return trials[0]

    def key(t):
        return t["rtt_us"]["mean"] if test == "lat" else t["bw_MBps"]
    ok.sort(key=key)
    best = dict(ok[len(ok) // 2])
    if len(trials) > 1:
        best["trials"] = len(trials)
    return best


def _merge(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (backend, tls, size): latency and bandwidth fields together."""
    out: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        k = (r["backend"], r["tls"], r["size_bytes"])
        m = out.setdefault(k, {"bench": "transport", "backend": r["backend"], "tls": r["tls"],
                               "size_bytes": r["size_bytes"], "transports": r.get("transports")})
        for key, v in r.items():
            if key in ("test",):
                continue
            if key == "error" and "error" in m:
                m["error"] += "; " + v
            elif key in ("iters", "count"):
                m[f"{'lat' if key == 'iters' else 'bw'}_{key}"] = v
            else:
                m.setdefault(key, v)
    return list(out.values())


def _print_rows(rows: List[Dict[str, Any]]) -> None:
    print(f"{'backend':13} {'tls':5} {'size':>8} {'rtt min':>9} {'p50':>9} {'p99':>9} {'p99.9':>9} "
          f"{'mean':>9} {'MB/s':>10} {'msg/s':>10}")
    for r in rows:
        rt = r.get("rtt_us") or {}

        def f(k):
            return f"{rt[k]:9.2f}" if k in rt else f"{'-':>9}"
        bw = f"{r['bw_MBps']:10.1f}" if r.get("bw_MBps") else f"{'-':>10}"
        mr = f"{r['msg_rate']:10.0f}" if r.get("msg_rate") else f"{'-':>10}"
        err = f"  ERROR {r['error'][:80]}" if r.get("error") else ""
        print(f"{r['backend']:13} {r['tls']:5} {human_size(r['size_bytes']):>8} {f('min')} {f('p50')} "
              f"{f('p99')} {f('p999')} {f('mean')} {bw} {mr}{err}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", default="tcp+sm",
                   help="transports to sweep, '+'-separated: tcp, sm (shared memory) or a UCX_TLS "
                        "value (default tcp+sm)")
    p.add_argument("--sizes", type=sizes_arg(0), default="8:64M", help="'8:64M' (powers of two) or '8,1K,1M'")
    p.add_argument("--tests", default="lat,bw", help="lat, bw or both")
    p.add_argument("--iters", type=int_arg(1), default=20000, help="timed round trips per size (capped by 1 GiB moved)")
    p.add_argument("--warmup", type=int_arg(0), default=1000, help="untimed round trips before each size")
    p.add_argument("--count", type=int_arg(1), default=100000, help="messages per bandwidth point (capped by 2 GiB)")
    p.add_argument("--window", type=int_arg(1, 1024), default=32, help="outstanding sends in the bandwidth test")
    p.add_argument("--repeat", type=int_arg(1), default=1,
                   help="trials per point, both backends, alternating gpuwire and ucx_perftest; the median trial is reported")
    p.add_argument("--server", help="HOST:PORT of a `gpuwire bench transport --serve` (else loopback)")
    p.add_argument("--serve", action="store_true", help="run the bench server")
    p.add_argument("--listen", default="0.0.0.0:13370", help="server: HOST:PORT to listen on")
    p.add_argument("--max-size", type=size_arg(1), default=64 << 20,
                   help="server: largest message it accepts")
    p.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready-stdout", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tls-raw", help=argparse.SUPPRESS)
    p.add_argument("--no-baseline", action="store_true", help="skip ucx_perftest")
    p.add_argument("--server-cpu", type=int, help="pin the loopback server (and perftest server) to this CPU")
    p.add_argument("--client-cpu", type=int, help="pin the client (and perftest client) to this CPU")
    add_output_arguments(p)
    p.add_argument("--plot", help="write a latency/bandwidth plot (PNG; needs matplotlib)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    return _cli.subcommand(subparsers, "transport", "transport latency/bandwidth sweep vs ucx_perftest",
                           __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(_cli.main("transport", add_arguments, run))
