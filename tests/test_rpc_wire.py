"""Wire-level robustness of `gpuwire serve`: authentication, version checks, garbage,
truncated and fuzzed frames from a raw transport endpoint, oversize frames, and a
client SIGKILLed mid-batch (its memory is freed). Every test ends by checking the
server still serves a normal client."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from gpuwire import transport as t
from gpuwire.rpc import AuthenticationError, VersionMismatch, protocol as P
from gpuwire.rpc.codegen import layout
from gpuwire.rpc.spec import SPEC_VERSION, default_spec
from test_rpc_support import EXECUTORS, TOKEN, start_server, wait_until


@pytest.fixture(scope="module", params=EXECUTORS + ["cpu-proc"])
def server(request):
    srv = start_server(request.param)
    yield srv
    srv.stop()


def _still_serving(srv):
    assert srv.alive(), "the server died"
    with srv.connect(name="after") as s:
        with s.alloc(64) as d:
            s.cuMemsetD8(d, 5, 64)
            assert (s.copy_to_host(np.zeros(64, np.uint8), d) == 5).all()


class Raw:
    """A raw transport endpoint speaking hand-made frames."""

    def __init__(self, srv):
        self.ctx = t.Context()
        self.w = self.ctx.worker()
        self.ep = self.w.connect(srv.address)
        self.rep = bytearray(1 << 20)
        self.next_seq = None      # after the hello: the seq the server expects next

    def send(self, frame: bytes, tag: int = P.TAG_REQ, keep_seq: bool = False):
        """Send ``frame``; after the hello a frame with a whole header gets the session's next
        seq written into it (the server runs frames in seq order), unless ``keep_seq``."""
        if self.next_seq is not None and len(frame) >= P.HEADER_SIZE and not keep_seq:
            frame = bytearray(frame)
            struct.pack_into("<I", frame, 4, self.next_seq)
            self.next_seq = (self.next_seq + 1) & 0xFFFFFFFF
        self.ep.send(bytes(frame), tag=tag)

    def reply(self, timeout=5.0):
        r = self.ep.recv(self.rep, tag=P.TAG_REP, tag_mask=t.EXACT_TAG, timeout=timeout)
        return bytes(self.rep[:r.nbytes])

    def call(self, frame: bytes, timeout=5.0, keep_seq: bool = False):
        req = self.ep.recv_nb(self.rep, tag=P.TAG_REP, tag_mask=t.EXACT_TAG)
        self.send(frame, keep_seq=keep_seq)
        r = req.wait(timeout=timeout)
        return bytes(self.rep[:r.nbytes])

    def hello(self, **kw) -> bytes:
        """Hello; follows a process-isolation redirect (to the session worker) like the client."""
        rep = self.call(hello_frame(**kw))
        if err_of(rep) is None:
            off = P.HEADER_SIZE + P.REPLY_HEAD.size + 16 + 1
            (ln,) = struct.unpack_from("<I", rep, off)
            info = json.loads(rep[off + 4:off + 4 + ln] or b"{}")
            if "redirect_port" in info:
                self.ep.close()
                self.ep = self.w.connect(f"127.0.0.1:{info['redirect_port']}")
                kw["token"] = info["ticket"]
                rep = self.call(hello_frame(**kw))
        if err_of(rep) is None:
            self.next_seq = 1     # (hello_frame's seq is 0)
        return rep

    def close(self):
        self.ep.close()
        self.w.close()
        self.ctx.close()


def record(name: str, *fixed, blobs=(), routes=()) -> bytes:
    L = layout(default_spec().calls[name])
    body = L.fixed.pack(*fixed)
    for b in blobs:
        body += struct.pack("<I", len(b)) + b
    for r in routes:
        body += struct.pack("<I", r)
    return P.RECORD.pack(default_spec().calls[name].id, 0, P.RECORD_SIZE + len(body)) + body


def frame(seq: int, recs, flags=0, version=P.PROTOCOL_VERSION, magic=P.MAGIC) -> bytes:
    body = b"".join(recs)
    return P.HEADER.pack(magic, version, flags, seq, len(recs), len(body)) + body


def hello_frame(token=TOKEN, fingerprint=None, pmin=P.PROTOCOL_VERSION, pmax=P.PROTOCOL_VERSION,
                info: bytes = None) -> bytes:
    spec = default_spec()
    tok = token.encode() if token else b""
    info = json.dumps({"name": "raw"}).encode() if info is None else info
    body = P.HELLO_REQ.pack(pmin, pmax, os.getpid(), len(tok), len(info)) + tok + info
    body += record("gwHello", SPEC_VERSION, spec.fingerprint64 if fingerprint is None else fingerprint)
    return P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.F_HELLO | P.F_SYNC, 0, 1, len(body)) + body


def err_of(rep: bytes):
    magic, ver, flags, seq, nc, blen = P.HEADER.unpack_from(rep, 0)
    assert magic == P.MAGIC
    if not flags & P.F_ERROR:
        return None
    return P.parse_error(rep, len(rep))


# ----------------------------------------------------------------------------- authentication

def test_wrong_token_is_refused(server):
    with pytest.raises(AuthenticationError) as ei:
        server.connect(token="not-the-token")
    assert "authentication failed" in str(ei.value) and "wrong token" in str(ei.value)
    _still_serving(server)


def test_missing_token_is_refused(server):
    with pytest.raises(AuthenticationError) as ei:
        server.connect(token="")
    assert "authentication failed" in str(ei.value) and "no token" in str(ei.value)


def test_refused_client_is_disconnected(server):
    raw = Raw(server)
    try:
        st, msg = err_of(raw.call(hello_frame(token="bad")))
        assert st == P.ST_AUTH
        with pytest.raises((t.ConnectionLost, t.ConnectionClosed)):
            raw.reply(timeout=5)          # the server hangs up: the wait ends with the connection
    finally:
        raw.close()


def test_frames_before_hello_are_refused(server):
    raw = Raw(server)
    try:
        st, msg = err_of(raw.call(frame(1, [record("gwSync")], P.F_SYNC)))
        assert st == P.ST_HELLO_REQUIRED and "hello" in msg
    finally:
        raw.close()


# ----------------------------------------------------------------------------- versions

def test_spec_mismatch_is_a_clear_error(server, monkeypatch):
    raw = Raw(server)
    try:
        rep = raw.call(hello_frame(fingerprint=12345))
        assert err_of(rep) is None
        res = struct.unpack_from("<I", rep, P.HEADER_SIZE + P.REPLY_HEAD.size)[0]
        assert res == P.CUDA_ERROR_NOT_SUPPORTED
    finally:
        raw.close()
    import gpuwire.rpc.client as C
    fake = type("S", (), {"fingerprint64": 42, "calls": default_spec().calls, "by_id": default_spec().by_id})()
    monkeypatch.setattr(C, "default_spec", lambda: fake)
    with pytest.raises(VersionMismatch) as ei:
        server.connect()
    assert "spec" in str(ei.value) and "same gpuwire version" in str(ei.value)


def test_protocol_version_mismatch(server):
    raw = Raw(server)
    try:
        st, msg = err_of(raw.call(hello_frame(pmin=7, pmax=9)))
        assert st == P.ST_BAD_VERSION and "versions 7..9" in msg
    finally:
        raw.close()
    raw = Raw(server)
    try:
        st, msg = err_of(raw.call(frame(0, [], P.F_HELLO | P.F_SYNC, version=9)))
        assert st == P.ST_BAD_VERSION and "protocol version 9" in msg
    finally:
        raw.close()


# ----------------------------------------------------------------------------- garbage

def test_garbage_and_truncated_frames_get_error_replies(server):
    raw = Raw(server)
    try:
        st, msg = err_of(raw.call(b"\x01\x02\x03"))
        assert st == P.ST_TRUNCATED
        st, msg = err_of(raw.call(b"hello world, this is not a frame at all"))
        assert st == P.ST_BAD_MAGIC
        assert err_of(raw.hello()) is None                       # now a real session
        good = frame(5, [record("gwSync")], P.F_SYNC)
        assert err_of(raw.call(good)) is None
        st, msg = err_of(raw.call(good[:-3]))                     # truncated body
        assert st == P.ST_TRUNCATED
        st, msg = err_of(raw.call(good + b"xx"))                  # trailing bytes
        assert st == P.ST_MALFORMED
        st, msg = err_of(raw.call(frame(6, [record("gwSync")[:-1] + b""], P.F_SYNC)))
        assert st in (P.ST_MALFORMED, P.ST_TRUNCATED)
        bad_id = P.RECORD.pack(0xFFFE, 0, 8)
        st, msg = err_of(raw.call(frame(7, [bad_id], P.F_SYNC)))
        assert st == P.ST_UNKNOWN_CALL and "65534" in msg
        # a sync call in the middle of a frame
        st, msg = err_of(raw.call(frame(8, [record("gwSync"), record("gwSync")], P.F_SYNC)))
        assert st == P.ST_MALFORMED and "sync" in msg
        # a blob longer than its record
        rec = bytearray(record("cuModuleGetFunction", 0x500, 0x400, blobs=[b"noop\0"]))
        struct.pack_into("<I", rec, P.RECORD_SIZE + 16, 1000)
        st, msg = err_of(raw.call(frame(9, [bytes(rec), record("gwSync")], P.F_SYNC)))
        assert st == P.ST_MALFORMED and "runs past" in msg
        # an async garbage frame still gets an error reply
        raw.send(frame(10, [P.RECORD.pack(0xFFFE, 0, 8)]))
        st, msg = err_of(raw.reply())
        assert st == P.ST_UNKNOWN_CALL
        # the session survives its own garbage
        assert err_of(raw.call(frame(11, [record("gwSync")], P.F_SYNC))) is None
    finally:
        raw.close()
    _still_serving(server)


def test_oversize_frame(server):
    raw = Raw(server)
    try:
        assert err_of(raw.hello()) is None
        big = frame(3, [record("gwSync")], P.F_SYNC) + bytes(2 << 20)
        st, msg = err_of(raw.call(big, keep_seq=True))      # (refused unread: its seq does not count)
        assert st == P.ST_TOO_LARGE
        assert err_of(raw.call(frame(4, [record("gwSync")], P.F_SYNC))) is None
    finally:
        raw.close()


def test_fuzzed_frames(server):
    """Random mutations of valid frames: each gets a reply or an error reply (for a sync
    frame), nothing crashes, no memory outside the session is touched."""
    rng = random.Random(1234)
    raw = Raw(server)
    try:
        assert err_of(raw.hello()) is None
        base = [
            [record("cuMemAlloc", 0, 4096)],
            [record("cuMemsetD32", 0x1000, 5, 64)],
            [record("cuStreamCreate", 0x300, 0), record("cuMemsetD8Async", 0x4000, 1, 8, 0x300)],
            [record("cuEventCreate", 0x301, 0), record("cuEventRecord", 0x301, 0)],
            [record("cuModuleGetFunction", 0x302, 0x303, blobs=[b"noop\0"])],
            [record("cuLaunchKernel", 0x302, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b""])],
            [record("cuMemcpyHtoD", 0x1000, 16, blobs=[bytes(16)])],
            [record("cuMemFree", 0x1000)],
        ]
        sync_tail = [record("gwSync")]
        errors = replies = 0
        for i in range(400):
            recs = rng.choice(base) + sync_tail
            fr = bytearray(frame(100 + i, recs, P.F_SYNC))
            for _ in range(rng.randint(1, 6)):
                k = rng.randrange(len(fr))
                op = rng.random()
                if op < 0.6:
                    fr[k] = rng.randrange(256)
                elif op < 0.8:
                    del fr[k:k + rng.randint(1, 8)]
                else:
                    fr[k:k] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            if rng.random() < 0.1:
                fr = fr[:rng.randrange(len(fr) + 1)]
            raw.send(bytes(fr))
            # sync frames get one reply; async ones (flags fuzzed) only when refused
            try:
                rep = raw.reply(timeout=0.3 if not (len(fr) >= 4 and fr[3] & P.F_SYNC) else 5.0)
            except t.OperationTimeout:
                continue
            if err_of(rep) is None:
                replies += 1
            else:
                errors += 1
            if i % 50 == 0:
                assert server.alive()
        assert errors > 100 and server.alive()
        # the fuzzed session itself is still usable
        while True:  # drop replies that arrived late
            try:
                raw.reply(timeout=0.2)
            except t.OperationTimeout:
                break
        assert err_of(raw.call(frame(9999, [record("gwSync")], P.F_SYNC))) is None
    finally:
        raw.close()
    _still_serving(server)


# ----------------------------------------------------------------------------- frame order

def _hand_frame(s, seq: int, recs) -> bytes:
    """A sync frame ``recs + [gwSync]`` sent on session ``s``'s own connection with ``seq``;
    returns its reply (the session's lock held: no frame of its own goes out meanwhile)."""
    body = b"".join(recs) + record("gwSync")
    fr = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.F_SYNC, seq, len(recs) + 1, len(body)) + body
    rep = bytearray(1 << 16)
    req = s._ep.recv_nb(rep, tag=P.TAG_REP, tag_mask=t.EXACT_TAG)
    s._ep.send(fr, tag=P.TAG_REQ)
    return bytes(rep[:req.wait(timeout=10).nbytes])


@pytest.mark.parametrize("ahead", [1, 2, -1, 1 << 31])
def test_frames_out_of_order_are_refused_and_run_nothing(server, ahead):
    """Frames of an established session must carry consecutive seqs: one that is not the
    session's next (ahead or behind) gets an error reply naming both seqs and none of its calls
    run (memsets the C server would run, a free); the session goes on from where it was."""
    with server.connect(name="order") as s:
        d = s.alloc(4096)
        s.cuMemsetD32(d, 1, 1024)
        with s._lock:
            seq = s._seq
            bad = (seq + ahead) & 0xFFFFFFFF
            rep = _hand_frame(s, bad, [record("cuMemsetD32Async", d.ptr, 7, 1024, 0),
                                       record("cuMemFree", d.ptr)])
        st, msg = err_of(rep)
        assert st == P.ST_MALFORMED and f"frame seq {bad} is out of order" in msg and f"next is {seq}" in msg
        out = s.copy_to_host(np.zeros(1024, np.uint32), d)
        assert (out == 1).all(), "a call of the refused frame ran"
        with s._lock:                               # the session's next seq by hand: runs
            rep = _hand_frame(s, s._seq, [record("cuMemsetD32Async", d.ptr, 9, 1024, 0)])
            s._seq = (s._seq + 1) & 0xFFFFFFFF
        assert err_of(rep) is None
        assert (s.copy_to_host(np.zeros(1024, np.uint32), d) == 9).all()
        assert s.protocol_errors == []


def test_stray_error_replies_keep_only_the_last_ones(server):
    """Error replies to frames the client did not send (out of order here) are recorded in
    protocol_errors, which keeps the last 256 and counts the rest: a peer disturbing a session
    cannot grow it without bound. The session's own calls still work."""
    with server.connect(name="stray") as s:
        d = s.alloc(64)
        with s._lock:
            bad = (s._seq + 1000) & 0xFFFFFFFF
            body = record("cuMemsetD8Async", d.ptr, 3, 64, 0)
            fr = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, 0, bad, 1, len(body)) + body
            for _ in range(300):
                s._ep.send(fr, tag=P.TAG_REQ)
        s.cuMemsetD8(d, 5, 64)
        assert (s.copy_to_host(np.zeros(64, np.uint8), d) == 5).all()
        assert wait_until(lambda: (s.gwSync(), len(s.protocol_errors) + s.protocol_errors.dropped)[1] == 300,
                          timeout=10)
        assert len(s.protocol_errors) == 256 and s.protocol_errors.dropped == 44
        assert all(f"frame {bad}:" in m and "out of order" in m for m in s.protocol_errors)


def test_sessions_start_at_random_frame_seqs(server):
    """A session's first frame seq is random (a peer cannot derive another session's), and
    frames go on from it."""
    firsts = []
    for i in range(3):
        with server.connect(name=f"seq{i}") as s:
            s0 = s._seq
            s.gwSync()
            assert s._seq == (s0 + 1) & 0xFFFFFFFF
            firsts.append(s0)
    assert len(set(firsts)) == 3, firsts


def test_raw_endpoint_that_vanishes(server):
    raw = Raw(server)
    raw.hello()
    raw.send(frame(1, [record("cuMemAlloc", 0, 4096)]))
    raw.close()
    _still_serving(server)


# ----------------------------------------------------------------------------- client killed

_KILLED_CLIENT = textwrap.dedent("""
    import sys, numpy as np, gpuwire
    s = gpuwire.connect(sys.argv[1], token=sys.argv[2])
    bufs = [s.alloc(32 << 20) for _ in range(4)]
    for b in bufs:
        s.cuMemsetD8(b, 1, 32 << 20)
    s.gwSync()                       # the memory is backed now
    st = s.stream()
    print("ready", flush=True)
    i = 0
    while True:                      # a batch in flight when the kill comes
        s.cuMemsetD32Async(bufs[i % 4], i, 1024, st)
        i += 1
""")


def test_sigkill_mid_batch_frees_memory(server):
    if server.isolation == "process" and server.executor == "cpu":
        pytest.skip("CPU executor with process isolation: each worker has its own memory budget "
                    "(test_rpc_isolation checks that the killed client's worker ends)")
    obs = server.connect(name="observer")
    try:
        base = obs.mem_get_info()[0]
        p = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, server.address, server.token],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            used = obs.mem_get_info()[0]
            assert used <= base - (128 << 20) + (8 << 20)
            time.sleep(0.2)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        slack = 0 if server.executor == "cpu" else 4 << 20   # the driver's own bookkeeping moves a little
        assert wait_until(lambda: obs.mem_get_info()[0] >= base - slack, 10), (
            f"memory of the killed client not freed: {obs.mem_get_info()[0]} < {base}")
    finally:
        obs.close()
    _still_serving(server)
