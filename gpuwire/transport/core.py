"""The transport's Python API over the C engine (cffi_src/gw_ucx.c).

Threading model (docs/transport.md): every object may be used from any thread.
Calls into UCX are serialised by one lock per Worker; waits release the GIL and
take the lock only around each progress pass, so one thread can send while
another waits. Progress happens inside waits (and :meth:`Worker.progress`);
there is no hidden background thread.
"""
from __future__ import annotations

import functools
import math
import os
import re
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .. import settings

_INF = -1
from ._lib import ffi, lib
from .errors import (
    ConnectionClosed, ConnectionLost, ConnectTimeout, ConnectionRefused, MessageTruncated,
    RMAOutOfRange, RMAReadOnly, OperationTimeout, TransportError,
)

settings.register("spin_us", 50, settings.finite_us,
                  "Microseconds a wait spins on the worker before blocking on its event fd "
                  "(0: block at once; idle cost ~0% CPU either way).", layer="transport")
settings.register("connect_timeout_s", 10.0, settings.positive_seconds,
                  "Seconds a connect waits for the peer's handshake.", layer="transport")
settings.register("op_timeout_s", 0.0, settings.seconds,
                  "Default timeout in seconds for blocking sends/receives/calls (0: none).",
                  layer="transport")
settings.register("emulate_rtt_us", 0.0, settings.finite_us,
                  "Emulated network round trip in microseconds: each received message becomes "
                  "visible rtt/2 after it arrived (for benches; there is no netem here).",
                  layer="transport")

_gw_call = lib.gw_call

ANY_TAG_MASK = 0
EXACT_TAG = 0xFFFFFF
MAX_TAG = 0xFFFFFE  # 0xFFFFFF is reserved (stop message of the echo server)
ECHO_STOP_TAG = 0xFFFFFF
_EMPTY = ffi.new("char[1]")


def _check_tags(tag, tag_mask=None, name="tag") -> None:
    """Receive/call tags are 0..MAX_TAG and masks 0..0xFFFFFF (24 bits): out of range
    is a ValueError, never a silent mask to 24 bits."""
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"{name} must be in 0..{MAX_TAG:#x}, got {tag!r}")
    if tag_mask is not None and not 0 <= tag_mask <= EXACT_TAG:
        raise ValueError(f"tag_mask must be in 0..{EXACT_TAG:#x}, got {tag_mask!r}")


# Timeouts of 2**62 ns (~146 years) or more mean no timeout (and never overflow the
# int64 deadlines in C).
_MAX_NS = 1 << 62


def _ns(timeout: Optional[float], default_setting: Optional[str] = "op_timeout_s") -> int:
    """Seconds -> the C engine's timeout in ns: None -> the setting's default (0 or none:
    no timeout), a negative number -> 0 (a deadline already passed: check once),
    inf (or over ~146 years) -> no timeout, nan -> ValueError."""
    if timeout is None:
        if default_setting is None:
            return _INF
        d = settings.get(default_setting)
        return _ns(d, None) if d and d > 0 else _INF
    if not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    if timeout >= 0:
        try:
            ns = timeout * 1e9
        except OverflowError:  # an int too large for a float
            return _INF
        if ns < 4.611686018427388e18:  # _MAX_NS (a literal: no global lookup here)
            return int(ns)
        return _INF  # inf, or longer than ~146 years
    if timeout != timeout:
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    return 0  # negative: a deadline that has passed


def _is_int(v) -> bool:
    """An int that is not a bool (True is no port, size or address)."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class RawBuffer:
    """A raw pointer and size, for memory Python did not allocate (e.g. pinned or device)."""
    ptr: int
    size: int
    readonly: bool = False

    def __post_init__(self):
        if not _is_int(self.ptr) or not 0 < self.ptr < 1 << 64:
            raise ValueError(f"RawBuffer: ptr must be a positive integer address (below 2**64), "
                             f"got {self.ptr!r}")
        if not _is_int(self.size) or self.size < 0:
            raise ValueError(f"RawBuffer: size must be a non-negative integer, got {self.size!r}")
        if self.ptr + self.size > 1 << 64:
            raise ValueError(f"RawBuffer: ptr {self.ptr:#x} + size {self.size} runs past the "
                             "end of the address space")


class Buffer:
    """A buffer with its pointer derived once (the fast path for repeated ops).

    Wraps anything with the buffer protocol (bytearray, numpy array, mmap,
    memoryview) or a :class:`RawBuffer`; keeps it alive.
    """
    __slots__ = ("obj", "cdata", "nbytes", "readonly", "ptr")

    def __init__(self, obj: Any, writable: bool = False):
        if isinstance(obj, Buffer):
            self.obj, self.cdata, self.nbytes, self.readonly, self.ptr = (
                obj.obj, obj.cdata, obj.nbytes, obj.readonly, obj.ptr)
            if writable and self.readonly:
                raise TypeError("buffer is read-only but the operation writes into it")
            return
        self.obj = obj
        if isinstance(obj, RawBuffer):
            if writable and obj.readonly:
                raise TypeError("RawBuffer is read-only but the operation writes into it")
            self.cdata = ffi.cast("char *", obj.ptr)
            self.nbytes = obj.size
            self.readonly = obj.readonly
            self.ptr = obj.ptr
            return
        if isinstance(obj, (str, int, float)) or obj is None:
            raise TypeError(f"expected a buffer (bytes, bytearray, numpy array, mmap, memoryview "
                            f"or RawBuffer), got {type(obj).__name__}")
        try:
            mv = memoryview(obj)
        except TypeError:
            raise TypeError(f"expected a buffer (bytes, bytearray, numpy array, mmap, memoryview "
                            f"or RawBuffer), got {type(obj).__name__}") from None
        if not mv.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        if "O" in mv.format and _has_objects(mv.format):
            raise TypeError(f"{type(obj).__name__} holds Python objects (buffer format "
                            f"{mv.format!r}): its bytes are object pointers, not data")
        self.readonly = mv.readonly
        if writable and mv.readonly:
            raise TypeError(f"{type(obj).__name__} is read-only but the operation writes into it")
        self.nbytes = mv.nbytes
        self.cdata = ffi.from_buffer("char[]", obj, require_writable=writable)
        self.ptr = int(ffi.cast("uintptr_t", self.cdata))


def _has_objects(fmt: str) -> bool:
    """Whether a buffer format (struct syntax, PEP 3118) has an object item 'O' (field
    names, between colons, do not count)."""
    return "O" in re.sub(r":[^:]*:", "", fmt)


def _buf(obj: Any, writable: bool) -> Buffer:
    if type(obj) is Buffer:
        if writable and obj.readonly:
            raise TypeError("buffer is read-only but the operation writes into it")
        return obj
    return Buffer(obj, writable)


_STATUS_NAMES: Dict[int, str] = {}


def status_string(st: int) -> str:
    s = _STATUS_NAMES.get(st)
    if s is None:
        s = ffi.string(lib.gw_status_string(st)).decode()
        _STATUS_NAMES[st] = s
    return s


def _raise(st: int, what: str, ep: "Optional[Endpoint]" = None) -> None:
    msg = f"{what}: {status_string(st)}"
    if st == lib.GW_ERR_CONN_LOST or (ep is not None and ep._lost_status()):
        if ep is not None:
            raise ConnectionLost(ep.peer, ep.lost_reason() or status_string(st), what)
        raise ConnectionLost("?", status_string(st), what)
    if st == lib.GW_ERR_BAD_STATE:
        raise ConnectionClosed(f"{what}: endpoint is closed" + (f" (peer {ep.peer})" if ep else ""))
    if st == lib.UCS_ERR_TIMED_OUT:
        raise OperationTimeout(msg)
    if st == lib.GW_ERR_TRUNCATED:
        raise MessageTruncated(msg)
    if st == lib.GW_ERR_OUT_OF_RANGE:
        raise RMAOutOfRange(msg)
    if st == lib.GW_ERR_READ_ONLY:
        raise RMAReadOnly(msg)
    if st in (lib.UCS_ERR_INVALID_PARAM, lib.UCS_ERR_INVALID_ADDR, lib.GW_ERR_FOREIGN_KEY):
        raise ValueError(msg)
    raise TransportError(msg, st)


@dataclass
class Received:
    """What a receive delivered: ``nbytes`` bytes (header first), from ``endpoint``."""
    nbytes: int
    tag: int
    header_len: int
    endpoint: "Optional[Endpoint]"

    @property
    def payload_len(self) -> int:
        return self.nbytes - self.header_len


class Request:
    """An outstanding send, receive, put or get. Wait on it, test it, or drop it
    (dropping an unfinished receive cancels it)."""
    __slots__ = ("_worker", "_r", "_keep", "_ep", "_what", "_recv", "__weakref__")

    def __init__(self, worker: "Worker", r, keep, ep, what: str, recv: bool):
        self._worker = worker
        self._r = r
        self._keep = keep
        self._ep = ep
        self._what = what
        self._recv = recv

    @property
    def worker(self) -> "Worker":
        """The worker this request belongs to (wait for it through that worker)."""
        return self._worker

    def done(self) -> bool:
        """True once the request finished (or can no longer: released, worker closed)."""
        return self._r == ffi.NULL or self._worker._closed or bool(lib.gw_req_test(self._r))

    def wait(self, timeout: Optional[float] = None):
        """Wait for completion; returns :class:`Received` for receives, else None."""
        r = self._r
        if r == ffi.NULL:
            raise TransportError(f"{self._what}: request already released", 0)
        w = self._worker
        if w._closed:
            self._r = ffi.NULL
            self._keep = None
            raise ConnectionClosed(f"{self._what}: the worker is closed")
        st = lib.gw_wait(w._w, r, w._op_ns if timeout is None else _ns(timeout))
        if st:
            if st == lib.UCS_ERR_TIMED_OUT:
                raise OperationTimeout(f"{self._what}: timed out after {timeout}s")
            if w._closed and st == lib.GW_ERR_BAD_STATE:  # closed while we waited
                raise ConnectionClosed(f"{self._what}: the worker is closed")
        return self._result(st)

    def _result(self, st: int):
        r = self._r
        if self._recv:
            info = _scratch()
            lib.gw_req_info(r, info.st, info.len, info.cid, info.tag, info.hlen)
            st = info.st[0]
            if st:
                self.release()
                _raise(st, self._what, self._ep)
            ep = self._ep or self._worker._endpoints.get(info.cid[0])
            res = Received(info.len[0], info.tag[0], info.hlen[0], ep)
            self._release_done()
            return res
        self._release_done()
        if st:
            _raise(st, self._what, self._ep)
        return None

    def _release_done(self) -> None:
        """Release a request that finished (waited for): UCX no longer holds it."""
        r = self._r
        self._r = ffi.NULL
        w = self._worker
        if not w._closed:
            lib.gw_req_release(w._w, r)
        self._keep = None

    def release(self) -> None:
        """Let go of the request; an unfinished receive is cancelled. While UCX still
        holds the request (a send, put or get in flight, a receive whose data is landing)
        its buffers stay referenced by the worker until UCX is done with them."""
        r = self._r
        keep, self._keep = self._keep, None
        if r == ffi.NULL:
            return
        self._r = ffi.NULL
        w = self._worker
        if w._closed:
            return
        if keep is not None and lib.gw_req_state(r) & 2:
            if self._recv:
                lib.gw_req_cancel(w._w, r)
            w._park(r, keep)
        else:
            lib.gw_req_release(w._w, r)

    cancel = release

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


class _Info:
    """Out-parameters for the C calls. One per thread (see _scratch): threads that
    share a Worker or an Endpoint must not share these, or one thread reads the
    request, tag or length another thread's call just wrote."""
    __slots__ = ("st", "len", "cid", "tag", "hlen", "out", "rlen")

    def __init__(self):
        self.st = ffi.new("int *")
        self.len = ffi.new("size_t *")
        self.cid = ffi.new("uint32_t *")
        self.tag = ffi.new("uint32_t *")
        self.hlen = ffi.new("uint32_t *")
        self.out = ffi.new("gw_req_t **")
        self.rlen = ffi.new("size_t *")


_tls = threading.local()


def _scratch() -> _Info:
    try:
        return _tls.info
    except AttributeError:
        _tls.info = _Info()
        return _tls.info


def _wait_or_cancel(req: "Request", timeout: Optional[float]) -> "Received":
    """Wait for a posted receive; on a timeout (or any error) cancel it, so that it
    cannot take a later message."""
    try:
        return req.wait(timeout)
    except BaseException:
        req.release()
        raise


class _Closing:
    """``with obj:`` closes ``obj`` at the end (close is idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class Context(_Closing):
    """A UCX context. ``config`` passes UCX settings through, e.g. ``{"TLS": "tcp,self"}``
    (keys with or without the ``UCX_`` prefix); UCX_* environment variables apply too."""

    def __init__(self, config: Optional[Dict[str, str]] = None):
        config = dict(config or {})
        for k, v in config.items():
            if not isinstance(k, str) or not k:
                raise TypeError(f"Context: UCX setting names must be non-empty strings, got {k!r}")
            if v is None or not isinstance(v, (str, int, float)):
                raise TypeError(f"Context: UCX setting {k}={v!r}: expected a string (or number)")
        keys = [k[4:] if k.upper().startswith("UCX_") else k for k in config]
        vals = [str(v) for v in config.values()]
        ckeys = [ffi.new("char[]", k.encode()) for k in keys]
        cvals = [ffi.new("char[]", v.encode()) for v in vals]
        karr = ffi.new("const char *[]", ckeys or [ffi.NULL])
        varr = ffi.new("const char *[]", cvals or [ffi.NULL])
        out = ffi.new("gw_ctx_t **")
        err = ffi.new("char[512]")
        st = lib.gw_ctx_create(karr, varr, len(keys), out, err, 512)
        if st:
            msg = "UCX context: " + ffi.string(err).decode()
            if st == lib.UCS_ERR_NO_DEVICE:
                tls = dict(zip(keys, vals)).get("TLS", os.environ.get("UCX_TLS"))
                msg += (f" (no transport of UCX_TLS={tls!r} is available here)" if tls is not None
                        else " (UCX found no usable transport)")
            raise TransportError(msg, st)
        self._c = out[0]
        self.config = dict(zip(keys, vals))
        self._closed = False
        self._tls: Optional[List[str]] = None
        self._workers: "weakref.WeakSet[Worker]" = weakref.WeakSet()
        self._mems: "weakref.WeakSet[MemoryRegion]" = weakref.WeakSet()

    def _check(self) -> None:
        if self._closed:
            raise ConnectionClosed("context is closed")

    def worker(self) -> "Worker":
        self._check()
        return Worker(self)

    def register(self, buf: Any = None, *, size: Optional[int] = None) -> "MemoryRegion":
        """Register memory for zero-copy and RMA: a buffer object, a RawBuffer, or
        ``size=N`` to have UCX allocate N registered bytes."""
        return MemoryRegion(self, buf, size)

    def has_transport(self, name: str) -> bool:
        """Whether UCX found a resource of transport ``name`` (e.g. "tcp") in this context."""
        return any(tl == name for tl in self.transports())

    def transports(self) -> List[str]:
        """The transport names of this context's resources (from ``info()``)."""
        if self._tls is None:
            self._tls = sorted(set(re.findall(r"^#\s*resource\s+\d+\s*:.*?--\s*([\w-]+)/",
                                              self.info(), re.M)))
        return self._tls

    def info(self) -> str:
        self._check()
        buf = ffi.new("char[65536]")
        lib.gw_ctx_info(self._c, buf, 65536)
        return ffi.string(buf).decode(errors="replace")

    def close(self) -> None:
        if self._closed:
            return
        for m in list(self._mems):
            m.close()
        for w in list(self._workers):
            w.close()
        self._closed = True
        lib.gw_ctx_destroy(self._c)


def parse_hostport(text: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' (with default_port) -> (ip, port)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"address must be 'host:port', got {text!r}")
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is None:
        if default_port is None:
            raise ValueError(f"address {text!r} has no port (expected 'host:port')")
        port = default_port
    try:
        port = int(port)
    except ValueError:
        raise ValueError(f"bad port in address {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in address {text!r}")
    return resolve_host(host), port


def check_listen(host: str, port: int) -> None:
    """TransportError 'listen on HOST:PORT: <why>' when ``host:port`` cannot be listened on
    (the address is in use, or not an address of this machine), found with a plain socket
    bind: UCX's own errors for these say 'Device is busy' or 'Input/output error'. Port 0
    (any free port) is not checked."""
    import errno
    if not port:
        return
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        so = socket.socket(fam, socket.SOCK_STREAM)
    except OSError:
        return
    try:
        so.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        so.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = "address already in use"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = f"{host} is not an address of this machine"
        else:
            why = e.strerror or str(e)
        raise TransportError(f"listen on {host}:{port}: {why}", 0) from None
    finally:
        so.close()


def resolve_host(host: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from None
    for fam in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == fam:
                return info[4][0]
    raise ValueError(f"cannot resolve host {host!r}")


class Worker(_Closing):
    """A UCX worker with gpuwire's progress engine (spin, then block on the event fd)."""

    def __init__(self, ctx: Context):
        if not isinstance(ctx, Context):
            raise TypeError(f"Worker: expected a transport Context, got {type(ctx).__name__}")
        ctx._check()
        out = ffi.new("gw_worker_t **")
        st = lib.gw_worker_create(ctx._c, out)
        if st:
            raise TransportError(f"UCX worker: {status_string(st)}", st)
        self._w = out[0]
        self.ctx = ctx
        self._closed = False
        self._endpoints: "weakref.WeakValueDictionary[int, Endpoint]" = weakref.WeakValueDictionary()
        self._listeners: "weakref.WeakSet[Listener]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._parked: List[Tuple[Any, Any]] = []  # (C request, buffers) UCX still holds
        self._call_spin_max_us = 0.0   # (the C worker starts with it off)
        try:
            self.spin_us = settings.get("spin_us")
            self.emulate_rtt_us = settings.get("emulate_rtt_us")
            # default timeout of blocking operations, fixed when the worker is made
            # (like spin_us): a later settings change does not reach existing workers
            self._op_ns = _ns(None)
        except BaseException:
            self._closed = True
            lib.gw_worker_destroy(self._w)
            raise
        ctx._workers.add(self)

    # -- settings
    @property
    def spin_us(self) -> float:
        return self._spin_us

    @spin_us.setter
    def spin_us(self, us: float) -> None:
        self._check()
        us = float(us)
        if not math.isfinite(us) or us > settings.MAX_US:
            raise ValueError(f"spin_us (GPUWIRE_SPIN_US) must be a finite number of "
                             f"microseconds (at most {settings.MAX_US:g}), got {us!r}")
        self._spin_us = max(us, 0.0)
        lib.gw_worker_set_spin(self._w, int(self._spin_us * 1000))

    @property
    def call_spin_max_us(self) -> float:
        """Adaptive spin of request/reply calls (``Endpoint.call`` and the C layers' calls
        through ``c_call_entry``): when above ``spin_us``, a call spins up to twice this
        worker's recent call waits (a maximum decaying by 1/8 per call), up to this many µs,
        before it blocks. 0 (default): every call spins ``spin_us``."""
        return self._call_spin_max_us

    @call_spin_max_us.setter
    def call_spin_max_us(self, us: float) -> None:
        try:
            us = settings.finite_us(us)
        except ValueError as e:
            raise ValueError(f"call_spin_max_us (µs) {e}") from None
        self._check()
        self._call_spin_max_us = us
        lib.gw_worker_set_call_spin_max(self._w, int(us * 1000))

    @property
    def call_wait_hint_us(self) -> float:
        """The recent call waits the adaptive spin goes by (µs; see call_spin_max_us)."""
        self._check()
        return lib.gw_worker_call_hint(self._w) / 1000.0

    @property
    def blocked_waits(self) -> int:
        """How many times a wait on this worker (any thread's) stopped spinning and blocked
        on the worker's event fd."""
        self._check()
        return int(lib.gw_worker_blocked_total(self._w))

    @property
    def emulate_rtt_us(self) -> float:
        return self._rtt_us

    @emulate_rtt_us.setter
    def emulate_rtt_us(self, us: float) -> None:
        self._check()
        us = float(us or 0)
        if not math.isfinite(us) or not 0 <= us <= settings.MAX_US:
            raise ValueError(f"emulate_rtt_us (GPUWIRE_EMULATE_RTT_US) must be a finite "
                             f"number >= 0 (at most {settings.MAX_US:g}), got {us!r}")
        self._rtt_us = us
        lib.gw_worker_set_rtt_emulation(self._w, int(self._rtt_us * 1000))

    @property
    def address(self) -> bytes:
        """This worker's address (bytes) for :meth:`connect_address` by a peer."""
        self._check()
        n = ffi.new("size_t *")
        buf = ffi.new("char[8192]")
        st = lib.gw_worker_address(self._w, buf, 8192, n)
        if st:
            _raise(st, "worker address")
        return bytes(ffi.buffer(buf, n[0]))

    def _check(self):
        if self._closed:
            raise ConnectionClosed("worker is closed")

    def _no_tcp(self, what: str) -> str:
        """Why ``what`` (a sockaddr listener/connection) cannot work on this context: it
        has no tcp transport ('' if it has, or if UCX's info was not understood)."""
        tls = self.ctx.transports()
        if not tls or "tcp" in tls:
            return ""
        return (f"{what} needs tcp in UCX_TLS, and this context has {','.join(tls)} "
                f"(UCX_TLS={self.ctx.config.get('TLS', os.environ.get('UCX_TLS', 'default'))}); "
                "add tcp, or connect by worker address (Worker.connect_address)")

    # -- connections
    def listen(self, host: str = "0.0.0.0", port: int = 0, handoff: bool = False) -> "Listener":
        """Listen for sockaddr connections (needs tcp in UCX_TLS). port 0 picks a free port.

        ``handoff=True``: each connection request is handed out
        (:meth:`Listener.accept_request`) and accepted on a worker of the caller's choice
        (:meth:`ConnRequest.accept`), so a connection can have a worker of its own: the
        connections of one worker are told apart by an id their peers write, so peers that
        must not reach each other's connections must not share a worker."""
        self._check()
        if not _is_int(port) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        if not isinstance(handoff, bool):
            raise TypeError(f"handoff must be a bool, got {type(handoff).__name__}")
        ip = resolve_host(host)
        no_tcp = self._no_tcp("a sockaddr listener")
        if no_tcp:
            raise TransportError(f"listen on {host}:{port}: {no_tcp}")
        check_listen(ip, port)
        out = ffi.new("gw_listener_t **")
        st = lib.gw_listen_mode(self._w, ip.encode(), port, int(handoff), out)
        if st == lib.UCS_ERR_BUSY:
            raise TransportError(f"listen on {host}:{port}: address already in use "
                                 f"({status_string(st)})", st)
        if st:
            _raise(st, f"listen on {host}:{port}")
        l = Listener(self, out[0], ip, handoff)
        self._listeners.add(l)
        return l

    def connect(self, address: str, port: Optional[int] = None,
                timeout: Optional[float] = None) -> "Endpoint":
        """Connect to a listener at 'host:port' (or host, port)."""
        self._check()
        if port is not None:
            ip, port = resolve_host(address), port
            if not _is_int(port) or not 0 < port <= 65535:
                raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
        else:
            ip, port = parse_hostport(address)
            if port == 0:
                raise ValueError(f"cannot connect to port 0 ({address!r})")
        if timeout is None:
            timeout = settings.get("connect_timeout_s")
        out = ffi.new("gw_conn_t **")
        st = lib.gw_connect(self._w, ip.encode(), port, _ns(timeout, None), out)
        if st == lib.UCS_ERR_TIMED_OUT:
            raise ConnectTimeout(f"connect to {ip}:{port}: no handshake within {timeout}s")
        if st == lib.GW_ERR_BAD_STATE:
            raise ConnectionClosed(f"connect to {ip}:{port}: the worker is closed")
        if st:
            no_tcp = self._no_tcp("a sockaddr connection")
            raise ConnectionRefused(f"connect to {ip}:{port}: {status_string(st)}"
                                    + (f" ({no_tcp})" if no_tcp else ""))
        return self._adopt(out[0], f"{ip}:{port}")

    def connect_address(self, address: bytes, timeout: Optional[float] = None) -> "Endpoint":
        """Connect by a peer worker's :attr:`address` (no listener needed; shared memory
        is used when both sit on one node)."""
        self._check()
        if not isinstance(address, (bytes, bytearray, memoryview)):
            raise TypeError(f"worker address must be bytes, got {type(address).__name__}")
        if timeout is None:
            timeout = settings.get("connect_timeout_s")
        b = bytes(address)
        out = ffi.new("gw_conn_t **")
        st = lib.gw_connect_address(self._w, b, len(b), _ns(timeout, None), out)
        if st == lib.UCS_ERR_TIMED_OUT:
            raise ConnectTimeout(f"connect by address: no handshake within {timeout}s")
        if st == lib.UCS_ERR_INVALID_ADDR:
            raise ValueError("connect by address: not a gpuwire worker address")
        if st:
            raise ConnectionRefused(f"connect by address: {status_string(st)}")
        return self._adopt(out[0], "address")

    def accept_address(self, timeout: Optional[float] = None) -> "Endpoint":
        """Take the next connection a peer made to this worker's :attr:`address`."""
        self._check()
        out = ffi.new("gw_conn_t **")
        st = lib.gw_accept_any(self._w, _ns(timeout, None), out)
        if st == lib.UCS_ERR_TIMED_OUT:
            raise OperationTimeout(f"accept by address: nothing within {timeout}s")
        if st == lib.GW_ERR_BAD_STATE:
            raise ConnectionClosed("accept by address: the worker is closed")
        if st:
            _raise(st, "accept by address")
        return self._adopt(out[0], "address")

    def _adopt(self, c, where: str) -> "Endpoint":
        ep = Endpoint(self, c, where)
        self._endpoints[ep.id] = ep
        return ep

    def endpoints(self) -> List["Endpoint"]:
        return list(self._endpoints.values())

    def poll_lost(self) -> List["Endpoint"]:
        """Endpoints that went down since the last call (peer died or closed)."""
        self._check()
        ids = ffi.new("uint32_t[256]")
        out = []
        while True:
            n = lib.gw_worker_poll_lost(self._w, ids, 256)
            for i in range(n):
                ep = self._endpoints.get(ids[i])
                if ep is not None:
                    out.append(ep)
            if n < 256:
                return out

    # -- progress
    def c_progress_entry(self) -> Tuple[int, int]:
        """For a C layer above that drives this worker itself while it waits for something
        else: the address of ``int gw_worker_progress(gw_worker_t *)`` and this worker's
        pointer (valid until the worker is closed; call it only from the thread that owns
        the worker's progress)."""
        self._check()
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "gw_worker_progress"))), int(ffi.cast("uintptr_t", self._w))

    def progress(self) -> int:
        self._check()
        return lib.gw_worker_progress(self._w)

    def start_progress_thread(self, min_bytes: int = 65536) -> None:
        """Start the worker's progress thread (idempotent; a second call changes ``min_bytes``).

        While a send, receive or RMA of at least ``min_bytes`` is in flight, a C thread of the
        worker's own drives it, so those bytes keep moving while the calling thread runs other
        code: over tcp a message moves only while some thread progresses the worker. The
        thread sleeps when none is in flight, spins while bytes move, and blocks on the
        worker's events after ``spin_us`` without progress. Callers keep priority for the
        worker's lock. :meth:`close` stops it."""
        self._check()
        n = int(min_bytes)
        if n < 0:
            raise ValueError(f"progress thread: min_bytes must be >= 0, got {min_bytes!r}")
        st = lib.gw_worker_pump_start(self._w, n)
        if st:
            _raise(st, "progress thread")

    def stop_progress_thread(self) -> None:
        """Stop the progress thread (joins it; nothing if none runs)."""
        self._check()
        lib.gw_worker_pump_stop(self._w)

    def progress_thread_stats(self) -> Dict[str, int]:
        """``running`` (0/1), ``in_flight`` (its requests UCX still holds), ``passes``
        (progress passes it made), ``blocks`` (times it blocked without progress) and
        ``requests`` (requests it drove), counted since the worker was made."""
        self._check()
        r, n = ffi.new("int *"), ffi.new("int *")
        p, b, q = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.gw_worker_pump_stats(self._w, r, n, p, b, q)
        return {"running": r[0], "in_flight": n[0], "passes": p[0], "blocks": b[0], "requests": q[0]}

    def wait_event(self, timeout: Optional[float] = None) -> bool:
        """Spin then block until UCX has something to do (or timeout); True if it did."""
        self._check()
        return bool(lib.gw_worker_wait_event(self._w, _ns(timeout, None)))

    @property
    def event_fd(self) -> int:
        """An epoll fd that becomes readable when the worker needs progress (for event loops)."""
        self._check()
        return lib.gw_worker_efd(self._w)

    # -- any-source receive
    def recv_nb(self, buf: Any, tag: int = 0, tag_mask: int = ANY_TAG_MASK) -> Request:
        """Receive from any endpoint of this worker."""
        self._check()
        _check_tags(tag, tag_mask)
        b = _buf(buf, True)
        out = _scratch().out
        st = lib.gw_recv(self._w, ffi.NULL, tag, tag_mask, b.cdata, b.nbytes, out)
        if st < 0:
            _raise(st, "recv")
        return Request(self, out[0], b, None, "recv", True)

    def recv(self, buf: Any, tag: int = 0, tag_mask: int = ANY_TAG_MASK,
             timeout: Optional[float] = None) -> Received:
        """Receive one message from any endpoint. On a timeout (or any error) the
        receive is cancelled: it cannot take a later message."""
        return _wait_or_cancel(self.recv_nb(buf, tag, tag_mask), timeout)

    def _req_array(self, reqs: List[Request], what: str, unique: bool = False):
        self._check()
        if unique and len(reqs) > 1 and len(set(map(id, reqs))) != len(reqs):
            seen: Dict[int, int] = {}
            for i, r in enumerate(reqs):
                j = seen.setdefault(id(r), i)
                if j != i:
                    raise ValueError(f"{what}: request {i} is request {j} again (each request "
                                     "can be waited for, and its result taken, once)")
        for i, r in enumerate(reqs):
            if not isinstance(r, Request):
                raise TypeError(f"{what}: expected Requests, got {type(r).__name__} at {i}")
            if r._r == ffi.NULL:
                raise TransportError(f"{what}: request {i} ({r._what}) was already released "
                                     "(waited for, or cancelled)")
            if r._worker is not self:
                raise ValueError(f"{what}: request {i} ({r._what}) belongs to another worker")
        return ffi.new("gw_req_t *[]", [r._r for r in reqs])

    def wait_all(self, reqs: Iterable[Request], timeout: Optional[float] = None) -> list:
        """Wait for every request; returns their results in order (each released)."""
        reqs = list(reqs)
        if not reqs:
            return []
        arr = self._req_array(reqs, "wait_all", unique=True)
        st = lib.gw_wait_all(self._w, arr, len(reqs), self._op_ns if timeout is None else _ns(timeout))
        if st == lib.UCS_ERR_TIMED_OUT:
            raise OperationTimeout(f"wait_all: timed out after {timeout}s")
        return [r._result(_req_status(r)) for r in reqs]

    def wait_any(self, reqs: List[Request], timeout: Optional[float] = None) -> int:
        """Index of a finished request among reqs (it stays unreleased: wait() it).
        An empty list is a ValueError: no request of it can ever finish."""
        reqs = list(reqs)
        if not reqs:
            raise ValueError("wait_any: no requests to wait for")
        arr = self._req_array(reqs, "wait_any")
        i = lib.gw_wait_any(self._w, arr, len(reqs), self._op_ns if timeout is None else _ns(timeout))
        if i == lib.UCS_ERR_TIMED_OUT:
            raise OperationTimeout(f"wait_any: timed out after {timeout}s")
        if i < 0:
            _raise(i, "wait_any")
        return i

    def _park(self, r, keep) -> None:
        """Keep ``keep`` (the buffers of released request ``r``, which UCX still holds)
        alive until UCX is done with it; then release it. Also sweeps earlier ones."""
        parked = self._parked
        parked.append((r, keep))
        self._sweep()

    def _sweep(self) -> None:
        for item in list(self._parked):
            if self._closed or lib.gw_req_state(item[0]) & 2:
                continue
            try:
                self._parked.remove(item)  # (whoever removes it releases it: once)
            except ValueError:
                continue
            lib.gw_req_release(self._w, item[0])

    def close(self) -> None:
        """Close every endpoint and listener, then the worker. Idempotent."""
        with self._lock:
            if self._closed:
                return
            for ep in list(self._endpoints.values()):
                ep.close(timeout=0.2)
                for rk in list(ep._rkeys):  # (else never: their __del__ comes after the worker)
                    rk._destroy()
            for l in list(self._listeners):
                l.close()
            self._sweep()
            self._closed = True
            lib.gw_worker_destroy(self._w)
            self._parked.clear()  # UCX is gone: nothing reads or writes them any more


def _req_status(r: Request) -> int:
    if r._r == ffi.NULL:
        raise TransportError(f"{r._what}: request already released", 0)
    info = _scratch()
    lib.gw_req_info(r._r, info.st, info.len, info.cid, info.tag, info.hlen)
    return info.st[0]


class Listener(_Closing):
    """A sockaddr listener (:meth:`Worker.listen`). ``handoff``: its connections are
    accepted on workers of the caller's choice (:meth:`accept_request`)."""

    def __init__(self, worker: Worker, l, ip: str, handoff: bool = False):
        self._closed = True  # (until set up: __del__ of a half-made one does nothing)
        self.worker = worker
        self._l = l
        self.ip = ip
        self.handoff = handoff
        self.port = lib.gw_listener_port(l)
        self._closed = False

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}" if ":" not in self.ip else f"[{self.ip}]:{self.port}"

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise ConnectionClosed(f"{what} on {self.address}: the listener is closed")
        if self.worker._closed:
            raise ConnectionClosed(f"{what} on {self.address}: the listener's worker is closed")

    def accept(self, timeout: Optional[float] = None, worker: Optional[Worker] = None) -> "Endpoint":
        """Wait for the next client whose handshake finished.

        On a handoff listener: the next connection request (within ``timeout``), accepted on
        ``worker`` (default: the listener's own), its handshake waited for up to the connect
        timeout (``GPUWIRE_CONNECT_TIMEOUT_S``). ``worker`` is for handoff listeners only."""
        if self.handoff:
            req = self.accept_request(timeout)
            return req.accept(self.worker if worker is None else worker)
        if worker is not None and worker is not self.worker:
            raise ValueError(f"accept on {self.address}: a worker= other than the listener's needs a "
                             "handoff listener (Worker.listen(..., handoff=True))")
        self._check_open("accept")
        out = ffi.new("gw_conn_t **")
        self._took(lib.gw_accept(self._l, _ns(timeout, None), out), "accept", timeout)
        return self.worker._adopt(out[0], "accepted")

    def _took(self, st: int, what: str, timeout: Optional[float]) -> None:
        """Raise for the status of a wait for the next client (accept, accept_request)."""
        if st == lib.UCS_ERR_TIMED_OUT:
            raise OperationTimeout(f"{what} on {self.address}: nobody within {timeout}s")
        if st == lib.GW_ERR_BAD_STATE:
            raise ConnectionClosed(f"{what} on {self.address}: the listener "
                                   f"{'is closed' if self._closed else 'or its worker closed'}")
        if st:
            _raise(st, f"{what} on {self.address}")

    def accept_request(self, timeout: Optional[float] = None) -> "ConnRequest":
        """Handoff listener: wait for the next connection request (``OperationTimeout`` after
        ``timeout``). Accept it on a worker (:meth:`ConnRequest.accept`) or reject it."""
        if not self.handoff:
            raise ValueError(f"accept_request on {self.address}: the listener is not in handoff mode "
                             "(Worker.listen(..., handoff=True)); use accept()")
        self._check_open("accept_request")
        out = ffi.new("gw_connreq_t **")
        self._took(lib.gw_listener_take(self._l, _ns(timeout, None), out), "accept_request", timeout)
        return ConnRequest(self, out[0])

    def close(self) -> None:
        """Stop listening (frees the port). A thread blocked in :meth:`accept` (or
        :meth:`accept_request`) gets ConnectionClosed; requests not yet taken are rejected
        (taken ones can still be accepted or rejected). Idempotent."""
        if not self._closed and not self.worker._closed:
            self._closed = True
            lib.gw_listener_close(self._l)
        self._closed = True

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class ConnRequest:
    """A connection request of a handoff listener (:meth:`Listener.accept_request`):
    :meth:`accept` it on a worker (its connection lives there), or :meth:`reject` it. One
    dropped without either is rejected. ``client``: the client's address as the listener
    saw it ("ip:port"; "" if UCX did not say)."""

    def __init__(self, listener: Listener, r):
        self.listener = listener
        self._r = ffi.gc(r, lib.gw_connreq_free)
        self._state = "pending"
        buf = ffi.new("char[80]")
        lib.gw_connreq_client(r, buf, 80)
        self.client = ffi.string(buf).decode(errors="replace")

    def __repr__(self):
        return f"<ConnRequest from {self.client or '?'} on {self.listener.address} ({self._state})>"

    @property
    def state(self) -> str:
        """'pending', 'accepted', 'rejected' or 'failed' (an accept whose handshake failed)."""
        return self._state

    def _check_pending(self, what: str) -> None:
        if self._state != "pending":
            raise TransportError(f"{what} of the connection request from {self.client or '?'}: "
                                 f"it was already {self._state}")

    def accept(self, worker: Worker, timeout: Optional[float] = None) -> "Endpoint":
        """Accept the request on ``worker`` (a Worker of the listener's context): the
        connection and its handshake live on that worker, and the returned Endpoint is
        adopted by it (``ep.worker is worker``). Waits for the client's handshake up to
        ``timeout`` (None: ``GPUWIRE_CONNECT_TIMEOUT_S``); a client that does not finish it
        in time, or goes, fails the accept (``ConnectTimeout`` / ``ConnectionLost``; the
        request counts as used). A request is accepted or rejected once."""
        if not isinstance(worker, Worker):
            raise TypeError(f"ConnRequest.accept: expected a transport Worker, got {type(worker).__name__}")
        self._check_pending("accept")
        if worker._closed:
            raise ConnectionClosed(f"accept of the connection request from {self.client or '?'}: "
                                   "the worker is closed")
        if worker.ctx is not self.listener.worker.ctx:
            raise ValueError(f"accept of the connection request from {self.client or '?'}: the worker "
                             "belongs to another Context than the listener's (UCX accepts a request only "
                             "on a worker of the listener's context)")
        if timeout is None:
            timeout = settings.get("connect_timeout_s")
        out = ffi.new("gw_conn_t **")
        st = lib.gw_connreq_accept(self._r, worker._w, _ns(timeout, None), out)
        what = f"accept of the connection request from {self.client or '?'}"
        if st == 0:
            self._state = "accepted"
            return worker._adopt(out[0], "accepted")
        if st == lib.UCS_ERR_INVALID_PARAM:   # (the context check above makes this unlikely)
            raise ValueError(f"{what}: UCX refused the worker ({status_string(st)})")
        self._state = "failed"
        if st == lib.GW_ERR_BAD_STATE:
            raise ConnectionClosed(f"{what}: {'the worker is closed' if worker._closed else 'the listener worker is closed'}")
        if st == lib.UCS_ERR_TIMED_OUT:
            raise ConnectTimeout(f"{what}: no handshake within {timeout}s")
        raise ConnectionLost(self.client or "?", status_string(st), what)

    def reject(self) -> None:
        """Reject the request: the client's connect fails (``ConnectionRefused``). Nothing if
        it was already rejected; a TransportError if it was accepted."""
        if self._state == "rejected":
            return
        self._check_pending("reject")
        self._state = "rejected"
        lib.gw_connreq_reject(self._r)


class Endpoint(_Closing):
    """A connection to one peer: tagged messages (header + payload), RMA, request/reply."""

    def __init__(self, worker: Worker, c, where: str):
        self.worker = worker
        self._c = c
        self._w = worker._w
        self.id = lib.gw_conn_id(c)
        buf = ffi.new("char[256]")
        lib.gw_conn_peer(c, buf, 256)
        self.peer = f"{ffi.string(buf).decode(errors='replace')} via {where}"
        self._peer_pid = lib.gw_conn_peer_pid(c)
        self._closed = False
        self._op_ns = worker._op_ns
        self._rlen = ffi.new("size_t *")
        self._out = ffi.new("gw_req_t **")
        self._rkeys: "weakref.WeakSet[RemoteKey]" = weakref.WeakSet()

    def __repr__(self):
        return f"<Endpoint {self.id:#x} peer={self.peer!r} state={self.state}>"

    @property
    def remote_id(self) -> int:
        """The peer's id of this connection (what this side writes into every message's tag)."""
        return int(lib.gw_conn_remote_id(self._c))

    def _test_forge_remote_id(self, conn_id: int) -> None:
        """FOR TESTS ONLY: from now on this endpoint's messages (and the goodbye of its close)
        name ``conn_id`` as the receiving connection: it impersonates another connection of
        the peer's worker (what a malicious peer could do by hand)."""
        self._check()
        lib.gw_conn_debug_set_remote_id(self._c, conn_id)

    @property
    def state(self) -> str:
        if self._closed:
            return "closed"
        return ("connecting", "up", "lost", "closed")[lib.gw_conn_state(self._c)]

    def wait_peer_close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the peer to close its side (its BYE, or its loss):
        True once the connection is no longer up. For an orderly goodbye: the peer sends its
        BYE after its data endpoint's close, so a side that waits for it and then closes with
        ``force=True`` closes after the peer's flush, never during it."""
        end = time.monotonic() + max(0.0, float(timeout))
        while self.state == "up":
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.worker.wait_event(min(left, 0.01))
        return True

    @property
    def transports(self) -> str:
        """Transports/devices of the data path, e.g. 'posix/memory,sysv/memory' or 'tcp/lo'."""
        if self._closed:
            return ""
        buf = ffi.new("char[512]")
        lib.gw_conn_transports(self._c, buf, 512)
        return ffi.string(buf).decode()

    @property
    def peer_pid(self) -> int:
        """The peer's process id (also after close)."""
        return self._peer_pid

    def _lost_status(self) -> int:
        return 0 if self._closed else (lib.gw_conn_state(self._c) == lib.GW_CONN_LOST)

    def lost_reason(self) -> str:
        if self._closed:
            return ""
        st = lib.gw_conn_lost_status(self._c)
        return status_string(st) if st else ""

    def _check(self):
        if self._closed:
            raise ConnectionClosed(f"endpoint to {self.peer} is closed")

    # -- messages
    def send_nb(self, payload: Any = b"", header: Any = b"", tag: int = 0) -> Request:
        """Start sending header+payload as one message tagged ``tag`` (0..0xFFFFFE)."""
        self._check()
        if not 0 <= tag <= MAX_TAG:
            raise ValueError(f"tag must be in 0..{MAX_TAG:#x}, got {tag!r}")
        p = _buf(payload, False)
        if header is None or (type(header) is bytes and not header):
            hc, hn, keep = ffi.NULL, 0, p
        else:  # any buffer (numpy arrays too: no truth test on it)
            h = _buf(header, False)
            if h.nbytes > 255:
                raise ValueError(f"header is {h.nbytes} bytes; at most 255")
            hc, hn = (h.cdata, h.nbytes) if h.nbytes else (ffi.NULL, 0)
            keep = (p, h)
        out = _scratch().out
        st = lib.gw_send(self._c, tag, hc, hn, p.cdata, p.nbytes, out)
        if st < 0:
            _raise(st, f"send to {self.peer}", self)
        return Request(self.worker, out[0], keep, self, f"send to {self.peer}", False)

    def send(self, payload: Any = b"", header: Any = b"", tag: int = 0,
             timeout: Optional[float] = None) -> None:
        """Send and wait for local completion (the buffers may be reused after)."""
        self.send_nb(payload, header, tag).wait(timeout)

    def recv_nb(self, buf: Any, tag: int = 0, tag_mask: int = ANY_TAG_MASK) -> Request:
        """Start receiving one message from this peer into ``buf``; by default any tag."""
        self._check()
        _check_tags(tag, tag_mask)
        b = _buf(buf, True)
        out = _scratch().out
        st = lib.gw_recv(self._w, self._c, tag, tag_mask, b.cdata, b.nbytes, out)
        if st < 0:
            _raise(st, f"recv from {self.peer}", self)
        return Request(self.worker, out[0], b, self, f"recv from {self.peer}", True)

    def recv(self, buf: Any, tag: int = 0, tag_mask: int = ANY_TAG_MASK,
             timeout: Optional[float] = None) -> Received:
        """Receive one message from this peer. On a timeout (or any error) the
        receive is cancelled: it cannot take a later message."""
        return _wait_or_cancel(self.recv_nb(buf, tag, tag_mask), timeout)

    def call(self, msg: Any, reply: Any, tag: int = 0, reply_tag: Optional[int] = None,
             timeout: Optional[float] = None) -> int:
        """Send ``msg`` and wait for the reply tagged ``reply_tag`` (default ``tag``) into
        ``reply``; returns the reply's length. Post, send and wait all run in C.
        Pass :class:`Buffer` objects on hot paths: their pointers are derived once."""
        rtag = tag if reply_tag is None else reply_tag
        if not (0 <= tag <= MAX_TAG and 0 <= rtag <= MAX_TAG):
            _check_tags(tag)
            _check_tags(rtag, name="reply_tag")
        m = msg if type(msg) is Buffer else _buf(msg, False)
        r = reply if type(reply) is Buffer else _buf(reply, True)
        try:
            rlen = _tls.info.rlen
        except AttributeError:
            rlen = _scratch().rlen
        st = _gw_call(self._c, tag, m.cdata, m.nbytes, rtag, r.cdata, r.nbytes,
                      self._op_ns if timeout is None else _ns(timeout), rlen)
        if st:
            self._call_failed(st, timeout)
        return rlen[0]

    def prepare_call(self, msg: Any, reply: Any, tag: int = 0, reply_tag: Optional[int] = None,
                     timeout: Optional[float] = None):
        """A bound request/reply for a hot loop: ``f = ep.prepare_call(msg, reply)`` then
        ``n = f()`` sends the current bytes of ``msg`` and returns the reply length.
        Buffers, pointers, tags and timeout are resolved once here."""
        self._check()
        m, r = _buf(msg, False), _buf(reply, True)
        rtag = tag if reply_tag is None else reply_tag
        _check_tags(tag)
        _check_tags(rtag, name="reply_tag")
        rlen = ffi.new("size_t *")
        # the C conn stays valid (closed) until this Endpoint is collected, and the
        # callable keeps the Endpoint: a call after close() is a ConnectionClosed
        bound = functools.partial(_gw_call, self._c, tag, m.cdata, m.nbytes, rtag, r.cdata,
                                  r.nbytes, self._op_ns if timeout is None else _ns(timeout), rlen)

        def call() -> int:
            st = bound()
            if st:
                self._call_failed(st, timeout)
            return rlen[0]

        call.buffers = (m, r)  # keep them alive with the callable
        call.endpoint = self
        return call

    def c_call_entry(self, timeout: Optional[float] = None) -> Tuple[int, int, int]:
        """For a C layer above that makes request/reply round trips itself: the address of
        ``gw_call`` (``int gw_call(gw_conn_t *, uint32_t tag, const void *sbuf, size_t slen,
        uint32_t rtag, void *rbuf, size_t rcap, int64_t timeout_ns, size_t *rlen)``), this
        endpoint's conn pointer and the timeout in ns. The conn stays valid (closed) until the
        Endpoint is collected: the caller keeps the Endpoint alive, and passes a nonzero status
        to :meth:`raise_call_status`."""
        self._check()
        return (int(ffi.cast("uintptr_t", ffi.addressof(lib, "gw_call"))), int(ffi.cast("uintptr_t", self._c)),
                self._op_ns if timeout is None else _ns(timeout))

    def c_bulk_entry(self) -> Dict[str, int]:
        """For a C layer above that posts and completes messages of this endpoint itself
        (the rpc server's bulk copies): addresses of ``gw_recv``, ``gw_send``, ``gw_wait``,
        ``gw_req_test``, ``gw_req_info``, ``gw_req_release`` and ``gw_worker_progress`` (signatures in
        cffi_src/gw_ucx.h), this endpoint's ``conn`` and its worker's ``worker`` pointer.
        Valid while the Endpoint is open; use them only from the thread that drives the
        worker, and release every request before the Endpoint closes."""
        self._check()

        def a(name: str) -> int:
            return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))
        return {"recv": a("gw_recv"), "send": a("gw_send"), "wait": a("gw_wait"), "test": a("gw_req_test"),
                "info": a("gw_req_info"),
                "release": a("gw_req_release"), "progress": a("gw_worker_progress"),
                "conn": int(ffi.cast("uintptr_t", self._c)), "worker": int(ffi.cast("uintptr_t", self.worker._w))}

    def raise_call_status(self, st: int, timeout: Optional[float] = None) -> None:
        """Raise what :meth:`call` raises for the nonzero status ``st`` of a ``gw_call``."""
        self._call_failed(st, timeout)

    def _call_failed(self, st: int, timeout) -> None:
        if st == lib.UCS_ERR_TIMED_OUT:
            raise OperationTimeout(f"call to {self.peer}: no reply within {timeout}s")
        _raise(st, f"call to {self.peer}", self)

    def serve_echo(self, buf: Any, count: int = -1) -> None:
        """Echo every message back to this peer from C (bench server) until a stop
        message (tag 0xFFFFFF), ``count`` messages, or the connection goes down."""
        self._check()
        b = _buf(buf, True)
        st = lib.gw_echo_serve(self._c, 0, b.cdata, b.nbytes, count)
        if st:
            _raise(st, f"echo with {self.peer}", self)

    def serve_sink(self, buf: Any, count: int, window: int = 32, tag: int = 0,
                   timeout: Optional[float] = None) -> None:
        """Receive ``count`` messages tagged ``tag`` into ``buf`` (each overwrites the
        last) from C, keeping ``window`` receives posted: the receiving end of a
        bandwidth test, as :meth:`serve_echo` is of a latency test."""
        self._check()
        _check_tags(tag)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative int, got {count!r}")
        if not isinstance(window, int) or not 1 <= window <= 1024:
            raise ValueError(f"window must be an int in 1..1024, got {window!r}")
        b = _buf(buf, True)
        st = lib.gw_sink_serve(self._c, tag, b.cdata, b.nbytes, count, window,
                               self._op_ns if timeout is None else _ns(timeout))
        if st == lib.UCS_ERR_TIMED_OUT:
            raise OperationTimeout(f"sink for {self.peer}: timed out after {timeout}s")
        if st:
            _raise(st, f"sink for {self.peer}", self)

    def stop_echo(self, timeout: Optional[float] = None) -> None:
        """Send the stop message (tag ECHO_STOP_TAG, reserved for this) that ends the
        peer's :meth:`serve_echo` loop; returns once it was sent."""
        self._check()
        out = _scratch().out
        st = lib.gw_send(self._c, ECHO_STOP_TAG, ffi.NULL, 0, _EMPTY, 0, out)
        if st < 0:
            _raise(st, f"stop echo of {self.peer}", self)
        Request(self.worker, out[0], None, self, f"stop echo of {self.peer}", False).wait(timeout)

    def serve(self, buf: Any, handler: int, arg: int, tag: int = 0, first: Any = None, first_tag: int = 0,
              timeout: Optional[float] = None) -> int:
        """Serve requests in C (``gw_serve``): receive messages tagged ``tag`` into ``buf`` and
        let the C function at address ``handler`` (``gw_serve_fn``, with ``arg``) answer them,
        until it passes one back: returns that message's length (the bytes are in ``buf``).
        ``first`` (a :class:`Buffer` or bytes, tag ``first_tag``) is sent first, after the
        first receive is posted: the caller's answer to the message it was passed."""
        b = buf if type(buf) is Buffer else _buf(buf, True)
        for name, v in (("tag", tag), ("first_tag", first_tag)):
            if not 0 <= v <= MAX_TAG:
                raise ValueError(f"{name} must be in 0..{MAX_TAG:#x}, got {v!r}")
        if not handler:
            raise ValueError("serve: no handler")
        if first is None:
            fc, fn = ffi.NULL, 0
        else:
            f = first if type(first) is Buffer else _buf(first, False)
            fc, fn = f.cdata, f.nbytes
        self._check()
        st = lib.gw_serve(self._c, tag, b.cdata, b.nbytes, first_tag, fc, fn, handler, ffi.cast("void *", arg),
                          self.worker._op_ns if timeout is None else _ns(timeout), self._rlen)
        if st:
            _raise(st, f"serve {self.peer}", self)
        return self._rlen[0]

    # -- RMA
    def unpack_rkey(self, packed: bytes) -> "RemoteKey":
        self._check()
        if not isinstance(packed, (bytes, bytearray, memoryview)):
            raise TypeError(f"packed rkey must be bytes, got {type(packed).__name__}")
        b = bytes(packed)
        out = ffi.new("gw_rkey_t **")
        st = lib.gw_rkey_unpack(self._c, b, len(b), out)
        if st == lib.UCS_ERR_INVALID_PARAM:
            raise ValueError("not a packed gpuwire memory key")
        if st == lib.GW_ERR_FOREIGN_KEY:
            raise ValueError(f"unpack rkey: the key was packed by another process than this "
                             f"endpoint's peer ({self.peer}); RMA with it would reach that "
                             "process's memory: unpack it on an endpoint to its owner")
        if st:
            _raise(st, "unpack rkey", self)
        rk = RemoteKey(self, out[0])
        self._rkeys.add(rk)
        return rk

    def _rma(self, local, remote_addr: int, rkey: "RemoteKey", put: bool) -> Request:
        self._check()
        if not isinstance(rkey, RemoteKey):
            raise TypeError(f"rkey must be a RemoteKey (from Endpoint.unpack_rkey), got {type(rkey).__name__}")
        if rkey.endpoint is not self:
            raise ValueError("rkey was unpacked on another endpoint")
        if not isinstance(remote_addr, int) or remote_addr < 0:
            raise ValueError(f"remote address must be a non-negative int, got {remote_addr!r}")
        b = _buf(local, not put)
        out = _scratch().out
        fn = lib.gw_put if put else lib.gw_get
        st = fn(self._c, b.cdata, b.nbytes, remote_addr, rkey._k, out)
        what = f"{'put' if put else 'get'} {b.nbytes} B at {remote_addr:#x} ({self.peer})"
        if st == lib.GW_ERR_OUT_OF_RANGE:
            raise RMAOutOfRange(f"{what}: outside the remote region "
                                f"[{rkey.base:#x}, {rkey.base + rkey.length:#x})")
        if st == lib.GW_ERR_READ_ONLY:
            raise RMAReadOnly(f"{what}: the remote region [{rkey.base:#x}, "
                              f"{rkey.base + rkey.length:#x}) is read-only (its owner "
                              "registered a read-only buffer): get from it, do not put")
        if st < 0:
            _raise(st, what, self)
        return Request(self.worker, out[0], (b, rkey), self, what, False)

    def put_nb(self, local: Any, remote_addr: int, rkey: "RemoteKey") -> Request:
        return self._rma(local, remote_addr, rkey, True)

    def get_nb(self, local: Any, remote_addr: int, rkey: "RemoteKey") -> Request:
        return self._rma(local, remote_addr, rkey, False)

    def put(self, local: Any, remote_addr: int, rkey: "RemoteKey", timeout: Optional[float] = None) -> None:
        """Write ``local`` to the peer's memory; remote visibility after :meth:`flush`."""
        self._rma(local, remote_addr, rkey, True).wait(timeout)

    def get(self, local: Any, remote_addr: int, rkey: "RemoteKey", timeout: Optional[float] = None) -> None:
        self._rma(local, remote_addr, rkey, False).wait(timeout)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every operation posted on this endpoint completed at the peer."""
        self._check()
        st = lib.gw_flush(self._c, self._op_ns if timeout is None else _ns(timeout))
        if st:
            _raise(st, f"flush to {self.peer}", self)

    # -- lifetime
    def close(self, timeout: float = 1.0, *, force: bool = False) -> None:
        """Close cleanly (flush, then tell the peer). Pending operations fail with
        ConnectionClosed. Idempotent.

        ``force=True``: flush nothing and wait for nobody; what is still in flight is
        dropped, pending operations fail as with any close, and the peer sees its connection
        go. For connections both sides know to be done (after an application's goodbye),
        whose worker closes soon after: the data endpoint (error mode NONE, which UCX cannot
        force) is released with the worker, not before.

        ``timeout``: seconds for the flush and the goodbye, a finite number >= 0 (None: the
        default 1 s); a bad value raises before anything is closed."""
        if self._closed:
            return
        if timeout is None:
            timeout = 1.0
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"close: timeout must be a number of seconds, got {type(timeout).__name__}")
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"close: timeout must be a finite number of seconds >= 0, got {timeout!r}")
        ns = int(min(timeout * 1e9, _MAX_NS))
        self._closed = True
        if not self.worker._closed:
            lib.gw_conn_close_mode(self._c, ns, int(bool(force)))
        # the C struct stays (closed) until this object is collected, so that a late
        # call through a prepared callable is an error, never a use after free

    def __del__(self):
        try:
            c = self._c
            if c == ffi.NULL:
                return
            if not self._closed and not self.worker._closed:
                self.close(timeout=0.1)
            self._c = ffi.NULL
            lib.gw_conn_free(c)  # after a worker close: its conns are closed, just freed
        except Exception:
            pass


class MemoryRegion(_Closing):
    """Memory registered with UCX: zero-copy sends/receives and RMA target.

    A read-only buffer (bytes, a read-only memoryview or array, a read-only RawBuffer)
    registers read-only (``readonly``): ``view()`` is read-only, and a peer may get from it
    but not put into it (its packed key says so; the put raises RMAReadOnly)."""
    _m = None

    def __init__(self, ctx: Context, buf: Any, size: Optional[int]):
        if ctx._closed:
            raise ConnectionClosed("context is closed")
        out = ffi.new("gw_mem_t **")
        if buf is None:
            if not _is_int(size) or size <= 0:
                raise ValueError(f"register: size must be a positive int, got {size!r}")
            st = lib.gw_mem_map(ctx._c, ffi.NULL, size, out)
            self._buf = None
        else:
            if size is not None:
                raise ValueError("register: give a buffer or size=, not both")
            self._buf = _buf(buf, False)
            if self._buf.nbytes == 0:
                raise ValueError("register: buffer is empty")
            st = lib.gw_mem_map(ctx._c, self._buf.cdata, self._buf.nbytes, out)
        if st:
            _raise(st, "register memory")
        self._m = out[0]
        self.readonly = bool(self._buf is not None and self._buf.readonly)
        if self.readonly:
            lib.gw_mem_set_readonly(self._m, 1)
        self.ctx = ctx
        self.base = int(lib.gw_mem_base(self._m))
        self.length = int(lib.gw_mem_length(self._m))
        ctx._mems.add(self)

    def _check(self) -> None:
        if self._m is None:
            raise ConnectionClosed("memory region is closed (unregistered)")

    @property
    def buffer(self) -> Buffer:
        """The registered bytes as a Buffer (usable in sends/receives/RMA)."""
        self._check()
        if self._buf is not None:
            return self._buf
        b = Buffer(RawBuffer(self.base, self.length))
        b.obj = (b.obj, self)  # the region stays registered (and allocated) while it lives
        return b

    def view(self) -> memoryview:
        """The registered bytes as a memoryview (do not use it after close(); it keeps
        the region from being collected). Read-only for a read-only region."""
        self._check()
        # (the pointer's destructor holds the region: a dropped region is not unregistered
        # while a view of it lives)
        p = ffi.gc(ffi.cast("char *", self.base), lambda _p, _keep=self: None)
        mv = memoryview(ffi.buffer(p, self.length))
        return mv.toreadonly() if self.readonly else mv

    def pack(self) -> bytes:
        """The remote key for peers (bytes; send it, then Endpoint.unpack_rkey)."""
        self._check()
        buf = ffi.new("char[8192]")
        n = ffi.new("size_t *")
        st = lib.gw_mem_pack(self._m, buf, 8192, n)
        if st:
            _raise(st, "pack rkey")
        return bytes(ffi.buffer(buf, n[0]))

    def close(self) -> None:
        if self._m is not None and not self.ctx._closed:
            lib.gw_mem_unmap(self._m)
        self._m = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class RemoteKey:
    """A peer's memory region, unpacked from its packed key (Endpoint.unpack_rkey):
    ``base``/``length`` bound every RMA; ``readonly``: the owner registered read-only
    memory (gets only)."""

    def __init__(self, ep: Endpoint, k):
        self.endpoint = ep
        self._k = k
        self.base = int(lib.gw_rkey_base(k))
        self.length = int(lib.gw_rkey_length(k))
        self.readonly = bool(lib.gw_rkey_readonly(k))

    def _destroy(self) -> None:
        k, self._k = self._k, None
        if k is not None and not self.endpoint.worker._closed:
            lib.gw_rkey_destroy(k)

    def __del__(self):
        try:
            self._destroy()
        except Exception:
            pass
