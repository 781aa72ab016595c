"""Tagged messages over real UCX between this process and peer processes
(tests/_transport_peer.py): every size class over tcp and shared memory, with
and without a header; 64 endpoints on one worker with any-source receives;
many outstanding receives completing out of order; buffer kinds; truncation.

Protocol thresholds (UCX 1.22, UCX_PROTO_INFO=y, this build's defaults):
  tcp ("tcp,self"):      eager short 0 | eager zcopy 1..16483 | multi-frag eager
                         16484..273826 | rendezvous 273827.. (fast-completion
                         sends: 8184 / 262143 / 256 KiB)
  shm ("tcp,sm,self"):   eager short 0..92 | eager bcopy 93..5028 | rendezvous
                         (cma get zcopy) 5029.. (fast-completion: 8248 / 256 KiB)
SIZES brackets each of these and the classic 8 KiB / 64 KiB / 256 KiB points.
"""
from __future__ import annotations

import mmap
import os
import random
import struct
import time
import zlib

import numpy as np
import pytest

from gpuwire import transport as t
from _transport_peer import pattern
from conftest import TLS

SIZES = [0, 1, 92, 93, 5028, 5029, 8184, 8185, 8191, 8192, 8193, 16483, 16484, 65535, 65536,
         65537, 262143, 262144, 262145, 273826, 273827, (1 << 20) + 1]
SENTINEL = 0xA5

pytestmark = pytest.mark.timeout(120)


def _echo(link, payload, header=b"", tag=0, slack=64):
    """Send payload (+header) to the echo peer; return (Received, bytes received)."""
    n = len(header) + memoryview(payload).nbytes
    buf = bytearray([SENTINEL]) * (n + slack)
    req = link.ep.recv_nb(buf, tag=tag, tag_mask=t.EXACT_TAG)
    link.ep.send(payload, header=header, tag=tag, timeout=30)
    rr = req.wait(timeout=30)
    assert buf[n:] == bytearray([SENTINEL]) * slack, "receive wrote past the message"
    return rr, bytes(buf[:rr.nbytes])


def test_data_path_uses_the_requested_transport(link):
    tr = link.ep.transports
    assert link.ep.state == "up"
    if link.kind == "tcp":
        assert "tcp/" in tr and "memory" not in tr, tr
    else:
        assert "sysv/memory" in tr or "posix/memory" in tr, tr
    assert link.ep.peer_pid == link.peer.pid
    assert f"pid {link.peer.pid}" in link.ep.peer


@pytest.mark.parametrize("hlen", [0, 255], ids=["nohdr", "hdr255"])
@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_every_size(link, n, hlen):
    payload = os.urandom(n)
    header = os.urandom(hlen)
    tag = (n * 7919 + hlen) % t.MAX_TAG
    rr, got = _echo(link, payload, header, tag)
    assert (rr.nbytes, rr.header_len, rr.payload_len, rr.tag) == (hlen + n, hlen, n, tag)
    assert rr.endpoint is link.ep
    assert got[:hlen] == header
    assert got[hlen:] == payload


@pytest.mark.parametrize("hlen", [1, 2, 17, 128, 254])
def test_header_lengths(link, hlen):
    header = bytes(range(256))[:hlen]
    for payload in (b"", b"p" * 100, os.urandom(300000)):
        rr, got = _echo(link, payload, header, tag=hlen)
        assert rr.header_len == hlen
        assert got == header + payload


def test_header_only_and_empty_messages(link):
    rr, got = _echo(link, b"", b"only-a-header", tag=3)
    assert (rr.nbytes, rr.header_len, got) == (13, 13, b"only-a-header")
    rr, got = _echo(link, b"", b"", tag=4)
    assert (rr.nbytes, rr.header_len, got) == (0, 0, b"")
    # a 0-byte message fits a 0-byte buffer
    buf = bytearray()
    req = link.ep.recv_nb(buf, tag=5, tag_mask=t.EXACT_TAG)
    link.ep.send(b"", tag=5, timeout=10)
    assert req.wait(10).nbytes == 0


def test_buffer_kinds(link):
    """numpy arrays, memoryviews (slices too), mmap, Buffer and RawBuffer work on
    both sides of a send and receive."""
    data = pattern(100003, 11)
    arr = np.zeros(100003 + 8, dtype=np.uint8)
    req = link.ep.recv_nb(arr, tag=21, tag_mask=t.EXACT_TAG)
    link.ep.send(data, tag=21, timeout=10)
    assert req.wait(10).nbytes == data.size
    assert np.array_equal(arr[:data.size], data)

    big = bytearray(b"x" * 1000 + bytes(data) + b"y" * 1000)
    rr, got = _echo(link, memoryview(big)[1000:-1000], b"mv", tag=22)
    assert got == b"mv" + bytes(data)

    with mmap.mmap(-1, 200000) as m:
        m[:5] = b"mmap!"
        req = link.ep.recv_nb(m, tag=23, tag_mask=t.EXACT_TAG)
        link.ep.send(m, tag=23, timeout=10)  # the echo overwrites m with itself
        assert req.wait(10).nbytes == 200000
        assert m[:5] == b"mmap!"

    out = np.full(70000, SENTINEL, dtype=np.uint8)
    raw_out = t.RawBuffer(out.ctypes.data, out.nbytes)
    src = pattern(70000, 12)
    raw_src = t.Buffer(t.RawBuffer(src.ctypes.data, src.nbytes, readonly=True))
    req = link.ep.recv_nb(t.Buffer(raw_out), tag=24, tag_mask=t.EXACT_TAG)
    link.ep.send(raw_src, header=b"", tag=24, timeout=10)
    assert req.wait(10).nbytes == 70000
    assert np.array_equal(out, src)


def test_call_request_reply(link):
    """Endpoint.call: send and wait for the reply (tag, reply_tag) in C; the echo
    peer replies with the same tag. Also with Buffer objects (the hot path)."""
    reply = bytearray(1 << 20)
    for n in (0, 1, 4096, 300000):
        msg = os.urandom(n)
        assert link.ep.call(msg, reply, tag=900 + (n % 50), timeout=10) == n
        assert bytes(reply[:n]) == msg
    m, r = t.Buffer(b"ping" * 10), t.Buffer(bytearray(64), writable=True)
    for _ in range(50):
        assert link.ep.call(m, r, tag=901, timeout=10) == 40
    assert bytes(r.obj[:40]) == b"ping" * 10


def test_truncated_message_then_endpoint_still_works(link):
    for n in (100, 300000):  # eager and rendezvous
        small = bytearray(10)
        req = link.ep.recv_nb(small, tag=31, tag_mask=t.EXACT_TAG)
        link.ep.send(os.urandom(n), tag=31, timeout=10)
        with pytest.raises(t.MessageTruncated, match="longer than the receive buffer"):
            req.wait(10)
        rr, got = _echo(link, b"after truncation", tag=32)
        assert got == b"after truncation"


def test_tag_matching_exact_and_masked(link):
    """A receive for tag A with the exact mask does not take a message tagged B;
    a masked receive takes any tag that agrees under the mask."""
    ba, bb = bytearray(16), bytearray(16)
    ra = link.ep.recv_nb(ba, tag=0x10, tag_mask=t.EXACT_TAG)
    link.ep.send(b"for-B", tag=0x11, timeout=10)          # echoed with tag 0x11
    time.sleep(0.05)
    link.w.progress()
    assert not ra.done()
    rb = link.ep.recv_nb(bb, tag=0x11, tag_mask=t.EXACT_TAG)
    assert rb.wait(10).tag == 0x11 and bytes(bb[:5]) == b"for-B"
    link.ep.send(b"for-A", tag=0x10, timeout=10)
    assert ra.wait(10).tag == 0x10 and bytes(ba[:5]) == b"for-A"
    # mask 0xFF00: tag 0x1234 matches a receive for 0x12FF
    rm = link.ep.recv_nb(bytearray(16), tag=0x12FF, tag_mask=0xFF00)
    link.ep.send(b"masked", tag=0x1234, timeout=10)
    assert rm.wait(10).tag == 0x1234
    # any tag by default
    r_any = link.ep.recv_nb(bytearray(16))
    link.ep.send(b"any", tag=t.MAX_TAG, timeout=10)
    assert r_any.wait(10).tag == t.MAX_TAG


# ------------------------------------------------ many outstanding operations


def _sizes_for(tags, rng):
    # mostly small, some across the eager/rendezvous boundaries of both transports
    choices = [0, 1, 64, 93, 5029, 9000, 70000, 300000]
    return {tg: rng.choice(choices) for tg in tags}


def test_200_outstanding_receives_complete_out_of_order(link):
    """200 receives with distinct tags are posted; the peer sends the 200 messages
    in a shuffled order; waiting them in posted order gives each its own content."""
    rng = random.Random(1234)
    tags = rng.sample(range(1, t.MAX_TAG), 200)
    sizes = _sizes_for(tags, rng)
    bufs = {tg: bytearray([SENTINEL]) * (sizes[tg] + 32) for tg in tags}
    reqs = [link.ep.recv_nb(bufs[tg], tag=tg, tag_mask=t.EXACT_TAG) for tg in tags]
    order = tags[:]
    rng.shuffle(order)
    assert order != tags
    link.ep.send(b"".join(struct.pack("<QQQ", tg, sizes[tg], tg) for tg in order),
                 header=b"!gw:send", tag=0x7E0000, timeout=10)
    for tg, req in zip(tags, reqs):
        rr = req.wait(timeout=30)
        assert (rr.tag, rr.nbytes, rr.header_len) == (tg, sizes[tg], 0)
        assert rr.endpoint is link.ep
        assert bufs[tg][:sizes[tg]] == pattern(sizes[tg], tg).tobytes(), f"tag {tg:#x}"
        assert bufs[tg][sizes[tg]:] == bytearray([SENTINEL]) * 32


def test_outstanding_sends_and_receives_through_echo_reverse_order(link):
    """120 receives posted; 120 send_nb's in reverse order (all outstanding at
    once); the echo comes back in reverse order; wait_all on the receives returns
    results in posted order."""
    n = 120
    rng = random.Random(99)
    tags = list(range(1000, 1000 + n))
    sizes = _sizes_for(tags, rng)
    data = {tg: os.urandom(sizes[tg]) for tg in tags}
    bufs = {tg: bytearray(sizes[tg] + 8) for tg in tags}
    recvs = [link.ep.recv_nb(bufs[tg], tag=tg, tag_mask=t.EXACT_TAG) for tg in tags]
    sends = [link.ep.send_nb(data[tg], header=b"h" + struct.pack("<I", tg), tag=tg)
             for tg in reversed(tags)]
    results = link.w.wait_all(recvs, timeout=60)
    assert [r.tag for r in results] == tags
    for tg, rr in zip(tags, results):
        assert rr.header_len == 5 and rr.payload_len == sizes[tg]
        assert bytes(bufs[tg][:5]) == b"h" + struct.pack("<I", tg)
        assert bytes(bufs[tg][5:rr.nbytes]) == data[tg]
    assert link.w.wait_all(sends, timeout=30) == [None] * n


def test_wait_any_returns_the_finished_one(link):
    """Receives for A, B, C are posted; only C's message arrives: wait_any says 2
    while A and B are still pending; then the rest arrive."""
    bufs = [bytearray(16) for _ in range(3)]
    reqs = [link.ep.recv_nb(b, tag=0x500 + i, tag_mask=t.EXACT_TAG) for i, b in enumerate(bufs)]
    link.ep.send(b"C", tag=0x502, timeout=10)
    assert link.w.wait_any(reqs, timeout=10) == 2
    assert not reqs[0].done() and not reqs[1].done()
    assert reqs[2].wait(1).tag == 0x502 and bufs[2][:1] == b"C"
    link.ep.send(b"B", tag=0x501, timeout=10)
    assert link.w.wait_any(reqs[:2], timeout=10) == 1
    assert not reqs[0].done()
    link.ep.send(b"A", tag=0x500, timeout=10)
    res = link.w.wait_all(reqs[:2], timeout=10)
    assert [r.tag for r in res] == [0x500, 0x501]
    assert bufs[0][:1] == b"A" and bufs[1][:1] == b"B"


def test_wait_any_drains_a_shuffled_burst(link):
    rng = random.Random(7)
    tags = rng.sample(range(0x20000, 0x30000), 64)
    sizes = _sizes_for(tags, rng)
    bufs = {tg: bytearray(sizes[tg] + 8) for tg in tags}
    pending = {tg: link.ep.recv_nb(bufs[tg], tag=tg, tag_mask=t.EXACT_TAG) for tg in tags}
    order = tags[:]
    rng.shuffle(order)
    link.ep.send(b"".join(struct.pack("<QQQ", tg, sizes[tg], tg + 1) for tg in order),
                 header=b"!gw:send", tag=0x7E0001, timeout=10)
    seen = []
    while pending:
        keys = list(pending)
        i = link.w.wait_any([pending[k] for k in keys], timeout=30)
        tg = keys[i]
        assert pending[tg].done()
        rr = pending.pop(tg).wait(1)
        assert rr.tag == tg and rr.nbytes == sizes[tg]
        assert bufs[tg][:sizes[tg]] == pattern(sizes[tg], tg + 1).tobytes()
        seen.append(tg)
    assert sorted(seen) == sorted(tags)


# ------------------------------------------------ 64 endpoints on one worker


@pytest.mark.parametrize("kind", sorted(TLS))
def test_64_endpoints_any_source_attribution(spawn_peer, kind):
    """One server worker here accepts 64 connections from two client processes
    (32 endpoints each); each client endpoint sends a distinct message; the
    any-source receive names the endpoint it came from, the server replies on
    it, and every client endpoint gets back exactly its own message."""
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        lst = w.listen("127.0.0.1", 0)
        clients = [spawn_peer_client(spawn_peer, kind, lst.port, 32) for _ in range(2)]
        accepted = [lst.accept(timeout=30) for _ in range(64)]
        assert len({ep.id for ep in accepted}) == 64
        by_pid = {}
        for ep in accepted:
            by_pid.setdefault(ep.peer_pid, []).append(ep)
        assert sorted(by_pid) == sorted(c.pid for c in clients)
        assert all(len(v) == 32 for v in by_pid.values())

        buf = bytearray(4096)
        got = {}
        for _ in range(64):
            rr = w.recv(buf, timeout=30)
            ep = rr.endpoint
            assert ep is not None and ep in accepted
            hdr, msg = bytes(buf[:rr.header_len]), bytes(buf[rr.header_len:rr.nbytes])
            assert hdr == b"m"
            pid, idx = (int(x) for x in msg.split(b":")[:2])
            assert pid == ep.peer_pid, "message attributed to the wrong endpoint"
            assert rr.tag == idx
            assert ep.id not in got, "two messages attributed to one endpoint"
            got[ep.id] = (pid, idx)
            ep.send(b"ack:" + msg, tag=rr.tag, timeout=10)
        assert len(got) == 64
        assert sorted(got.values()) == sorted((c.pid, i) for c in clients for i in range(32))
        for c in clients:
            ev = c.event("multi", timeout=30)
            assert ev["ok"] and ev["n"] == 32, ev
        # the clients close their endpoints cleanly, which needs our progress
        deadline = time.monotonic() + 30
        while any(c.proc.poll() is None for c in clients) and time.monotonic() < deadline:
            w.wait_event(0.05)
        assert [c.wait(timeout=1) for c in clients] == [0, 0]
        lost = w.poll_lost()
        assert {ep.id for ep in lost} == {ep.id for ep in accepted}
    finally:
        ctx.close()


def spawn_peer_client(spawn_peer, kind, port, conns):
    # a multi-mode client reports only when done, and its connects need this
    # (server) worker's progress: start it without waiting for a ready line
    return spawn_peer("client", "--tls", TLS[kind], "--mode", "multi", "--connect",
                      f"127.0.0.1:{port}", "--conns", conns, ready=False)


# ------------------------------------------------ 1 GiB


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", sorted(TLS))
def test_one_gib_roundtrip(spawn_peer, kind):
    n = 1 << 30
    peer = spawn_peer("server", "--tls", TLS[kind], "--max-msg", n)
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        data = pattern(n, 2024)
        header = b"1GiB-hdr"
        want = zlib.crc32(data)
        out = np.empty(n + len(header) + 64, dtype=np.uint8)
        out[-64:] = SENTINEL
        t0 = time.monotonic()
        req = ep.recv_nb(out, tag=77, tag_mask=t.EXACT_TAG)
        ep.send(data, header=header, tag=77, timeout=300)
        rr = req.wait(timeout=300)
        dt = time.monotonic() - t0
        assert (rr.nbytes, rr.header_len, rr.tag) == (n + len(header), len(header), 77)
        assert out[:len(header)].tobytes() == header
        assert zlib.crc32(out[len(header):len(header) + n]) == want
        assert (out[-64:] == SENTINEL).all()
        print(f"1 GiB echo over {kind} ({ep.transports}): {dt:.2f}s, {2 * n / dt / 1e9:.2f} GB/s")
    finally:
        ctx.close()


# ------------------------------------------------ the C echo server


@pytest.mark.parametrize("kind", sorted(TLS))
def test_serve_echo_in_c_and_stop_tag(spawn_peer, kind):
    """Endpoint.serve_echo echoes header + payload with the tag; Endpoint.stop_echo()
    sends the reserved stop tag (ECHO_STOP_TAG, refused by send and call), after
    which the peer closes its endpoint and exits 0."""
    peer = spawn_peer("server", "--tls", TLS[kind], "--mode", "cecho", "--max-msg", 1 << 20)
    ctx = t.Context({"TLS": TLS[kind]})
    try:
        w = ctx.worker()
        ep = w.connect(peer.address, timeout=10)
        for n in (0, 1, 5029, 70000, 300000, 1 << 20):
            payload = os.urandom(n)
            buf = bytearray(n + 64)
            req = ep.recv_nb(buf, tag=n % 1000, tag_mask=t.EXACT_TAG)
            ep.send(payload, header=b"c-echo", tag=n % 1000, timeout=10)
            rr = req.wait(10)
            assert rr.header_len == 6 and bytes(buf[:rr.nbytes]) == b"c-echo" + payload
        with pytest.raises(ValueError):
            ep.send(b"", tag=t.ECHO_STOP_TAG)
        with pytest.raises(ValueError, match="tag"):
            ep.call(b"", bytearray(8), tag=t.ECHO_STOP_TAG, timeout=1)
        assert ep.call(b"still echoing", bytearray(64), tag=3, timeout=10) == 13
        ep.stop_echo(timeout=10)
        assert peer.event("echo_end")["type"] is None
        assert peer.wait(timeout=10) == 0
        with pytest.raises(t.ConnectionLost):  # the peer closed its endpoint
            ep.recv(bytearray(8), tag=5, tag_mask=t.EXACT_TAG, timeout=5)
        ep.close()
    finally:
        ctx.close()


# ------------------------------------------------ the C sink (bandwidth bench server)


@pytest.mark.parametrize("kind", sorted(TLS))
@pytest.mark.parametrize("size", [8, 5029, 300000])
def test_serve_sink_receives_count_messages(kind, size):
    """Endpoint.serve_sink receives exactly ``count`` messages of its tag from C
    (keeping a window of receives posted) and returns; other tags stay for
    ordinary receives; a message larger than the buffer is MessageTruncated."""
    import threading

    with t.Context({"TLS": TLS[kind]}) as ctx:
        ws, wc = ctx.worker(), ctx.worker()
        lst = ws.listen("127.0.0.1", 0)
        got = {}

        def server():
            sep = lst.accept(timeout=10)
            got["sep"] = sep
            sink = bytearray(size)
            try:
                sep.serve_sink(sink, 50, window=8, tag=3, timeout=20)
                got["last"] = bytes(sink)
                other = bytearray(16)
                rr = sep.recv(other, tag=4, tag_mask=t.EXACT_TAG, timeout=10)
                got["other"] = bytes(other[:rr.nbytes])
                sep.serve_sink(bytearray(4), 1, tag=3, timeout=10)
            except Exception as e:  # checked below
                got["error"] = e

        th = threading.Thread(target=server)
        th.start()
        try:
            ep = wc.connect(lst.address, timeout=10)
            ep.send_nb(b"other tag", tag=4)
            reqs = [ep.send_nb(pattern(size, k), tag=3) for k in range(50)]
            wc.wait_all(reqs, timeout=20)
            ep.send(b"too long for 4 bytes", tag=3, timeout=10)
            th.join(30)
            assert "last" in got, got
            assert got["last"] == pattern(size, 49).tobytes()
            assert got["other"] == b"other tag"
            assert isinstance(got.get("error"), t.MessageTruncated), got
            with pytest.raises(ValueError, match="window"):
                got["sep"].serve_sink(bytearray(8), 1, window=0)
        finally:
            th.join(30)
