"""The deferred stubs' issue path (codegen.client_source): one byte-limit test before each
record, one count test after it, the session lock taken with acquire/release, and
cuLaunchKernel's one-pack path for parameter bytes that fit inline. Real server, CPU
executor (C and Python decoders) and the GPU executor where there is one."""
from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from gpuwire import settings
from gpuwire.rpc import protocol as P
from test_rpc_support import EXECUTORS, PTX, start_server, wait_until


@pytest.fixture(scope="module", params=EXECUTORS)
def server(request):
    srv = start_server(request.param)
    yield srv
    srv.stop()


MEMSET = 36     # cuMemsetD32Async's record: header 8 + dst 8 + value 4 + count 4 + stream 8 (bytes)


def _kib_frames(server, name: str, flush_us: int = 0):
    """A session whose batches are bounded only by rpc_batch_bytes=1024 (no call-count ramp)."""
    with settings.override(rpc_batch_bytes=1024, rpc_batch_calls=1 << 20, rpc_batch_first=1 << 20,
                           rpc_flush_us=flush_us):
        return server.connect(name=name)


def test_batch_never_passes_rpc_batch_bytes(server):
    """A frame holds records up to rpc_batch_bytes; the call that would pass it goes into
    the next frame (before it is written), and every call runs, in order."""
    s = _kib_frames(server, "bytes")
    try:
        per = (1024 - P.HEADER_SIZE) // MEMSET            # 28 records fill a frame of 1024 B
        d = s.alloc(4 * 3 * per)
        st = s.stream()
        s.gwSync()
        seq0 = s._seq
        sent_at = []
        for i in range(3 * per):
            s.cuMemsetD32Async(d.ptr + 4 * i, i + 1, 1, st)
            if s._seq != seq0 + len(sent_at):
                sent_at.append(i)
            assert s._pos <= 1024
        assert sent_at == [per, 2 * per], sent_at         # call `per` (0-based) opened frame 2
        out = s.copy_to_host(np.zeros(3 * per, np.uint32), d)
        assert (out == np.arange(1, 3 * per + 1)).all()
    finally:
        s.close()


def test_a_record_larger_than_the_byte_limit_goes_alone(server):
    """A record above rpc_batch_bytes that fits the frame buffer is sent in a frame of its
    own: the batch before it first, the calls after it in the next frame."""
    s = _kib_frames(server, "big")
    try:
        d = s.alloc(8192)
        st = s.stream()
        s.cuMemsetD32Async(d, 7, 2048, st)
        seq0 = s._seq
        data = (np.arange(3000) % 251).astype(np.uint8)
        s.cuMemcpyHtoDAsync(d.ptr + 100, data, 3000, st)        # 3 KiB inline record
        assert s._seq == seq0 + 1, "the batch before the big record did not go first"
        s.cuMemsetD32Async(d.ptr + 4096, 9, 16, st)
        assert s._seq == seq0 + 2, "the big record's frame did not go before the next call"
        out = s.copy_to_host(np.zeros(8192, np.uint8), d)
        assert (out[100:3100] == data).all()
        assert (out[:100].view(np.uint32) == 7).all()
        assert (out[4096:4160].view(np.uint32) == 9).all()
        assert (out[3100:4096].view(np.uint32) == 7).all()
    finally:
        s.close()


def test_the_first_call_after_a_byte_limit_flush_arms_the_timer(server):
    """After a frame went out because the next record would pass rpc_batch_bytes, the new
    batch's first call arms the flush timer: the calls left over go out without a sync."""
    s = _kib_frames(server, "timer", flush_us=3000)
    try:
        d = s.alloc(4096)
        st = s.stream()
        s.gwSync()
        seq0 = s._seq
        per = (1024 - P.HEADER_SIZE) // MEMSET
        for i in range(per + 3):
            s.cuMemsetD32Async(d.ptr + 4 * i, 5, 1, st)
        assert s._seq == seq0 + 1 and s._ncalls == 3
        assert wait_until(lambda: s._ncalls == 0, timeout=5), "the timer did not send the last calls"
        assert s._seq == seq0 + 2
        out = s.copy_to_host(np.zeros(per + 3, np.uint32), d)
        assert (out == 5).all()
    finally:
        s.close()


def _saxpy(s):
    f = s.load_module(PTX).function("saxpy")
    return f


@pytest.mark.parametrize("form", ["bytes", "bytearray", "memoryview", "numpy", "extra", "bulk"])
def test_launch_parameters_in_every_form(server, form):
    """cuLaunchKernel's parameters as bytes that fit inline take the one-pack path; other
    buffer types, `extra=` and parameters above rpc_inline_max (a bulk payload) the general
    one. The kernel sees the same values either way, over a batch of launches."""
    inline = 16 if form == "bulk" else 64 << 10
    with settings.override(rpc_inline_max=inline, rpc_flush_us=0):
        s = server.connect(name=form)
    try:
        f = _saxpy(s)
        n = 300
        x = np.arange(n, dtype=np.float32)
        with s.alloc(x.nbytes) as dx, s.alloc(x.nbytes) as dy:
            s.copy_to_device(dx, x)
            s.cuMemsetD32(dy, 0, n)
            st = s.stream()
            for k in range(1, 6):                               # y += k * x, five launches
                p = struct.pack("<f4xQQi", float(k), dx.ptr, dy.ptr, n)
                if form == "bytearray":
                    p = bytearray(p)
                elif form == "memoryview":
                    p = memoryview(p)
                elif form == "numpy":
                    p = np.frombuffer(p, np.uint8).copy()
                if form == "extra":
                    s.cuLaunchKernel(f.handle, 2, 1, 1, 256, 1, 1, 0, st, extra=p)
                else:
                    s.cuLaunchKernel(f.handle, 2, 1, 1, 256, 1, 1, 0, st, p)
            s.cuStreamSynchronize(st)
            y = s.copy_to_host(np.zeros(n, np.float32), dy)
            assert np.allclose(y, 15 * x)
    finally:
        s.close()


@pytest.mark.parametrize("bad", [("grid", -1), ("grid", "2"), ("stream", 1 << 64), ("params", 5)])
def test_bad_launch_arguments_raise_and_release_the_lock(server, bad):
    """A value the record cannot hold raises TypeError naming cuLaunchKernel, writes
    nothing, and leaves the session usable (its lock released): from another thread too."""
    with settings.override(rpc_flush_us=0):         # (no timer: the batch stays as it was)
        s = server.connect(name="bad")
    try:
        f = _saxpy(s)
        d = s.alloc(4096)
        st = s.stream()
        s.cuMemsetD32Async(d, 3, 1024, st)
        ncalls, pos = s._ncalls, s._pos
        what, v = bad
        args = [f.handle, 1, 1, 1, 1, 1, 1, 0, st.handle, struct.pack("<f4xQQi", 1.0, d.ptr, d.ptr, 0)]
        if what == "grid":
            args[1] = v
        elif what == "stream":
            args[8] = v
        else:
            args[9] = v
        with pytest.raises(TypeError, match="cuLaunchKernel"):
            s.cuLaunchKernel(*args)
        assert (s._ncalls, s._pos) == (ncalls, pos)
        got = []
        th = threading.Thread(target=lambda: got.append(s.copy_to_host(np.zeros(1024, np.uint32), d)))
        th.start()
        th.join(30)
        assert not th.is_alive(), "the session lock was left held"
        assert (got[0] == 3).all()
    finally:
        s.close()


def test_threads_issuing_launches_and_memsets_on_one_session(server):
    """Four threads batch launches and memsets into one session with small frames and a
    short timer; each checks its own results after its stream syncs."""
    with settings.override(rpc_batch_bytes=2048, rpc_batch_first=3, rpc_batch_calls=40, rpc_flush_us=100):
        s = server.connect(name="threads")
    try:
        f = _saxpy(s)
        errs = []

        def worker(k):
            try:
                st = s.stream()
                n = 64
                x = np.full(n, k + 1, np.float32)
                dx, dy = s.alloc(4 * n), s.alloc(4 * n)
                s.copy_to_device(dx, x)
                for rnd in range(20):
                    s.cuMemsetD32Async(dy, 0, n, st)
                    for j in range(1, 8):
                        s.cuLaunchKernel(f.handle, 1, 1, 1, 64, 1, 1, 0, st,
                                         struct.pack("<f4xQQi", float(j), dx.ptr, dy.ptr, n))
                    s.cuStreamSynchronize(st)
                    y = s.copy_to_host(np.zeros(n, np.float32), dy)
                    if not np.allclose(y, 28 * (k + 1)):
                        errs.append(f"thread {k} round {rnd}: {y[:4]}")
                        return
            except BaseException as e:   # noqa: BLE001 - reported by the main thread
                errs.append(e)

        ths = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in ths:
            th.start()
        deadline = time.monotonic() + 120
        for th in ths:
            th.join(max(0.1, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in ths), "a thread hung"
        assert errs == [] and s.protocol_errors == []
    finally:
        s.close()
