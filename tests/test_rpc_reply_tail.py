"""Small cuMemcpyDtoHAsync results batched with a sync call come back inside that call's
reply (the reply tail, route ROUTE_REPLY; docs/protocol.md) instead of as push messages:
the bytes, their order among pushes, failed copies (deferred errors, the buffer left
alone), the setting that turns it off, and frames that misuse the route. Against real
server processes: the C server (cpu), the Python one (cpu-py) and the GPU."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from gpuwire import settings as _settings
from gpuwire.rpc import DeferredCudaError, protocol as P
from gpuwire.rpc.codegen import layout
from gpuwire.rpc.spec import default_spec
from test_rpc_support import EXECUTORS, start_server


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    srv = start_server(request.param)
    yield srv
    srv.stop()


def _connect(srv, **kw):
    with _settings.override(rpc_flush_us=0, rpc_batch_first=64, **kw):   # a step is one frame
        return srv.connect(name="test-tail")


def _fill(s, d, n):
    s.copy_to_device(d, np.arange(n, dtype=np.uint32))


def test_small_results_ride_in_the_sync_reply(server):
    with _connect(server) as s:
        assert s._tail_max == P.REPLY_INLINE_LIMIT
        d = s.alloc(4096)
        st = s.stream()
        _fill(s, d, 1024)
        s.gwSync()
        pushes0 = s._push_done
        for step in range(3):
            a, b = np.zeros(1, np.uint32), np.zeros(16, np.uint32)
            s.cuMemsetD32Async(d, step + 100, 1, st)
            s.cuMemcpyDtoHAsync(a, d, 4, st)
            s.cuMemcpyDtoHAsync(b, d.ptr + 64, 64, st)
            s.cuStreamSynchronize(st)
            assert a[0] == step + 100 and (b == np.arange(16, 32)).all()
        assert s._push_done == pushes0 and not s._pushes      # no push message was needed


def test_setting_off_uses_pushes_with_the_same_bytes(server):
    with _connect(server, rpc_reply_inline_max=0) as s:
        assert s._tail_max == 0
        d = s.alloc(4096)
        st = s.stream()
        _fill(s, d, 1024)
        s.gwSync()
        pushes0 = s._push_done
        a = np.zeros(4, np.uint32)
        s.cuMemcpyDtoHAsync(a, d.ptr + 16, 16, st)
        s.cuStreamSynchronize(st)
        assert (a == [4, 5, 6, 7]).all() and s._push_done == pushes0 + 1


def test_larger_results_and_earlier_frames_still_push_in_order(server):
    with _connect(server, rpc_reply_inline_max=64) as s:
        d = s.alloc(1 << 16)
        st = s.stream()
        _fill(s, d, 1 << 14)
        s.gwSync()
        pushes0 = s._push_done
        early = np.zeros(2, np.uint32)
        s.cuMemcpyDtoHAsync(early, d.ptr + 8, 8, st)
        s.flush()                                   # its frame has no sync: a push
        small1, big, small2 = np.zeros(1, np.uint32), np.zeros(1024, np.uint32), np.zeros(16, np.uint32)
        s.cuMemcpyDtoHAsync(small1, d.ptr + 400, 4, st)
        s.cuMemcpyDtoHAsync(big, d.ptr + 4096, 4096, st)     # above rpc_reply_inline_max: a push
        s.cuMemcpyDtoHAsync(small2, d.ptr + 800, 64, st)
        s.cuStreamSynchronize(st)
        assert (early == [2, 3]).all() and small1[0] == 100
        assert (big == np.arange(1024, 2048)).all() and (small2 == np.arange(200, 216)).all()
        assert s._push_done == pushes0 + 2


def test_a_failed_copy_leaves_its_buffer_and_is_reported_at_the_sync(server):
    with _connect(server) as s:
        d = s.alloc(4096)
        st = s.stream()
        _fill(s, d, 1024)
        s.gwSync()
        ok1, bad, ok2 = np.zeros(1, np.uint32), np.full(4, 7, np.uint32), np.zeros(1, np.uint32)
        s.cuMemcpyDtoHAsync(ok1, d.ptr + 4, 4, st)
        s.cuMemcpyDtoHAsync(bad, d.ptr + 4096, 16, st)      # past the allocation: fails on the server
        s.cuMemcpyDtoHAsync(ok2, d.ptr + 8, 4, st)
        with pytest.raises(DeferredCudaError) as ei:
            s.cuStreamSynchronize(st)
        assert ei.value.call == "cuMemcpyDtoHAsync" and ei.value.name == "CUDA_ERROR_INVALID_VALUE"
        assert ei.value.batch_position == 1
        assert ok1[0] == 1 and ok2[0] == 2 and (bad == 7).all()
        # the session goes on
        s.cuMemcpyDtoHAsync(ok1, d.ptr + 12, 4, st)
        s.cuStreamSynchronize(st)
        assert ok1[0] == 3


def _d2h_record(src, n, stream, route):
    call = default_spec().calls["cuMemcpyDtoHAsync"]
    body = layout(call).fixed.pack(src, n, stream) + struct.pack("<I", route)
    return P.RECORD.pack(call.id, 0, P.RECORD_SIZE + len(body)) + body


def test_reply_route_outside_a_sync_frame_is_refused(server):
    with _connect(server) as s:
        d = s.alloc(64)
        s.gwSync()
        rec = _d2h_record(d.ptr, 4, 0, P.ROUTE_REPLY)
        with s._lock:                                # (the session's next seq: frames run in order)
            seq = s._seq
            frame = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, 0, seq, 1, len(rec)) + rec
            s._ep.send(frame, tag=P.TAG_REQ)
            s._seq = (seq + 1) & 0xFFFFFFFF
        s.gwSync()                                   # the error reply came first: recorded
        assert any("reply tail" in m for m in s.protocol_errors), s.protocol_errors
        a = np.zeros(1, np.uint32)
        s.cuMemsetD32Async(d, 9, 1, 0)
        s.cuMemcpyDtoHAsync(a, d, 4, 0)
        s.cuStreamSynchronize(0)
        assert a[0] == 9


def test_reply_route_above_the_limit_fails_that_call():
    """A hand-made sync frame routing 8 KiB to the reply tail: that copy fails (deferred
    error naming the limit), the reply still parses."""
    srv = start_server("cpu")
    try:
        with _connect(srv) as s:
            d = s.alloc(1 << 16)
            s.gwSync()
            seq = s._seq
            rec = _d2h_record(d.ptr, 8192, 0, P.ROUTE_REPLY)
            gw = P.RECORD.pack(default_spec().calls["gwSync"].id, 0, 8)
            body = rec + gw
            frame = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.F_SYNC, seq, 2, len(body)) + body
            rep = bytearray(1 << 16)
            req = s._ep.recv_nb(rep, tag=P.TAG_REP)
            s._ep.send(frame, tag=P.TAG_REQ)
            n = req.wait(timeout=10).nbytes
            s._seq = (seq + 1) & 0xFFFFFFFF
            magic, _v, flags, rseq, _nc, blen = P.HEADER.unpack_from(rep, 0)
            assert magic == P.MAGIC and not flags and rseq == seq and blen == n - P.HEADER_SIZE
            off = P.HEADER_SIZE + P.REPLY_HEAD.size
            assert struct.unpack_from("<I", rep, off)[0] == 0          # an empty tail entry
            res, = struct.unpack_from("<I", rep, off + 4)                # gwSync's result
            assert res == 0 and rep[off + 8] == 1                        # a deferred-error report
            assert b"reply tail" in bytes(rep[off + 9:n])
    finally:
        srv.stop()
