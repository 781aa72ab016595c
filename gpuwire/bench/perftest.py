"""The ucx_perftest baseline: the C benchmark shipped in the libucx wheel, run
with the same transports and sizes as our sweep, in the same run.

ucx_perftest reports one-way latency (half the round trip) in microseconds and
bandwidth in MB/s with MB = 2^20 bytes; rows here convert to round trip and to
10^6-byte MB/s like gpuwire's rows.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from typing import Dict, List, Optional

MIB_TO_MB = (1 << 20) / 1e6


def perftest_path() -> Optional[str]:
    try:
        import libucx
        d = os.path.dirname(libucx.__file__)
        p = os.path.join(d, "bin", "ucx_perftest")
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which("ucx_perftest")


def perftest_env(tls: str) -> Dict[str, str]:
    env = dict(os.environ)
    try:
        import libucx
        lib = os.path.join(os.path.dirname(libucx.__file__), "lib")
        env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    except ImportError:
        pass
    env["UCX_TLS"] = tls
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_FINAL = re.compile(r"^Final:\s+(.*)$", re.M)


def parse_final(text: str) -> Dict[str, float]:
    m = _FINAL.search(text)
    if not m:
        raise RuntimeError("ucx_perftest printed no 'Final:' line:\n" + text[-2000:])
    f = [float(x) for x in m.group(1).split()]
    # iterations, lat p50, lat avg, lat overall, bw avg, bw overall, rate avg, rate overall
    return {"iters": f[0], "lat_p50_us": f[1], "lat_avg_us": f[2], "lat_overall_us": f[3],
            "bw_avg_MiBps": f[4], "bw_overall_MiBps": f[5], "rate_avg": f[6], "rate_overall": f[7]}


def _taskset(cpu: Optional[int]) -> List[str]:
    if cpu is None or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", str(cpu)]


def run_local(test: str, size: int, iters: int, tls: str, server_cpu: Optional[int] = None,
              client_cpu: Optional[int] = None, warmup: Optional[int] = None,
              timeout: float = 120.0, window: int = 32, attempts: int = 3) -> Dict[str, float]:
    """Run a perftest server and client on this host (loopback) and parse the result.

    A failed attempt (the server exited, e.g. its port was taken between free_port and its bind,
    or the client failed) is retried with a fresh server and port, up to `attempts` times in
    all; the error names every attempt's failure."""
    errors = []
    for _ in range(max(1, attempts)):
        try:
            return _run_local_once(test, size, iters, tls, server_cpu, client_cpu, warmup,
                                   timeout, window)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            errors.append(str(e))
    raise RuntimeError(f"ucx_perftest failed {len(errors)} times; last: " + errors[-1]
                       + ("" if len(errors) == 1 else f" (first: {errors[0][:300]})"))


def _run_local_once(test, size, iters, tls, server_cpu, client_cpu, warmup, timeout, window):
    exe = perftest_path()
    if not exe:
        raise FileNotFoundError("ucx_perftest not found (libucx wheel missing?)")
    port = free_port()
    env = perftest_env(tls)
    srv = subprocess.Popen(_taskset(server_cpu) + [exe, "-p", str(port)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        return run_client(test, size, iters, "127.0.0.1", port, tls, client_cpu, warmup,
                          timeout, window, server=srv)
    except RuntimeError as e:
        if srv.poll() is not None and srv.stdout is not None:
            raise RuntimeError(f"{e}\nperftest server (rc {srv.returncode}): "
                               f"{srv.stdout.read()[-1000:]}") from None
        raise
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()


def run_client(test: str, size: int, iters: int, host: str, port: int, tls: str,
               client_cpu: Optional[int] = None, warmup: Optional[int] = None,
               timeout: float = 120.0, window: int = 32, server=None) -> Dict[str, float]:
    exe = perftest_path()
    env = perftest_env(tls)
    args = [exe, host, "-p", str(port), "-t", test, "-s", str(max(size, 1)), "-n", str(iters)]
    if warmup is not None:
        args += ["-w", str(warmup)]
    if test.endswith("_bw"):
        args += ["-O", str(window)]
    deadline = time.monotonic() + 10
    last = ""
    while True:
        p = subprocess.run(_taskset(client_cpu) + args, env=env, capture_output=True, text=True,
                           timeout=timeout)
        out = p.stdout + p.stderr
        if p.returncode == 0 and "Final:" in out:
            return parse_final(out)
        last = out
        # the server may not be listening yet
        if time.monotonic() > deadline or (server is not None and server.poll() is not None):
            raise RuntimeError(f"ucx_perftest {' '.join(args[1:])} failed (rc {p.returncode}):\n{last[-2000:]}")
        time.sleep(0.2)
