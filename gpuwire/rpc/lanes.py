"""Bulk lanes: a session's large payloads on extra connections, each driven by its own thread.

Over tcp one connection moves bytes only as fast as one thread on each side copies them
through the kernel (~5-7 GB/s on the GPU box, whoever drives it: ucx_perftest included);
two connections driven by two threads on each side move about twice that (docs/benchmarks.md,
session 7). A session that asks for lanes (client setting ``rpc_bulk_lanes``) gets, per lane,
a UCX worker of its own on both sides, connected through a one-shot listener of the session,
and the worker's progress thread (``Worker.start_progress_thread``) drives it.

Which messages use them (both sides compute the same): the ``k``-th message (chunk) of a bulk
payload of ``n`` bytes tagged ``tag`` travels on lane ``(tag + k) % nlanes`` when
``n >= lane_min`` (the server's ``rpc_lane_min``, sent in its offer), else on the session's
own connection. Frames, replies and small payloads never leave the session's connection.

Set-up (docs/protocol.md "Bulk lanes"):

1. The client's hello asks for ``lanes: N``; the server opens N listeners (ephemeral ports on
   its listen address) and offers ``{"ports", "secret", "min"}`` in its hello reply.
2. The client connects one worker to each port and sends ``secret + lane index`` (TAG_LANE);
   the server checks it (a wrong or late one is refused and closed), starts the lane's
   progress thread and answers ``ok + index``. Each listener takes one connection.
3. The client calls ``gwBulkLanes(N)`` (sync): the session waits for its N lanes, switches its
   payload paths (Python and C) to them and answers; only then does the client use them.

A lane that fails before step 3 fails the connect (naming the lane). After it, a lane that
breaks ends the session on the server (its payload waits raise ConnectionLost) and raises in the
client's next wait on it; however the session ends, its teardown closes every lane.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import transport as t
from . import protocol as P

log = logging.getLogger("gpuwire.rpc.lanes")

MAX_LANES = 8
AUTO_LANES = 4                     # rpc_bulk_lanes=auto off shared memory
LANE_SPIN_US = 200.0               # a lane's progress thread stays awake this long after a transfer
_AUTH = struct.Struct("<16sI")     # secret, lane index
_ACK = struct.Struct("<2sI")       # b"ok", lane index
PUMP_MIN_BYTES = 0                 # what a lane's progress thread drives: every message on it


def lane_of(tag: int, k: int, n: int, nlanes: int, lane_min: int) -> int:
    """The lane of message ``k`` of a payload of ``n`` bytes tagged ``tag``; -1: the session's
    own connection."""
    if nlanes and n >= lane_min:
        return (tag + k) % nlanes
    return -1


class LaneError(Exception):
    pass


class Offer:
    """Server side: ``n`` one-shot listeners of a session and the threads that accept them."""

    def __init__(self, ctx: t.Context, host: str, n: int, lane_min: int, timeout: float):
        self.n = n
        self.lane_min = lane_min
        self.secret = secrets.token_bytes(16)
        self.timeout = timeout
        self.workers: List[t.Worker] = []
        self.listeners: List[t.Listener] = []
        self.eps: List[Optional[t.Endpoint]] = [None] * n
        self.errors: List[str] = []
        self._done = threading.Semaphore(0)
        self._closed = False
        self._threads: List[threading.Thread] = []
        try:
            for _ in range(n):
                w = ctx.worker()
                w.spin_us = LANE_SPIN_US
                self.workers.append(w)
                self.listeners.append(w.listen(host, 0))
        except BaseException:
            self.close()
            raise
        for i in range(n):
            th = threading.Thread(target=self._accept, args=(i,), name=f"gpuwire-lane-{i}", daemon=True)
            self._threads.append(th)
            th.start()

    def describe(self) -> Dict[str, Any]:
        return {"ports": [lst.port for lst in self.listeners], "secret": self.secret.hex(), "min": self.lane_min}

    def _slices(self, op, what: str):
        """``op(timeout)`` in short slices until it succeeds, the offer's time runs out or the
        offer is closed (a closed offer's threads must end before its workers go)."""
        end = time.monotonic() + self.timeout
        while True:
            if self._closed:
                raise LaneError("the session ended")
            try:
                return op(min(0.1, max(0.001, end - time.monotonic())))
            except t.OperationTimeout:
                if time.monotonic() >= end:
                    raise LaneError(f"no {what} within {self.timeout:g} s") from None

    def _accept(self, i: int) -> None:
        lst, w = self.listeners[i], self.workers[i]
        ep = None
        try:
            ep = self._slices(lambda tmo: lst.accept(timeout=tmo), "connection")
            buf = bytearray(_AUTH.size + 16)
            r = self._slices(lambda tmo: ep.recv(buf, tag=P.TAG_LANE, tag_mask=t.EXACT_TAG, timeout=tmo),
                             "lane hello")
            if r.nbytes != _AUTH.size:
                raise LaneError(f"lane {i}: hello of {r.nbytes} B, expected {_AUTH.size}")
            sec, idx = _AUTH.unpack_from(buf, 0)
            if not hmac.compare_digest(sec, self.secret) or idx != i:
                raise LaneError(f"lane {i}: wrong secret or lane index from {ep.peer}")
            w.start_progress_thread(PUMP_MIN_BYTES)
            ep.send(_ACK.pack(b"ok", i), tag=P.TAG_LANE, timeout=self.timeout)
            self.eps[i] = ep
            ep = None
        except Exception as e:  # refused, timed out, or the offer was closed
            if not self._closed:
                log.warning("bulk lane %d: %s", i, e)
                self.errors.append(f"lane {i}: {e}")
        finally:
            if ep is not None:
                try:
                    ep.close(timeout=0.2)
                except Exception:
                    pass
            try:
                lst.close()      # one connection per lane: nobody else gets in
            except Exception:
                pass
            self._done.release()

    def wait(self, timeout: float) -> List[t.Endpoint]:
        """Every lane connected and authenticated, or LaneError naming what failed."""
        end = time.monotonic() + timeout
        for _ in range(self.n):
            if not self._done.acquire(timeout=max(0.0, end - time.monotonic())):
                raise LaneError(f"bulk lanes: not all {self.n} connected within {timeout:g} s")
        missing = [i for i, ep in enumerate(self.eps) if ep is None]
        if missing:
            raise LaneError("bulk lanes: " + ("; ".join(self.errors) or f"lanes {missing} did not connect"))
        return list(self.eps)  # type: ignore[arg-type]

    def close_endpoints(self) -> None:
        """Close the lanes' endpoints (each a flush, then its BYE) and leave the workers to
        close(): a session's goodbye sends every BYE before the slower teardown of the
        workers (~5-15 ms each). Idempotent."""
        self._closed = True
        for th in self._threads:     # (they end within a slice: nothing may wait in a worker that goes)
            if th is not threading.current_thread():
                th.join(timeout=5.0)
        for lst in self.listeners:
            try:
                lst.close()
            except Exception:
                pass
        close_lanes(self.eps, [])
        self.eps = [None] * self.n

    def close(self) -> None:
        """Close every lane (endpoints, progress threads, workers); idempotent."""
        self.close_endpoints()
        close_lanes([], self.workers)
        self.workers = []


def close_lanes(eps, workers, peer_by: Optional[float] = None) -> None:
    """Close a session's lanes, then their workers (which stops their progress threads).

    The server (``peer_by`` None) closes its ends right after answering the client's bye
    (or when the session ends otherwise): a flush close, whose BYE goes out after the flush.
    The client, once the bye is answered, waits for that BYE until ``peer_by`` (a
    ``time.monotonic()`` deadline for the whole goodbye) and then closes its end forced: it
    flushes nothing, and the lane's data endpoint (error mode NONE, which UCX cannot force)
    goes with its worker right after. So neither side flushes towards a side that is already
    gone: such a flush fails, and UCX logs the failure as an error (docs/protocol.md "Bulk
    lanes": closing)."""
    for ep in eps:
        if ep is None:
            continue
        try:
            if peer_by is not None:
                ep.wait_peer_close(peer_by - time.monotonic())
                ep.close(force=True)
            else:
                ep.close(timeout=0.2)
        except Exception:
            pass
    for w in workers:
        try:
            w.close()       # (closes what is left of its endpoints; stops its progress thread)
        except Exception:
            pass


def connect(ctx: t.Context, host: str, offer: Dict[str, Any], n: int,
            timeout: float) -> Tuple[List[t.Worker], List[t.Endpoint], int]:
    """Client side: connect and authenticate the ``n`` lanes of ``offer`` (the server's hello
    ``lanes``). Returns (workers, endpoints, lane_min); LaneError naming the lane that failed
    (the workers made so far are closed)."""
    ports = list(offer.get("ports") or [])
    try:
        secret = bytes.fromhex(str(offer.get("secret", "")))
        lane_min = int(offer.get("min", 0))
    except (TypeError, ValueError):
        raise LaneError("bulk lanes: malformed offer in the server's hello") from None
    if len(ports) != n or len(secret) != 16 or lane_min <= 0:
        raise LaneError(f"bulk lanes: the server offered {len(ports)} lanes (asked for {n}) or a malformed offer")
    workers: List[t.Worker] = []
    eps: List[t.Endpoint] = []
    try:
        for i, port in enumerate(ports):
            w = ctx.worker()
            w.spin_us = LANE_SPIN_US
            workers.append(w)
            target = f"{host} port {int(port)}"
            try:
                ep = w.connect(host, int(port), timeout=timeout)
                ep.send(_AUTH.pack(secret, i), tag=P.TAG_LANE, timeout=timeout)
                ack = bytearray(_ACK.size)
                r = ep.recv(ack, tag=P.TAG_LANE, tag_mask=t.EXACT_TAG, timeout=timeout)
            except t.TransportError as e:
                raise LaneError(f"bulk lane {i} ({target}): {e}") from None
            if r.nbytes != _ACK.size or _ACK.unpack_from(ack, 0) != (b"ok", i):
                raise LaneError(f"bulk lane {i} ({target}): the server did not acknowledge it")
            w.start_progress_thread(PUMP_MIN_BYTES)
            eps.append(ep)
    except BaseException:
        for w in workers:
            try:
                w.close()
            except Exception:
                pass
        raise
    return workers, eps, lane_min


def wait_requests(reqs: List[Any], main: t.Worker, timeout: Optional[float]) -> list:
    """``Worker.wait_all`` for requests that may belong to several workers (the session's and
    its lanes'); the results in the order of ``reqs``.

    While lane requests are outstanding this thread drives ``main`` (the session's own worker):
    their progress threads move the lanes, but what the other side needs first (the frame that
    announces a payload, queued on ``main``) moves only when someone progresses ``main``."""
    reqs = list(reqs)
    if not reqs:
        return []
    groups: Dict[int, Tuple[t.Worker, List[int]]] = {}
    for i, r in enumerate(reqs):
        w = getattr(r, "worker", None) or main
        groups.setdefault(id(w), (w, []))[1].append(i)
    if len(groups) == 1 and id(main) in groups:
        return main.wait_all(reqs, timeout=timeout)
    end = None if timeout is None else time.monotonic() + timeout
    lane_reqs = [r for r in reqs if (getattr(r, "worker", None) or main) is not main]
    n = 0
    while True:
        main.progress()
        lane_reqs = [r for r in lane_reqs if not r.done()]
        if not lane_reqs:
            break
        n += 1
        if end is not None and (n & 63) == 0 and time.monotonic() > end:
            raise t.OperationTimeout(f"bulk lanes: transfers not done after {timeout}s")
        os.sched_yield()        # (the lanes' progress threads may share this CPU)
    out: List[Any] = [None] * len(reqs)
    for w, idx in groups.values():
        res = w.wait_all([reqs[i] for i in idx], timeout=None if end is None else max(0.0, end - time.monotonic()))
        for i, v in zip(idx, res):
            out[i] = v
    return out
