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


def _all_on(pid, cpus):
    try:
        tasks = _tasks(pid)
    except FileNotFoundError:
        return False
    return bool(tasks) and all(c == cpus for c in tasks.values())


@need2
def test_spare_workers_start_on_the_spawn_cpus_and_serve_on_the_servers():
    """rpc_worker_spawn_cpus = a, server on b: the spare session workers start (and
    initialise) on a, off the CPUs of running sessions; the one a client connects to moves
    all its threads to b before the session runs, and serves; the next spare stays on a."""
    a, b = ALLOWED[0], ALLOWED[1]
    env = {"GPUWIRE_RPC_WORKER_SPAWN_CPUS": str(a)}
    try:
        os.sched_setaffinity(0, {b})                       # the server (acceptor) on b
        srv = start_server("cpu-proc", env=env)
    finally:
        _restore()
    try:
        def kids():
            return [int(k) for k in subprocess.run(["pgrep", "-P", str(srv.p.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        spares = wait_until(lambda: (lambda ks: ks if len(ks) >= 2 and all(_all_on(k, {a}) for k in ks) else None)(
            kids()), timeout=20)
        assert spares, {k: _tasks(k) for k in kids()}
        s = srv.connect()
        try:
            s.gwSync()
            served = wait_until(lambda: [k for k in kids() if _all_on(k, {b})], timeout=10)
            assert served and len(served) == 1, {k: _tasks(k) for k in kids()}
            assert served[0] in spares                     # a spare started on a, moved to b
            assert len(_tasks(served[0])) >= 2             # (its threads too, not only the main one)
            rest = wait_until(lambda: [k for k in kids() if k != served[0] and _all_on(k, {a})], timeout=20)
            assert rest, {k: _tasks(k) for k in kids()}    # the spares started meanwhile: on a
            s.gwSync()
        finally:
            s.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("value, msg", [
    ("x", "GPUWIRE_RPC_WORKER_SPAWN_CPUS='x': bad CPU number or range 'x'"),
    ("3-1", "bad CPU number or range '3-1'"),
    ("99999", r"CPUs \[99999\] do not exist on this machine"),
])
def test_bad_spawn_cpus_stop_the_server_with_what_is_wrong(value, msg):
    import re
    import sys
    r = subprocess.run([sys.executable, "-m", "gpuwire.rpc.cli", "--executor", "cpu", "--isolation", "process",
                        "--listen", "127.0.0.1:0", "--token", "t0k"],
                       env=dict(os.environ, GPUWIRE_RPC_WORKER_SPAWN_CPUS=value),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and re.search(msg, r.stderr), r.stderr[-1000:]
