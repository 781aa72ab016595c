"""Launch-run graphs in the server's C dispatch loop (gw_rpc_graph_*): a run of launches the
session repeats is replayed as one graph. Here through the C host 'driver' (host graphs that
record their nodes and replay them through the host cuLaunchKernel, which logs every launch);
the GPU suite runs the same paths on CUDA graphs (tests/test_rpc_gpu.py)."""
import struct

import pytest

from gpuwire.rpc import protocol as P
from gpuwire.rpc import server as S
from gpuwire.rpc.executors import _cfast as cf
from gpuwire.rpc.spec import default_spec
from gpuwire.rpc.codegen import layout

pytestmark = pytest.mark.skipif(not cf.available(), reason="gpuwire._rpc is not built")

SPEC = default_spec()
lib, ffi = cf.lib, cf.ffi
F1, F2 = 0x300, 0x301                 # function wire ids
PTR1, PTR2 = 0xF1F1, 0xF2F2          # their host 'CUfunction's
ST = 0x5000                           # a stream wire id


def _rec(name, *fixed, blobs=()):
    L = layout(SPEC.calls[name])
    body = L.fixed.pack(*fixed)
    for b in blobs:
        body += struct.pack("<I", len(b)) + b
    return P.RECORD.pack(SPEC.calls[name].id, 0, 8 + len(body)) + body


def _launch(fid, p0, p1, stream=ST, grid=1, plen=16):
    params = struct.pack("<QI", p0, p1).ljust(plen, b"\0")
    return _rec("cuLaunchKernel", fid, grid, 1, 1, 1, 1, 1, 0, stream, blobs=[params])


def _memset(dst, stream=ST):
    return _rec("cuMemsetD8Async", dst, 7, 4, stream)


class Frame:
    def __init__(self, recs, sync=False):
        body = b"".join(recs)
        flags = P.F_SYNC if sync else 0
        self.buf = bytearray(P.HEADER.pack(P.MAGIC, 1, flags, 3, len(recs), len(body)) + body)
        self.c = ffi.cast("uint8_t *", ffi.from_buffer(self.buf))
        self.n = len(recs)
        self.recs = ffi.new("gw_rpc_rec_t[]", self.n)
        st, msg = cf.Scanner(S._table()).scan(self.c, P.HEADER_SIZE, len(self.buf), self.n, sync, self.recs)
        assert st == 0, msg


def _dispatch(min_run=8, cache=4, fns=None):
    d = cf.Dispatch(SPEC, cf.host_fns([0, 1]))
    for fid, ptr in ((F1, PTR1), (F2, PTR2)):
        d.bind("function", fid, type("F", (), {"ptr": ptr, "size": 16, "layout": [(0, 8), (8, 4)]})())
    d.bind("stream", ST, type("S", (), {"ptr": 0x77})())
    d.host_mem = ffi.new("uint8_t[]", 4096)          # (the host memset writes here)
    d.alloc(int(ffi.cast("uintptr_t", d.host_mem)), 4096)
    assert d.graphs(cf.graph_host_fns() if fns is None else fns, min_run, cache)
    return d


def _log_since(n0):
    n = lib.gw_rpc_host_log_n()
    return [(lib.gw_rpc_host_log(i, 0), lib.gw_rpc_host_log(i, 1), lib.gw_rpc_host_log(i, 2)) for i in range(n0, n)]


def _run(d, fr):
    n0 = lib.gw_rpc_host_log_n()
    k, res, msg = d.run(fr.c, fr.recs, 0, fr.n)
    return k, res, msg, _log_since(n0)


def _expected(recs_args):
    return [({F1: PTR1, F2: PTR2}[fid], p0, p1) for fid, p0, p1 in recs_args]


def test_a_repeated_run_is_built_the_second_time_and_replayed_after():
    d = _dispatch()
    alive0 = lib.gw_rpc_graph_host_alive()
    args = [(F1 if k % 3 else F2, 1000 + k, k) for k in range(16)]
    fr = Frame([_launch(*a) for a in args])
    k, res, _m, log = _run(d, fr)                      # seen once: one by one
    assert (k, res) == (16, 0) and log == _expected(args)
    assert d.graph_stats()["built"] == 0 and d.graph_stats()["runs"] == 0
    for rnd in range(3):                               # the same run again: built, then replayed
        k, res, _m, log = _run(d, fr)
        assert (k, res) == (16, 0) and log == _expected(args)
    g = d.graph_stats()
    assert g["built"] == 1 and g["runs"] == 3 and g["launches"] == 48 and g["updates"] == 0 and g["failed"] == 0
    assert lib.gw_rpc_graph_host_alive() == alive0 + 2   # the graph and its executable
    d.graph_flush()
    assert lib.gw_rpc_graph_host_alive() == alive0


def test_changed_parameters_update_only_their_nodes():
    d = _dispatch()
    args = [(F1, 1000 + k, k) for k in range(12)]
    fr = Frame([_launch(*a) for a in args])
    _run(d, fr)
    _run(d, fr)                                        # built
    new = list(args)
    for j in (0, 5, 11):
        new[j] = (F1, 7777 + j, 99)
    k, res, _m, log = _run(d, Frame([_launch(*a) for a in new]))
    assert (k, res) == (12, 0) and log == _expected(new)
    assert d.graph_stats()["updates"] == 3 and d.graph_stats()["runs"] == 2
    k, res, _m, log = _run(d, fr)                      # and back: the same three again
    assert log == _expected(args) and d.graph_stats()["updates"] == 6


def test_short_runs_and_runs_broken_by_other_calls_or_streams():
    d = _dispatch(min_run=8)
    a = [(F1, k, k) for k in range(8)]
    b = [(F2, 50 + k, k) for k in range(7)]            # too short
    c = [(F1, 90 + k, k) for k in range(9)]
    recs = ([_launch(*x) for x in a] + [_memset(int(ffi.cast("uintptr_t", d.host_mem)))] + [_launch(*x) for x in b]
            + [_launch(*x, stream=0) for x in c])      # another stream: a run of its own
    fr = Frame(recs)
    for rnd in range(3):
        k, res, _m, log = _run(d, fr)
        assert (k, res) == (len(recs), 0)
        assert log == _expected(a) + _expected(b) + _expected(c)
    g = d.graph_stats()
    assert g["built"] == 2 and g["runs"] == 4 and g["launches"] == 2 * (8 + 9)


def test_a_run_with_a_different_shape_is_another_run():
    d = _dispatch()
    fr1 = Frame([_launch(F1, k, k) for k in range(10)])
    fr2 = Frame([_launch(F1, k, k, grid=2 if k == 4 else 1) for k in range(10)])
    for fr in (fr1, fr2, fr1, fr2, fr1, fr2):
        _run(d, fr)
    g = d.graph_stats()
    assert g["built"] == 2 and g["runs"] == 4 and g["updates"] == 0


def test_a_bad_launch_inside_a_run_still_names_its_record():
    d = _dispatch()
    recs = [_launch(F1, k, k) for k in range(10)] + [_launch(F1, 5, 5, plen=24)] + [_launch(F1, 1, 1)]
    fr = Frame(recs)
    for rnd in range(3):
        k, res, msg, log = _run(d, fr)
        assert (k, res) == (10, P.CUDA_ERROR_INVALID_VALUE) and "parameter buffer is 24 B" in msg
        assert log == _expected([(F1, j, j) for j in range(10)])
    assert d.graph_stats()["runs"] == 2


def test_an_unknown_function_inside_a_run_is_an_invalid_handle():
    d = _dispatch()
    fr = Frame([_launch(F1, k, k) for k in range(9)] + [_launch(0x999, 0, 0)])
    for rnd in range(3):
        k, res, msg, _log = _run(d, fr)
        assert (k, res) == (9, P.CUDA_ERROR_INVALID_HANDLE) and "0x999" in msg


@pytest.mark.parametrize("which,stage", [(0, "create"), (1, "add"), (2, "instantiate"), (3, "launch"),
                                         (4, "set params")])
def test_a_failing_graph_call_falls_back_to_launches_and_is_not_retried(which, stage):
    d = _dispatch()
    alive0 = lib.gw_rpc_graph_host_alive()
    args = [(F1, k, k) for k in range(8)]
    fr = Frame([_launch(*a) for a in args])
    _run(d, fr)
    if which == 4:          # set params fails on an update: build first, then change a parameter
        _run(d, fr)
        args = [(F1, 100 + k, k) for k in range(8)]
        fr = Frame([_launch(*a) for a in args])
    elif which == 3:
        _run(d, fr)          # built and launched once
    lib.gw_rpc_graph_host_fail(which)
    k, res, _m, log = _run(d, fr)
    assert (k, res) == (8, 0) and log == _expected(args), stage
    g = d.graph_stats()
    assert g["failed"] == 1, stage
    created = lib.gw_rpc_graph_host_count(0)
    for rnd in range(3):      # never built again, every launch still runs
        k, res, _m, log = _run(d, fr)
        assert (k, res) == (8, 0) and log == _expected(args)
    assert lib.gw_rpc_graph_host_count(0) == created and d.graph_stats()["failed"] == 1
    assert lib.gw_rpc_graph_host_alive() == alive0, "a failed graph is destroyed"


def test_the_cache_drops_the_least_recently_used_run():
    d = _dispatch(cache=2)
    alive0 = lib.gw_rpc_graph_host_alive()
    frs = [Frame([_launch(F1, 10 * r + k, k, grid=r + 1) for k in range(8)]) for r in range(3)]
    for fr in frs[:2] * 2:
        _run(d, fr)                                    # runs 0 and 1 built
    assert d.graph_stats()["built"] == 2
    _run(d, frs[0])                                    # 0 used: 1 is the oldest
    _run(d, frs[2])                                    # seen: 1 dropped
    assert d.graph_stats()["evicted"] == 1
    assert d.graph_stats()["runs"] == 3
    _run(d, frs[0])
    assert d.graph_stats()["runs"] == 4                # 0 still cached
    _run(d, frs[1])                                    # 1 again: seen once more, not replayed
    assert d.graph_stats()["runs"] == 4 and d.graph_stats()["evicted"] == 2
    d.graph_flush()
    assert lib.gw_rpc_graph_host_alive() == alive0


def test_unbinding_or_rebinding_a_function_drops_the_graphs():
    d = _dispatch()
    alive0 = lib.gw_rpc_graph_host_alive()
    fr = Frame([_launch(F1, k, k) for k in range(8)])
    _run(d, fr)
    _run(d, fr)
    assert lib.gw_rpc_graph_host_alive() == alive0 + 2
    d.unbind("function", F2)                           # any function: its graphs could use it
    assert lib.gw_rpc_graph_host_alive() == alive0 and d.graph_stats()["flushes"] == 1
    _run(d, fr)
    _run(d, fr)
    assert d.graph_stats()["built"] == 2
    d.bind("function", F1, type("F", (), {"ptr": PTR2, "size": 16, "layout": [(0, 8), (8, 4)]})())
    assert lib.gw_rpc_graph_host_alive() == alive0 and d.graph_stats()["flushes"] == 2
    k, res, _m, log = _run(d, fr)                     # the new function, not the graph's old one
    assert {f for f, _a, _b in log} == {PTR2}
    d.unbind("function", F1)
    k, res, msg, _log = _run(d, fr)
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_HANDLE)


def test_graphs_off_and_missing_entry_points():
    d = _dispatch()
    assert not d.graphs(cf.graph_host_fns(), 0, 4)          # off
    fr = Frame([_launch(F1, k, k) for k in range(8)])
    for rnd in range(3):
        _run(d, fr)
    assert d.graph_stats()["built"] == 0
    fns = dict(cf.graph_host_fns())
    del fns["set_params"]
    assert not d.graphs(fns, 8, 4)
    for rnd in range(3):
        _run(d, fr)
    assert d.graph_stats()["built"] == 0


def test_the_c_server_replays_runs_in_frames_it_answers():
    """gw_rpc_serve_handler: a frame of launches and a gwSync, answered in C, graphs and all."""
    d = _dispatch()
    sc = cf.Serve(cf.Scanner(S._table()), P.TAG_REP)
    sc.attach(SPEC, d, cf.host_fns([8, 9]), 0)
    sc.v.enabled = 1
    args = [(F1, 500 + k, k) for k in range(16)]
    recs = [_launch(*a) for a in args] + [_rec("gwSync")]
    body = b"".join(recs)
    frame = P.HEADER.pack(P.MAGIC, 1, P.F_SYNC, 9, len(recs), len(body)) + body
    buf = ffi.new("uint8_t[]", frame)
    out = ffi.new("gw_rpc_msg_t[32]")
    nout = ffi.new("int *")
    for rnd in range(3):
        n0 = lib.gw_rpc_host_log_n()
        assert lib.gw_rpc_serve_handler(ffi.cast("void *", sc.arg), buf, len(frame), out, 32, nout) == 1   # answered
        assert nout[0] == 1 and sc.v.passed == 0 and sc.v.frames == rnd + 1
        assert _log_since(n0) == _expected(args)
    assert d.graph_stats()["runs"] == 2


# ----------------------------------------------------------------------------- on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_gpu_launch_runs_keep_every_launch_and_its_parameters(tmp_path, graphs):
    """A real GPU server: steps of 64 fill_f32 launches (each writing its own element with a
    per-step value) and 64 saxpy launches (each adding its own amount to one accumulator) on
    one stream, a stream sync per step. Every element must hold this step's value and the
    accumulator every launch's amount, so each replay ran every node with this step's
    parameters; the session's trace shows the runs were replayed as graphs (or, with
    rpc_gpu_graph_min 0, that none was)."""
    import json
    import os
    import numpy as np
    from gpuwire import settings
    from tests.test_rpc_support import PTX, start_server
    env = {"GPUWIRE_RPC_TRACE_DIR": str(tmp_path)}
    if not graphs:
        env["GPUWIRE_RPC_GPU_GRAPH_MIN"] = "0"
    srv = start_server("gpu", env=env)
    try:
        with settings.override(rpc_flush_us=0, rpc_batch_calls=1 << 20, rpc_batch_first=1 << 20,
                               rpc_batch_bytes=900 << 10):
            s = srv.connect(name="graphs")
        n = 64
        mod = s.load_module(PTX)
        fill, saxpy = mod.function("fill_f32"), mod.function("saxpy")
        out, acc, one = s.alloc(n * 4), s.alloc(4), s.alloc(4)
        s.copy_to_device(one, np.ones(1, np.float32))
        s.copy_to_device(acc, np.zeros(1, np.float32))
        st = s.stream()
        total = 0.0
        for step in range(6):
            for k in range(n):
                s.launch(fill, 1, 1, (out + 4 * k, float(step * 1000 + k), 1), stream=st)
            for k in range(n):
                a = float((step % 3) + k % 2)       # repeats: some steps update no node
                total += a
                s.launch(saxpy, 1, 1, (a, one, acc, 1), stream=st)
            st.synchronize()
            got = s.copy_to_host(np.zeros(n, np.float32), out)
            assert (got == np.arange(n, dtype=np.float32) + step * 1000).all(), step
            assert s.copy_to_host(np.zeros(1, np.float32), acc)[0] == total, step
        s.close()
    finally:
        srv.stop()
    docs = [json.load(open(os.path.join(tmp_path, f))) for f in os.listdir(tmp_path) if f.endswith(".json")]
    g = [d["graphs"] for d in docs if d.get("client", {}).get("name") == "graphs"]
    assert len(g) == 1, docs
    if graphs:
        # (step 0's launches are split by the first launch of each function: its parameter
        # layout is asked for; step 1's run is seen, built at step 2, replayed from then on)
        assert g[0]["runs"] >= 4 and g[0]["launches"] == 2 * n * g[0]["runs"], g
        assert g[0]["built"] >= 1 and g[0]["failed"] == 0 and g[0]["updates"] > 0, g
    else:
        assert g[0]["runs"] == 0 and g[0]["built"] == 0, g
