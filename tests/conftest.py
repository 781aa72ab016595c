"""Shared fixtures for the transport tests: subprocess peers (tests/_transport_peer.py)."""
from __future__ import annotations

import pytest

TLS = {"tcp": "tcp,self", "shm": "tcp,sm,self"}


@pytest.fixture
def spawn_peer():
    """spawn_peer(role, *args, prefix=(), env=None, ready=True) -> a running Peer
    (ready: wait for its ready line); all are killed when the test ends."""
    from _transport_peer import Peer

    peers = []

    def spawn(*args, prefix=(), env=None, ready_timeout=20.0, ready=True):
        p = Peer(args, prefix=prefix, env=env, ready_timeout=ready_timeout, ready=ready)
        peers.append(p)
        return p

    yield spawn
    for p in peers:
        p.close()


class Link:
    """A client endpoint in this process connected to a cmd-mode peer server."""

    def __init__(self, kind, peer, ctx, worker, ep):
        self.kind, self.tls, self.peer = kind, TLS[kind], peer
        self.ctx, self.w, self.ep = ctx, worker, ep

    def command(self, name, arg=b"", tag=0x7F0000, reply_size=1 << 16, timeout=10.0):
        """Send command ``name`` (header b"!gw:name") with payload ``arg`` to the peer
        and return (reply header, reply payload)."""
        buf = bytearray(reply_size)
        req = self.ep.recv_nb(buf, tag=tag, tag_mask=0xFFFFFF)
        self.ep.send(arg, header=b"!gw:" + name.encode(), tag=tag, timeout=timeout)
        rr = req.wait(timeout)
        return bytes(buf[:rr.header_len]), bytes(buf[rr.header_len:rr.nbytes])


@pytest.fixture(scope="module", params=sorted(TLS))
def link(request):
    """One peer server per transport kind ("tcp": tcp,self; "shm": tcp,sm,self) for
    the whole module, and a connected endpoint to it."""
    from _transport_peer import Peer
    from gpuwire import transport as t

    peer = Peer(["server", "--tls", TLS[request.param]])
    ctx = t.Context({"TLS": TLS[request.param]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        yield Link(request.param, peer, ctx, w, ep)
    finally:
        ctx.close()
        peer.close()
        if peer.stderr.strip():
            print(f"--- peer {peer.argv} stderr:\n{peer.stderr}")
