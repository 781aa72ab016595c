import struct, threading, time, types
_C = struct.Struct("<HHIQIIQ")
_pack_into = _C.pack_into
_pack = _C.pack
class S0: pass
def mk():
    s = S0()
    s._lock = threading.Lock(); s._pos = 16; s._cap = 1<<20; s._buf = bytearray(1<<20)
    s._ncalls = 0; s._flush_at = 1<<30; s._max_bytes = 900<<10; s._bulk = []; s._lim = 900<<10
    s._arm_timer = lambda: None; s._q = []; s._open = True; s._fa = 1<<30
    return s
def cur(self, dstDevice, ui, N, hStream=0):
    S = self
    _need = 32
    with S._lock:
        _pos = S._pos
        if _pos + _need > S._cap: _pos = S._make_room(_need)
        _buf = S._buf
        try:
            _C.pack_into(_buf, _pos, 35, 0, _need, dstDevice, ui, N, hStream)
        except struct.error as _e:
            raise S._bad_args('cuMemsetD32Async', _e) from None
        S._pos = _pos + _need
        _k = S._ncalls = S._ncalls + 1
        if _k == 1: S._arm_timer()
        if _k >= S._flush_at or _pos + _need >= S._max_bytes or S._bulk: S._flush_locked()
    return None
def acq(self, dstDevice, ui, N, hStream=0):
    S = self
    _l = S._lock
    _l.acquire()
    try:
        p = S._pos
        q = p + 32
        if q > S._lim: p = S._room(32); q = p + 32
        _pack_into(S._buf, p, 35, 0, 32, dstDevice, ui, N, hStream)
        S._pos = q
        if p == 16: S._arm_timer()
    except struct.error as _e:
        raise S._bad_args('cuMemsetD32Async', _e) from None
    finally:
        _l.release()
def queue(self, dstDevice, ui, N, hStream=0):
    try:
        _b = _pack(35, 0, 32, dstDevice, ui, N, hStream)
    except struct.error as _e:
        raise self._bad_args('cuMemsetD32Async', _e) from None
    S = self
    q = S._q
    q.append(_b)
    if len(q) >= S._fa or not S._open: S._after()
def queue2(self, dstDevice, ui, N, hStream=0):
    S = self
    q = S._q
    q.append(_pack(35, 0, 32, dstDevice, ui, N, hStream))
    if len(q) >= S._fa or not S._open: S._after()
def empty(self, dstDevice, ui, N, hStream=0):
    pass
fs = (cur, acq, queue, queue2, empty)
res = {f.__name__: 1e9 for f in fs}
for rep in range(15):
    for f in fs:
        s = mk(); m = types.MethodType(f, s)
        n = 20000
        t0 = time.perf_counter()
        for i in range(n):
            m(1234567, 7, 16, 5)
        res[f.__name__] = min(res[f.__name__], (time.perf_counter()-t0)/n*1e9)
print({k: round(v) for k, v in res.items()})
def acqcur(self, dstDevice, ui, N, hStream=0):
    S = self
    _l = S._lock
    _l.acquire()
    try:
        _pos = S._pos
        if _pos + 32 > S._cap: _pos = S._make_room(32)
        _C.pack_into(S._buf, _pos, 35, 0, 32, dstDevice, ui, N, hStream)
        S._pos = _pos + 32
        _k = S._ncalls = S._ncalls + 1
        if _k == 1: S._arm_timer()
        if _k >= S._flush_at or _pos + 32 >= S._max_bytes or S._bulk: S._flush_locked()
    except struct.error as _e:
        raise S._bad_args('cuMemsetD32Async', _e) from None
    finally:
        _l.release()
def acqcnt(self, dstDevice, ui, N, hStream=0):
    S = self
    _l = S._lock
    _l.acquire()
    try:
        p = S._pos
        q = p + 32
        if q > S._lim: p = S._room(32); q = p + 32
        _pack_into(S._buf, p, 35, 0, 32, dstDevice, ui, N, hStream)
        S._pos = q
        _k = S._ncalls = S._ncalls + 1
        if _k >= S._fa: S._after()
    except struct.error as _e:
        raise S._bad_args('cuMemsetD32Async', _e) from None
    finally:
        _l.release()
fs = (cur, acqcur, acqcnt, acq)
res = {f.__name__: 1e9 for f in fs}
for rep in range(15):
    for f in fs:
        s = mk(); m = types.MethodType(f, s)
        n = 20000
        t0 = time.perf_counter()
        for i in range(n):
            m(1234567, 7, 16, 5)
        res[f.__name__] = min(res[f.__name__], (time.perf_counter()-t0)/n*1e9)
print({k: round(v) for k, v in res.items()})
