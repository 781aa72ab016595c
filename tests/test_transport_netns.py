"""Server and client in two network namespaces joined by a veth pair (addresses
in 198.18.0.0/15, the benchmark-testing range): real tcp between "hosts".

Both namespaces share the IPC namespace, so UCX (and gpuwire's liveness check)
still see one node unless the client also runs under ``unshare --ipc``; the
cases below cover tcp-only, tcp+sm with a private IPC namespace (UCX must fall
back to tcp), and tcp+sm with the shared IPC namespace (UCX uses shared memory
across the network namespaces)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

SIZES = "0,1,8191,8192,65537,262145,273827,1048577,4194305"


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns_pair():
    """Two fresh namespaces NS1/NS2 joined by a veth pair; removed afterwards."""
    with _netns_pair() as ns:
        yield ns


@contextlib.contextmanager
def _netns_pair():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip"):
        pytest.skip("the `ip` tool (iproute2) is not installed")
    pid = os.getpid()
    uniq = uuid.uuid4().hex[:4]
    ns1, ns2 = f"gwt{pid}{uniq}a", f"gwt{pid}{uniq}b"
    veth1, veth2 = f"gv{pid % 100000}{uniq[:2]}a", f"gv{pid % 100000}{uniq[:2]}b"  # <= 15 chars
    made = []
    try:
        r = _ip("netns", "add", ns1)
        if r.returncode:
            pytest.skip(f"`ip netns add` failed: {r.stderr.strip()}")
        made.append(ns1)
        r = _ip("netns", "add", ns2)
        if r.returncode:
            pytest.skip(f"`ip netns add` failed: {r.stderr.strip()}")
        made.append(ns2)
        k = (pid * 7 + int(uniq, 16)) % (1 << 15)  # a /30 inside 198.18.0.0/15
        base = (198 << 24) | (18 << 16) | (k << 2)
        ip1 = ".".join(str((base + 1) >> s & 255) for s in (24, 16, 8, 0))
        ip2 = ".".join(str((base + 2) >> s & 255) for s in (24, 16, 8, 0))
        steps = [
            ("link", "add", veth1, "type", "veth", "peer", "name", veth2),
            ("link", "set", veth1, "netns", ns1),
            ("link", "set", veth2, "netns", ns2),
            ("-n", ns1, "addr", "add", f"{ip1}/30", "dev", veth1),
            ("-n", ns2, "addr", "add", f"{ip2}/30", "dev", veth2),
            ("-n", ns1, "link", "set", "lo", "up"),
            ("-n", ns2, "link", "set", "lo", "up"),
            ("-n", ns1, "link", "set", veth1, "up"),
            ("-n", ns2, "link", "set", veth2, "up"),
        ]
        for st in steps:
            r = _ip(*st)
            if r.returncode:
                pytest.skip(f"`ip {' '.join(st)}` failed: {r.stderr.strip()}")
        ping = subprocess.run(["ip", "netns", "exec", ns2, "ping", "-c", "1", "-W", "2", ip1],
                              capture_output=True, text=True, timeout=20) \
            if shutil.which("ping") else None
        if ping is not None and ping.returncode:
            pytest.skip(f"veth pair does not pass traffic: {ping.stdout} {ping.stderr}")
        yield {"ns1": ns1, "ns2": ns2, "ip1": ip1, "ip2": ip2, "veth2": veth2}
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair
            _ip("netns", "del", ns)
        _ip("link", "del", veth1)  # in case it never moved into a namespace


CASES = {
    # id: (client TLS, extra client prefix, expected in ep.transports, not expected)
    "tcp": ("tcp,self", [], "tcp/", "memory"),
    "sm-private-ipc": ("tcp,sm,self", ["unshare", "--ipc"], "tcp/", "memory"),
    "sm-shared-ipc": ("tcp,sm,self", [], "memory", "tcp/"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_namespaces_exchange_then_server_killed(spawn_peer, netns_pair, case):
    tls, extra, want, unwanted = CASES[case]
    ns = netns_pair
    server = spawn_peer("server", "--tls", "tcp,sm,self" if "sm" in case else "tcp,self",
                        "--host", ns["ip1"], "--max-msg", 8 << 20,
                        prefix=["ip", "netns", "exec", ns["ns1"]])
    assert server.info["host"] == ns["ip1"]
    client = spawn_peer("client", "--tls", tls, "--mode", "check", "--connect",
                        f"{ns['ip1']}:{server.port}", "--sizes", SIZES,
                        prefix=["ip", "netns", "exec", ns["ns2"], *extra], ready=False)
    ev = client.event("checked", timeout=60)
    assert ev["ok"], ev["results"]
    assert [n for n, _ in ev["results"]] == [int(x) for x in SIZES.split(",")]
    tr = ev["transports"]
    assert want in tr and unwanted not in tr, tr
    if want == "tcp/":
        assert ns["veth2"] in tr, f"data path does not use the veth link: {tr}"
    ready = client.event("ready", timeout=10)
    assert ready["peer_pid"] == server.pid

    t_kill = server.kill()
    lost = client.event("lost", timeout=10)
    assert lost["type"] == "ConnectionLost", lost
    dt = lost["t"] - t_kill  # CLOCK_MONOTONIC is system-wide
    print(f"{case}: client noticed the server's death after {dt * 1e3:.1f} ms ({lost['msg']})")
    assert 0 <= dt < 1.0, f"client noticed the death after {dt:.3f}s"
    assert f"pid {server.pid}" in lost["msg"]
    assert lost["poll_lost"] == [ready["ep_id"]]
    assert client.wait(timeout=10) == 0


def test_namespaces_are_set_up_and_cleaned_up():
    with _netns_pair() as ns:
        names = _ip("netns", "list").stdout
        assert ns["ns1"] in names and ns["ns2"] in names
        r = subprocess.run(["ip", "netns", "exec", ns["ns1"], "ip", "-4", "addr"],
                           capture_output=True, text=True, timeout=20)
        assert ns["ip1"] + "/30" in r.stdout
    names = _ip("netns", "list").stdout
    assert ns["ns1"] not in names and ns["ns2"] not in names
    assert ns["veth2"] not in _ip("link").stdout
