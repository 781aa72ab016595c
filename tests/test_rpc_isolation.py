"""Process isolation (`gpuwire serve --isolation process`, the GPU executor's default):
the server hands every authenticated client to a session worker process of its own.
Run here with the CPU executor; the GPU suite (tests/test_rpc*.py, marked gpu) runs
in this mode by default."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpuwire.rpc import AuthenticationError, CudaError
from test_rpc_support import PTX, start_server, wait_until


@pytest.fixture(scope="module")
def server():
    srv = start_server("cpu", extra=["--isolation", "process"])
    yield srv
    srv.stop()


def test_session_runs_in_a_worker_process(server):
    with server.connect(name="iso") as s:
        assert s.address != server.address                 # redirected to the worker's port
        with s.alloc(256) as d:
            s.cuMemsetD8(d, 9, 256)
            assert (s.copy_to_host(np.zeros(256, np.uint8), d) == 9).all()


def test_auth_is_checked_before_any_worker(server):
    with pytest.raises(AuthenticationError):
        server.connect(token="nope")


def test_fault_in_one_session_leaves_the_others(server):
    a = server.connect(name="a")
    b = server.connect(name="b")
    try:
        m = a.load_module(PTX)
        a.launch(m.function("poke"), 1, 1, (8,))
        with pytest.raises(CudaError):
            a.cuCtxSynchronize()
        c = server.connect(name="c")                      # new sessions still start
        try:
            with c.alloc(64) as d:
                c.cuMemsetD8(d, 1, 64)
                c.gwSync()
        finally:
            c.close()
        with b.alloc(64) as d:
            b.cuMemsetD8(d, 2, 64)
            assert (b.copy_to_host(np.zeros(64, np.uint8), d) == 2).all()
    finally:
        a.close()
        b.close()


def test_worker_exits_with_its_session(server):
    s = server.connect(name="short")
    port = int(s.address.rsplit(":", 1)[1])
    s.gwSync()
    s.close()

    def gone():
        out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        return f":{port} " not in out
    assert wait_until(gone, 10), "the session worker kept listening after its session ended"


_KILLED = textwrap.dedent("""
    import sys, gpuwire
    s = gpuwire.connect(sys.argv[1], token=sys.argv[2])
    s.alloc(1 << 20); s.gwSync()
    print(s.address, flush=True)
    import time; time.sleep(60)
""")


def test_killed_client_ends_its_worker(server):
    p = subprocess.Popen([sys.executable, "-c", _KILLED, server.address, server.token], stdout=subprocess.PIPE,
                         text=True)
    addr = p.stdout.readline().strip()
    port = int(addr.rsplit(":", 1)[1])
    p.send_signal(signal.SIGKILL)
    p.wait()

    def gone():
        out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        return f":{port} " not in out
    assert wait_until(gone, 10), "the worker of a killed client did not end"


def _fd_target(pid: int, fd: int) -> str:
    import os
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def test_server_and_worker_stdout_go_to_stderr_after_the_ready_line(server):
    """`--ready-stdout`: the parent reads the port line from the pipe and nothing after it, so
    the server (and each session worker, which the server starts the same way) points its
    stdout at its stderr once the line is out: later output (UCX's log is written to stdout)
    cannot fill a pipe nobody reads and block it. The server's end of the pipe is closed (the
    parent reads EOF while it runs); every session worker's fd 1 is its fd 2."""
    import os
    import threading
    got = []
    th = threading.Thread(target=lambda: got.append(server.p.stdout.read()), daemon=True)
    th.start()
    th.join(10)
    assert not th.is_alive() and got == [""], "the server still holds the stdout pipe"
    assert server.alive()
    assert _fd_target(server.p.pid, 1) == _fd_target(server.p.pid, 2)
    with server.connect(name="fds") as s:

        def workers_redirected():
            try:        # (a spare started at this connect writes its line within a second or so)
                kids = [int(x) for t in os.listdir(f"/proc/{server.p.pid}/task")
                        for x in open(f"/proc/{server.p.pid}/task/{t}/children").read().split()]
                return bool(kids) and all(_fd_target(k, 1) == _fd_target(k, 2) for k in kids)
            except OSError:   # (a thread or worker exited meanwhile: look again)
                return False
        assert wait_until(workers_redirected, timeout=30)
        s.gwSync()
