"""--pin of the benches with a loopback server: CPU plans and their errors."""

import os

import pytest

from gpuwire.bench import _pin


def test_explicit_plan_and_ranges():
    allowed = sorted(os.sched_getaffinity(0))
    a, b = allowed[0], allowed[-1]
    p = _pin.plan(f"{a}:{b}")
    assert p.client == {a} and p.server == {b} and p.main is None and p.spawn is None
    if len(allowed) >= 2:
        assert _pin.plan(f"{a}-{allowed[1]}:{b}").client == {a, allowed[1]}


@pytest.mark.parametrize("spec, msg", [
    ("0", "expected none, auto, CLIENT_CPUS:SERVER_CPUS"),
    ("0/1:0", "expected MAIN/HELPERS:SESSION/SERVER_REST"),
    ("0/1/2:0/1", "expected MAIN/HELPERS:SESSION/SERVER_REST"),
    ("0/:1/0", "HELPERS needs at least one CPU"),
    ("0/1:x/0", "SESSION: bad CPU number or range 'x'"),
    ("0/1:0,1/0", "SESSION is one CPU"),
    ("0/0,1:1/0", "MAIN and HELPERS share CPUs \\[0\\]"),
    ("0/1:1/1", "SESSION and SERVER_REST share CPU 1"),
    ("0/1:0/100000", "not available to this process"),
    ("3-1:0", "bad CPU number or range '3-1'"),
    (":0", "both sides need at least one CPU"),
    ("0:x", "--pin '0:x'"),
    ("0:100000", "not available to this process"),
])
def test_bad_plans_are_refused_with_what_is_wrong(spec, msg):
    with pytest.raises(ValueError, match=msg):
        _pin.plan(spec)


def test_split_plan_places_each_thread_group_where_named():
    """MAIN/HELPERS:SESSION/SERVER_REST: the auto plan written out by hand (the same Plan
    fields the auto plan fills, spare workers starting on SERVER_REST)."""
    allowed = sorted(os.sched_getaffinity(0))
    a, b = allowed[0], allowed[-1]
    p = _pin.plan(f"{a}/{b}:{b}/{a}")
    assert p.main == {a} and p.client == {a, b} and p.session == b and p.server == {a, b}
    assert p.spawn == {a}
    d = _pin.describe(p)
    assert f"calling thread [{a}]" in d and f"session thread {b}" in d


def test_auto_gives_client_and_server_disjoint_whole_cores():
    cores = _pin.cores()
    assert sorted(c for core in cores for c in core) == sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        with pytest.raises(ValueError, match="at least 2 physical cores"):
            _pin.plan("auto")
        return
    p = _pin.plan("auto")
    client, server = p.client, p.server
    assert client and server and not (client & server)
    for core in cores:                      # never half a core on each side
        assert not (set(core) & client and set(core) & server)
        if p.main:                          # nor on the calling thread's and the helpers'
            assert not (set(core) & p.main and set(core) & (client - p.main))
    if len(cores) >= 4:                     # the calling thread gets a core of its own
        assert p.main and p.main < client and client - p.main
    else:
        assert p.main is None
    assert _pin.plan("none") is None and _pin.describe(None) == "none"
    assert str(sorted(client)) in _pin.describe(p)


def test_settle_puts_the_calling_thread_alone_and_the_others_beside_it():
    """With a calling-thread CPU in the plan, settle() moves every other thread of the
    process (a session's flush timer, CUDA's threads) off it, and the caller onto it."""
    import threading
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs 2 CPUs")
    a, b = allowed[0], allowed[1]
    stop = threading.Event()
    th = threading.Thread(target=stop.wait)
    th.start()
    try:
        p = _pin.Plan({a, b}, {b}, {a})
        assert _pin.settle(p) >= 2
        assert os.sched_getaffinity(0) == {a}
        assert os.sched_getaffinity(th.native_id) == {b}
        assert "calling thread [%d]" % a in _pin.describe(p)
        assert _pin.settle(_pin.Plan({a, b}, {b})) >= 2      # no calling-thread CPU: all on the client's
        assert os.sched_getaffinity(0) == {a, b} == os.sched_getaffinity(th.native_id)
        assert _pin.settle(None) == 0
    finally:
        stop.set()
        th.join()
        for t in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(t), set(allowed))
            except ProcessLookupError:
                pass


def test_cores_without_sysfs_fall_back_to_one_cpu_per_core():
    assert _pin.cores({100000}) == [(100000,)]


@pytest.mark.parametrize("ncores, spawn", [(8, {5}), (6, {5}), (5, None), (4, None)])
def test_auto_plan_on_bigger_machines_gives_spare_workers_a_core_of_their_own(monkeypatch, ncores, spawn):
    """On a machine of `ncores` one-CPU cores: core 0 skipped from five on; the calling
    thread, the client's helpers, the server's two, then (when one is left) the core the
    server's spare workers start on (rpc_worker_spawn_cpus), apart from all the others."""
    monkeypatch.setattr(_pin, "cores", lambda allowed=None: [(i,) for i in range(ncores)])
    p = _pin.plan("auto")
    first = 1 if ncores >= 5 else 0
    assert p.main == {first} and p.client == {first, first + 1}
    assert p.server == {first + 2, first + 3} and p.session == first + 2
    assert p.spawn == spawn
    if spawn:
        assert not (spawn & (p.client | p.server))
        assert f"spare workers start on {sorted(spawn)}" in _pin.describe(p)
    else:
        assert "spare workers" not in _pin.describe(p)
