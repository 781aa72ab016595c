"""The C server's per-frame timestamps (rpc_trace_dir) and its skipped second stream sync
(rpc_server_skip_ssync), through the CPU executor: memsets, small D2H pushes and stream
syncs run in C there (the host 'driver' of gpuwire._rpc counts its calls), launches in
Python."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from gpuwire import settings as _settings

_rpc = pytest.importorskip("gpuwire._rpc", reason="gpuwire._rpc is not built (pip install -e .)")
lib = _rpc.lib
from gpuwire.rpc import server as S  # noqa: E402
from test_rpc_support import live_session  # noqa: E402

SSYNC = 8      # GW_RPC_STREAM_SYNC: the host driver's stream-sync counter
F_SYNC, F_PASS = 1, 2


def _server():
    srv = S.Server("127.0.0.1:0", executor="cpu", no_auth=True, isolation="thread", cpu_mem_gib=1)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    return srv, th


def _stop(srv, th):
    srv.shutdown()
    th.join(timeout=20)




def _connect(srv, first: int = 8):
    import gpuwire
    with _settings.override(rpc_flush_us=0, rpc_batch_first=first):    # 8: a step is one frame
        return gpuwire.connect(f"127.0.0.1:{srv.port}", name="test-trace")


@pytest.fixture
def traced(tmp_path):
    with _settings.override(rpc_trace_dir=str(tmp_path), rpc_trace_frames=64):
        srv, th = _server()
        try:
            yield srv, tmp_path
        finally:
            _stop(srv, th)


def _step(s, st, buf, out):
    """memset + D2H + stream sync: one sync frame the C server runs entirely."""
    s.cuMemsetD32Async(buf, 7, 4, st)
    s.cuMemcpyDtoHAsync(out, buf, 16, st)
    s.cuStreamSynchronize(st)


def test_trace_records_each_frame_in_order_with_monotonic_points(traced):
    srv, _dir = traced
    with _settings.override(rpc_reply_inline_max=0):     # the loss goes back as a push message
        s = _connect(srv)
    try:
        sess = live_session(srv)
        buf = s.alloc(64)
        st = s.stream()
        out = np.zeros(4, np.uint32)
        s.gwSync()
        seq0 = s._seq
        t0 = time.monotonic_ns()
        for _ in range(3):
            _step(s, st, buf, out)
        t1 = time.monotonic_ns()
        assert (out == 7).all()
        rows = [dict(zip(sess.serve_c.TRACE_FIELDS, r)) for r in sess.serve_c.trace_rows()]
        mine = [r for r in rows if r["seq"] >= seq0]
        assert [r["seq"] for r in mine] == list(range(seq0, s._seq))
        for r in mine:
            assert r["flags"] == F_SYNC and r["ncalls"] == 3 and r["npush"] == 1
            # same clock as the client's (CLOCK_MONOTONIC), inside the client's window
            assert t0 <= r["t_in"] <= r["t_scan"] <= r["t_first"] <= r["t_issued"] <= r["t_waited"] <= r["t_out"] <= t1
    finally:
        s.close()


def test_trace_marks_frames_passed_to_python_and_keeps_the_last_frames(traced):
    srv, _dir = traced
    s = _connect(srv)
    try:
        sess = live_session(srv)
        buf = s.alloc(64)
        st = s.stream()
        out = np.zeros(4, np.uint32)
        s.cuMemAlloc(128)
        s.mem_get_info()                   # a sync call C does not run: passed to Python
        seq_pass = s._seq - 1
        rows = [dict(zip(sess.serve_c.TRACE_FIELDS, r)) for r in sess.serve_c.trace_rows()]
        r = [x for x in rows if x["seq"] == seq_pass][-1]
        assert r["flags"] == F_SYNC | F_PASS and r["t_out"] >= r["t_in"] > 0 and r["t_scan"] == 0
        for _ in range(80):                # more than rpc_trace_frames (64)
            _step(s, st, buf, out)
        rows = sess.serve_c.trace_rows()
        assert len(rows) == 64 and int(sess.serve_c.v.trace_n) >= 81
        seqs = [x[0] for x in rows]
        assert seqs == list(range(s._seq - 64, s._seq))
    finally:
        s.close()


def test_trace_file_written_when_the_session_ends(traced):
    srv, tdir = traced
    s = _connect(srv)
    sess = live_session(srv)
    buf = s.alloc(64)
    st = s.stream()
    out = np.zeros(4, np.uint32)
    s.gwSync()                             # (the stream's creation goes through Python)
    for _ in range(5):
        _step(s, st, buf, out)
    last = s._seq - 1
    s.close()
    for _ in range(250):
        files = list(tdir.glob("gpuwire-trace-*.json"))
        if files:
            break
        time.sleep(0.02)
    assert len(files) == 1 and files[0].name.endswith(f"-{sess.id}.json")
    doc = json.loads(files[0].read_text())
    assert doc["fields"][:2] == ["seq", "ncalls"] and doc["client"]["name"] == "test-trace"
    seqs = [f[0] for f in doc["frames"]]
    assert last in seqs and doc["frames_total"] == len(doc["frames"])
    assert doc["c_frames"] >= 5


def test_no_trace_without_the_setting():
    srv, th = _server()
    try:
        s = _connect(srv)
        try:
            sess = live_session(srv)
            s.gwSync()
            assert sess.serve_c.trace_rows() == [] and int(sess.serve_c.v.trace_n) == 0
        finally:
            s.close()
    finally:
        _stop(srv, th)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_sync_after_a_push_wait_on_the_same_stream(skip):
    """[memset, D2H(st), sync(st)]: the push's wait already synchronized st, so with the
    setting on the stream sync makes no second driver call; the bytes and the answer are
    the same either way."""
    with _settings.override(rpc_server_skip_ssync=skip):
        _skip_case(skip)


def _skip_case(skip):
    srv, th = _server()
    try:
        s = _connect(srv)
        try:
            sess = live_session(srv)
            buf = s.alloc(64)
            st = s.stream()
            out = np.zeros(4, np.uint32)
            s.gwSync()
            n0, k0 = lib.gw_rpc_host_count(SSYNC), int(sess.serve_c.v.ssync_skipped)
            _step(s, st, buf, out)
            assert (out == 7).all()
            assert lib.gw_rpc_host_count(SSYNC) - n0 == (1 if skip else 2)
            assert int(sess.serve_c.v.ssync_skipped) - k0 == (1 if skip else 0)
        finally:
            s.close()
    finally:
        _stop(srv, th)


def test_stream_sync_still_waits_after_work_issued_since_the_push_or_on_another_stream():
    with _settings.override(rpc_server_skip_ssync=True):
        _still_waits_case()


def _still_waits_case():
    srv, th = _server()
    try:
        s = _connect(srv)
        try:
            sess = live_session(srv)
            buf = s.alloc(64)
            st, st2 = s.stream(), s.stream()
            out = np.zeros(4, np.uint32)
            s.gwSync()
            n0, k0 = lib.gw_rpc_host_count(SSYNC), int(sess.serve_c.v.ssync_skipped)
            # work after the push's wait: the sync waits for it
            s.cuMemcpyDtoHAsync(out, buf, 16, st)
            s.cuMemsetD32Async(buf, 9, 4, st)
            s.cuStreamSynchronize(st)
            assert lib.gw_rpc_host_count(SSYNC) - n0 == 2
            # a different stream than the push's
            s.cuMemcpyDtoHAsync(out, buf, 16, st)
            s.cuStreamSynchronize(st2)
            assert lib.gw_rpc_host_count(SSYNC) - n0 == 4
            assert int(sess.serve_c.v.ssync_skipped) == k0
            assert (out == 9).all()
        finally:
            s.close()
    finally:
        _stop(srv, th)


def test_bench_boundary_split_joins_client_and_server_timestamps(traced):
    """The bench's --trace analysis on real timestamps: steps of memset + loss D2H + stream
    sync (no kernels: the CPU executor runs those in Python) are joined by frame seq; each
    step's parts add up to its boundary and are in causal order."""
    from gpuwire.bench import rpc as R
    srv, tdir = traced
    import os
    s = _connect(srv, first=2)            # first batch: memset + D2H, then the sync alone
    sess = live_session(srv)
    before = set(os.listdir(tdir))
    lossbuf = s.alloc(4)
    st = s.stream()
    loss = np.zeros(1, np.float32)
    s.gwSync()
    ct = R._mlp_remote_trace(s, st, [], loss, lossbuf, 12)
    s.close()
    doc = R._new_trace(str(tdir), before)
    assert doc is not None and doc["session"] == sess.id
    raw = R._trace_split(ct, doc, raw=True)
    n = len(raw["boundary"])
    assert n == 11 and raw["srv_frames_per_step"] == [2.0] * n
    parts = [k for k, _ in R.SPLIT_PARTS if k != "boundary"]
    for i in range(n):
        assert sum(raw[k][i] for k in parts) == pytest.approx(raw["boundary"][i], abs=1e-6)
        for k in parts:
            if k != "batch_to_server":
                assert raw[k][i] >= 0, k
    med = R._trace_split(ct, doc)
    assert med["steps_joined"] == n and all(med[k] is not None for k, _ in R.SPLIT_PARTS)


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_trace_dir_reaches_a_server_process_and_its_session_workers(tmp_path, isolation):
    """What `bench rpc --trace` relies on: the setting given to a `gpuwire serve` process
    (environment) reaches its session workers (process isolation, as the GPU executor
    runs), and the session's file holds the frames the client sent."""
    import os
    from gpuwire.bench import rpc as R
    env = dict(os.environ, GPUWIRE_RPC_TRACE_DIR=str(tmp_path))
    p, addr = R.start_rpc_server("cpu", "tcp,self", "tok-trace", ["--isolation", isolation], env=env)
    try:
        import gpuwire
        s = gpuwire.connect(addr, token="tok-trace", tls="tcp,self", name="bench")
        d = s.alloc(64)
        out = np.zeros(4, np.uint32)
        s.gwSync()
        s.cuMemsetD32Async(d, 3, 4, 0)
        s.cuMemcpyDtoHAsync(out, d, 16, 0)
        s.cuStreamSynchronize(0)
        last = s._seq - 1
        s.close()
        assert (out == 3).all()
        doc = R._new_trace(str(tmp_path), set(), want_seq=last)
        assert doc is not None and doc["client"]["name"] == "bench"
        rows = {r[0]: dict(zip(doc["fields"], r)) for r in doc["frames"]}
        assert rows[last]["flags"] & F_SYNC and not rows[last]["flags"] & F_PASS
        assert 0 < rows[last]["t_in"] <= rows[last]["t_out"]
    finally:
        R.stop(p)
