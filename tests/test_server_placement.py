"""Thread placement: gpuwire._affinity.place_threads, and the server's rpc_server_session_cpu
(a session worker's session thread alone on its CPU, the worker's other threads elsewhere)."""
from __future__ import annotations

import os
import subprocess
import threading

import pytest

from gpuwire._affinity import place_threads
from test_rpc_support import start_server, wait_until

ALLOWED = sorted(os.sched_getaffinity(0))
need2 = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs")


def _restore():
    for t in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(t), set(ALLOWED))
        except ProcessLookupError:
            pass


@need2
def test_place_threads_moves_the_others_and_keeps_mine():
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    th.start()
    a, b = ALLOWED[0], ALLOWED[1]
    try:
        assert place_threads({a}, {b}) >= 2
        assert os.sched_getaffinity(0) == {a} and os.sched_getaffinity(th.native_id) == {b}
        assert place_threads(None, {a, b}) >= 1            # None: the caller stays where it is
        assert os.sched_getaffinity(0) == {a} and os.sched_getaffinity(th.native_id) == {a, b}
    finally:
        stop.set()
        th.join()
        _restore()


@pytest.mark.parametrize("mine, others", [(set(), {0}), ({0}, set())])
def test_place_threads_refuses_empty_sets(mine, others):
    with pytest.raises(ValueError, match="empty CPU set"):
        place_threads(mine, others)


def _tasks(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(t)] = os.sched_getaffinity(int(t))
        except ProcessLookupError:
            pass
    return out


@need2
def test_session_worker_puts_its_session_thread_alone_on_the_cpu():
    """A process-isolation server on CPUs {a, b} with rpc_server_session_cpu = a: the worker
    that serves the session runs its session thread (the worker's main thread) on a alone and
    its other threads on b; the spare workers kept ahead are left as they were."""
    a, b = ALLOWED[0], ALLOWED[1]
    env = dict(os.environ, GPUWIRE_RPC_SERVER_SESSION_CPU=str(a))
    srv = start_server("cpu-proc", env=env)
    try:
        os.sched_setaffinity(srv.p.pid, {a, b})             # (workers started later inherit it)
        s = srv.connect()
        try:
            s.gwSync()

            def placed():
                kids = subprocess.run(["pgrep", "-P", str(srv.p.pid)], capture_output=True,
                                      text=True).stdout.split()
                for k in map(int, kids):
                    try:
                        tasks = _tasks(k)
                    except FileNotFoundError:
                        continue
                    if tasks.get(k) == {a}:
                        return k, tasks
                return None
            got = wait_until(placed, timeout=10)
            assert got, "no session worker placed its session thread"
            pid, tasks = got
            others = {t: c for t, c in tasks.items() if t != pid}
            assert others and all(c == {b} for c in others.values()), others
            s.gwSync()                                     # and it keeps serving
        finally:
            s.close()
    finally:
        srv.stop()
