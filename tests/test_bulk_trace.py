"""The C bulk handler's phase times (gw_rpc_bulk_stat GW_RPC_BS_HANDLER_NS.. / _cfast.BULK_STATS):
taken only while the server traces (rpc_trace_dir), written into the session's trace file
("bulk"), and the bw bench's --trace columns built from them. CPU executor (host memcpy for
the driver copies), real UCX."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gpuwire import settings as _settings
from gpuwire.rpc import server as S
from gpuwire.rpc.executors import _cfast as cf
from gpuwire.rpc.executors import cpu as _cpu  # noqa: F401 - registers rpc_cpu_chunk
from test_rpc_support import live_session, wait_until

pytestmark = pytest.mark.skipif(not cf.available(), reason="gpuwire._rpc is not built")

CHUNK = 256 << 10
SIZE = 1 << 20
NCOPY = 6
CHUNKS = NCOPY * (SIZE // CHUNK)


@contextlib.contextmanager
def _session(**over):
    """(client session, its server-side session, server) on an in-process CPU-executor server:
    payloads in 256 KiB chunks, 8 slots, at most 2 chunks posted (the inflight limit acts),
    D2H copy frames through the C ring."""
    with _settings.override(rpc_cpu_chunk=CHUNK, rpc_flush_us=0, rpc_c_bulk_slots=8,
                            rpc_c_bulk_inflight=2 * CHUNK, rpc_c_bulk_dtoh_min=CHUNK, **over):
        srv = S.Server("127.0.0.1:0", executor="cpu", no_auth=True, isolation="thread", cpu_mem_gib=1)
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        try:
            import gpuwire
            s = gpuwire.connect(f"127.0.0.1:{srv.port}", name="test-bulk-trace")
            try:
                yield s, live_session(srv), srv
            finally:
                s.close()
        finally:
            srv.shutdown()
            th.join(timeout=20)


def _copies(s):
    """NCOPY async 1 MiB H2D copies, a sync, NCOPY async D2H copies back, a sync; the bytes
    checked."""
    rng = np.random.default_rng(5)
    host = s.pinned(NCOPY * SIZE)
    host[:] = rng.integers(0, 256, host.size, dtype=np.uint8)
    d = s.alloc(NCOPY * SIZE)
    st = s.stream()
    s.gwSync()
    for i in range(NCOPY):
        s.cuMemcpyHtoDAsync(d + i * SIZE, host[i * SIZE:(i + 1) * SIZE], SIZE, st)
    s.cuStreamSynchronize(st)
    out = np.zeros(NCOPY * SIZE, np.uint8)
    for i in range(NCOPY):
        s.cuMemcpyDtoHAsync(out[i * SIZE:(i + 1) * SIZE], d + i * SIZE, SIZE, st)
        s.flush()
    s.cuStreamSynchronize(st)
    assert np.array_equal(out, host)


def _phase(st, p, x=""):
    return st[f"{p}{x}"]


def test_bulk_stat_names_follow_the_c_indices():
    lib = cf.lib
    assert len(cf.BULK_STATS) == lib.GW_RPC_BS_N == lib.GW_RPC_BS_PH0 + 3 * lib.GW_RPC_BPH_N
    assert len(cf.BULK_PHASES) == lib.GW_RPC_BPH_N
    assert cf.BULK_STATS[:6] == ("h2d", "d2h", "frames", "early", "pending", "max_pending")   # stable
    assert cf.BULK_STATS.index("handler_ns") == lib.GW_RPC_BS_HANDLER_NS
    assert cf.BULK_STATS.index("handler_calls") == lib.GW_RPC_BS_HANDLER_N
    for name, c in (("other", "OTHER"), ("prescan", "PRESCAN"), ("recv_post", "RECV_POST"),
                    ("recv_wait", "RECV_WAIT"), ("htod_call", "HTOD"), ("dtoh_call", "DTOH"),
                    ("evrec_h2d", "EVREC_H2D"), ("evrec_d2h", "EVREC_D2H"), ("evwait_h2d", "EVWAIT_H2D"),
                    ("evwait_d2h", "EVWAIT_D2H"), ("send_post", "SEND_POST"), ("send_wait", "SEND_WAIT"),
                    ("inflight", "INFLIGHT")):
        i = lib.GW_RPC_BS_PH0 + 3 * getattr(lib, f"GW_RPC_BPH_{c}")
        assert cf.BULK_STATS[i:i + 3] == (f"{name}_ns", f"{name}_n", f"{name}_incl_ns")


def test_traced_session_writes_phase_times_that_match_the_copies(tmp_path):
    with _session(rpc_trace_dir=str(tmp_path)) as (s, sess, _srv):
        assert sess.bulk_c is not None and sess.chunk == CHUNK
        t0 = time.monotonic_ns()
        _copies(s)
        t1 = time.monotonic_ns()
        live = sess.bulk_c.stats()
    # the file the session wrote when it ended: the counters as they were before the close
    assert wait_until(lambda: glob.glob(str(tmp_path / "gpuwire-trace-*.json")))
    (path,) = glob.glob(str(tmp_path / "gpuwire-trace-*.json"))
    doc = json.load(open(path))
    st = doc["bulk"]
    assert set(st) == set(cf.BULK_STATS)
    assert st["h2d"] == NCOPY and st["d2h"] == NCOPY and st["pending"] == 0
    # one entry per chunk for the per-chunk phases
    for p in ("recv_post", "recv_wait", "htod_call", "evrec_h2d", "dtoh_call", "evrec_d2h", "send_post"):
        assert st[f"{p}_n"] == CHUNKS, (p, st[f"{p}_n"])
    assert 0 < st["send_wait_n"] <= CHUNKS                      # 8 slots, 24 D2H chunks: slots reused
    assert 0 < st["inflight_n"] <= CHUNKS                       # 2 chunks posted at most
    assert st["max_pending"] <= 2
    assert 0 < st["evwait_h2d_n"] <= CHUNKS and 0 < st["evwait_d2h_n"] <= 2 * CHUNKS
    assert st["handler_calls"] >= st["frames"] >= 2 and st["prescan_n"] == st["other_n"] == st["handler_calls"]
    # times: exclusive ones add up to the handler's time, which fits in the session's span
    # (and in the client's window around the copies, plus the setup frames before it)
    excl = sum(st[f"{p}_ns"] for p in cf.BULK_PHASES)
    assert excl == st["handler_ns"] > 0
    assert st["other_incl_ns"] == st["handler_ns"]
    assert doc["t_start"] <= t0 < t1 <= doc["t_end"]
    assert st["handler_ns"] <= doc["t_end"] - doc["t_start"]
    for p in cf.BULK_PHASES:
        assert 0 <= st[f"{p}_ns"] <= st[f"{p}_incl_ns"] <= st["handler_ns"], p
        if st[f"{p}_n"] == 0:
            assert st[f"{p}_incl_ns"] == 0, p                    # never entered: no time
    for p in ("recv_wait", "htod_call", "dtoh_call", "send_post", "recv_post"):
        assert st[f"{p}_ns"] > 0, p
    # the live counters (read before the session ended): the file's, less the closing frames
    assert {k: live[k] for k in ("h2d", "d2h", "recv_post_n", "dtoh_call_n")} == \
        {k: st[k] for k in ("h2d", "d2h", "recv_post_n", "dtoh_call_n")}
    assert 0 < live["handler_ns"] <= st["handler_ns"]


def test_untraced_session_leaves_phase_times_zero(tmp_path):
    with _session() as (s, sess, _srv):
        assert sess.bulk_c is not None and not sess.trace_dir
        _copies(s)
        st = sess.bulk_c.stats()
    assert st["h2d"] == NCOPY and st["d2h"] == NCOPY           # the copies did run in C
    timed = cf.BULK_STATS[cf.lib.GW_RPC_BS_HANDLER_NS:]
    assert {k: st[k] for k in timed} == {k: 0 for k in timed}
    assert not os.listdir(tmp_path)


def test_bw_bench_trace_reports_issue_time_and_server_phases(tmp_path):
    """The bench's bw test with --trace against its own loopback server process: one session
    per size, the srv_* columns from each session's trace file."""
    out = tmp_path / "bw.json"
    env = dict(os.environ, GPUWIRE_RPC_CPU_CHUNK=str(CHUNK), GPUWIRE_RPC_C_BULK_DTOH_MIN=str(CHUNK))
    count = 8
    r = subprocess.run([sys.executable, "-m", "gpuwire.bench.rpc", "--executor", "cpu", "--tests", "bw",
                        "--sizes", "512K,1M", "--bw-count", str(count), "--bw-reps", "2", "--no-baseline",
                        "--trace", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.load(open(out))["rows"]
    assert [x["size_bytes"] for x in rows] == [512 << 10, 1 << 20]
    for row in rows:
        assert "srv_trace_error" not in row and "srv_bulk" not in row, row
        assert row["htod_issue_us"] > 0 and row["dtoh_issue_us"] > 0
        # every async H2D copy (a warm-up + count per rep) ran in the session's C bulk handler;
        # D2H copies that went out in a sync frame (the one before each stream sync) did not
        copies = (count + 1) * 2
        assert row["srv_h2d_copies"] == copies, row
        assert 0 < row["srv_d2h_copies"] <= copies, row
        assert row["srv_h2d_chunks"] == row["size_bytes"] // CHUNK
        for d in ("htod", "dtoh"):
            assert 0 < row[f"srv_{d}_busy_frac"] <= 1
            assert row[f"srv_{d}_frame_us"] > 0 and row[f"srv_{d}_frames"] >= 1 / count
        for k in ("srv_recv_wait_us", "srv_htod_call_us", "srv_dtoh_call_us", "srv_send_post_us", "srv_other_us"):
            assert row[k] > 0, k
        assert all(v >= 0 for k, v in row.items() if k.startswith("srv_") and k.endswith("_us"))
        assert row["srv_prescan_incl_us"] >= row["srv_prescan_us"]
