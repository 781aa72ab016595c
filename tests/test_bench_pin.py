"""--pin of the benches with a loopback server: CPU plans and their errors."""

import os

import pytest

from gpuwire.bench import _pin


def test_explicit_plan_and_ranges():
    allowed = sorted(os.sched_getaffinity(0))
    a, b = allowed[0], allowed[-1]
    c, s = _pin.plan(f"{a}:{b}")
    assert c == {a} and s == {b}
    if len(allowed) >= 2:
        c, s = _pin.plan(f"{a}-{allowed[1]}:{b}")
        assert c == {a, allowed[1]}


@pytest.mark.parametrize("spec, msg", [
    ("0", "expected none, auto or CLIENT_CPUS:SERVER_CPUS"),
    ("3-1:0", "bad CPU range"),
    (":0", "both sides need at least one CPU"),
    ("0:x", "--pin '0:x'"),
    ("0:100000", "not available to this process"),
])
def test_bad_plans_are_refused_with_what_is_wrong(spec, msg):
    with pytest.raises(ValueError, match=msg):
        _pin.plan(spec)


def test_auto_gives_client_and_server_disjoint_whole_cores():
    cores = _pin.cores()
    assert sorted(c for core in cores for c in core) == sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        with pytest.raises(ValueError, match="at least 2 physical cores"):
            _pin.plan("auto")
        return
    client, server = _pin.plan("auto")
    assert client and server and not (client & server)
    for core in cores:                      # never half a core on each side
        assert not (set(core) & client and set(core) & server)
    assert _pin.plan("none") is None and _pin.describe(None) == "none"
    assert str(sorted(client)) in _pin.describe((client, server))


def test_cores_without_sysfs_fall_back_to_one_cpu_per_core():
    assert _pin.cores({100000}) == [(100000,)]
