"""The ucx_perftest baseline runner (gpuwire/bench/perftest.py) against the real binary."""
from __future__ import annotations

import pytest

from gpuwire.bench import perftest

pytestmark = pytest.mark.skipif(perftest.perftest_path() is None, reason="ucx_perftest not found")


def test_a_small_run_parses():
    res = perftest.run_local("tag_lat", 8, 200, "tcp", warmup=10)
    assert res["iters"] >= 200 and res["lat_avg_us"] > 0


def test_a_failing_baseline_is_retried_and_every_try_named():
    # a transport that does not exist: the perftest server exits at once, every time
    with pytest.raises(RuntimeError) as ei:
        perftest.run_local("tag_bw", 4096, 10, "no_such_transport", attempts=2, timeout=20)
    msg = str(ei.value)
    assert msg.startswith("ucx_perftest failed 2 times; last: ")
    assert "(first: " in msg and "perftest server (rc " in msg
