"""The worker's progress thread (Worker.start_progress_thread, gw_worker_pump_* in
cffi_src/gw_ucx.c): over tcp a rendezvous message moves only while some thread progresses the
sending worker; with the progress thread it moves while the caller sleeps. Real UCX workers on
loopback tcp (two workers of one process, the receiver a C sink on its own thread)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gpuwire import transport as t

TLS = "tcp,self"
SZ = 4 << 20


def _sink_pair(ctx, count, window=4, size=SZ):
    """(client worker, its endpoint, server thread, results): the server's C sink takes
    ``count`` messages of tag 3 into one buffer (the last one stays)."""
    ws, wc = ctx.worker(), ctx.worker()
    lst = ws.listen("127.0.0.1", 0)
    got = {}

    def server():
        sep = lst.accept(timeout=10)
        sink = bytearray(size)
        try:
            sep.serve_sink(sink, count, window=window, tag=3, timeout=30)
            got["last"] = bytes(sink)
        except Exception as e:  # checked by the test
            got["error"] = e

    th = threading.Thread(target=server)
    th.start()
    ep = wc.connect(lst.address, timeout=10)
    return wc, ep, th, got


@pytest.mark.parametrize("thread", [False, True])
def test_rendezvous_sends_move_while_the_caller_sleeps_only_with_the_thread(thread):
    n = 8
    with t.Context({"TLS": TLS}) as ctx:
        wc, ep, th, got = _sink_pair(ctx, n)
        if thread:
            wc.start_progress_thread(64 << 10)
        data = [np.full(SZ, k, np.uint8) for k in range(n)]
        reqs = [ep.send_nb(d, tag=3) for d in data]
        time.sleep(0.5)                      # this thread does not touch the worker meanwhile
        done = sum(r.done() for r in reqs)
        wc.wait_all(reqs, timeout=30)
        th.join(30)
        assert "error" not in got and got["last"] == data[-1].tobytes()
        st = wc.progress_thread_stats()
        if thread:
            assert done == n, f"{done} of {n} sends completed while the caller slept"
            assert st["running"] == 1 and st["requests"] >= 1 and st["in_flight"] == 0
        else:
            # the control: without the thread nothing drives the sender (else this test
            # could not tell the thread's work from UCX's own)
            assert done < n
            assert st == {"running": 0, "in_flight": 0, "passes": 0, "blocks": 0, "requests": 0}


def test_start_stop_and_what_it_drives():
    with t.Context({"TLS": TLS}) as ctx:
        wc, ep, th, got = _sink_pair(ctx, 4, size=1 << 20)
        with pytest.raises(ValueError, match="min_bytes"):
            wc.start_progress_thread(-1)
        wc.start_progress_thread(1 << 20)
        wc.start_progress_thread(1 << 20)           # idempotent
        assert wc.progress_thread_stats()["running"] == 1
        small = np.ones(1000, np.uint8)
        wc.wait_all([ep.send_nb(small, tag=9)], timeout=10)   # below min_bytes: not its business
        assert wc.progress_thread_stats()["requests"] == 0
        wc.stop_progress_thread()
        wc.stop_progress_thread()                   # a no-op
        assert wc.progress_thread_stats()["running"] == 0
        wc.start_progress_thread(0)                 # again, every transfer
        big = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)[:1 << 20]
        reqs = [ep.send_nb(big, tag=3) for _ in range(4)]
        wc.wait_all(reqs, timeout=30)
        th.join(30)
        assert "error" not in got and got["last"] == big.tobytes()
        t0 = time.monotonic()
        wc.close()                                   # stops the running thread
        assert time.monotonic() - t0 < 5


def test_threads_post_and_wait_while_it_runs():
    """Two threads stream on one worker while its progress thread runs: every message whole,
    no thread starved of the worker's lock."""
    per, size = 30, 1 << 20
    with t.Context({"TLS": TLS}) as ctx:
        ws, wc = ctx.worker(), ctx.worker()
        lst = ws.listen("127.0.0.1", 0)
        recv = {}

        def server():
            sep = lst.accept(timeout=10)
            bufs = [bytearray(size) for _ in range(2 * per)]
            reqs = [sep.recv_nb(b, tag=k % 2 + 1, tag_mask=t.EXACT_TAG) for k, b in enumerate(bufs)]
            ws.wait_all(reqs, timeout=60)
            recv["bufs"] = bufs

        th = threading.Thread(target=server)
        th.start()
        ep = wc.connect(lst.address, timeout=10)
        wc.start_progress_thread(0)
        errs = []

        def client(tag):
            try:
                for k in range(per):
                    ep.send_nb(np.full(size, (tag * 100 + k) % 251, np.uint8), tag=tag).wait(timeout=30)
            except Exception as e:
                errs.append(e)

        cs = [threading.Thread(target=client, args=(tag,)) for tag in (1, 2)]
        for c in cs:
            c.start()
        for c in cs:
            c.join(60)
        th.join(60)
        assert not errs
        bufs = recv["bufs"]
        # a tag's messages arrive in order (tag matching is ordered per sender)
        for tag in (1, 2):
            mine = [b for k, b in enumerate(bufs) if k % 2 + 1 == tag]
            assert [b[0] for b in mine] == [(tag * 100 + k) % 251 for k in range(per)]
            assert all(b.count(b[0]) == size for b in mine)
