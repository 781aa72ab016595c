"""`bench rpc --tests mlp`: the block interleaving of the local and the remote loop, the
remote loop's runner on the CPU executor (its kernels are registered as numpy callables),
and the whole test on the GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import gpuwire
from gpuwire.bench import rpc as R
from test_rpc_support import gpu_available, inproc_server


def _fake(name, log, secs_per_step):
    def timed(n):
        log.append((name, n))
        return n * secs_per_step
    return timed


def test_interleave_alternates_blocks_and_which_loop_goes_first():
    log = []
    iv = R.interleave(_fake("L", log, 1.0), _fake("R", log, 1.5), steps=250, block=100)
    # blocks of 100, 100, 50; local first, then remote first, then local first again
    assert log == [("L", 100), ("R", 100), ("R", 100), ("L", 100), ("L", 50), ("R", 50)]
    assert iv["local_s"] == 250.0 and iv["remote_s"] == 375.0
    assert iv["block_ratios"] == [1.5, 1.5, 1.5]
    one = []
    R.interleave(_fake("L", one, 1.0), _fake("R", one, 1.0), steps=7, block=100)
    assert one == [("L", 7), ("R", 7)]                 # a block larger than the run: one each


def test_interleave_warm_steps_start_each_block_outside_its_time():
    """With warm=3 every block of a loop starts with 1 + 2 steps (the first after the other
    loop ran, then the rest) that land in *_first_s / *_warm_s, not in the block's time."""
    log = []

    def timed(name, first_cost, per_step):
        def f(n):
            log.append((name, n))
            # the first step after the other loop's block is slow (this fake: every n == 1 call)
            return first_cost if n == 1 else n * per_step
        return f
    iv = R.interleave(timed("L", 5.0, 1.0), timed("R", 9.0, 1.5), steps=200, block=100, warm=3)
    assert log == [("L", 1), ("L", 2), ("L", 100), ("R", 1), ("R", 2), ("R", 100),
                   ("R", 1), ("R", 2), ("R", 100), ("L", 1), ("L", 2), ("L", 100)]
    assert iv["local_s"] == 200.0 and iv["remote_s"] == 300.0      # the blocks only
    assert iv["block_ratios"] == [1.5, 1.5]
    assert iv["local_first_s"] == [5.0, 5.0] and iv["remote_first_s"] == [9.0, 9.0]
    assert iv["local_warm_s"] == 2 * (5.0 + 2.0) and iv["remote_warm_s"] == 2 * (9.0 + 3.0)
    assert iv["warm"] == 3
    one = []
    iv1 = R.interleave(_fake("L", one, 1.0), _fake("R", one, 1.0), steps=5, block=5, warm=1)
    assert one == [("L", 1), ("L", 5), ("R", 1), ("R", 5)] and iv1["local_warm_s"] == 1.0
    none = []
    iv0 = R.interleave(_fake("L", none, 1.0), _fake("R", none, 1.0), steps=5, block=5)
    assert none == [("L", 5), ("R", 5)] and iv0["local_first_s"] == [] and iv0["remote_warm_s"] == 0.0


def test_interleave_refuses_negative_warm():
    with pytest.raises(ValueError, match="warm"):
        R.interleave(lambda n: 1.0, lambda n: 1.0, 10, 5, warm=-1)


def test_bench_cli_refuses_negative_mlp_warm():
    r = subprocess.run([sys.executable, "-m", "gpuwire.bench.rpc", "--executor", "cpu", "--tests", "mlp",
                        "--mlp-warm", "-2"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--mlp-warm must be >= 0 (got -2)" in r.stderr


@pytest.mark.parametrize("steps, block", [(0, 10), (10, 0), (-1, 5)])
def test_interleave_refuses_empty_runs(steps, block):
    with pytest.raises(ValueError, match="must be >= 1"):
        R.interleave(lambda n: 1.0, lambda n: 1.0, steps, block)


def test_block_percentiles():
    assert R._pcts([3.0, 1.0, 2.0], (0, 50, 100)) == [1.0, 2.0, 3.0]
    assert R._pcts([], (50,)) == []


def test_remote_mlp_runner_trains_on_the_cpu_executor():
    """The remote loop's runner end to end on a real server (CPU executor): the loss is read
    back every step (in the sync reply's tail) and goes down; three frames a step."""
    ptx = R.find_ptx(None).read_bytes()
    with inproc_server() as srv:
        s = gpuwire.connect(f"127.0.0.1:{srv.port}")
        try:
            rem = R.RemoteMLP(s, ptx, 16, 8, 8, 2)
            dt = rem.timed(30)
            assert dt > 0 and len(rem.losses) == 30 and all(np.isfinite(rem.losses))
            assert rem.losses[-1] < rem.losses[0]
            issue_ns, sync_ns, frames = R._mlp_remote_parts(s, rem.st, rem.plan, rem.loss, rem.bufs["loss"])
            assert frames == 3 and issue_ns > 0 and sync_ns > 0
        finally:
            s.close()


@pytest.mark.gpu
def test_bench_mlp_interleaved_on_the_gpu(tmp_path):
    why = gpu_available()
    if why:
        pytest.skip(why)
    out = tmp_path / "mlp.json"
    r = subprocess.run([sys.executable, "-m", "gpuwire.bench.rpc", "--executor", "gpu", "--tls", "tcp",
                        "--tests", "mlp", "--mlp-shapes", "256,64,64,8", "--mlp-steps", "60",
                        "--mlp-block", "20", "--mlp-rounds", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [x for x in json.loads(out.read_text())["rows"] if x.get("test") == "mlp"]
    assert len(rows) == 1
    row = rows[0]
    assert row["blocks"] == 2 * 3 and row["block"] == 20 and len(row["round_ratios"]) == 2
    assert row["warm"] == 3 and 0.3 < row["ratio_incl_warm"] < 5.0
    assert row["local_first_step_us"] > 0 and row["remote_first_step_us"] > 0
    assert 0.3 < row["ratio"] < 5.0
    assert row["loss_rel_diff"] < 1e-3          # the same training, locally and remotely
