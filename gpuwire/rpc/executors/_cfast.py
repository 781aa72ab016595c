"""The server's C paths (gpuwire._rpc): frame scan, the hot-call dispatch loop, and the
launch helper. Everything here is optional: without the extension the server runs
the same calls in Python (``available()`` says which)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from .. import protocol as P

try:
    from ... import _rpc
    ffi, lib = _rpc.ffi, _rpc.lib
except ImportError:  # pragma: no cover - depends on the build
    _rpc = ffi = lib = None

# hot calls the C loop runs, with the wire layout it reads them in
HOT = (
    ("cuLaunchKernel", "<QIIIIIIIQ"),
    ("cuMemsetD8Async", "<QBQQ"),
    ("cuMemsetD16Async", "<QHQQ"),
    ("cuMemsetD32Async", "<QIQQ"),
    ("cuMemcpyDtoDAsync", "<QQQQ"),
    ("cuEventRecord", "<QQ"),
    ("cuStreamWaitEvent", "<QQI"),
)
# calls only the C server runs (it answers or pushes), by index: (name, wire layout)
SERVE = {
    7: ("cuMemcpyDtoHAsync", "<QQQ"),
    8: ("cuStreamSynchronize", "<Q"),
    9: ("cuCtxSynchronize", "<"),
}
# driver entry points the C server uses beyond the calls above (keys of driver_fns' result)
QUERY = 100          # cuStreamQuery: wait for a push's copy while driving the transport
KIND = {"stream": 0, "event": 1, "function": 2}


def available() -> bool:
    return lib is not None and lib.gw_rpc_abi() == 3


def _consistent(spec) -> bool:
    """The C code reads the hot calls at fixed offsets: only use it if the spec agrees."""
    if lib is None:
        return False
    if (lib.GW_RPC_TAG_IN_FIRST, lib.GW_RPC_TAG_IN_LAST, lib.GW_RPC_TAG_OUT_FIRST, lib.GW_RPC_TAG_OUT_LAST) != (
            P.TAG_BULK_IN_FIRST, P.TAG_BULK_IN_LAST, P.TAG_BULK_OUT_FIRST, P.TAG_BULK_OUT_LAST):
        return False
    if (lib.GW_RPC_ROUTE_REPLY, lib.GW_RPC_REPLY_INLINE_LIMIT) != (P.ROUTE_REPLY, P.REPLY_INLINE_LIMIT):
        return False
    for name, fmt in HOT + tuple(SERVE.values()):
        c = spec.calls.get(name)
        if c is None or c.wire_format.request != fmt:
            return False
    for name, _fmt in SERVE.values():
        if spec.calls[name].wire_format.reply != "<I":
            return False
    g = spec.calls.get("gwSync")
    return g is not None and g.wire_format.reply == "<I" and g.wire_format.request in ("<", "")


class Scanner:
    """gw_rpc_scan with the call table of the spec."""

    def __init__(self, table: Dict[int, Any]):
        n = max(table) + 1
        self.desc = ffi.new("gw_rpc_desc_t[]", n)
        self.n = n
        for cid, e in table.items():
            d = self.desc[cid]
            d.fixed = e.fixed.size
            d.nvar = e.nvar
            d.nroute = e.nroutes
            d.deferred = 1 if e.call.deferred else 0
            d.valid = 1 if e.nvar <= 4 and e.nroutes <= 4 else 0
        self.err = ffi.new("char[512]")

    def scan(self, frame_c, off: int, end: int, ncalls: int, sync: bool, recs) -> "tuple[int, str]":
        st = lib.gw_rpc_scan(frame_c, off, end, ncalls, 1 if sync else 0, self.desc, self.n, recs, self.err, 512)
        return st, (ffi.string(self.err).decode("utf-8", "replace") if st else "")


class Dispatch:
    """A gw_rpc_sess_t: id tables and the allocation map mirrored from Python, and the
    driver entry points of the hot calls this executor lets C run."""

    def __init__(self, spec, fns: Dict[int, int]):
        self.s = ffi.gc(lib.gw_rpc_sess_new(), lib.gw_rpc_sess_free)
        self.hot_ids = set()
        for which, (name, _fmt) in enumerate(HOT):
            fp = fns.get(which)
            if fp:
                cid = spec.calls[name].id
                lib.gw_rpc_set_call(self.s, which, cid, ffi.cast("void *", fp))
                self.hot_ids.add(cid)
        self.res = ffi.new("int *")
        self.err = ffi.new("char[512]")

    def bind(self, kind: str, hid: int, obj: Any) -> None:
        k = KIND.get(kind)
        if k is None:
            return
        lib.gw_rpc_bind(self.s, k, hid, int(getattr(obj, "ptr", 0) or 0), int(getattr(obj, "size", 0) or 0))
        if k == 2:
            # parameter offsets: C launches with kernelParams (pointers into the frame)
            lay = getattr(obj, "layout", None)
            size = int(getattr(obj, "size", 0) or 0)
            try:
                offs = [int(o) for o, n in (lay or ())]
                ok = offs and all(0 <= o and o + int(n) <= size for o, n in lay)
            except (TypeError, ValueError):
                ok = False
            if ok:
                lib.gw_rpc_bind_params(self.s, hid, ffi.new("uint32_t[]", offs), len(offs))

    def unbind(self, kind: str, hid: int) -> None:
        k = KIND.get(kind)
        if k is not None:
            lib.gw_rpc_unbind(self.s, k, hid)

    def graphs(self, fns: Dict[str, int], min_run: int, cache: int) -> bool:
        """Launch-run graphs (gw_rpc_graph_setup): runs of at least ``min_run`` launches the
        session repeats are replayed as CUDA graphs, ``cache`` runs remembered. ``fns``: the
        graph entry points (:func:`graph_driver_fns`, or :func:`graph_host_fns` for tests).
        False (and off) when one is missing; ``min_run`` 0 turns them off."""
        g = ffi.new("gw_rpc_graph_fns_t *")
        for k in GRAPH_FNS:
            fp = fns.get(k)
            if not fp and min_run:
                lib.gw_rpc_graph_setup(self.s, ffi.NULL, 0, 0)
                return False
            setattr(g, k, ffi.cast("void *", fp or 0))
        return lib.gw_rpc_graph_setup(self.s, g, max(0, int(min_run)), max(0, int(cache))) == 0 and min_run > 0

    def graph_stats(self) -> Dict[str, int]:
        """The launch-run graph counters (GRAPH_STATS order)."""
        return {k: int(lib.gw_rpc_graph_stat(self.s, i)) for i, k in enumerate(GRAPH_STATS)}

    def graph_flush(self) -> None:
        """Destroy the cached graphs (while the CUDA context still exists)."""
        lib.gw_rpc_graph_flush(self.s)

    def alloc(self, start: int, size: int) -> None:
        lib.gw_rpc_alloc_add(self.s, start, size)

    def free(self, start: int) -> None:
        lib.gw_rpc_alloc_del(self.s, start)

    def run(self, frame_c, recs, i: int, n: int) -> "tuple[int, int, str]":
        k = lib.gw_rpc_exec(self.s, frame_c, recs, i, n, self.res, self.err, 512)
        r = self.res[0]
        return k, r, (ffi.string(self.err).decode("utf-8", "replace") if r else "")


class Serve:
    """The C server of one session (gw_rpc_srv_t): the handler the transport's serve loop
    calls for every frame. It answers frames it can run entirely in C and passes the others
    (and the ones whose calls failed, with where to resume) back to Python."""

    def __init__(self, scanner: Scanner, rep_tag: int, nrecs: int = 1024):
        self.v = ffi.new("gw_rpc_srv_t *")
        v = self.v
        self._recs = ffi.new("gw_rpc_rec_t[]", nrecs)
        self._rep = ffi.new("uint8_t[]", 256 + P.REPLY_TAIL_MAX)
        self._tail = ffi.new("uint8_t[]", P.REPLY_TAIL_MAX)     # the reply tail (ROUTE_REPLY)
        self._scratch = None
        self.scanner = scanner      # keeps the call table alive
        v.desc = scanner.desc
        v.ndesc = scanner.n
        v.nrecs = nrecs
        v.recs = self._recs
        v.rep = self._rep
        v.tail, v.tail_cap = self._tail, P.REPLY_TAIL_MAX
        v.rep_tag = rep_tag
        v.enabled = 0
        self.handler = int(lib.gw_rpc_serve_handler_addr())
        self.arg = int(ffi.cast("uintptr_t", v))
        self.disp: Optional[Dispatch] = None
        self._trace = None

    def attach(self, spec, disp: "Dispatch", fns: Dict[int, int], chunk: int, scratch=None,
               progress: "Optional[tuple[int, int]]" = None) -> None:
        """After the hello: the session's dispatch tables and the driver entry points of the
        calls only the C server runs. ``scratch``: (ptr, size) host memory for pushed bytes
        (pinned on the GPU executor), else 1 MiB of our own; pushes alternate between its
        halves as deferred sends (the serve loop's GW_MSG_DEFER). ``progress``: (address of
        the transport's gw_worker_progress, worker pointer): with cuStreamQuery among ``fns``
        a push's copy is awaited while driving the transport."""
        v = self.v
        self.disp = disp
        v.s = disp.s
        v.id_gwsync = spec.calls["gwSync"].id
        for which, (name, _fmt) in SERVE.items():
            v.ids[which] = spec.calls[name].id
            fp = fns.get(which)
            v.fn[which] = ffi.cast("void *", fp) if fp else ffi.NULL
        if scratch is None:
            self._scratch = ffi.new("uint8_t[]", 1 << 20)
            v.scratch, v.scratch_cap = self._scratch, 1 << 20
        else:
            v.scratch, v.scratch_cap = ffi.cast("uint8_t *", scratch[0]), scratch[1]
        v.chunk = chunk or 0
        v.defer = 1
        v.flip = 0
        fq = fns.get(QUERY)
        if progress is not None and fq:
            v.progress = ffi.cast("void *", progress[0])
            v.worker = ffi.cast("void *", progress[1])
            v.fn_query = ffi.cast("void *", fq)

    def detach(self) -> None:
        self.v.enabled = 0
        self.v.s = ffi.NULL
        self.disp = None

    def take_tail(self) -> bytes:
        """The reply-tail bytes the C server wrote for the frame it passed (resume set)."""
        n = int(self.v.tail_n)
        self.v.tail_n = 0
        return bytes(ffi.buffer(self._tail, n)) if n else b""

    TRACE_FIELDS = ("seq", "ncalls", "flags", "npush", "t_in", "t_scan", "t_first", "t_issued", "t_waited",
                    "t_out")

    def trace_on(self, frames: int) -> None:
        """Record per-frame timestamps (``gw_rpc_trace_t``, CLOCK_MONOTONIC ns) of the last
        ``frames`` frames the handler sees (0: off)."""
        v = self.v
        v.trace = ffi.NULL
        v.trace_cap = 0
        v.trace_n = 0
        self._trace = None
        if frames > 0:
            self._trace = ffi.new("gw_rpc_trace_t[]", int(frames))
            v.trace, v.trace_cap = self._trace, int(frames)

    def trace_rows(self) -> "list[tuple]":
        """The recorded frames, oldest first: tuples in TRACE_FIELDS order (0 = not reached;
        flags: 1 sync frame, 2 passed to Python)."""
        v = self.v
        cap, n = int(v.trace_cap), int(v.trace_n)
        if not cap or self._trace is None:
            return []
        out = []
        for i in range(max(0, n - cap), n):
            r = self._trace[i % cap]
            out.append(tuple(int(getattr(r, f)) for f in self.TRACE_FIELDS))
        return out

    def resume(self) -> "Optional[tuple[int, int, str]]":
        v = self.v
        if not v.resume:
            return None
        v.resume = 0
        return v.resume_at, v.resume_res, ffi.string(v.err).decode("utf-8", "replace")


def host_fns(which: Optional[list] = None) -> Dict[int, int]:
    """The C host 'driver' (memsets and copies on host memory) for the CPU executor."""
    out = {}
    for w in (which or []):
        out[w] = int(ffi.cast("uintptr_t", lib.gw_rpc_host_fn(w)))
    return out


class Launcher:
    """cuLaunchKernel through the driver entry point with a packed parameter buffer."""

    def __init__(self, fn: int):
        self.fn = ffi.cast("void *", fn)

    def launch(self, f: int, gx, gy, gz, bx, by, bz, shmem, stream: int, data: Any, n: int) -> int:
        return lib.gw_rpc_launch(self.fn, f, gx, gy, gz, bx, by, bz, shmem, stream,
                                 ffi.from_buffer(data) if n else ffi.NULL, n)


# launch-run graphs: gw_rpc_graph_fns_t's fields and the driver entry points behind them
# (the CUDA 12 ABI: cuGetProcAddress version 12000 gives the _v2 kernel-node calls)
GRAPH_FNS = {"create": "cuGraphCreate", "add_kernel": "cuGraphAddKernelNode",
             "instantiate": "cuGraphInstantiateWithFlags", "launch": "cuGraphLaunch",
             "set_params": "cuGraphExecKernelNodeSetParams", "exec_destroy": "cuGraphExecDestroy",
             "destroy": "cuGraphDestroy"}
GRAPH_STATS = ("runs", "launches", "built", "failed", "updates", "evicted", "flushes")


def _all_procs(d, names: Dict[str, str]) -> Dict[str, int]:
    """key -> entry point of each driver call in ``names`` (key -> name) from cuda.bindings'
    cuGetProcAddress (CUDA 12 ABI); empty if one is missing."""
    out: Dict[str, int] = {}
    for k, name in names.items():
        try:
            r = d.cuGetProcAddress(name.encode(), 12000, d.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT)
        except Exception:
            return {}
        if int(r[0]) != 0 or not int(r[1]):
            return {}
        out[k] = int(r[1])
    return out


def graph_driver_fns(d) -> Dict[str, int]:
    """The graph entry points (empty if one is missing)."""
    return _all_procs(d, GRAPH_FNS)


def graph_host_fns() -> Dict[str, int]:
    """The host graph entry points (a node list replayed through the host cuLaunchKernel)."""
    g = ffi.new("gw_rpc_graph_fns_t *")
    lib.gw_rpc_graph_host_fns(g)
    return {k: int(ffi.cast("uintptr_t", getattr(g, k))) for k in GRAPH_FNS}


def driver_fns(d) -> Dict[int, int]:
    """Entry points of the hot calls from cuda.bindings' cuGetProcAddress."""
    out: Dict[int, int] = {}
    for which, (name, _fmt) in list(enumerate(HOT)) + list(SERVE.items()) + [(QUERY, ("cuStreamQuery", ""))]:
        try:
            r = d.cuGetProcAddress(name.encode(), 12000, d.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT)
            if int(r[0]) == 0 and int(r[1]):
                out[which] = int(r[1])
        except Exception:  # an older binding: leave this call to Python
            continue
    return out


def load(d) -> Optional[Launcher]:
    """The launch helper for the GPU executor (None when the C module is missing)."""
    if not available():
        return None
    fns = driver_fns(d)
    if 0 not in fns:
        return None
    return Launcher(fns[0])


# ----------------------------------------------------------------------------- bulk copies in C

# gw_rpc_bulk_stat's counters in index order (GW_RPC_BS_*): the first six always; the rest
# only while the server traces (rpc_trace_dir; else 0): handler time and calls, then per phase
# (GW_RPC_BPH_*, BULK_PHASES order) <phase>_ns (exclusive: the exclusive times of all phases add
# up to handler_ns), <phase>_n (times entered), <phase>_incl_ns (entry to exit, nested phases included)
BULK_PHASES = ("other", "prescan", "recv_post", "recv_wait", "htod_call", "dtoh_call", "evrec_h2d", "evrec_d2h",
               "evwait_h2d", "evwait_d2h", "send_post", "send_wait", "inflight")
BULK_STATS = ("h2d", "d2h", "frames", "early", "pending", "max_pending", "handler_ns", "handler_calls") + tuple(
    f"{p}{x}" for p in BULK_PHASES for x in ("_ns", "_n", "_incl_ns"))


def bulk_host_fns() -> Dict[str, int]:
    """The host versions of the bulk engine's driver calls (the CPU executor)."""
    return {k: int(ffi.cast("uintptr_t", lib.gw_rpc_bulk_host_fn(i)))
            for i, k in enumerate(("htod", "dtoh", "evrec", "evquery"))}


def bulk_driver_fns(d) -> Dict[str, int]:
    """cuMemcpyHtoDAsync, cuMemcpyDtoHAsync, cuEventRecord, cuEventQuery from cuGetProcAddress
    (an empty dict if one is missing)."""
    return _all_procs(d, {"htod": "cuMemcpyHtoDAsync", "dtoh": "cuMemcpyDtoHAsync", "evrec": "cuEventRecord",
                          "evquery": "cuEventQuery"})


class Bulk:
    """The C server's bulk copies (gw_rpc_bulk_t): wraps a :class:`Serve` handler so that
    frames of async H2D copies (their payloads received into a ring of staging slots, settled
    lazily) and of async D2H copies (copied into the slots and sent from C) run in C. Frames
    it does not run go to the wrapped handler unchanged. ``entry``: the transport's
    ``Endpoint.c_bulk_entry()``; ``res``: the executor's ``c_bulk()`` (slots, events, driver
    entry points)."""

    def __init__(self, serve: Serve, spec, entry: Dict[str, int], res: Dict[str, Any], chunk: int,
                 timeout_s: float, dtoh_min: int = 0, inflight: int = 8 << 20, htod_max: int = 0):
        # the C code reads both copies' fixed parts as '<QQQ' (pointer, ByteCount, stream)
        for name in ("cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync"):
            cl = spec.calls.get(name)
            if cl is None or cl.wire_format.request != "<QQQ" or not cl.deferred:
                raise ValueError(f"bulk copies: {name} is not the deferred '<QQQ' call the C code reads")
        c = ffi.new("gw_rpc_bulk_cfg_t *")
        c.srv = serve.v
        for k in ("recv", "send", "wait", "test", "info", "release", "progress", "worker", "conn"):
            setattr(c, k, ffi.cast("void *", entry[k]))
        c.timeout_ns = int(max(timeout_s, 0.001) * 1e9)
        fns = res["fns"]
        for k in ("htod", "dtoh", "evrec", "evquery"):
            setattr(c, k, ffi.cast("void *", fns[k]))
        c.id_htod = spec.calls["cuMemcpyHtoDAsync"].id
        c.id_dtoh = spec.calls["cuMemcpyDtoHAsync"].id
        slots, evs = list(res["slots"]), list(res["events"])
        if not 2 <= len(slots) <= lib.GW_RPC_BULK_MAXSLOTS or len(evs) != len(slots):
            raise ValueError(f"bulk copies: {len(slots)} staging slots (2..{lib.GW_RPC_BULK_MAXSLOTS})")
        c.nslots = len(slots)
        c.slot_size = int(res["slot_size"])
        c.chunk = int(chunk or 0)
        c.dtoh_min = int(dtoh_min) if dtoh_min > 0 else (1 << 63)   # 0: D2H frames are never taken
        c.inflight = max(1, int(inflight))
        c.htod_max = int(htod_max) if htod_max > 0 else (1 << 63)     # 0: no limit
        for i, (p, e) in enumerate(zip(slots, evs)):
            c.slot[i] = ffi.cast("uint8_t *", int(p))
            c.ev[i] = ffi.cast("void *", int(e))
        b = lib.gw_rpc_bulk_new(c)
        if b == ffi.NULL:
            raise ValueError("bulk copies: gw_rpc_bulk_new refused the configuration")
        self.b = b
        self.cfg = c
        self.res = res                 # keeps the slots alive (host memory of the CPU executor)
        self.serve = serve
        self.nslots = len(slots)
        self._late = ffi.new("gw_rpc_late_t[]", lib.GW_RPC_BULK_MAXLATE)
        self._dropped = ffi.new("uint32_t *")
        serve.handler = int(lib.gw_rpc_bulk_handler_addr())
        serve.arg = int(ffi.cast("uintptr_t", b))

    def set_lanes(self, entries: "list[Dict[str, int]]", lane_min: int) -> None:
        """Bulk lanes (docs/protocol.md): payloads of ``lane_min`` bytes or more as messages on
        the lanes' connections (``Endpoint.c_bulk_entry()`` of each; the same transport entry
        points as the session's). Call from the session's thread between frames."""
        n = len(entries)
        conns = ffi.new("void *[]", max(1, n))
        workers = ffi.new("void *[]", max(1, n))
        for i, e in enumerate(entries):
            conns[i] = ffi.cast("void *", int(e["conn"]))
            workers[i] = ffi.cast("void *", int(e["worker"]))
        if lib.gw_rpc_bulk_set_lanes(self.b, n, conns, workers, int(lane_min)) != 0:
            raise ValueError(f"bulk lanes: {n} lanes refused (at most {lib.GW_RPC_MAXLANES})")

    def nlate(self) -> int:
        return int(lib.gw_rpc_bulk_nlate(self.b)) if self.b is not None else 0

    def take_late(self) -> "tuple[list, int]":
        """The late failures (res, frame seq, batch position, call id, back, fixed bytes, text),
        oldest first, and how many more were only counted."""
        if self.b is None:
            return [], 0
        n = lib.gw_rpc_bulk_late(self.b, self._late, lib.GW_RPC_BULK_MAXLATE, self._dropped)
        out = []
        for i in range(n):
            x = self._late[i]
            out.append((int(x.res), int(x.seq), int(x.pos), int(x.id), int(x.back), bytes(ffi.buffer(x.fixed, 24)),
                        ffi.string(x.msg).decode("utf-8", "replace")))
        return out, int(self._dropped[0])

    def stats(self) -> Dict[str, int]:
        if self.b is None:
            return {k: 0 for k in BULK_STATS}
        return {k: int(lib.gw_rpc_bulk_stat(self.b, i)) for i, k in enumerate(BULK_STATS)}

    def close(self) -> None:
        """The session ends (its thread): pending receives are cancelled, sends waited for;
        the wrapped handler is the serve loop's handler again."""
        b, self.b = self.b, None
        if b is not None:
            self.serve.handler = int(lib.gw_rpc_serve_handler_addr())
            self.serve.arg = int(ffi.cast("uintptr_t", self.serve.v))
            lib.gw_rpc_bulk_free(b)
