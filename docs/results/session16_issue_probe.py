"""Session 16 probe: where a deferred stub's time goes in a real session vs the same
generated stub on a bare object, and vs a pure-Python copy of it before any connect.
Usage: python3 session16_issue_probe.py [gpu|cpu] [pin-cpu] [settle-s]"""
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_rpc_support import start_server  # noqa: E402
from gpuwire import settings  # noqa: E402

kind = sys.argv[1] if len(sys.argv) > 1 else "cpu"
if len(sys.argv) > 2:
    os.sched_setaffinity(0, {int(sys.argv[2])})
_C = struct.Struct("<HHIQIIQ")
_pi = _C.pack_into


def bare(self, a, b, c, d):
    S = self
    _l = S._lock
    _l.acquire()
    try:
        p = S._pos
        if p + 32 > S._lim:
            raise RuntimeError
        _pi(S._buf, p, 35, 0, 32, a, b, c, d)
        S._pos = p + 32
        k = S._ncalls = S._ncalls + 1
        if k >= S._fa:
            raise RuntimeError
    finally:
        _l.release()


class Fake:
    pass


def fake():
    f = Fake()
    f._lock, f._pos, f._lim, f._buf, f._ncalls, f._fa = threading.Lock(), 16, 1 << 20, bytearray(1 << 20), 0, 1 << 30
    return f


def burst(fn, args, n=10000):
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return (time.perf_counter() - t0) / n * 1e6


def main():
    fk = fake()
    pre = sorted(burst(bare.__get__(fk), (1, 2, 3, 4)) for _ in range(9) if not setattr(fk, "_pos", 16))
    print("before connect, pure-Python stub copy (us):", [round(x, 3) for x in pre])
    srv = start_server(kind)
    try:
        with settings.override(rpc_flush_us=0, rpc_batch_calls=1 << 20, rpc_batch_first=1 << 20,
                               rpc_batch_bytes=900 << 10):
            s = srv.connect()
        d = s.alloc(1 << 16)
        st = s.stream()
        if len(sys.argv) > 3:
            time.sleep(float(sys.argv[3]))
        f = s.cuMemsetD32Async
        fk2 = fake()
        g = type(s).cuMemsetD32Async.__get__(fk2)
        rows = []
        for rep in range(15):
            s.gwSync()
            a = burst(f, (d.ptr, 7, 16, st.handle))
            b = burst(f, (d, 7, 16, st))
            s.gwSync()
            fk2._pos = 16
            fk2._ncalls = 0
            c = burst(g, (d.ptr, 7, 16, st.handle))
            fk._pos = 16
            e = burst(bare.__get__(fk), (d.ptr, 7, 16, st.handle))
            rows.append((a, b, c, e))
        for name, i in (("session stub, ints", 0), ("session stub, objects", 1),
                        ("generated stub on a bare object", 2), ("pure-Python copy", 3)):
            print(f"{name:34s}", [round(r[i], 3) for r in rows])
        s.close()
    finally:
        srv.stop()


main()
