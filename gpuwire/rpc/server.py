"""``gpuwire serve``: runs clients' CUDA calls on this machine's GPU (or on the CPU executor).

The main thread takes connection requests; each session gets a transport worker of its
own (its connection is accepted on it, so no other peer's connection shares it) and a
thread that receives its frames (endpoint receive on TAG_REQ), so one session
waiting on its GPU never holds up another, and a session's CUDA context stays
current on its own thread. Per session the server keeps its own executor session
(GPU: a CUDA context and a reserved VA range), handle tables, the allocation map
every device range is checked against, and the last-error / deferred-error state.
However a session ends (bye, lost connection, client killed), everything it made
is released.
"""
from __future__ import annotations

import ctypes
import hmac
import itertools
import json
import logging
import mmap
import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import __version__, settings
from .._affinity import cpu_list, place_threads
from .. import transport as t
from . import lanes as _lanes
from . import protocol as P
from .codegen import QUERY_RESULT, STATUS_RESULT, server_table
from .executors import make_executor
from .executors import _cfast as _cf
from .executors.base import CudaCallError, Executor, MemoryMap, fail
from .spec import SPEC_VERSION, default_spec

log = logging.getLogger("gpuwire.rpc.server")

settings.register("rpc_va_gib", 64.0, float,
                  "Server: device address space reserved per session for client-side allocation (GiB).",
                  layer="rpc")
settings.register("rpc_c_server", True, bool,
                  "Server: receive, decode and answer frames in C (gpuwire._rpc) when it is built: frames of "
                  "hot calls (launches, async memsets/copies, event record/wait, small async D2H, stream/"
                  "context sync) never enter Python; others run in Python with the hot calls in C.", layer="rpc")
settings.register("rpc_worker_pool", 2, int,
                  "Server, process isolation: session worker processes kept started ahead (CUDA initialised), "
                  "so a connect does not wait for one.", layer="rpc")
settings.register("rpc_worker_spawn_cpus", "", cpu_list,
                  "Server, process isolation: CPUs a session worker process starts and initialises on (e.g. "
                  "'6' or '6-7'; empty: the server's own). The worker moves all its threads to the server's CPUs "
                  "when its client connects. The pool refills at every connect, and a worker's start (Python, "
                  "UCX and CUDA initialisation: about a second of one CPU) on the CPUs of running sessions slows "
                  "them meanwhile (session 9: whole rounds of a pinned MLP bench 1.10-1.15x instead of 1.02x).",
                  layer="rpc")
settings.register("rpc_worker_claim_s", 30.0, settings.positive_seconds,
                  "Server, process isolation: seconds a session worker waits for its client to reconnect.",
                  layer="rpc")
settings.register("rpc_hostmap_offer", True, bool,
                  "Server: offer same-host mapped regions (gwHostMap): a client on the same host hands its "
                  "host_alloc memory (a sealed memfd) over a unix socket and the session maps and registers "
                  "it, so kernels and copies use the client's pages directly (docs/pinned.md).", layer="rpc")
settings.register("rpc_hostmap_wait_s", 5.0, float,
                  "Server: seconds gwHostMap waits for the client's memfd on the session's unix socket.",
                  layer="rpc")
settings.register("rpc_hostmap_max_gib", 64.0, float,
                  "Server: client memory one session may have mapped with gwHostMap at once (GiB; the driver "
                  "pins it).", layer="rpc")
settings.register("rpc_server_progress_thread", False, bool,
                  "Server: run the transport worker's progress thread (a C thread that drives it while "
                  "payloads of 64 KiB or more are in flight, Worker.start_progress_thread), so payload bytes "
                  "keep moving while the session thread runs calls.", layer="rpc")
settings.register("rpc_server_session_cpu", -1, int,
                  "Server, process isolation: the session worker's session thread (the one that receives "
                  "frames and makes the driver calls) runs alone on this CPU, every other thread of the "
                  "worker (CUDA's, UCX's, bulk lanes' progress threads) on the rest of the worker's CPUs, so "
                  "none of them preempts it. Placed when the session starts and again after its lanes "
                  "connect. -1: off (the OS places threads). Ignored with thread isolation (sessions share "
                  "the process) and when the CPU is not one the worker may use.", layer="rpc")
settings.register("rpc_session_max_objects", 1 << 18, settings.nonneg_int,
                  "Server: handles (streams, events, modules, functions) and device and host allocations "
                  "one session may hold at once; one more is refused with CUDA_ERROR_OUT_OF_MEMORY naming "
                  "this setting (0: no limit). Bounds the server memory a client's bookkeeping can take.",
                  layer="rpc")
settings.register("rpc_hello_timeout_s", 10.0, settings.seconds,
                  "Server: seconds a new connection has to complete its hello (authenticate); after that "
                  "it is closed, so idle unauthenticated connections do not pile up (0: no limit).",
                  layer="rpc")
settings.register("rpc_bulk_timeout_s", 120.0, settings.positive_seconds,
                  "Server: seconds to wait for a bulk payload a frame announced.", layer="rpc")
settings.register("rpc_c_bulk", True, bool,
                  "Server (C): frames of async H2D copies (payloads received into a ring of staging slots "
                  "while later frames are handled) and of async D2H copies (sent from the slots) run in C "
                  "(gw_rpc_bulk_*; with rpc_c_server).", layer="rpc")
settings.register("rpc_c_bulk_dtoh_min", 64 << 10, int,
                  "Server (C): frames of async D2H copies with one of at least this many bytes are copied "
                  "into the C bulk staging slots and sent from C (0: never; they run as before: small "
                  "frames in the C server, larger in Python; H100, async D2H vs perftest with it at 64 KiB: "
                  "tcp 1 MiB 0.56 -> 0.71, 16 MiB 0.80 -> 0.98; sm 0.43 -> 0.62, 0.82 -> 0.94).", layer="rpc")
settings.register("rpc_c_bulk_inflight", 8 << 20, int,
                  "Server (C): H2D payload bytes the C bulk copies keep posted at most (at least one message): "
                  "8 slots of 1 MiB messages, or 2 of 4 MiB chunks, by default.", layer="rpc")
settings.register("rpc_c_bulk_h2d_max", 16 << 20, int,
                  "Server (C): an async H2D copy larger than this (and its frame) is left to the Python "
                  "path (0: no limit). 16 MiB by default: in one H200 A/B over tcp the C path read 0.69 vs "
                  "0.54 of perftest at 1 MiB, level at 16 MiB, and 0.82 vs 0.99 at 64 MiB "
                  "(docs/benchmarks.md).", layer="rpc")
settings.register("rpc_c_bulk_slots", 8, int,
                  "Server (C): staging slots (of one bulk chunk each) of the C bulk copies; up to this many "
                  "H2D payload messages are in flight at once.", layer="rpc")
settings.register("rpc_trace_dir", "", str,
                  "Server: when set, the C server records timestamps of every frame (received, decoded, "
                  "first driver call, calls issued, waits done, reply handed to the transport; "
                  "CLOCK_MONOTONIC) and each session writes them to "
                  "<dir>/gpuwire-trace-<pid>-<session>.json when it ends (the bench's --trace). "
                  "Empty: off.", layer="rpc")
settings.register("rpc_trace_frames", 65536, int,
                  "Server, with rpc_trace_dir: frames a session's trace keeps (the last ones).", layer="rpc")
settings.register("rpc_server_skip_ssync", True, bool,
                  "Server (C): a cuStreamSynchronize right after a small D2H push's wait on the same "
                  "stream, with nothing issued since, is answered without a second driver call.",
                  layer="rpc")

MAX_FRAME = 1 << 20
_HELLO_FRAME_MAX = 128 << 10  # frames before the hello (a hello: token <= 4 KiB, info <= 64 KiB)
DEFAULT_PORT = 13371
_BYTES_MAX = 1 << 30          # largest bulk blob the server reads into host memory (images)
_READ_EAGER = 1 << 20         # ... larger ones are received into lazily backed memory (BulkIn.read)
SESSION_CTX_BASE = 0xC0000000  # client id of a session's context: base + device

_NO_STICKY = {"gwHello", "gwGetLastError", "gwPeekAtLastError", "cuGetErrorName", "cuGetErrorString",
              "cuDriverGetVersion", "cuDeviceGetCount"}


class FrameError(Exception):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status


class StatusResult:
    """A session-level call whose CUresult is its value (gwGetLastError): not an error."""
    __slots__ = ("code", "outs")

    def __init__(self, code: int, outs: tuple):
        self.code, self.outs = code, outs


def _chunks(n: int, chunk: int):
    if n == 0:
        return [(0, 0)]
    if not chunk or n <= chunk:
        return [(0, n)]
    return [(o, min(chunk, n - o)) for o in range(0, n, chunk)]


def _nchunks(n: int, chunk: int) -> int:
    """How many messages _chunks(n, chunk) has (without making the list)."""
    return 1 if not chunk or n <= chunk else (n + chunk - 1) // chunk


# ----------------------------------------------------------------------------- bulk in / out

class BulkIn:
    """A request blob that arrives as separate tagged message(s)."""
    __slots__ = ("s", "tag", "nbytes", "done", "k")

    def __init__(self, s: "ServerSession", tag: int, nbytes: int):
        self.s, self.tag, self.nbytes, self.done = s, tag, nbytes, False
        self.k = 0      # the next chunk message (its bulk lane: gpuwire.rpc.lanes)

    def _long(self, ln: int) -> Exception:
        """A chunk message longer than announced (it was consumed, truncated): the copy's error;
        the payload counts as taken, so the caller does not drain it again."""
        self.done = True
        return fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload chunk longer than the expected {ln} B")

    def _missing(self, ln: int) -> Exception:
        """A chunk message that did not come within rpc_bulk_timeout_s: the copy's error; the
        payload counts as taken (drain does not wait for it again), the session goes on."""
        self.done = True
        return fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload chunk of {ln} B (tag {self.tag:#x}) not received "
                                                f"within rpc_bulk_timeout_s ({self.s.bulk_timeout:g} s)")

    def _recv(self, ptr: int, n: int) -> None:
        s, chunk, tmo = self.s, self.s.chunk, self.s.bulk_timeout
        for k, (off, ln) in enumerate(_chunks(n, chunk)):
            target = t.Buffer(t.RawBuffer(ptr + off, ln), writable=True) if ln else t.Buffer(bytearray(1), True)
            try:
                r = s.pep(self.tag, k, self.nbytes).recv(target, tag=self.tag, tag_mask=t.EXACT_TAG, timeout=tmo)
            except t.MessageTruncated:
                raise self._long(ln) from None
            except t.OperationTimeout:
                raise self._missing(ln) from None
            if r.nbytes != ln:
                self.done = True
                raise fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload chunk of {r.nbytes} B, expected {ln}")
        self.done = True

    def recv_part(self, ptr: int, ln: int) -> None:
        """Receive the next chunk message (of ``ln`` bytes) into ``ptr`` (chunked consumers)."""
        target = t.Buffer(t.RawBuffer(ptr, ln), writable=True) if ln else t.Buffer(bytearray(1), True)
        ep = self.s.pep(self.tag, self.k, self.nbytes)
        self.k += 1
        try:
            r = ep.recv(target, tag=self.tag, tag_mask=t.EXACT_TAG, timeout=self.s.bulk_timeout)
        except t.MessageTruncated:
            raise self._long(ln) from None
        except t.OperationTimeout:
            raise self._missing(ln) from None
        if r.nbytes != ln:
            self.done = True
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload chunk of {r.nbytes} B, expected {ln}")

    def recv_part_nb(self, ptr: int, ln: int):
        """Post the receive of the next chunk message into ``ptr`` (chunked consumers)."""
        target = t.Buffer(t.RawBuffer(ptr, ln), writable=True) if ln else t.Buffer(bytearray(1), True)
        ep = self.s.pep(self.tag, self.k, self.nbytes)
        self.k += 1
        return ep.recv_nb(target, tag=self.tag, tag_mask=t.EXACT_TAG)

    def wait_part(self, req, ln: int) -> None:
        try:
            r = req.wait(timeout=self.s.bulk_timeout)
        except t.MessageTruncated:
            raise self._long(ln) from None
        except t.OperationTimeout:
            req.release()       # (cancels the receive: nothing lands in its buffer later)
            raise self._missing(ln) from None
        if r.nbytes != ln:
            self.done = True
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload chunk of {r.nbytes} B, expected {ln}")

    def recv_into_ptr(self, ptr: int, n: int) -> None:
        """Receive the payload straight into memory at ``ptr`` (zero copy)."""
        if n != self.nbytes:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk payload is {self.nbytes} B, the call copies {n}")
        self._recv(ptr, n)

    def recv_into(self, buf: Any) -> None:
        b = t.Buffer(buf, writable=True)
        if b.nbytes < self.nbytes:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "bulk payload larger than its target")
        self._recv(b.ptr, self.nbytes)

    def read(self) -> bytearray:
        if self.nbytes > _BYTES_MAX:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"bulk blob of {self.nbytes} B is too large")
        n = self.nbytes
        if n <= _READ_EAGER:
            out = bytearray(n)
            if n:
                self.recv_into(out)
            else:
                self._recv(0, 0)
            return out
        # a large blob is received into anonymous memory the kernel backs only as its bytes land
        # (an announced image that never comes costs address space, not RAM), then copied out
        m = mmap.mmap(-1, n)
        try:
            self.recv_into(m)
            return bytearray(m)
        finally:
            try:
                m.close()
            except BufferError:     # (the transport still holds it: freed when it lets go)
                pass

    def drain(self) -> None:
        """Consume the payload without using it (the call failed before it was read)."""
        if self.done:
            return
        self.done = True
        s, scratch = self.s, self.s.scratch
        for k in range(_nchunks(self.nbytes, self.s.chunk)):   # (a count, not a list: nbytes is the client's)
            try:
                s.pep(self.tag, k, self.nbytes).recv(scratch, tag=self.tag, tag_mask=t.EXACT_TAG,
                                                     timeout=self.s.bulk_timeout)
            except t.MessageTruncated:
                pass
            except t.OperationTimeout:      # never sent: the call failed already; the session goes on
                log.info("session %d: bulk payload (tag %#x, %d B) not received within %g s; not waited for "
                         "further", s.id, self.tag, self.nbytes, s.bulk_timeout)
                return

    def __len__(self) -> int:
        return self.nbytes


class _Sized:
    """A blob that is only described (its size), for error texts of copies run in C."""
    __slots__ = ("nbytes",)

    def __init__(self, n: int):
        self.nbytes = n


class OutSink:
    """Where an out hostbuf goes: inline in the reply (route 0) or to a client tag."""
    __slots__ = ("s", "route", "nbytes", "deferred", "data", "sent", "split", "k")

    def __init__(self, s: "ServerSession", route: int, nbytes: int, deferred: bool):
        self.s, self.route, self.nbytes, self.deferred = s, route, nbytes, deferred
        self.data: Any = None
        self.sent = False
        self.k = 0      # the next part message (its bulk lane: gpuwire.rpc.lanes)
        self.split: Optional[int] = None    # message size of this push when not the session's chunk

    def _send(self, ptr: int, n: int, keep: Any) -> None:
        s = self.s
        reqs = []
        for k, (off, ln) in enumerate(_chunks(n, s.chunk)):
            reqs.append(s.pep(self.route, k, n).send_nb(t.Buffer(t.RawBuffer(ptr + off, ln)) if ln else b"",
                                                        tag=self.route))
        _lanes.wait_requests(reqs, s.ep.worker, s.bulk_timeout)
        self.sent = True

    def put_ptr(self, ptr: int, n: int, view: Any = None) -> None:
        """The bytes are at host address ``ptr`` (``view``: keeps them alive)."""
        if n != self.nbytes:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "out buffer size mismatch")
        if self.route:
            self._send(ptr, n, view)
        else:
            self.data = ctypes.string_at(ptr, n) if n else b""
            self.sent = True

    def progress(self) -> None:
        """Drive the transport (sends in flight) while the caller waits for something else."""
        self.s.ep.worker.progress()

    def send_part_nb(self, ptr: int, ln: int):
        ep = self.s.pep(self.route, self.k, self.nbytes)
        self.k += 1
        return ep.send_nb(t.Buffer(t.RawBuffer(ptr, ln)) if ln else b"", tag=self.route)

    def send_part(self, ptr: int, ln: int) -> None:
        """Send one chunk message (chunked producers; the caller sets ``sent`` at the end)."""
        self.send_part_nb(ptr, ln).wait(timeout=self.s.bulk_timeout)

    def put_bytes(self, b: Any) -> None:
        mv = memoryview(b).cast("B")
        if mv.nbytes < self.nbytes:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "short out buffer")
        if self.route:
            buf = t.Buffer(mv[:self.nbytes]) if self.nbytes else None
            self._send(buf.ptr if buf else 0, self.nbytes, buf)
        else:
            self.data = bytes(mv[:self.nbytes])
            self.sent = True

    def finish(self) -> None:
        """A deferred push that failed still sends (empty) messages: the client posted receives."""
        if self.route and not self.sent:
            s = self.s
            split = s.chunk if self.split is None else self.split
            self.sent = True
            if self.nbytes > s.bulk_max:
                # larger than anything the session could copy (its VA range, its mapped client
                # memory; the hello's bulk_max): no messages for it, as their count would be the
                # client's to choose (2**63 B: 2**41 messages). A client that posted receives for
                # such a push must not wait for them (docs/protocol.md "Bulk payloads")
                log.info("session %d: failed push of %d B (tag %#x) is over the %d B a copy can have: "
                         "no messages sent for it", s.id, self.nbytes, self.route, s.bulk_max)
                return
            reqs = [s.pep(self.route, k, self.nbytes).send_nb(b"", tag=self.route)
                    for k in range(_nchunks(self.nbytes, split))]
            _lanes.wait_requests(reqs, s.ep.worker, s.bulk_timeout)


# ----------------------------------------------------------------------------- session

_TABLE = None


def _table():
    global _TABLE
    if _TABLE is None:
        tab = server_table()
        for e in tab.values():
            e.session_level = hasattr(ServerSession, e.call.name)  # type: ignore[attr-defined]
            codes = e.reply.format[2:]  # after '<I'
            e.zero = tuple(0.0 if c in "fd" else 0 for c in codes)  # type: ignore[attr-defined]
        _TABLE = tab
    return _TABLE


_SCANNER = None


def _scanner():
    """The C frame scanner, or None (Python decoding) when gpuwire._rpc is not built or
    disabled (GPUWIRE_RPC_C_SERVER=0)."""
    global _SCANNER
    if _SCANNER is None:
        ok = settings.get("rpc_c_server") and _cf.available() and _cf._consistent(default_spec())
        _SCANNER = _cf.Scanner(_table()) if ok else False
    return _SCANNER or None


class ServerSession:
    """Server-side state of one client connection (also the target of session-level calls)."""

    def __init__(self, server: "Server", ep: t.Endpoint, sid: int):
        self.server = server
        self.ep = ep
        self.id = sid
        self.peer = ep.peer
        self.es = None                     # executor session
        self.mm: Optional[MemoryMap] = None
        self.ready = False
        self.device = 0
        self.ctx_id = 0
        self.ctx_current = True
        self.tables: Dict[str, Dict[int, Any]] = {"stream": {}, "event": {}, "module": {}, "function": {}}
        self.parents: Dict[int, int] = {}
        self.hosts: Dict[int, Tuple[int, Any]] = {}
        self.last = (0, 0, 0)
        self.latch: Optional[List[Any]] = None
        self.call_seq = 0
        self.pushes = 0
        self.tail = bytearray()            # the current sync frame's reply tail (ROUTE_REPLY results)
        self.errmsg = ""
        self.chunk = server.executor.bulk_chunk if server.executor is not None else 0
        self.bulk_timeout = float(settings.get("rpc_bulk_timeout_s"))
        self.scratch = t.Buffer(bytearray(64 << 10), writable=True)
        self.inline_max = int(settings.get("rpc_inline_max"))   # (results inline in a reply: at most this)
        self.rep = bytearray(self.inline_max + (64 << 10))
        self.rep_ptr = t.Buffer(self.rep, writable=True).ptr
        self.rep_views: Dict[int, Any] = {}
        self.out: Any = None          # the reply to send with the next receive
        self.stop = False
        self.thread: Optional[threading.Thread] = None
        self.scanner = _scanner()
        self.frame_c = None
        self.recs_c = _cf.ffi.new("gw_rpc_rec_t[]", 256) if self.scanner is not None else None
        self.disp = None
        # the C server (gpuwire._rpc through the transport's Endpoint.serve): answers frames it
        # can run entirely in C without entering Python; passes the rest to handle_frame
        self.serve_c = (_cf.Serve(self.scanner, P.TAG_REP)
                        if self.scanner is not None and hasattr(ep, "serve") else None)
        self.trace_dir = str(settings.get("rpc_trace_dir") or "")
        if self.serve_c is not None:
            self.serve_c.v.skip_ssync = 1 if settings.get("rpc_server_skip_ssync") else 0
            if self.trace_dir:
                self.serve_c.trace_on(max(1, int(settings.get("rpc_trace_frames"))))
        self.next_seq = 0             # (set from the hello's seq: _expect_seq)
        self.trace_t0 = time.monotonic_ns()   # the trace's session span starts (CLOCK_MONOTONIC)
        self.bulk_stats: Optional[Dict[str, int]] = None   # the C bulk copies' counters when they closed
        self.frames = 0
        self.errors = 0
        self.closed_reason = ""
        self._gds_files: Any = None   # gpuwire.gds.service.FileService, at the first file call
        self.h2d_ctx: Any = None      # the async H2D copy whose tail is still pending (GPU executor)
        self.hostmap: Any = None      # same-host mapped regions: the session's descriptor socket
        self.hostmaps: Dict[int, Tuple[Any, Any]] = {}   # device address -> (mmap, executor token)
        self.bulk_c: Any = None       # the C server's bulk copies (_cfast.Bulk, rpc_c_bulk)
        self.lane_offer: Any = None   # bulk lanes offered in the hello (gpuwire.rpc.lanes.Offer)
        self.lane_eps: List[t.Endpoint] = []    # ... and in use (after gwBulkLanes)
        self.lane_min = 0
        self.bulk_max = 0             # the largest payload a copy of this session can have (at the hello)
        self.max_objects = int(settings.get("rpc_session_max_objects"))

    # ------------------------------------------------------------------ loop
    def _place(self) -> None:
        """rpc_server_session_cpu: this (the session) thread alone on its CPU, the worker's
        other threads on the rest (session workers only: one session per process)."""
        cpu = int(settings.get("rpc_server_session_cpu"))
        if cpu < 0 or not self.server.single:
            return
        allowed = self.server.cpus
        if cpu not in allowed or len(allowed) < 2:
            log.warning("session %d: rpc_server_session_cpu %d not used (this worker may use CPUs %s)",
                        self.id, cpu, sorted(allowed))
            return
        try:
            place_threads({cpu}, allowed - {cpu})
        except ValueError as e:
            log.warning("session %d: %s", self.id, e)

    def _await_hello(self) -> bool:
        """Frames until the hello succeeds, within rpc_hello_timeout_s of the connect, in a buffer
        that fits the largest hello (the session's frame buffer comes after it); False: the
        session ends (deadline passed, or the hello refused the client)."""
        tmo = float(settings.get("rpc_hello_timeout_s"))
        deadline = time.monotonic() + tmo if tmo > 0 else None
        buf = bytearray(_HELLO_FRAME_MAX)
        bb = t.Buffer(buf, writable=True)
        mv = memoryview(buf)
        while not self.ready and not self.stop:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise t.OperationTimeout("hello deadline")
                n = self.ep.recv(bb, tag=P.TAG_REQ, tag_mask=t.EXACT_TAG, timeout=left).nbytes
            except t.MessageTruncated:
                self._send_error(0, P.ST_TOO_LARGE, f"frame larger than {_HELLO_FRAME_MAX} bytes before the hello")
                continue
            except t.OperationTimeout:
                log.info("session %d (%s): no hello within %g s (rpc_hello_timeout_s): closed", self.id,
                         self.peer, tmo)
                self._send_error(0, P.ST_HELLO_REQUIRED,
                                 f"no hello within {tmo:g} s of connecting (rpc_hello_timeout_s): closed")
                self.closed_reason = "no hello in time"
                return False
            self.frames += 1
            if not self.handle_frame(mv, n):
                return False
        return self.ready

    def run(self) -> None:
        self._place()
        ep = self.ep
        sc = self.serve_c
        try:
            if not self._await_hello():
                return
            buf = bytearray(MAX_FRAME)      # (after the hello: unauthenticated peers cost no MiB each)
            bb = t.Buffer(buf, writable=True)
            if self.scanner is not None:
                self.frame_c = _cf.ffi.cast("uint8_t *", bb.ptr)
            mv = memoryview(buf)
            while not self.stop:
                resume = None
                try:
                    out = self.out
                    self.out = None
                    if sc is not None:
                        # C answers what it can; we get the frames it passes (and our reply
                        # goes out from C first, after the next receive is posted)
                        v = sc.v
                        v.enabled = 1 if self._c_ok() else 0
                        v.pushes = self.pushes
                        n = ep.serve(bb, sc.handler, sc.arg, tag=P.TAG_REQ, first=out, first_tag=P.TAG_REP)
                        self.pushes = v.pushes
                        self.call_seq += v.ran
                        v.ran = 0
                        resume = sc.resume()
                    elif out is not None:
                        # the reply goes out and the next request comes in through one C call
                        n = ep.call(out, bb, tag=P.TAG_REP, reply_tag=P.TAG_REQ)
                    else:
                        n = ep.recv(bb, tag=P.TAG_REQ, tag_mask=t.EXACT_TAG).nbytes
                except t.MessageTruncated:
                    if sc is not None:
                        self.pushes = sc.v.pushes
                    self._send_error(0, P.ST_TOO_LARGE, f"frame larger than {MAX_FRAME} bytes")
                    continue
                self.frames += 1
                if not self.handle_frame(mv, n, resume):     # the client's bye
                    if self.out is not None:
                        out, self.out = self.out, None
                        ep.send(out, tag=P.TAG_REP, timeout=5.0)
                    # lanes and connection close now, before the cleanup below (which can take
                    # milliseconds): the client waits for their BYEs (sent after each flush) and
                    # then closes its sides without a flush; a flush towards a side already gone
                    # fails, which UCX logs as an error (docs/protocol.md "Bulk lanes": closing)
                    self._end_transport()
                    break
        except (t.ConnectionLost, t.ConnectionClosed) as e:
            self.closed_reason = str(e)
        except Exception as e:  # pragma: no cover - a bug; the session ends, the server stays
            log.exception("session %d (%s) failed", self.id, self.peer)
            self.closed_reason = f"internal error: {e}"
        finally:
            self.cleanup()
            self.server._session_done(self)

    def pep(self, tag: int, k: int, n: int) -> t.Endpoint:
        """The endpoint of message ``k`` of a bulk payload of ``n`` bytes tagged ``tag``: one of
        the session's bulk lanes, or its own connection (gpuwire.rpc.lanes.lane_of)."""
        eps = self.lane_eps
        i = _lanes.lane_of(tag, k, n, len(eps), self.lane_min) if eps else -1
        return self.ep if i < 0 else eps[i]

    def _rep_view(self, n: int):
        v = self.rep_views.get(n)
        if v is None:
            if len(self.rep_views) > 256:
                self.rep_views.clear()
            v = self.rep_views[n] = t.Buffer(t.RawBuffer(self.rep_ptr, n))
        return v

    def _send_error(self, seq: int, status: int, msg: str) -> None:
        self.errors += 1
        log.info("session %d (%s): frame %d refused: %s", self.id, self.peer, seq, msg)
        try:
            self.ep.send(P.pack_error(seq, status, msg), tag=P.TAG_REP, timeout=5.0)
        except t.TransportError:
            pass

    def _c_ok(self) -> bool:
        """May the C server run this session's next frames? Only while the session has no
        state the C path does not carry: after the hello, no pending deferred error, no
        sticky context, and no pinned host mirrors (their handling stays in Python)."""
        fs = self._gds_files
        return (self.ready and self.disp is not None and self.latch is None and not self.hosts
                and not getattr(self.es, "h2d_pend", None)       # H2D tail queued by Python
                and not (self.es is not None and getattr(self.es, "sticky", None))
                and not (fs is not None and fs.busy))   # gds reads in flight: their errors come at sync

    def _expect_seq(self, nxt: int) -> None:
        """The seq the session's next frame must carry (the C server's cell too)."""
        self.next_seq = nxt
        if self.serve_c is not None:
            self.serve_c.v.next_seq = nxt
            self.serve_c.v.seq_on = 1

    @property
    def c_frames(self) -> int:
        """Frames the C server answered without Python."""
        return int(self.serve_c.v.frames) if self.serve_c is not None else 0

    def handle_frame(self, mv: memoryview, n: int, resume: Optional[Tuple[int, int, str]] = None) -> bool:
        """Run one frame; False ends the session. ``resume``: the C server ran the frame up to
        a call that failed (index, CUresult, message); the rest is run here."""
        if n < P.HEADER_SIZE:
            self._send_error(0, P.ST_TRUNCATED, f"frame of {n} bytes is shorter than the {P.HEADER_SIZE}-byte header")
            return True
        magic, ver, flags, seq, ncalls, blen = P.HEADER.unpack_from(mv, 0)
        if self.ready:
            # an established session's frames carry consecutive seqs from its hello's on (the
            # client starts at a random one); a frame out of order was not sent in order by
            # this session's client (a peer that found the session worker's transport address
            # and guessed its connection id, or a client bug): nothing of it runs. A frame in
            # order counts also when it is refused below.
            v = self.serve_c.v if self.serve_c is not None else None
            exp = int(v.next_seq) if v is not None else self.next_seq
            if seq != exp:
                self._send_error(seq, P.ST_MALFORMED, f"frame seq {seq} is out of order (this session's "
                                 f"next is {exp}): refused, none of its calls ran")
                return True
            self._expect_seq((seq + 1) & 0xFFFFFFFF)
        if magic != P.MAGIC:
            self._send_error(seq if magic == P.MAGIC else 0, P.ST_BAD_MAGIC,
                             f"bad magic {magic:#06x}: not a gpuwire RPC frame")
            return True
        if ver != P.PROTOCOL_VERSION:
            self._send_error(seq, P.ST_BAD_VERSION,
                             f"protocol version {ver} is not supported (this server speaks {P.PROTOCOL_VERSION})")
            return True
        if flags & ~P.F_KNOWN:
            self._send_error(seq, P.ST_MALFORMED, f"unknown frame flags {flags:#x}")
            return True
        if blen != n - P.HEADER_SIZE:
            st = P.ST_TRUNCATED if blen > n - P.HEADER_SIZE else P.ST_MALFORMED
            self._send_error(seq, st, f"header announces {blen} body bytes, the frame has {n - P.HEADER_SIZE}")
            return True
        if not self.ready:
            if not flags & P.F_HELLO:
                self._send_error(seq, P.ST_HELLO_REQUIRED, "the first frame must be a hello")
                return True
            r = self._hello(mv, n, seq)
            if self.ready:                # frames follow the hello's seq one by one
                self._expect_seq((seq + 1) & 0xFFFFFFFF)
            return r
        if flags & P.F_HELLO:
            self._send_error(seq, P.ST_MALFORMED, "hello on an established session")
            return True
        # the reply tail of this frame (ROUTE_REPLY results); with resume, what C wrote first
        self.tail = bytearray(self.serve_c.take_tail()) if resume is not None and self.serve_c else bytearray()
        if self.scanner is not None and self.frame_c is not None:
            if ncalls > len(self.recs_c):
                if ncalls > blen // P.RECORD_SIZE:
                    self._send_error(seq, P.ST_TRUNCATED, f"{ncalls} calls cannot fit {blen} body bytes")
                    return True
                self.recs_c = _cf.ffi.new("gw_rpc_rec_t[]", max(ncalls, 2 * len(self.recs_c)))
            st, msg = self.scanner.scan(self.frame_c, P.HEADER_SIZE, n, ncalls, bool(flags & P.F_SYNC), self.recs_c)
            if st:
                self._send_error(seq, st, msg)
                return True
            self._execute_c(mv, ncalls, seq, flags, resume)
        else:
            try:
                recs = self._parse(mv, P.HEADER_SIZE, n, ncalls, bool(flags & P.F_SYNC))
            except FrameError as e:
                self._send_error(seq, e.status, str(e))
                return True
            self._execute(recs, seq, flags)
        if flags & P.F_BYE:
            return False
        return True

    # ------------------------------------------------------------------ parsing
    def _parse(self, mv: memoryview, off: int, end: int, ncalls: int, sync: bool):
        tab = _table()
        recs = []
        try:
            for i in range(ncalls):
                if end - off < P.RECORD_SIZE:
                    raise FrameError(P.ST_TRUNCATED, f"call {i}: record header runs past the frame end")
                cid, rflags, ln = P.RECORD.unpack_from(mv, off)
                e = tab.get(cid)
                if e is None:
                    raise FrameError(P.ST_UNKNOWN_CALL, f"call {i}: unknown call id {cid}")
                if rflags:
                    raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): unknown record flags {rflags:#x}")
                rend = off + ln
                if ln < P.RECORD_SIZE + e.fixed.size or rend > end:
                    raise FrameError(P.ST_MALFORMED if rend <= end else P.ST_TRUNCATED,
                                     f"call {i} ({e.call.name}): record length {ln} does not fit "
                                     f"(fixed part {e.fixed.size} B, {end - off} B left)")
                if not e.call.deferred and (not sync or i != ncalls - 1):
                    raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}) is sync but not the last "
                                                     f"call of a sync frame")
                p = off + P.RECORD_SIZE
                vals = e.fixed.unpack_from(mv, p)
                p += e.fixed.size
                blobs = []
                for k in range(e.nvar):
                    if rend - p < 4:
                        raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): blob {k} header missing")
                    (bn,) = P.U32.unpack_from(mv, p)
                    if bn == P.BULK_MARK:
                        if rend - p < P.BULK_SLOT.size:
                            raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): bulk slot truncated")
                        _m, tag, nb = P.BULK_SLOT.unpack_from(mv, p)
                        if not P.TAG_BULK_IN_FIRST <= tag <= P.TAG_BULK_IN_LAST:
                            raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): bulk tag {tag:#x} "
                                                             f"outside the client->server bulk range")
                        blobs.append(BulkIn(self, tag, nb))
                        p += P.BULK_SLOT.size
                    else:
                        if rend - p - 4 < bn:
                            raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): blob {k} of {bn} B "
                                                             f"runs past its record")
                        blobs.append(mv[p + 4:p + 4 + bn])
                        p += 4 + bn
                routes = []
                for k in range(e.nroutes):
                    if rend - p < 4:
                        raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): route {k} missing")
                    (r,) = P.U32.unpack_from(mv, p)
                    if r == P.ROUTE_REPLY:
                        if not (e.call.deferred and sync):
                            raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): route {k} to the reply "
                                                             f"tail outside a sync frame's deferred call")
                    elif r and not P.TAG_BULK_OUT_FIRST <= r <= P.TAG_BULK_OUT_LAST:
                        raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): route tag {r:#x} "
                                                         f"outside the server->client bulk range")
                    if e.call.deferred and not r:
                        raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): a deferred out buffer "
                                                         f"needs a bulk route")
                    routes.append(r)
                    p += 4
                if p != rend:
                    raise FrameError(P.ST_MALFORMED, f"call {i} ({e.call.name}): {rend - p} stray bytes "
                                                     f"at the end of the record")
                recs.append((e, vals, blobs, routes))
                off = rend
            if off != end:
                raise FrameError(P.ST_MALFORMED, f"{end - off} bytes after the last of {ncalls} calls")
        except struct.error as ex:  # pragma: no cover - the checks above make this unreachable
            raise FrameError(P.ST_MALFORMED, f"decode: {ex}") from None
        except FrameError:
            for _e, _v, bl, _r in recs:
                for b in bl:
                    if isinstance(b, BulkIn):
                        b.drain()
            raise
        return recs

    # ------------------------------------------------------------------ execution
    def _execute(self, recs, seq: int, flags: int) -> None:
        sync = None
        for pos, (e, vals, blobs, routes) in enumerate(recs):
            r = self._one(pos, e, vals, blobs, routes, seq)
            if r is not None:
                sync = r
        if flags & P.F_SYNC:
            # (a bye's answer carries the report of a deferred call that failed since the
            # last sync point: the client's close() raises it)
            self._reply(seq, *(sync or (None, 0, None, [])), report=bool(flags & P.F_BYE))

    def _execute_c(self, mv: memoryview, ncalls: int, seq: int, flags: int, resume=None) -> None:
        """Records located by the C scanner; runs of hot calls go through the C loop.
        ``resume``: the C server already ran records [0, i) and record i failed."""
        recs = self.recs_c
        if self.bulk_c is not None and self.bulk_c.nlate():
            self._c_bulk_late()
        tab = _table()
        disp = self.disp
        hot = disp.hot_ids if disp is not None else ()
        sticky = self.es is not None and getattr(self.es, "sticky", None)
        sync = None
        i = 0
        if resume is not None:
            i, res, msg = resume
            e, vals, blobs, routes = self._rec(mv, recs[i], tab)
            cseq = self.call_seq
            self.call_seq += 1
            self.errmsg = msg
            if e.call.deferred:
                # a failed push still sends (empty) messages: the client posted its receives
                for r, nb in zip(routes, self._out_sizes(e, vals)):
                    if r == P.ROUTE_REPLY:
                        self.tail += P.U32.pack(0)      # (an empty result in the reply tail)
                        continue
                    OutSink(self, r, nb, True).finish()
                    self.pushes = (self.pushes + 1) & 0xFFFFFFFF
            else:
                sync = (e, res, None, [])
            self._note_error(e, vals, blobs, res, i, seq, cseq)
            i += 1
        while i < ncalls:
            rc = recs[i]
            if rc.id in hot and not sticky:
                if getattr(self.es, "h2d_pend", None):
                    self._h2d_settle()
                k, res, msg = disp.run(self.frame_c, recs, i, ncalls)
                if k:
                    self.call_seq += k
                    i += k
                if res:
                    e, vals, blobs, routes = self._rec(mv, recs[i], tab)
                    cseq = self.call_seq
                    self.call_seq += 1
                    self.errmsg = msg
                    self._note_error(e, vals, blobs, res, i, seq, cseq)
                    i += 1
                    continue
                if k:
                    continue
            e, vals, blobs, routes = self._rec(mv, rc, tab)
            r = self._one(i, e, vals, blobs, routes, seq)
            if r is not None:
                sync = r
            if self.es is not None and getattr(self.es, "sticky", None):
                sticky = True
            i += 1
        if flags & P.F_SYNC:
            # (a bye's answer carries the report of a deferred call that failed since the
            # last sync point: the client's close() raises it)
            self._reply(seq, *(sync or (None, 0, None, [])), report=bool(flags & P.F_BYE))

    def _rec(self, mv: memoryview, rc, tab):
        e = tab[rc.id]
        vals = e.fixed.unpack_from(mv, rc.fixed)
        blobs = []
        for k in range(e.nvar):
            off = rc.var_off[k]
            if off == 0xFFFFFFFF:
                blobs.append(BulkIn(self, rc.var_len[k], rc.var_bulk[k]))
            else:
                blobs.append(mv[off:off + rc.var_len[k]])
        routes = [rc.route[k] for k in range(e.nroutes)]
        return e, vals, blobs, routes

    def _h2d_settle(self) -> None:
        """Queue the left-over chunks of the last async H2D copy (GPU executor,
        rpc_gpu_h2d_overlap) before another call runs; a failure is that copy's error."""
        es = self.es
        if getattr(es, "h2d_pend", None):
            es.h2d_finish()
        self._h2d_failed()

    def _h2d_failed(self) -> None:
        es = self.es
        f = getattr(es, "h2d_failed", None)
        if f is not None:
            es.h2d_failed = None
            ctx, self.h2d_ctx = self.h2d_ctx, None
            if ctx is not None:
                msg, self.errmsg = self.errmsg, f[1]
                self._note_error(*ctx[:3], f[0], *ctx[3:])
                self.errmsg = msg

    def _one(self, pos: int, e, vals, blobs, routes, seq: int):
        """Run one record; returns (entry, result, outs, sinks) for a sync call, else None."""
        call = e.call
        cseq = self.call_seq
        self.call_seq += 1
        es = self.es
        if call.name == "cuMemcpyHtoDAsync" and getattr(es, "h2d_overlap", False):
            prev = self.h2d_ctx
            res, outs = self._run(e, vals, blobs, [])
            if getattr(es, "h2d_failed", None) is not None:   # the previous copy's tail failed
                self.h2d_ctx = prev
                self._h2d_failed()
            if not es.h2d_pend:
                self.h2d_ctx = None
            elif not res:
                self.h2d_ctx = (e, vals, blobs, pos, seq, cseq)
            else:
                self.h2d_ctx = prev if self.h2d_ctx is None else self.h2d_ctx
            for b in blobs:
                if isinstance(b, BulkIn) and not b.done:
                    b.drain()
            if res:
                self._note_error(e, vals, blobs, res, pos, seq, cseq)
            return None
        if getattr(es, "h2d_pend", None) or getattr(es, "h2d_failed", None) is not None:
            self._h2d_settle()
        sinks = []
        tail = None
        if routes:
            sizes = self._out_sizes(e, vals)
            if P.ROUTE_REPLY in routes:
                tail = self._tail_sinks(call, routes, sizes)
                if tail is None:        # not a result the reply tail may carry: empty entries
                    self.tail += P.U32.pack(0) * routes.count(P.ROUTE_REPLY)
                    self._note_error(e, vals, blobs, P.CUDA_ERROR_INVALID_VALUE, pos, seq, cseq)
                    return None
            sinks = [OutSink(self, 0 if r == P.ROUTE_REPLY else r, n, call.deferred) for r, n in zip(routes, sizes)]
            inline = 0 if call.deferred else sum(n for r, n in zip(routes, sizes) if not r)
            if inline > self.inline_max:
                # results inline in the reply (route 0): at most inline_max (the hello says it); larger
                # ones need a bulk route (the reply buffer holds no more)
                self.errmsg = (f"{call.name}: {inline} B of results "
                               f"do not fit inline in the reply (at most {self.inline_max} B; larger ones "
                               f"need a bulk route)")
                for b in blobs:
                    if isinstance(b, BulkIn):
                        b.drain()
                self._note_error(e, vals, blobs, P.CUDA_ERROR_INVALID_VALUE, pos, seq, cseq)
                return (e, P.CUDA_ERROR_INVALID_VALUE, None, sinks)
            if call.name == "gwMirrorPull":     # one message per granule (docs/pinned.md)
                g = vals[3]
                if not g or (vals[2] + g - 1) // g <= (1 << 16):
                    sinks[0].split = g
        res, outs = self._run(e, vals, blobs, sinks)
        for b in blobs:
            if isinstance(b, BulkIn) and not b.done:
                b.drain()
        if call.deferred:
            for k, sk in enumerate(sinks):
                if tail is not None and routes[k] == P.ROUTE_REPLY:
                    d = sk.data if sk.sent and not res and sk.data is not None else b""
                    self.tail += P.U32.pack(len(d)) + d       # reply tail: length, bytes
                    continue
                sk.finish()
                self.pushes = (self.pushes + 1) & 0xFFFFFFFF
        if res and call.name not in STATUS_RESULT and not (
                call.name in QUERY_RESULT and res == P.CUDA_ERROR_NOT_READY):
            self._note_error(e, vals, blobs, res, pos, seq, cseq)
        if not call.deferred:
            return (e, res, outs, sinks)
        return None

    def _tail_sinks(self, call, routes, sizes):
        """A call routing results to the reply tail: only cuMemcpyDtoHAsync, each result at
        most REPLY_INLINE_LIMIT bytes, the tail at most REPLY_TAIL_MAX; else None (and why in
        errmsg)."""
        if call.name != "cuMemcpyDtoHAsync":
            self.errmsg = f"{call.name} cannot return results in the reply tail"
            return None
        n = len(self.tail)
        for r, sz in zip(routes, sizes):
            if r == P.ROUTE_REPLY:
                n += 4 + sz
                if sz > P.REPLY_INLINE_LIMIT or n > P.REPLY_TAIL_MAX:
                    self.errmsg = (f"{sz} B do not fit the reply tail (at most {P.REPLY_INLINE_LIMIT} B "
                                   f"per result, {P.REPLY_TAIL_MAX} B per reply)")
                    return None
        return True

    def _note_error(self, e, vals, blobs, res: int, pos: int, seq: int, cseq: int) -> None:
        call = e.call
        self.last = (res, call.id, cseq)
        if call.deferred:
            if self.latch is None:
                text = e.render(vals, blobs)
                if self.errmsg:
                    text += f": {self.errmsg}"
                self.latch = [res, call.id, pos, seq, cseq, 0, text[:2000]]
            else:
                self.latch[5] += 1

    def _out_sizes(self, e, vals) -> List[int]:
        call = e.call
        d = dict(zip(call.wire_format.request_args, vals))
        out = []
        for name in e.route_names:
            try:
                out.append(int(call.arg(name).size_fn(d)))
            except Exception:
                out.append(0)
        return out

    def _run(self, e, vals, blobs, sinks):
        self.errmsg = ""
        es = self.es
        name = e.call.name
        if es is not None and getattr(es, "sticky", None) and name not in _NO_STICKY:
            self.errmsg = "the context is unusable after an earlier error (sticky)"
            return es.sticky, None
        target = self if e.session_level else es
        try:
            out = e.dispatch(self, target, vals, blobs, sinks)
        except CudaCallError as err:
            self.errmsg = str(err) if str(err) != P.result_name(err.code) else ""
            return err.code, None
        except (t.ConnectionLost, t.ConnectionClosed):
            raise
        except t.TransportError as err:
            self.errmsg = f"transport: {err}"
            return P.CUDA_ERROR_UNKNOWN, None
        except Exception as err:
            log.exception("session %d: %s raised", self.id, name)
            self.errmsg = f"server error: {type(err).__name__}: {err}"
            return P.CUDA_ERROR_UNKNOWN, None
        if type(out) is StatusResult:
            return out.code, out.outs
        return 0, out

    def _reply(self, seq: int, e, res: int, outs: Any, sinks: List[OutSink], report: bool = False) -> None:
        rep = self.rep
        off = P.HEADER_SIZE
        P.REPLY_HEAD.pack_into(rep, off, 0, self.pushes)
        off += P.REPLY_HEAD.size
        tail = getattr(self, "tail", None)
        if tail:                # D2H results routed to this reply (ROUTE_REPLY), in frame order
            rep[off:off + len(tail)] = tail
            off += len(tail)
            self.tail = bytearray()
        if e is not None:
            fixed = e.zero
            strings: Sequence[Any] = ("",) * e.nstrings
            if outs is not None and (res == 0 or e.call.name in STATUS_RESULT):
                vals = outs if isinstance(outs, tuple) else (outs,)
                k = len(fixed)
                fixed = tuple(vals[:k])
                strings = vals[k:k + e.nstrings]
                if len(fixed) != k or len(strings) != e.nstrings:
                    log.error("%s returned %r; expected %d values and %d strings", e.call.name, outs, k,
                              e.nstrings)
                    fixed, strings, res = e.zero, ("",) * e.nstrings, P.CUDA_ERROR_UNKNOWN
            try:
                e.reply.pack_into(rep, off, res, *fixed)
            except struct.error:
                log.error("%s: reply values %r do not fit %s", e.call.name, fixed, e.reply.format)
                e.reply.pack_into(rep, off, P.CUDA_ERROR_UNKNOWN, *e.zero)
            off += e.reply.size
            for s in strings:
                b = s.encode() if isinstance(s, str) else bytes(s)
                b = b[:4096]
                P.U32.pack_into(rep, off, len(b))
                rep[off + 4:off + 4 + len(b)] = b
                off += 4 + len(b)
            for s in sinks:
                if s.route and s.sent:
                    P.BULK_SLOT.pack_into(rep, off, P.BULK_MARK, s.route, s.nbytes)
                    off += P.BULK_SLOT.size
                elif not s.route and s.sent and res == 0:
                    d = s.data
                    P.U32.pack_into(rep, off, len(d))
                    rep[off + 4:off + 4 + len(d)] = d
                    off += 4 + len(d)
                else:
                    P.U32.pack_into(rep, off, 0)
                    off += 4
        if self.latch is None and (e is not None or report) and self._gds_files is not None:
            self._gds_error()
        if self.latch is not None and (e is not None or report):
            res_, cid, pos, fseq, cseq, later, text = self.latch
            tb = text.encode("utf-8", "replace")[:2000]
            rep[off] = 1
            P.REPORT.pack_into(rep, off + 1, res_, cid, pos, fseq, cseq & 0xFFFFFFFFFFFFFFFF, later, len(tb))
            off += 1 + P.REPORT.size
            rep[off:off + len(tb)] = tb
            off += len(tb)
            self.latch = None
        else:
            rep[off] = 0
            off += 1
        flags = 0
        if e is not None and res and self.errmsg and e.call.name not in STATUS_RESULT:
            # why the sync call failed (F_REASON): the reason, then its length, end the reply
            rb = self.errmsg.encode("utf-8", "replace")[:P.REASON_MAX]
            rep[off:off + len(rb)] = rb
            P.U16.pack_into(rep, off + len(rb), len(rb))
            off += len(rb) + 2
            flags = P.F_REASON
        P.HEADER.pack_into(rep, 0, P.MAGIC, P.PROTOCOL_VERSION, flags, seq, 1 if e is not None else 0,
                           off - P.HEADER_SIZE)
        self.out = self._rep_view(off)

    # ------------------------------------------------------------------ hello
    def _hello(self, mv: memoryview, n: int, seq: int) -> bool:
        srv = self.server
        off = P.HEADER_SIZE
        if n - off < P.HELLO_REQ.size:
            self._send_error(seq, P.ST_TRUNCATED, "hello body truncated")
            return True
        pmin, pmax, pid, toklen, infolen = P.HELLO_REQ.unpack_from(mv, off)
        off += P.HELLO_REQ.size
        if toklen > 4096 or infolen > 65536 or off + toklen + infolen > n:
            self._send_error(seq, P.ST_TRUNCATED, "hello token/info run past the frame")
            return True
        if not pmin <= P.PROTOCOL_VERSION <= pmax:
            self._send_error(seq, P.ST_BAD_VERSION, f"client speaks protocol versions {pmin}..{pmax}, "
                                                    f"this server {P.PROTOCOL_VERSION}")
            return False
        token = bytes(mv[off:off + toklen])
        off += toklen
        if srv.token is not None and not hmac.compare_digest(token, srv.token):
            log.warning("session %d (%s): authentication failed (%s token)", self.id, self.peer,
                        "missing" if not token else "wrong")
            self._send_error(seq, P.ST_AUTH, "authentication failed: " +
                             ("no token given (pass token= to gpuwire.connect or set GPUWIRE_RPC_TOKEN)"
                              if not token else "wrong token"))
            return False
        try:
            info = json.loads(bytes(mv[off:off + infolen]) or b"{}")
            if not isinstance(info, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send_error(seq, P.ST_MALFORMED, "hello info is not a JSON object")
            return True
        except RecursionError:
            self._send_error(seq, P.ST_MALFORMED, "hello info is not a JSON object: nested too deeply")
            return True
        except Exception as ex:   # (anything else the decoder raises: an error reply, not a dead session)
            self._send_error(seq, P.ST_MALFORMED, f"hello info is not a JSON object: {type(ex).__name__}: {ex}")
            return True
        want_lanes = info.get("lanes")
        if isinstance(want_lanes, float) and not want_lanes - want_lanes == 0:   # inf, nan (before a session opens)
            self._send_error(seq, P.ST_MALFORMED, f"hello info: lanes {want_lanes!r} is not a number of lanes")
            return True
        off += infolen
        try:
            recs = self._parse(mv, off, n, 1, True)
        except FrameError as e:
            self._send_error(seq, e.status, f"hello: {e}")
            return True
        e, vals, _b, _r = recs[0]
        if e.call.name != "gwHello":
            self._send_error(seq, P.ST_MALFORMED, "hello frame without gwHello")
            return True
        spec = default_spec()
        sver, fp = vals
        if sver != SPEC_VERSION or fp != spec.fingerprint64:
            log.warning("session %d (%s): spec mismatch (client v%d %#x, server v%d %#x)", self.id, self.peer,
                        sver, fp, SPEC_VERSION, spec.fingerprint64)
            self._hello_reply(seq, e, P.CUDA_ERROR_NOT_SUPPORTED, spec.fingerprint64, {})
            return False
        device = info.get("device")
        if not isinstance(device, int) or isinstance(device, bool):
            device = srv.default_device          # the client left it to the server (--device)
        if srv.pool is not None:
            return self._redirect(seq, e, spec.fingerprint64)
        try:
            self.es = srv.executor.open_session(device, srv.va_size)
        except CudaCallError as ex:
            self._send_error(seq, P.ST_INTERNAL, f"cannot open a session on device {device}: {ex}")
            return False
        except Exception as ex:
            log.exception("open_session")
            self._send_error(seq, P.ST_INTERNAL, f"cannot open a session on device {device}: {ex}")
            return False
        self.device = device
        self.ctx_id = SESSION_CTX_BASE + device
        self.mm = self.es.mm
        # a device range lies in one allocation (within the VA range) or in mapped client memory;
        # module images are read up to _BYTES_MAX
        self.bulk_max = max(int(self.es.va_size), _hostmap_cap(), _BYTES_MAX)
        if self.scanner is not None and hasattr(self.es, "c_calls"):
            try:
                fns = self.es.c_calls()
                self.disp = _cf.Dispatch(spec, fns)
                gcfg = self.es.c_graphs() if hasattr(self.es, "c_graphs") else None
                if gcfg:     # launch-run graphs (rpc_gpu_graph_min)
                    self.disp.graphs(gcfg["fns"], gcfg["min_run"], gcfg["cache"])
                if self.serve_c is not None:
                    scratch = self.es.c_scratch() if hasattr(self.es, "c_scratch") else None
                    prog = self.ep.worker.c_progress_entry() if hasattr(self.ep.worker, "c_progress_entry") else None
                    self.serve_c.attach(spec, self.disp, fns, self.chunk, scratch, prog)
                    self._attach_bulk(spec)
            except Exception:
                log.exception("C dispatch disabled")
                self.disp = None
                if self.serve_c is not None:
                    self.serve_c.detach()
        self.client = {"pid": pid, **{k: v for k, v in info.items() if k in ("name", "pid")}}
        self.ready = True
        if srv.single:
            # a session worker serves this one session: no later connection may share its
            # transport worker (connections of one worker are told apart by an id the sender
            # writes: docs/protocol.md "Security"), so its listener closes now
            try:
                srv.listener.close()
            except Exception:
                log.exception("session worker: closing the listener")
        self.call_seq = 1
        extras = {"session": self.id, "executor": srv.executor.kind, "server": __version__,
                  "protocol": P.PROTOCOL_VERSION, "va_base": self.es.va_base, "va_size": self.es.va_size,
                  "va_granularity": self.mm.gran, "bulk_chunk": self.chunk,
                  "inline_max": int(settings.get("rpc_inline_max")), "max_frame": MAX_FRAME,
                  "reply_tail": P.REPLY_INLINE_LIMIT, "bulk_max": self.bulk_max,
                  "device": device, "context": self.ctx_id}
        extras.update({k: v for k, v in srv.executor.describe().items() if k not in extras})
        hm = self._hostmap_offer()
        if hm:
            extras["hostmap"] = hm
        lo = self._lanes_offer(want_lanes)
        if lo:
            extras["lanes"] = lo
        self._hello_reply(seq, e, 0, spec.fingerprint64, extras)
        log.info("session %d: %s (pid %s, %r) on device %d", self.id, self.peer, pid, info.get("name", ""), device)
        return True

    def _redirect(self, seq: int, e, fp: int) -> bool:
        """Process isolation: hand the client to a session worker process of its own."""
        try:
            w = self.server.pool.take()
        except Exception as ex:
            log.exception("session %d: no session worker", self.id)
            self._send_error(seq, P.ST_INTERNAL, f"cannot start a session worker: {ex}")
            return False
        log.info("session %d (%s): handed to worker pid %d on port %d", self.id, self.peer, w.proc.pid, w.port)
        self._hello_reply(seq, e, 0, fp, {"redirect_port": w.port, "ticket": w.ticket, "session": self.id,
                                          "executor": self.server.executor_kind})
        return False

    def _hello_reply(self, seq, e, res, fp, extras) -> None:
        rep = bytearray()
        rep += P.REPLY_HEAD.pack(0, 0)
        ex = self.server.executor
        rep += e.reply.pack(res, fp, ex.driver_version() if res == 0 and ex is not None else 0)
        rep += b"\0"
        js = json.dumps(extras).encode()
        rep += P.U32.pack(len(js)) + js
        frame = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, 0, seq, 1, len(rep)) + bytes(rep)
        self.ep.send(frame, tag=P.TAG_REP, timeout=5.0)

    # ------------------------------------------------------------------ cleanup
    def _write_trace(self) -> None:
        """rpc_trace_dir: this session's frame timestamps as JSON (the bench reads them)."""
        import os
        sc = self.serve_c
        rows = sc.trace_rows()
        doc = {"pid": os.getpid(), "session": self.id, "client": getattr(self, "client", None), "clock": "CLOCK_MONOTONIC ns",
               "t_start": self.trace_t0, "t_end": time.monotonic_ns(),
               "fields": list(sc.TRACE_FIELDS), "frames_total": int(sc.v.trace_n), "c_frames": int(sc.v.frames),
               "passed": int(sc.v.passed), "ssync_skipped": int(sc.v.ssync_skipped), "frames": rows}
        if self.bulk_stats is not None:   # the C bulk copies' counters and phase times (_cfast.BULK_STATS)
            doc["bulk"] = dict(self.bulk_stats)
        if self.disp is not None:         # launch-run graphs (_cfast.GRAPH_STATS)
            doc["graphs"] = self.disp.graph_stats()
        path = os.path.join(self.trace_dir, f"gpuwire-trace-{os.getpid()}-{self.id}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)     # readers never see a partial file

    def _attach_bulk(self, spec) -> None:
        """rpc_c_bulk: async H2D/D2H copy frames run in C (gw_rpc_bulk_*); without it, or if the
        executor or the transport cannot provide what it needs, they run as before."""
        if not settings.get("rpc_c_bulk") or not hasattr(self.es, "c_bulk") or not hasattr(self.ep, "c_bulk_entry"):
            return
        try:
            res = self.es.c_bulk(max(2, min(64, int(settings.get("rpc_c_bulk_slots")))))
            if res:
                self.bulk_c = _cf.Bulk(self.serve_c, spec, self.ep.c_bulk_entry(), res, self.chunk,
                                       self.bulk_timeout, max(0, int(settings.get("rpc_c_bulk_dtoh_min"))),
                                       int(settings.get("rpc_c_bulk_inflight")),
                                       max(0, int(settings.get("rpc_c_bulk_h2d_max"))))
        except Exception:
            log.exception("C bulk copies disabled")
            self.bulk_c = None

    def _c_bulk_late(self) -> None:
        """Failures of C bulk copies found after their record ran (a short payload, a driver
        error while a staged copy was queued): each becomes the deferred error of its copy."""
        late, dropped = self.bulk_c.take_late()
        tab = _table()
        for res, seq, pos, cid, back, fixed, text in late:
            e = tab.get(cid)
            if e is None:     # pragma: no cover - C only records the two copy calls
                continue
            vals = e.fixed.unpack_from(fixed, 0)
            blobs = [_Sized(vals[1])] if e.nvar else []
            msg, self.errmsg = self.errmsg, text
            self._note_error(e, vals, blobs, res, pos, seq, self.call_seq - back)
            self.errmsg = msg
        if dropped and self.latch is not None:
            self.latch[5] += dropped

    def _end_transport(self) -> None:
        """The session's C bulk copies, then its lanes' endpoints and its connection (each a
        flush and a BYE: the client waits for those), then the lanes' workers (the copies'
        requests may be on the lanes and the connection)."""
        if self.bulk_c is not None:     # pending payload receives cancelled, sends completed
            try:
                self.bulk_stats = self.bulk_c.stats()     # (for the trace file)
                self.bulk_c.close()
            except Exception:
                log.exception("session %d: closing the C bulk copies", self.id)
            self.bulk_c = None
        if self.lane_offer is not None:
            self.lane_offer.close_endpoints()
        try:
            self.ep.close(timeout=0.5)
        except Exception:
            pass
        self._lanes_close()

    def cleanup(self) -> None:
        self._end_transport()           # (done already after a bye)
        if self.serve_c is not None and self.trace_dir and self.ready:
            try:
                self._write_trace()
            except Exception:
                log.exception("session %d: writing the frame trace to %s", self.id, self.trace_dir)
        if self.serve_c is not None:
            self.serve_c.detach()
        if self.disp is not None:
            self.disp.graph_flush()     # (while the CUDA context exists)
        self.disp = None
        es, self.es = self.es, None
        if es is None:
            return
        fs, self._gds_files = self._gds_files, None
        if fs is not None:
            try:   # reads in flight end (and release their streams) before anything is freed
                fs.close()
            except Exception:
                log.exception("session %d: closing file reads", self.id)
        try:
            for kind in ("function", "module", "event", "stream"):
                tab = self.tables[kind]
                for hid, obj in list(tab.items()):
                    try:
                        if kind == "module":
                            es.cuModuleUnload(obj)
                        elif kind == "event":
                            es.cuEventDestroy(obj)
                        elif kind == "stream":
                            es.cuStreamDestroy(obj)
                    except Exception:
                        pass
                tab.clear()
            self._hostmap_close(es)
            for addr, (size, obj) in list(self.hosts.items()):
                try:
                    es.host_free(obj)
                except Exception:
                    pass
            self.hosts.clear()
            es.mm.release_all()
        finally:
            try:
                es.close()
            except Exception:
                log.exception("session %d: executor close", self.id)
        log.info("session %d (%s) ended%s", self.id, self.peer,
                 f": {self.closed_reason}" if self.closed_reason else "")

    # ------------------------------------------------------------------ translation / validation (dispatch)
    def _lookup(self, kind: str, hid: int, optional: bool):
        if hid == 0:
            if optional:
                return None
            raise fail(P.CUDA_ERROR_INVALID_HANDLE, f"NULL {kind}")
        obj = self.tables[kind].get(hid)
        if obj is None:
            raise fail(P.CUDA_ERROR_INVALID_HANDLE, f"{kind} {hid:#x} is not a live {kind} of this session")
        return obj

    def h_stream(self, hid: int, optional: bool):
        if hid in (P.STREAM_LEGACY, P.STREAM_PER_THREAD):
            return self.es.special_stream(hid) if hasattr(self.es, "special_stream") else None
        return self._lookup("stream", hid, optional)

    def h_event(self, hid: int, optional: bool):
        return self._lookup("event", hid, optional)

    def h_module(self, hid: int, optional: bool):
        return self._lookup("module", hid, optional)

    def h_function(self, hid: int, optional: bool):
        return self._lookup("function", hid, optional)

    def h_context(self, hid: int, optional: bool):
        if hid == 0 and optional:
            return None
        if hid != self.ctx_id:
            raise fail(P.CUDA_ERROR_INVALID_CONTEXT, f"context {hid:#x} is not this session's context")
        return hid

    def h_device(self, hid: int, optional: bool):
        if not 0 <= hid < self.server.executor.device_count():
            raise fail(P.CUDA_ERROR_INVALID_DEVICE, f"device {hid} does not exist")
        return hid

    def h_hostptr(self, addr: int, optional: bool, mode: str):
        if addr == 0 and optional:
            return None
        if mode == "register":
            return addr
        ent = self.hosts.get(addr)
        if ent is None:
            raise fail(P.CUDA_ERROR_INVALID_VALUE if mode == "lookup" else P.CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
                       f"host pointer {addr:#x} is not a pinned/registered range of this session")
        return addr

    def devrange(self, ptr: int, n: int, what: str) -> None:
        if self.mm.find(ptr, n) is None:
            raise fail(P.CUDA_ERROR_INVALID_VALUE,
                       f"{what}: device range {ptr:#x}+{n} is not inside an allocation of this session")

    def devbase(self, ptr: int, what: str) -> None:
        if ptr not in self.mm.sizes:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"{what}: {ptr:#x} is not an allocation of this session")

    def blob_size(self, blob: Any, n: int, what: str) -> None:
        have = blob.nbytes
        if have != n:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"{what}: {have} bytes sent, the call copies {n}")

    def fresh_id(self, kind: str, hid: int) -> None:
        if hid < P.FIRST_CLIENT_HANDLE or any(hid in tab for tab in self.tables.values()):
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"{kind} id {hid:#x} is reserved or already in use")
        self._room(f"a new {kind}")

    def _room(self, what: str) -> None:
        """rpc_session_max_objects: refuse one more handle or allocation past the limit."""
        cap = self.max_objects
        if not cap:
            return
        n = sum(len(tab) for tab in self.tables.values()) + len(self.hosts)
        if self.mm is not None:
            n += len(self.mm.starts) + len(self.mm.external)
        if n >= cap:
            raise fail(P.CUDA_ERROR_OUT_OF_MEMORY,
                       f"{what}: this session already holds {n} handles and allocations, the server's limit "
                       f"(rpc_session_max_objects, GPUWIRE_RPC_SESSION_MAX_OBJECTS); free some first")

    def bind(self, kind: str, hid: int, obj: Any, parent: int) -> None:
        self.tables[kind][hid] = obj
        if parent:
            self.parents[hid] = parent
        if self.disp is not None:
            self.disp.bind(kind, hid, obj)

    def releasing(self, kind: str, hid: int) -> None:
        """Before the executor releases a handle: a module's functions leave the launch-run
        graphs first (no graph may outlive a kernel it launches)."""
        if kind == "module" and self.disp is not None:
            self.disp.graph_flush()

    def unbind(self, kind: str, hid: int) -> None:
        self.tables[kind].pop(hid, None)
        d = self.disp
        if d is not None:
            d.unbind(kind, hid)
        if kind == "module":
            funcs = self.tables["function"]
            for fid in [f for f, p in self.parents.items() if p == hid]:
                funcs.pop(fid, None)
                self.parents.pop(fid, None)
                if d is not None:
                    d.unbind("function", fid)

    # ------------------------------------------------------------------ session-level calls
    def gwSync(self):
        return None

    def gwGetLastError(self):
        r, cid, seq = self.last
        self.last = (0, 0, 0)
        return StatusResult(r, (cid, seq))

    def gwPeekAtLastError(self):
        r, cid, seq = self.last
        return StatusResult(r, (cid, seq))

    def cuInit(self, flags):
        if flags != 0:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "cuInit: Flags must be 0")

    def cuDriverGetVersion(self):
        return self.server.executor.driver_version()

    def cuDeviceGetCount(self):
        return self.server.executor.device_count()

    def cuDeviceGet(self, ordinal):
        if not 0 <= ordinal < self.server.executor.device_count():
            raise fail(P.CUDA_ERROR_INVALID_DEVICE, f"cuDeviceGet: no device {ordinal}")
        return ordinal

    def cuDevicePrimaryCtxRetain(self, dev):
        if dev != self.device:
            raise fail(P.CUDA_ERROR_NOT_SUPPORTED,
                       f"this session runs on device {self.device}; connect with device={dev} for another")
        return self.ctx_id

    def cuDevicePrimaryCtxRelease(self, dev):
        if dev != self.device:
            raise fail(P.CUDA_ERROR_INVALID_DEVICE, f"device {dev} is not this session's device")

    def cuCtxSetCurrent(self, ctx):
        self.ctx_current = ctx is not None

    def cuCtxGetCurrent(self):
        return self.ctx_id if self.ctx_current else 0

    def cuCtxGetDevice(self):
        return self.device

    def cuMemAlloc(self, dptr, bytesize):
        self._room("cuMemAlloc")
        self.mm.alloc(dptr, bytesize)
        if self.disp is not None:
            self.disp.alloc(dptr, bytesize)

    def cuMemFree(self, dptr):
        self.mm.free(dptr)
        if self.disp is not None:
            self.disp.free(dptr)

    def cuMemHostAlloc(self, pp, bytesize, flags):
        if bytesize <= 0 or pp == 0:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostAlloc: bytesize must be > 0")
        if pp in self.hosts:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"cuMemHostAlloc: {pp:#x} is already pinned")
        self._room("cuMemHostAlloc")
        self.hosts[pp] = (bytesize, self.es.host_alloc(bytesize, flags))

    def cuMemFreeHost(self, p):
        size, obj = self.hosts.pop(p)
        self.es.host_free(obj)

    def cuMemHostRegister(self, p, bytesize, flags):
        if bytesize <= 0 or p == 0:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "cuMemHostRegister: empty range")
        self._room("cuMemHostRegister")
        for a, (sz, _o) in self.hosts.items():
            if a < p + bytesize and p < a + sz:
                raise fail(P.CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
                           f"cuMemHostRegister: {p:#x}+{bytesize} overlaps {a:#x}+{sz}")
        self.hosts[p] = (bytesize, self.es.host_alloc(bytesize, flags))

    def cuMemHostUnregister(self, p):
        size, obj = self.hosts.pop(p)
        self.es.host_free(obj)

    # ------------------------------------------------------------------ same-host mapped regions
    def _hostmap_offer(self) -> Optional[Dict[str, str]]:
        """The hello's offer of gwHostMap: this session's descriptor socket, its secret, the
        boot id (the client maps only on the same host)."""
        if not settings.get("rpc_hostmap_offer") or not hasattr(self.es, "host_map"):
            return None
        from . import hostmap
        ok, why = hostmap.supported()
        if not ok:
            log.info("session %d: no same-host mapping (%s)", self.id, why)
            return None
        try:
            self.hostmap = hostmap.Listener()
        except OSError as e:
            log.info("session %d: no same-host mapping (unix socket: %s)", self.id, e)
            return None
        d = self.hostmap.describe()
        d["max_bytes"] = _hostmap_cap()
        return d

    # ------------------------------------------------------------------ bulk lanes
    def _lanes_offer(self, want: Any) -> Optional[Dict[str, Any]]:
        """The hello's offer of bulk lanes (gpuwire.rpc.lanes), when the client asks for some."""
        try:
            n = int(want or 0)
        except (TypeError, ValueError, OverflowError):
            return None
        n = min(n, int(settings.get("rpc_lanes_max")), _lanes.MAX_LANES)
        if n <= 0:
            return None
        try:
            self.lane_offer = _lanes.Offer(self.server.ctx, self.server.host, n,
                                           max(1, int(settings.get("rpc_lane_min"))),
                                           float(settings.get("rpc_lane_wait_s")))
        except Exception as e:
            log.warning("session %d: no bulk lanes (%s)", self.id, e)
            return None
        return self.lane_offer.describe()

    def gwBulkLanes(self, count):
        lo = self.lane_offer
        if lo is None:
            raise fail(P.CUDA_ERROR_NOT_SUPPORTED, "gwBulkLanes: this session offered no bulk lanes")
        if self.lane_eps:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "gwBulkLanes: the lanes are in use already")
        if count != lo.n:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwBulkLanes: {count} lanes, the session offered {lo.n}")
        try:
            eps = lo.wait(float(settings.get("rpc_lane_wait_s")))
        except _lanes.LaneError as e:
            log.warning("session %d: %s", self.id, e)
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwBulkLanes: {e}") from None
        if self.bulk_c is not None:
            self.bulk_c.set_lanes([ep.c_bulk_entry() for ep in eps], lo.lane_min)
        if self.serve_c is not None:        # (its pushes of lane size go to Python, which routes them)
            self.serve_c.v.lane_min = lo.lane_min
        self.lane_min = lo.lane_min
        self.lane_eps = eps
        self._place()                       # (the lanes' progress threads started on this thread's CPU)
        log.info("session %d: %d bulk lanes (payloads of %d B or more)", self.id, len(eps), lo.lane_min)

    def _lanes_close(self) -> None:
        lo, self.lane_offer = self.lane_offer, None
        self.lane_eps = []
        if lo is not None:
            lo.close()

    def gwHostMap(self, bytesize, key):
        from . import hostmap
        if self.hostmap is None:
            raise fail(P.CUDA_ERROR_NOT_SUPPORTED, "gwHostMap: this session offers no same-host mapping")
        if bytesize <= 0:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, "gwHostMap: bytesize must be > 0")
        cap = _hostmap_cap()
        have = sum(self.mm.external.values())
        if have + bytesize > cap:
            raise fail(P.CUDA_ERROR_OUT_OF_MEMORY,
                       f"gwHostMap: {bytesize} B more would exceed the session's {cap} B of mapped client "
                       f"memory (rpc_hostmap_max_gib; {have} B mapped)")
        try:
            fd = self.hostmap.take(key, bytesize, float(settings.get("rpc_hostmap_wait_s")))
            try:
                span = hostmap.check_fd(fd, bytesize)
                m = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        except hostmap.HostMapError as e:
            log.warning("session %d: gwHostMap(key %d) refused: %s", self.id, key, e)
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwHostMap(key {key}): {e}") from None
        except OSError as e:
            raise fail(P.CURESULT["CUDA_ERROR_OPERATING_SYSTEM"], f"gwHostMap(key {key}): mmap: {e}") from None
        try:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            dptr, token = self.es.host_map(addr, span)
        except BaseException:
            m.close()
            raise
        try:
            self.mm.add_external(dptr, bytesize)
        except BaseException:
            self.es.host_unmap(token)
            m.close()
            raise
        if self.disp is not None:
            self.disp.alloc(dptr, bytesize)
        self.hostmaps[dptr] = (m, token)
        return dptr

    def gwHostUnmap(self, dptr):
        ent = self.hostmaps.pop(dptr, None)
        if ent is None:
            raise fail(P.CUDA_ERROR_INVALID_VALUE, f"gwHostUnmap: {dptr:#x} is not a mapping of this session")
        self._unmap(dptr, ent, self.es)

    def _unmap(self, dptr: int, ent: Tuple[Any, Any], es: Any) -> None:
        m, token = ent
        self.mm.remove_external(dptr)
        if self.disp is not None:
            self.disp.free(dptr)
        es.host_unmap(token)      # (waits for the work that may still use it)
        try:
            m.close()
        except BufferError:       # a view is still alive somewhere: the mapping goes with it
            pass

    def _hostmap_close(self, es: Any) -> None:
        for dptr, ent in list(self.hostmaps.items()):
            try:
                self._unmap(dptr, ent, es)
            except Exception:
                log.exception("session %d: unmapping %#x", self.id, dptr)
        self.hostmaps.clear()
        if self.hostmap is not None:
            self.hostmap.close()
            self.hostmap = None

    # ------------------------------------------------------------------ gds file reads (spec ids 60-69)
    # The work is gpuwire.gds.service.FileService's (paths checked against --data-root, kvikio /
    # posix+h2d / host engines); here only errors become CUresults with the path in the message.
    def _gds(self, fn, *args):
        try:
            fs = self._gds_files
            if fs is None:
                from ..gds.service import FileService
                fs = self._gds_files = FileService(self.server.data_roots, self.es)
            return fn(fs, *args)
        except CudaCallError:
            raise
        except Exception as e:
            from ..gds.service import error_code, error_text
            raise fail(error_code(e), error_text(e)) from None

    def _gds_error(self) -> None:
        """A file read that failed on the session's read workers becomes the deferred error
        this sync reply reports (the message names the file)."""
        got = self._gds_files.take_error()
        if got is not None:
            call, text, code, cseq, later = got
            cid = next((c for c, e in _table().items() if e.call.name == call), 0)
            self.latch = [code, cid, 0, 0, cseq, later, f"{call}(...): {text}"[:2000]]

    def gwFileRead(self, dst, path, offset, nbytes, stream):
        from ..gds.service import decode_path
        seq = self.call_seq - 1
        self._gds(lambda fs: fs.read(dst, decode_path(path), offset, nbytes, stream, seq))

    def gwFileReadV(self, requests, nbytes, count, stream):
        def run(fs):   # the list is parsed, checked and planned by gds (each destination: devrange)
            data = requests.read() if hasattr(requests, "read") else requests
            fs.read_packed(data, count, stream, seq, check_dst=self.devrange)
        seq = self.call_seq - 1
        self._gds(run)

    def gwFileStat(self, path):
        from ..gds.service import decode_path
        return self._gds(lambda fs: fs.stat(decode_path(path)))

    def gwFileBackend(self):
        return self._gds(lambda fs: fs.describe())


# ----------------------------------------------------------------------------- server

_VA_MAX = 1 << 47     # a session's VA range at most (a process's user address space)


def _hostmap_cap() -> int:
    """Bytes of client memory one session may have mapped (rpc_hostmap_max_gib)."""
    return int(float(settings.get("rpc_hostmap_max_gib")) * (1 << 30))


# the acceptor re-makes the spare worker once no request came for this long: not while the last
# client's connect (hello, lanes) or a close runs (on the 2-core CPU box, re-making it right after
# a request doubled the client's close time; after 50 ms, connect and close were as fast as with
# one shared worker when clients came 0.3 s apart)
_SPARE_IDLE_S = 0.05


def _read_token(token: Optional[str], token_file: Optional[str]) -> Optional[bytes]:
    if token_file:
        with open(token_file, "rb") as f:
            data = f.read().strip()
        if not data:
            raise ValueError(f"token file {token_file} is empty")
        return data
    if token:
        return token.encode()
    return None


class Server:
    """A gpuwire RPC server.

    ``isolation``: ``"thread"`` runs every session on a thread of this process;
    ``"process"`` hands every authenticated client to a session worker process of its
    own (a redirect in the hello reply), so a GPU fault, which poisons every CUDA
    context of the process it happens in, only ends that client's session. The
    default is process for the GPU executor and thread for the CPU executor."""

    def __init__(self, listen: str = f"0.0.0.0:{DEFAULT_PORT}", executor: str = "cpu",
                 token: Optional[str] = None, token_file: Optional[str] = None, no_auth: bool = False,
                 device: int = 0, data_roots: Sequence[str] = (), tls: Optional[str] = None,
                 va_gib: Optional[float] = None, executor_obj: Optional[Executor] = None,
                 isolation: Optional[str] = None, single: bool = False, cpu_kernels: Sequence[str] = (),
                 **exec_kw: Any):
        self.token = _read_token(token, token_file)
        if self.token is None and not no_auth:
            env = settings.get("rpc_token")
            if env:
                self.token = env.encode()
            else:
                raise ValueError("refusing to serve without a token: pass --token, --token-file or set "
                                 "GPUWIRE_RPC_TOKEN (or --no-auth on a trusted network)")
        if isolation is None:
            isolation = "process" if executor == "gpu" and executor_obj is None else "thread"
        if isolation not in ("thread", "process"):
            raise ValueError(f"isolation must be thread or process, not {isolation!r}")
        self.isolation = isolation
        self.single = single
        self.cpus = set(os.sched_getaffinity(0))   # (rpc_server_session_cpu places threads within these)
        self.home_cpus: Optional[set] = None        # a session worker started elsewhere: where it serves
        self.spawn_cpus: frozenset = frozenset()
        if isolation == "process":
            self.spawn_cpus = settings.get("rpc_worker_spawn_cpus")
            bad = set(self.spawn_cpus) - set(range(os.cpu_count() or 1))
            if bad:
                raise ValueError(f"rpc_worker_spawn_cpus (GPUWIRE_RPC_WORKER_SPAWN_CPUS): CPUs {sorted(bad)} do "
                                 f"not exist on this machine (CPUs 0-{(os.cpu_count() or 1) - 1})")
        self.listen_addr = listen
        self.default_device = device
        self.data_roots = list(data_roots)
        if self.data_roots:  # a missing --data-root fails at start (gds/roots.py checks every read)
            from ..gds.roots import DataRoots
            self.data_roots = DataRoots(self.data_roots).roots
        self.executor_kind = executor_obj.kind if executor_obj is not None else executor
        self.cpu_kernels = list(cpu_kernels)
        self.va_gib = va_gib if va_gib is not None else settings.get("rpc_va_gib")
        # (bad values fail here, at start, not at every client's hello)
        try:
            va_bytes = float(self.va_gib) * (1 << 30)
        except (TypeError, ValueError):
            va_bytes = float("nan")
        if not 0 < va_bytes <= _VA_MAX:
            raise ValueError(f"va_gib (--va-gib, GPUWIRE_RPC_VA_GIB) must be above 0 and at most "
                             f"{_VA_MAX >> 30} GiB (a process's address space), got {self.va_gib!r}")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise ValueError(f"device (--device) must be a device ordinal (0, 1, ...), got {device!r}")
        self.exec_kw = dict(exec_kw)
        tls = settings.get("rpc_tls") if tls is None else tls
        self.tls = tls
        self.pool: Optional[WorkerPool] = None
        host, port = t.parse_hostport(listen, default_port=DEFAULT_PORT)
        try:                                # (in use, not an address here: fail before the executor starts)
            t.check_listen(host, port)
        except t.TransportError as e:
            raise ValueError(f"cannot {e}") from None
        if executor == "gpu" and executor_obj is None:
            try:  # fail at start, not at the first connect (importing initialises nothing)
                from cuda.bindings import driver  # noqa: F401
            except ImportError as e:
                raise ValueError(f"--executor gpu needs cuda.bindings (pip install 'gpuwire[gpu]'): {e}; "
                                 f"use --executor cpu on a machine without a GPU") from None
        if isolation == "process":
            self.executor = None
            self.va_size = 0
        else:
            if executor_obj is not None:
                self.executor = executor_obj
            else:
                try:
                    self.executor = make_executor(executor, **exec_kw)
                except RuntimeError as e:      # (no driver, no device: the executor says which)
                    raise ValueError(f"--executor {executor}: {e}") from None
            self.va_size = int(self.va_gib * (1 << 30))
            self.va_size = max(self.va_size // self.executor.granularity, 1) * self.executor.granularity
            try:
                if not device < self.executor.device_count():
                    raise ValueError(f"device (--device) {device}: the {self.executor_kind} executor has "
                                     f"{self.executor.device_count()} device(s)")
                chk = getattr(self.executor, "check_va", None)
                if chk is not None:
                    chk(self.va_size)
            except BaseException:
                self.executor.close()
                raise
        _table()  # generate the dispatch now, not at the first hello
        try:
            self.ctx = t.Context({"TLS": tls} if tls else None)
        except t.TransportError as e:
            if self.executor is not None and executor_obj is None:
                self.executor.close()
            raise ValueError(f"cannot start the transport{f' (UCX_TLS {tls!r})' if tls else ''}: {e}") from None
        # The listener's worker: it only takes connection requests. Every connection is accepted
        # on a transport worker of its own (_session_worker), closed when its session ends: the
        # connections of one worker are told apart by an id the sending peer writes, so sessions
        # sharing one could be reached by each other's peers (docs/protocol.md "Security").
        self.worker = self.ctx.worker()
        serving = single or isolation == "thread"
        spin = float(settings.get("rpc_server_spin_us"))
        # the session threads wait on their workers (the pre-hello connections of process
        # isolation only redirect: the transport's defaults)
        self._session_spin: Optional[float] = spin if spin >= 0 and serving else None
        # a worker's progress thread drives its big transfers while the session thread handles
        # frames (not for process isolation's redirecting connections: they move no payloads)
        self._session_pump = bool(settings.get("rpc_server_progress_thread")) and serving
        self.host = host
        try:
            self.listener = self.worker.listen(host, port, handoff=True)
        except t.TransportError as e:
            self.worker.close()
            self.ctx.close()
            if self.executor is not None and executor_obj is None:
                self.executor.close()
            raise ValueError(f"cannot {e}") from None
        self.address = self.listener.address
        self.port = self.listener.port
        self.sessions: Dict[int, ServerSession] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # session threads still accepting their connection: sid -> [thread, worker or None]
        self._accepting: Dict[int, List[Any]] = {}
        self.ended = 0
        self.served = 0
        # a worker made (and warmed) ahead, so a client's connect waits for neither: making one
        # costs ~20 ms on the 2-core CPU box (two UCX workers), and UCX's protocol selection on a
        # worker's first accepted connection ~30 ms more (_warm). Re-made in the background once
        # the acceptor is idle (_spare_thread)
        self._spare: Optional[t.Worker] = None
        self._warmer: Optional[t.Worker] = None
        self._spare_thread: Optional[threading.Thread] = None
        self._refill_spare()
        if isolation == "process":
            self.pool = WorkerPool(self, int(settings.get("rpc_worker_pool")))

    def serve_forever(self, poll_s: float = 0.002) -> None:
        """Accept clients until :meth:`shutdown` (or SIGINT/SIGTERM in the CLI)."""
        lst = self.listener
        idle = 0
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    req = lst.accept_request(timeout=0)
                except t.OperationTimeout:
                    idle += 1
                    if self._spare is None and not self.served and time.monotonic() - last >= _SPARE_IDLE_S:
                        self._start_refill()       # (idle: off the clients' paths)
                    # poll fast right after activity, then settle
                    time.sleep(poll_s if idle < 500 else 0.02)
                    continue
                except t.TransportError as e:
                    if self._stop.is_set():
                        break
                    log.warning("accept: %s", e)
                    continue
                idle = 0
                last = time.monotonic()
                if self.single:
                    self._run_single(req)
                    if self.served:
                        break
                else:
                    self._start_session(req)
        finally:
            self._close()

    def _session_worker(self) -> t.Worker:
        """A transport worker for one session's connection, with the server's worker settings
        (rpc_server_spin_us, rpc_server_progress_thread)."""
        w = self.ctx.worker()
        try:
            if self._session_spin is not None:
                w.spin_us = self._session_spin
            if self._session_pump:
                w.start_progress_thread()
        except BaseException:
            w.close()
            raise
        return w

    def _take_spare(self) -> Optional[t.Worker]:
        with self._lock:
            w, self._spare = self._spare, None
        return w

    def _start_refill(self) -> None:
        th = self._spare_thread
        if th is not None and th.is_alive():
            return
        th = threading.Thread(target=self._refill_spare, name="gpuwire-spare-worker", daemon=True)
        self._spare_thread = th
        th.start()

    def _refill_spare(self) -> None:
        """Make (and warm) the spare session worker, unless one is there."""
        if self._spare is not None or self._stop.is_set():
            return
        try:
            w: Optional[t.Worker] = self._session_worker()
        except Exception as e:
            log.warning("spare session worker: %s (each session makes its own)", e)
            time.sleep(0.05)
            return
        try:
            if not self._warm(w):
                w.close()
                return
        except Exception:   # pragma: no cover - a bug; the spare goes unwarmed
            log.exception("warming the spare session worker")
        with self._lock:
            if self._spare is None and not self._stop.is_set():
                self._spare, w = w, None
        if w is not None:
            w.close()

    def _warm(self, w: t.Worker) -> bool:
        """Accept one connection on ``w`` before a client's: UCX's protocol selection for a worker's
        first connection accepted from a listener (~30 ms on the CPU box; with UCX_PROTO_ENABLE=n
        none) then happens here, off the client's connect. The warm-up client is a worker of the
        server's own (_warmer) connecting to a one-shot handoff listener of that worker on the
        loopback: ``w`` never listens itself. False: a connection that is not the server's own
        came in on ``w`` instead (the ids do not match): ``w`` must be discarded. A warm-up that
        cannot be done leaves ``w`` cold but untouched (True)."""
        try:
            if self._warmer is None:
                self._warmer = self.ctx.worker()
            h = self._warmer
            lst = h.listen("127.0.0.1", 0, handoff=True)
        except Exception as e:
            log.debug("no warm-up of the spare session worker: %s", e)
            return True
        got: Dict[str, Any] = {}

        def connect() -> None:
            try:
                got["c"] = h.connect("127.0.0.1", lst.port, timeout=5.0)
            except Exception as e:     # (the accept below says what went wrong)
                got["err"] = e
        th = threading.Thread(target=connect, name="gpuwire-warm-up", daemon=True)
        th.start()
        ep = None
        try:
            ep = lst.accept_request(timeout=5.0).accept(w, timeout=5.0)
        except Exception as e:
            log.debug("warm-up of the spare session worker: %s", e)
        finally:
            lst.close()
            th.join(10)
        c = got.get("c")
        ours = ep is None or (c is not None and c.id == ep.remote_id and c.remote_id == ep.id)
        # goodbye: the client's side closes first (flush, BYE); w's side then closes forced: its
        # data endpoint (error mode NONE) goes with w, which lives no longer than its session
        if c is not None:
            c.close(timeout=0.5)
        if ep is not None:
            if ours:
                ep.wait_peer_close(0.5)
            ep.close(timeout=0.2, force=True)
        if not ours:
            log.warning("warm-up of the spare session worker: a connection that is not the server's own (%s) "
                        "came in on it; discarded", ep.peer if ep is not None else "?")
        return ours

    def _accept_on(self, req: t.ConnRequest, w: t.Worker, sid: int) -> Optional[t.Endpoint]:
        """The request's connection on ``w`` (its handshake waited for up to the transport's
        connect timeout, in the calling session thread: a slow client stalls no one else)."""
        try:
            return req.accept(w)
        except Exception as e:
            log.info("session %d (%s): connection not established: %s", sid, req.client or "?", e)
            return None

    def _run_single(self, req: t.ConnRequest) -> None:
        """Session worker: run the connection here; stop after one authenticated session."""
        if self.home_cpus:
            self._go_home()
        sid = next(self._ids)
        w = self._take_spare()
        try:
            if w is None:
                try:
                    w = self._session_worker()
                except t.TransportError as e:
                    log.warning("session %d: no transport worker: %s", sid, e)
                    req.reject()
                    return
            ep = self._accept_on(req, w, sid)
            if ep is None:
                return
            s = ServerSession(self, ep, sid)
            with self._lock:
                self.sessions[s.id] = s
            s.thread = threading.current_thread()
            s.run()
            if s.ready:
                self.served += 1
        finally:
            if w is not None:
                w.close()

    def _go_home(self) -> None:
        """A worker started on rpc_worker_spawn_cpus: every thread of it onto the server's
        CPUs before the session runs (its session thread's placement is within those)."""
        home, self.home_cpus = set(self.home_cpus), None
        try:
            place_threads(home, home)
            self.cpus = home
        except ValueError as e:
            log.warning("session worker: could not move to the server's CPUs %s: %s", sorted(home), e)

    def _start_session(self, req: t.ConnRequest) -> None:
        sid = next(self._ids)
        w = self._take_spare()
        th = threading.Thread(target=self._session_main, args=(req, w, sid), name=f"gpuwire-session-{sid}",
                              daemon=True)
        with self._lock:
            self._accepting[sid] = [th, w]
        th.start()

    def _session_main(self, req: t.ConnRequest, w: Optional[t.Worker], sid: int) -> None:
        """A session thread: its connection accepted on a worker of its own (the spare, or one
        made here), the session run, then the worker closed, however the session ended."""
        try:
            if w is None:
                w = self._session_worker()
                with self._lock:
                    if self._stop.is_set():     # (_close did not see this worker: no accept now)
                        req.reject()
                        return
                    self._accepting[sid][1] = w
            ep = self._accept_on(req, w, sid)
            if ep is None:
                return
            s = ServerSession(self, ep, sid)
            s.thread = threading.current_thread()
            with self._lock:
                self._accepting.pop(sid, None)
                self.sessions[sid] = s
                if self._stop.is_set():
                    s.stop = True
            s.run()
        except Exception:   # pragma: no cover - a bug; the server stays
            log.exception("session %d failed to start", sid)
        finally:
            with self._lock:
                self._accepting.pop(sid, None)
            if w is not None:
                w.close()

    def _session_done(self, s: ServerSession) -> None:
        # close the endpoint while the session is still listed: _close joins listed sessions'
        # threads before it destroys the worker (a close racing the destroy aborts)
        with self._lock:
            s.ending = True
        try:
            s.ep.close(timeout=0.5)
        except Exception:
            pass
        with self._lock:
            self.sessions.pop(s.id, None)
            self.ended += 1

    def shutdown(self) -> None:
        self._stop.set()

    def _close(self) -> None:
        self._stop.set()
        try:
            self.listener.close()
        except Exception:
            pass
        if self.pool is not None:
            self.pool.close()
        with self._lock:
            live = list(self.sessions.values())
            accepting = [list(x) for x in self._accepting.values()]
        for th, w in accepting:     # a handshake in progress: ends at once (its worker goes)
            if w is not None:
                try:
                    w.close()
                except Exception:
                    pass
        for s in live:
            s.stop = True
            if getattr(s, "ending", False):
                continue            # its own thread is closing the endpoint
            try:
                s.ep.close(timeout=0.2)
            except Exception:
                pass
        for s in live:
            if s.thread is not None and s.thread is not threading.current_thread():
                s.thread.join(timeout=10)
        for th, w in accepting:
            if th is not threading.current_thread():
                th.join(timeout=10)
        th = self._spare_thread
        if th is not None and th is not threading.current_thread():
            th.join(timeout=15)
        try:
            if self.executor is not None:
                self.executor.close()
        finally:
            spare = self._take_spare()
            if spare is not None:
                spare.close()
            if self._warmer is not None:
                self._warmer.close()
            self.worker.close()
            self.ctx.close()    # (and any session worker still open)


def serve(listen: str, executor: str = "cpu", token: Optional[str] = None, token_file: Optional[str] = None,
          no_auth: bool = False, device: int = 0, data_roots: Sequence[str] = (), tls: Optional[str] = None,
          ready_fd: Any = None, cpu_kernels: Sequence[str] = (), **kw: Any) -> int:
    """Run a server in this process until SIGINT/SIGTERM (the `gpuwire serve` body)."""
    import importlib
    for mod in cpu_kernels:
        try:
            importlib.import_module(mod)
        except Exception as e:     # (a missing or broken module: a start-up error, not a traceback)
            raise ValueError(f"--cpu-kernels {mod}: cannot import it: {type(e).__name__}: {e}") from None
    srv = Server(listen, executor=executor, token=token, token_file=token_file, no_auth=no_auth, device=device,
                 data_roots=data_roots, tls=tls, cpu_kernels=cpu_kernels, **kw)

    def _stop(signum, frame):
        srv.shutdown()

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _stop)
        except ValueError:  # not the main thread
            pass
    desc = srv.executor.describe() if srv.executor is not None else {"device": "one worker process per session"}
    print(f"gpuwire serve: listening on {srv.address} (executor {srv.executor_kind}: "
          f"{desc.get('device', '')}; isolation {srv.isolation}; auth {'token' if srv.token else 'OFF'})",
          flush=True, file=sys.stderr)
    if ready_fd is not None:
        from .._ready import announce
        announce(ready_fd, str(srv.port))   # (stdout: then pointed at stderr)
    try:
        srv.serve_forever()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return 0


# ----------------------------------------------------------------------------- process isolation

class _Worker:
    __slots__ = ("proc", "port", "ticket")

    def __init__(self, proc: subprocess.Popen, port: int, ticket: str):
        self.proc, self.port, self.ticket = proc, port, ticket


class WorkerPool:
    """Session worker processes: each listens on an ephemeral port, serves the one client
    that presents its ticket, and exits when that session ends (so everything the
    session made dies with the process, whatever happened in it)."""

    def __init__(self, server: Server, size: int):
        self.server = server
        self.size = max(0, size)
        self.idle: List[_Worker] = []
        self.handed: List[_Worker] = []
        self.lock = threading.Lock()
        self.closed = False
        self._fill_ev = threading.Event()
        self._filler = threading.Thread(target=self._fill_loop, name="gpuwire-worker-pool", daemon=True)
        self._filler.start()
        self._fill_ev.set()

    def _spawn(self) -> _Worker:
        srv = self.server
        ticket = secrets.token_hex(32)
        cfg = {"executor": srv.executor_kind, "host": srv.host, "ticket": ticket, "va_gib": srv.va_gib,
               "tls": srv.tls, "device": srv.default_device, "data_roots": srv.data_roots,
               "cpu_kernels": srv.cpu_kernels, "exec_kw": srv.exec_kw,
               "log_level": logging.getLevelName(logging.getLogger().level),
               # started on rpc_worker_spawn_cpus: where to serve once its client connects
               "home_cpus": sorted(srv.cpus) if srv.spawn_cpus else None}
        spawn = set(srv.spawn_cpus)
        p = subprocess.Popen([sys.executable, "-m", "gpuwire.rpc.server", "--worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        if spawn:   # (the worker starts no thread before it reads its config, written below; its
            try:    # threads inherit this. No preexec_fn: not safe in this threaded process)
                os.sched_setaffinity(p.pid, spawn)
            except OSError as e:
                log.warning("session worker: rpc_worker_spawn_cpus %s not applied: %s", sorted(spawn), e)
        p.stdin.write(json.dumps(cfg) + "\n")
        p.stdin.flush()
        line = p.stdout.readline()
        if not line.strip().isdigit():
            p.kill()
            p.wait()
            raise RuntimeError(f"session worker failed to start (rc {p.returncode}): {line.strip()!r}")
        return _Worker(p, int(line), ticket)

    def _fill_loop(self) -> None:
        while not self.closed:
            self._fill_ev.wait(1.0)
            self._fill_ev.clear()
            self.reap()
            while not self.closed:
                with self.lock:
                    if len(self.idle) >= self.size:
                        break
                try:
                    w = self._spawn()
                except Exception as e:
                    log.error("session worker: %s", e)
                    time.sleep(1.0)
                    break
                with self.lock:
                    if self.closed:
                        _stop_worker(w)
                        return
                    self.idle.append(w)

    def take(self) -> _Worker:
        with self.lock:
            while self.idle:
                w = self.idle.pop(0)
                if w.proc.poll() is None:
                    break
            else:
                w = None
        if w is None:
            w = self._spawn()
        try:
            w.proc.stdin.write("claimed\n")
            w.proc.stdin.flush()
        except OSError:
            pass
        with self.lock:
            self.handed.append(w)
        self._fill_ev.set()
        return w

    def reap(self) -> None:
        with self.lock:
            self.handed = [w for w in self.handed if w.proc.poll() is None]
            self.idle = [w for w in self.idle if w.proc.poll() is None]

    def close(self) -> None:
        self.closed = True
        self._fill_ev.set()
        with self.lock:
            ws = self.idle + self.handed
            self.idle, self.handed = [], []
        for w in ws:
            try:
                w.proc.terminate()
            except OSError:
                pass
        for w in ws:
            try:
                w.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


def _stop_worker(w: _Worker) -> None:
    try:
        w.proc.terminate()
        w.proc.wait(timeout=10)
    except Exception:
        w.proc.kill()


def worker_main() -> int:
    """``python -m gpuwire.rpc.server --worker``: one session in its own process."""
    cfg = json.loads(sys.stdin.readline())
    logging.basicConfig(level=getattr(logging, str(cfg.get("log_level", "WARNING")).upper(), logging.WARNING),
                        stream=sys.stderr, format="%(asctime)s %(name)s[worker %(process)d] %(levelname)s %(message)s")
    import importlib
    for mod in cfg.get("cpu_kernels") or []:
        importlib.import_module(mod)
    srv = Server(f"{cfg['host']}:0" if ":" not in cfg["host"] else f"[{cfg['host']}]:0",
                 executor=cfg["executor"], token=cfg["ticket"], device=cfg.get("device", 0),
                 data_roots=cfg.get("data_roots") or [], tls=cfg.get("tls"), va_gib=cfg.get("va_gib"),
                 isolation="thread", single=True, **(cfg.get("exec_kw") or {}))
    if cfg.get("home_cpus"):
        srv.home_cpus = set(cfg["home_cpus"])

    def _stop(signum, frame):
        srv.shutdown()
        for s in list(srv.sessions.values()):
            s.stop = True
            try:
                s.ep.close(timeout=0.2)
            except Exception:
                pass

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _watch_parent():
        claim_s = float(settings.get("rpc_worker_claim_s"))
        for line in sys.stdin:
            if line.strip() == "claimed":
                def _expire():
                    if not srv.served and not any(x.ready for x in list(srv.sessions.values())):
                        log.warning("session worker: the client did not come within %.0f s", claim_s)
                        srv.shutdown()
                threading.Timer(claim_s, _expire).start()
        # the parent went away: stop once idle
        if not any(x.ready for x in list(srv.sessions.values())):
            srv.shutdown()

    threading.Thread(target=_watch_parent, daemon=True).start()
    try:
        from .._ready import announce
        announce(sys.stdout, str(srv.port))   # (then stdout points at stderr: the server reads one line)
    except BrokenPipeError:   # the server went away while we started
        return 0
    srv.serve_forever()
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main())
