"""The RPC layer's C module (gpuwire._rpc): encoder vs struct.pack, the frame scanner vs
the Python decoder on valid and fuzzed frames, the dispatch loop's translation and
validation with the host 'driver'."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from gpuwire.rpc import protocol as P
from gpuwire.rpc.codegen import layout
from gpuwire.rpc.spec import default_spec

_rpc = pytest.importorskip("gpuwire._rpc", reason="gpuwire._rpc is not built (pip install -e .)")
ffi, lib = _rpc.ffi, _rpc.lib
from gpuwire.rpc.executors import _cfast as cf  # noqa: E402
from gpuwire.rpc import server as S  # noqa: E402

SPEC = default_spec()


def test_layouts_match_the_spec():
    assert cf.available() and cf._consistent(SPEC)


@pytest.mark.parametrize("name", [c.name for c in SPEC.calls.values() if len(c.wire_format.request_args) <= 10])
def test_encoder_matches_struct(name):
    call = SPEC.calls[name]
    L = layout(call)
    rng = random.Random(call.id)
    vals = []
    for code in L.fixed.format.lstrip("<"):
        lim = {"b": 127, "B": 255, "h": 32767, "H": 65535, "i": 2**31 - 1, "I": 2**32 - 1, "q": 2**62, "Q": 2**62}[code]
        vals.append(rng.randrange(0, lim))
    buf = ffi.new("uint8_t[256]")
    end = lib.gw_rpc_put(buf, 256, 16, call.id, 99, L.fixed.format.lstrip("<").encode(),
                         *(vals + [0] * (10 - len(vals))))
    want = L.client.pack(call.id, 0, 99, *vals)
    assert end == 16 + len(want)
    assert bytes(ffi.buffer(buf, 256))[16:end] == want


def test_encoder_range_and_capacity():
    buf = ffi.new("uint8_t[32]")
    assert lib.gw_rpc_put(buf, 32, 0, 1, 9, b"B", 256, *([0] * 9)) == -2
    assert lib.gw_rpc_put(buf, 32, 0, 1, 9, b"I", -1, *([0] * 9)) == -2
    assert lib.gw_rpc_put(buf, 32, 28, 1, 16, b"Q", 5, *([0] * 9)) == -1
    assert lib.gw_rpc_put(buf, 32, 0, 1, 9, b"z", 5, *([0] * 9)) == -3


class _FakeEP:
    peer = "x"

    def send(self, *a, **k):
        pass


class _FakeSrv:
    executor = None
    token = None
    va_size = 0
    worker = None
    pool = None


def _frame(recs, flags=P.F_SYNC):
    body = b"".join(recs)
    return P.HEADER.pack(P.MAGIC, 1, flags, 3, len(recs), len(body)) + body


def _rec(name, *fixed, blobs=(), routes=()):
    L = layout(SPEC.calls[name])
    body = L.fixed.pack(*fixed)
    for b in blobs:
        body += struct.pack("<I", len(b)) + b
    for r in routes:
        body += struct.pack("<I", r)
    return P.RECORD.pack(SPEC.calls[name].id, 0, 8 + len(body)) + body


def _both(frame: bytes, ncalls: int, sync: bool):
    """(python status, c status, same record boundaries?)"""
    sess = S.ServerSession(_FakeSrv(), _FakeEP(), 1)
    mv = memoryview(bytearray(frame))
    try:
        recs = sess._parse(mv, P.HEADER_SIZE, len(frame), ncalls, sync)
        pst = 0
    except S.FrameError as e:
        recs, pst = None, e.status
    sc = cf.Scanner(S._table())
    buf = ffi.from_buffer(bytearray(frame))
    out = ffi.new("gw_rpc_rec_t[]", max(ncalls, 1))
    cst, msg = sc.scan(ffi.cast("uint8_t *", buf), P.HEADER_SIZE, len(frame), ncalls, sync, out)
    same = True
    if pst == 0 and cst == 0:
        for i, (e, vals, blobs, routes) in enumerate(recs):
            r = out[i]
            same &= r.id == e.call.id and e.fixed.unpack_from(mv, r.fixed) == vals
            same &= [r.route[k] for k in range(e.nroutes)] == routes
    return pst, cst, same


def test_scanner_agrees_with_python_on_valid_frames():
    recs = [_rec("cuMemAlloc", 0x1000, 4096), _rec("cuMemsetD32Async", 0x1000, 5, 16, 0),
            _rec("cuModuleGetFunction", 0x300, 0x301, blobs=[b"noop\0"]),
            _rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b"12345678"]),
            _rec("cuMemcpyDtoHAsync", 0x1000, 16, 0, routes=[P.TAG_BULK_OUT_FIRST]),
            _rec("cuMemcpyDtoH", 0x1000, 16, routes=[0])]
    f = _frame(recs)
    assert _both(f, len(recs), True) == (0, 0, True)


def test_scanner_agrees_with_python_on_fuzzed_frames():
    rng = random.Random(7)
    base = [_rec("cuMemsetD8", 0x1000, 1, 8), _rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b""]),
            _rec("cuMemcpyHtoD", 0x1000, 4, blobs=[b"abcd"]), _rec("gwSync")]
    disagree = 0
    for it in range(2000):
        recs = rng.sample(base[:3], rng.randint(1, 3)) + [base[3]]
        f = bytearray(_frame(recs))
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(P.HEADER_SIZE, len(f))
            if rng.random() < 0.7:
                f[k] = rng.randrange(256)
            else:
                del f[k]
        ncalls = len(recs) + rng.choice([0, 0, 0, -1, 1])
        pst, cst, same = _both(bytes(f), max(ncalls, 0), True)
        if (pst == 0) != (cst == 0) or not same:
            disagree += 1
    assert disagree == 0


def test_dispatch_validates_ranges_and_handles():
    d = cf.Dispatch(SPEC, cf.host_fns([1, 2, 3, 4]))
    mem = np.zeros(4096, np.uint8)
    base = int(mem.ctypes.data)
    d.alloc(base, 4096)
    d.bind("stream", 0x200, type("St", (), {"ptr": 0})())
    recs = [_rec("cuMemsetD32Async", base, 0x01020304, 16, 0x200),
            _rec("cuMemsetD8Async", base + 64, 7, 8, 0),
            _rec("cuMemcpyDtoDAsync", base + 128, base, 64, 1),
            _rec("cuMemsetD32Async", base + 4096, 1, 1, 0),                 # past the end
            _rec("cuMemsetD32Async", base, 1, 1, 0x999),                    # unknown stream
            _rec("cuMemsetD16Async", base + 1, 1, 1, 0),                    # misaligned
            _rec("gwSync")]
    f = bytearray(_frame(recs))
    fc = ffi.from_buffer(f)
    out = ffi.new("gw_rpc_rec_t[]", len(recs))
    sc = cf.Scanner(S._table())
    assert sc.scan(ffi.cast("uint8_t *", fc), P.HEADER_SIZE, len(f), len(recs), True, out)[0] == 0
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 0, len(recs))
    assert (k, res) == (3, P.CUDA_ERROR_INVALID_VALUE) and "not inside an allocation" in msg
    assert (mem[:64].view(np.uint32) == 0x01020304).all() and (mem[64:72] == 7).all()
    assert (mem[128:192] == mem[:64]).all()
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 4, len(recs))
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_HANDLE) and "0x999" in msg
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 5, len(recs))
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_VALUE) and "aligned" in msg
    k, res, msg = d.run(ffi.cast("uint8_t *", fc), out, 6, len(recs))
    assert (k, res) == (0, 0)                                                 # gwSync: back to Python
    d.free(base)
    assert not lib.gw_rpc_range_ok(d.s, base, 1)


def test_dispatch_launch_checks_the_parameter_size():
    d = cf.Dispatch(SPEC, cf.host_fns([0]))
    d.bind("function", 0x300, type("F", (), {"ptr": 0x1234, "size": 8})())
    recs = [_rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b"12345678"]),
            _rec("cuLaunchKernel", 0x300, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b"1234"]),
            _rec("cuLaunchKernel", 0x301, 1, 1, 1, 1, 1, 1, 0, 0, blobs=[b""])]
    f = bytearray(_frame(recs, 0))
    fc = ffi.cast("uint8_t *", ffi.from_buffer(f))
    out = ffi.new("gw_rpc_rec_t[]", 3)
    assert cf.Scanner(S._table()).scan(fc, P.HEADER_SIZE, len(f), 3, False, out)[0] == 0
    n0 = lib.gw_rpc_host_count(0)
    k, res, msg = d.run(fc, out, 0, 3)
    assert (k, res) == (1, P.CUDA_ERROR_INVALID_VALUE) and "8" in msg and lib.gw_rpc_host_count(0) == n0 + 1
    k, res, msg = d.run(fc, out, 2, 3)
    assert (k, res) == (0, P.CUDA_ERROR_INVALID_HANDLE)
    d.unbind("function", 0x300)
    k, res, msg = d.run(fc, out, 0, 3)
    assert res == P.CUDA_ERROR_INVALID_HANDLE


def test_handle_table_survives_churn():
    d = cf.Dispatch(SPEC, {})
    live = {}
    rng = random.Random(3)
    for i in range(20000):
        hid = rng.randrange(0x100, 0x100 + 3000)
        if hid in live and rng.random() < 0.5:
            d.unbind("event", hid)
            del live[hid]
        else:
            live[hid] = rng.randrange(1, 1 << 40)
            d.bind("event", hid, type("E", (), {"ptr": live[hid]})())
    # every live id resolves (through an event-record record with the host driver)
    d2 = cf.Dispatch(SPEC, cf.host_fns([5]))
    for hid, p in live.items():
        d2.bind("event", hid, type("E", (), {"ptr": p})())
    recs = [_rec("cuEventRecord", hid, 0) for hid in list(live)[:500]]
    f = bytearray(_frame(recs, 0))
    fc = ffi.cast("uint8_t *", ffi.from_buffer(f))
    out = ffi.new("gw_rpc_rec_t[]", len(recs))
    assert cf.Scanner(S._table()).scan(fc, P.HEADER_SIZE, len(f), len(recs), False, out)[0] == 0
    k, res, _ = d2.run(fc, out, 0, len(recs))
    assert (k, res) == (len(recs), 0)
