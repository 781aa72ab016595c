"""Shared fixtures of the RPC tests: a real `gpuwire serve` subprocess on loopback
(CPU executor everywhere; GPU executor where a GPU and cuda.bindings are present)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuwire.rpc import kernels as _kernels  # noqa: E402 - the package ships the test kernels

KERNELS = _kernels.HERE
PTX = _kernels.PTX
TOKEN = "test-token-0123456789"


def gpu_available() -> str:
    """'' when the GPU executor can run here, else why not."""
    try:
        from cuda.bindings import driver as cu
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"cuda.bindings not importable ({type(e).__name__})"
    try:
        err, = cu.cuInit(0)
        if int(err) != 0:
            return f"cuInit failed ({err})"
        err, n = cu.cuDeviceGetCount()
        if int(err) != 0 or n < 1:
            return "no CUDA device"
    except Exception as e:  # pragma: no cover
        return f"CUDA driver unusable ({e})"
    return ""


class ServerProc:
    def __init__(self, executor: str, token: str = TOKEN, extra=(), env=None):
        self.executor = executor
        extra = list(extra)
        self.isolation = (extra[extra.index("--isolation") + 1] if "--isolation" in extra
                          else ("process" if executor == "gpu" else "thread"))
        self.token = token
        cmd = [sys.executable, "-m", "gpuwire.rpc.cli", "--executor", executor, "--listen", "127.0.0.1:0",
               "--ready-stdout", "--log-level", os.environ.get("GPUWIRE_TEST_LOG", "warning")]
        if token:
            cmd += ["--token", token]
        else:
            cmd += ["--no-auth"]
        if executor == "cpu":
            cmd += ["--cpu-mem-gib", "2"]
        cmd += list(extra)
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=e)
        line = self.p.stdout.readline()
        if not line.strip():
            self.p.wait(timeout=10)
            raise RuntimeError(f"gpuwire serve --executor {executor} failed to start (rc {self.p.returncode})")
        self.port = int(line)
        self.address = f"127.0.0.1:{self.port}"

    def connect(self, **kw):
        import gpuwire
        kw.setdefault("token", self.token)
        return gpuwire.connect(self.address, **kw)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


# cpu: the C decoder and dispatch loop (when gpuwire._rpc is built); cpu-py: the Python ones
EXECUTORS = ["cpu", "cpu-py", pytest.param("gpu", marks=pytest.mark.gpu)]


def start_server(kind: str, **kw) -> ServerProc:
    if kind == "gpu":
        why = gpu_available()
        if why:
            pytest.skip(f"GPU executor: {why}")
    if kind == "cpu-proc":
        return ServerProc("cpu", extra=["--isolation", "process"] + list(kw.pop("extra", ())), **kw)
    if kind == "cpu-py":
        env = dict(kw.pop("env", None) or {})
        env["GPUWIRE_RPC_C_SERVER"] = "0"
        return ServerProc("cpu", env=env, **kw)
    return ServerProc(kind, **kw)


def wait_until(pred, timeout=5.0, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def syncs_in_a_thread(s, timeout=10.0):
    """gwSync from another thread; True if it returned (or raised) within ``timeout`` (a
    session whose wire lock leaked would wait forever)."""
    import threading
    done = []

    def run():
        try:
            s.gwSync()
        except BaseException:            # noqa: BLE001 - only termination matters here
            pass
        done.append(1)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    return bool(done)


def close_soon(s, timeout=10.0):
    """close() from a daemon thread (a session whose wire lock leaked would wait forever)."""
    import threading
    th = threading.Thread(target=s.close, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "close() hung on the wire lock"


def live_session(srv, tries: int = 200):
    """The first ready session of an in-process Server (waits up to tries x 20 ms)."""
    import time
    for _ in range(tries):
        live = [x for x in list(srv.sessions.values()) if x.ready]
        if live:
            return live[0]
        time.sleep(0.02)
    raise AssertionError("no session on the server")


@__import__("contextlib").contextmanager
def inproc_server(overrides=None, **kw):
    """A CPU-executor Server in this process (thread isolation, no auth, 1 GiB), serving on a
    thread, under the settings ``overrides``; ``kw`` goes to the Server."""
    import threading
    from gpuwire import settings
    from gpuwire.rpc import server as S
    with settings.override(**(overrides or {})):
        srv = S.Server("127.0.0.1:0", executor="cpu", no_auth=True, isolation="thread", cpu_mem_gib=1, **kw)
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        try:
            yield srv
        finally:
            srv.shutdown()
            th.join(timeout=20)


def copy_roundtrip(s, n: int, mod: int = 251) -> bool:
    """``n`` patterned bytes through a fresh allocation of session ``s`` (sync H2D, then D2H):
    True when they come back whole."""
    import numpy as np
    a = (np.arange(n) % mod).astype(np.uint8)
    with s.alloc(n) as d:
        s.cuMemcpyHtoD(d, a, n)
        back = np.zeros(n, np.uint8)
        s.cuMemcpyDtoH(back, d, n)
    return bool(np.array_equal(back, a))
