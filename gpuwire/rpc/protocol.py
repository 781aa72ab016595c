"""gpuwire's RPC wire protocol: frame layout, tags, status codes, exceptions.

The normative description is docs/protocol.md; this module is its executable form.
Everything is little-endian and unpadded.

Frame (client->server on TAG_REQ, server->client on TAG_REP)::

    header  magic u16 | version u8 | flags u8 | seq u32 | ncalls u32 | body_len u32   (16 B)
    body    ncalls call records (requests) or a reply body (replies)

Call record::

    call_id u16 | rflags u16 | len u32 (whole record, header included)
    fixed arguments packed with the call's ``wire_format.request``
    one slot per ``wire_format.request_var`` entry:
        u32 n, n bytes                      inline blob
        u32 0xFFFFFFFF, u32 tag, u64 n      bulk: n bytes arrive as tagged message(s)
    one u32 route per out hostbuf (``reply_var`` entries of kind hostbuf):
        0 = inline in the reply, else the tag the bytes are sent to

Only the last record of a SYNC frame may be a sync call; non-SYNC frames carry
deferred calls only and get no reply (unless they are malformed).
"""
from __future__ import annotations

import struct
from typing import Any, Dict, Optional

from .. import settings

# Settings of the rpc layer (docs/settings.md), registered here so client and server see them.
settings.register("rpc_batch_bytes", 256 << 10, int,
                  "Client: a batch of deferred calls holds at most this many bytes (a call that would "
                  "take it past goes into the next frame; a record larger than this goes alone).", layer="rpc")
settings.register("rpc_batch_calls", 4096, int,
                  "Client: flush the batch of deferred calls when it holds this many calls.", layer="rpc")
settings.register("rpc_batch_first", 2, int,
                  "Client: after a sync point the first batch goes out at this many calls, the next at "
                  "twice as many, up to rpc_batch_calls (gets an idle server going early).", layer="rpc")
def _spin_us(value):
    """A settings type: microseconds to spin, finite and at most settings.MAX_US; negative
    means the transport's spin_us."""
    v = float(value) if not isinstance(value, bool) else float("nan")
    if not (v == v and abs(v) <= settings.MAX_US):
        raise ValueError(f"must be a finite number of microseconds (negative: the transport's spin_us), "
                         f"got {value!r}")
    return v


settings.register("rpc_flush_us", 200.0, settings.finite_us,
                  "Client: flush a started batch after this many microseconds (0: only on the other "
                  "triggers).", layer="rpc")
def _on_off_auto(raw) -> str:
    t = str(raw).strip().lower()
    if t in ("1", "true", "on", "yes"):
        return "on"
    if t in ("0", "false", "off", "no"):
        return "off"
    if t == "auto":
        return "auto"
    raise ValueError("expected auto, on (1/true) or off (0/false)")


def _bulk_progress_mode(raw) -> str:
    t = str(raw).strip().lower()
    if t == "thread":
        return "thread"
    try:
        return _on_off_auto(t)
    except ValueError:
        raise ValueError("expected auto, thread, on (1/true) or off (0/false)") from None


settings.register("rpc_bulk_progress", "auto", _bulk_progress_mode,
                  "Client: how the bytes of bulk copies (async copy payloads, bulk async D2H pushes) keep "
                  "moving while the caller issues its next calls. 'thread': the session's transport worker "
                  "runs its progress thread (a C thread that drives it while such bytes are in flight; "
                  "Worker.start_progress_thread); 'on': the calling thread drives the transport once "
                  "(non-blocking) after each payload send and push posting; 'off': bytes move only inside "
                  "the client's waits; 'auto' (default): on unless the connection's data path is shared "
                  "memory only. Over tcp the bytes move only while this side progresses (two H100 runs, "
                  "16 MiB async copies over tcp, on vs off: H2D +11/+12 %, D2H +23/+6 %); over shared "
                  "memory the server pulls them itself and the extra calls slowed 16 MiB copies "
                  "(H2D -14/-28 %).",
                  layer="rpc")
def _lanes_setting(raw) -> Any:
    t = str(raw).strip().lower()
    if t == "auto":
        return "auto"
    try:
        n = int(t)
    except ValueError:
        n = -1
    if not 0 <= n <= 8:
        raise ValueError("expected auto or a number of lanes 0..8")
    return n


settings.register("rpc_bulk_lanes", "auto", _lanes_setting,
                  "Client: bulk lanes to ask the server for: payloads of the server's rpc_lane_min bytes or "
                  "more travel on that many extra connections, each driven by a progress thread of its own "
                  "on both sides, so several threads copy bytes through the kernel at once "
                  "(gpuwire.rpc.lanes, docs/protocol.md 'Bulk lanes'). 0..8, or 'auto' (default): 4 unless "
                  "the connection's data path is shared memory only (there same-host mapped regions carry "
                  "host_alloc copies), 0 then. H100, loopback tcp, async copies vs ucx_perftest: 0.58-0.98 "
                  "without lanes, 1.13-2.08 with 2-4 (docs/benchmarks.md, session 7).", layer="rpc")
settings.register("rpc_lanes_max", 4, int,
                  "Server: bulk lanes one session may have (0: none offered).", layer="rpc")
settings.register("rpc_lane_min", 256 << 10, int,
                  "Server: bulk payloads of at least this many bytes use a session's bulk lanes (smaller "
                  "ones, frames and replies stay on its connection).", layer="rpc")
settings.register("rpc_lane_wait_s", 10.0, settings.positive_seconds,
                  "Seconds the lanes' set-up waits for a connection, its hello or its acknowledgement.",
                  layer="rpc")
settings.register("rpc_hostmap", "auto", _on_off_auto,
                  "Client: same-host mapped regions (docs/pinned.md): host_alloc memory is a sealed memfd the "
                  "server's session maps and registers with the GPU, so kernels and copies use the client's "
                  "pages in place (copies are one DMA, no payload on the wire, no mirror). 'auto' (default): "
                  "when the server offers it, runs on this host (same boot id) and the connection's data "
                  "path is shared memory; 'on': on the same host whatever the transport (tcp included); "
                  "'off': never (host_alloc memory is mirrored).", layer="rpc")
settings.register("rpc_inline_max", 64 << 10, int,
                  "Client: host buffers up to this size travel inside the frame; larger ones as separate "
                  "zero-copy messages.", layer="rpc")
settings.register("rpc_timeout_s", 0.0, settings.seconds,
                  "Client: seconds a sync call waits for its reply (0: forever).", layer="rpc")
settings.register("rpc_spin_us", 1000.0, _spin_us,
                  "Client: microseconds a sync call spins on the connection before blocking (like CUDA's "
                  "spin-wait; a blocked thread wakes up tens of microseconds late). Negative: the "
                  "transport's spin_us.", layer="rpc")
settings.register("rpc_spin_adapt_us", 20000.0, settings.finite_us,
                  "Client: a sync call spins up to twice the session's recent sync waits (a maximum "
                  "decaying by 1/8 per call), up to this many microseconds, where that is longer than "
                  "rpc_spin_us: a loop whose steps wait longer than rpc_spin_us (a training step of a few "
                  "ms) does not pay a wake-up per step, as CUDA's default spin-wait does not. 0: off. "
                  "Only on machines with 4 or more logical CPUs (CUDA's default yields instead where "
                  "threads outnumber CPUs).", layer="rpc")
settings.register("rpc_server_spin_us", 1000.0, _spin_us,
                  "Server: microseconds a session spins waiting for its next frame before blocking. "
                  "Negative: the transport's spin_us.", layer="rpc")
settings.register("rpc_tls", "", str,
                  "UCX_TLS for gpuwire.connect and the server ('' = UCX's default).", layer="rpc")
settings.register("rpc_token", "", str,
                  "Shared-secret token sent by gpuwire.connect when none is given.", layer="rpc")
settings.register("rpc_c_sync", True, bool,
                  "Client: gwSync, cuCtxSynchronize and cuStreamSynchronize with nothing batched go out "
                  "as a pre-encoded frame and one C call (gpuwire._rpc) that takes the session's wire lock "
                  "and checks the reply (no Python session lock; docs/protocol.md).",
                  layer="rpc")
settings.register("rpc_c_flush", True, bool,
                  "Client (with rpc_c_sync): a batch of deferred calls goes out through one C call "
                  "(gw_rpc_flush: frame header with the wire's seq, the transport's gw_send, the next "
                  "frame buffer waited for) instead of the Python send path.",
                  layer="rpc")
settings.register("rpc_reply_inline_max", 4096, int,
                  "Client: deferred D2H copies (cuMemcpyDtoHAsync) of at most this many bytes that are "
                  "batched in the same frame as a sync call come back inside that call's reply instead of "
                  "as push messages (at most 4096; 0: always pushes). Needs a server that offers it.",
                  layer="rpc")
settings.register("rpc_c_encoder", False, bool,
                  "Client: encode deferred calls with the C batch encoder (gpuwire._rpc) instead of "
                  "struct.pack_into (see `gpuwire bench rpc` for which is faster).", layer="rpc")


PROTOCOL_VERSION = 1
MAGIC = 0x5747                      # b"GW" on the wire
HEADER = struct.Struct("<HBBIII")   # magic, version, flags, seq, ncalls, body_len
HEADER_SIZE = HEADER.size           # 16
RECORD = struct.Struct("<HHI")      # call id, record flags, record length
RECORD_SIZE = RECORD.size           # 8
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")
BULK_SLOT = struct.Struct("<IIQ")   # 0xFFFFFFFF, tag, nbytes
BULK_MARK = 0xFFFFFFFF

# frame flags
F_SYNC = 0x01      # request: the last record is a sync call, reply expected
F_HELLO = 0x02     # request: first frame of a connection (auth, versions)
F_BYE = 0x04       # request: clean end of the session (after running the frame)
F_ERROR = 0x08     # reply: frame-level error (error body layout)
F_REASON = 0x10    # reply: its sync call failed and the server says why: the reply's last bytes are
                   # the reason (UTF-8) followed by its length (u16)
REASON_MAX = 1000
F_KNOWN = F_SYNC | F_HELLO | F_BYE

# hello: after the header, before the gwHello record
HELLO_REQ = struct.Struct("<HHIII")  # proto_min, proto_max, client pid, token length, info length
# reply bodies
REPLY_HEAD = struct.Struct("<II")    # frame status (0), DtoH pushes sent so far (mod 2**32)
ERROR_HEAD = struct.Struct("<IH")    # frame status (!= 0), message length; then the message
REPORT = struct.Struct("<IHIIQIH")   # result, call id, batch position, frame seq, call seq, later failures, text len

# Tags (24-bit user tag space of the transport)
TAG_REQ = 0x000001          # request frames
TAG_REP = 0x000002          # reply frames
TAG_LANE = 0x000003         # bulk lane set-up (gpuwire.rpc.lanes): its hello and acknowledgement
TAG_BULK_IN_FIRST = 0x100000   # host->device bulk payloads (client picks, round robin)
TAG_BULK_IN_LAST = 0x7FFFFF
TAG_BULK_OUT_FIRST = 0x800000  # device->host bulk payloads (client picks, server sends there)
TAG_BULK_OUT_LAST = 0xEFFFFF
# 0xF00000..0xFFFFFF: reserved (transport benches, stop message)
# route of a deferred D2H result that comes back in the sync reply of its own frame (the
# reply tail: docs/protocol.md) instead of as a push message; a sync frame only
ROUTE_REPLY = 0xFFFFFFFE
REPLY_INLINE_LIMIT = 4096       # largest D2H result a reply tail carries
REPLY_TAIL_MAX = 16384          # a reply tail's bytes at most (entries: u32 length + bytes)

# Frame-level status codes (error replies)
ST_OK = 0
ST_BAD_MAGIC = 1
ST_BAD_VERSION = 2
ST_TRUNCATED = 3
ST_MALFORMED = 4
ST_UNKNOWN_CALL = 5
ST_AUTH = 6
ST_HELLO_REQUIRED = 7
ST_SPEC_MISMATCH = 8
ST_TOO_LARGE = 9
ST_INTERNAL = 10
STATUS_NAMES = {
    ST_OK: "ok", ST_BAD_MAGIC: "bad magic", ST_BAD_VERSION: "unsupported protocol version",
    ST_TRUNCATED: "truncated frame", ST_MALFORMED: "malformed frame", ST_UNKNOWN_CALL: "unknown call id",
    ST_AUTH: "authentication failed", ST_HELLO_REQUIRED: "hello required",
    ST_SPEC_MISMATCH: "spec mismatch", ST_TOO_LARGE: "frame too large", ST_INTERNAL: "internal server error",
}

# Handle ids: 0 is NULL; streams 1 and 2 are CU_STREAM_LEGACY / CU_STREAM_PER_THREAD.
STREAM_LEGACY = 1
STREAM_PER_THREAD = 2
FIRST_CLIENT_HANDLE = 0x100

# CUresult names (values from cuda.h of CUDA 13.0)
CURESULT_NAMES: Dict[int, str] = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    5: "CUDA_ERROR_PROFILER_DISABLED",
    6: "CUDA_ERROR_PROFILER_NOT_INITIALIZED",
    7: "CUDA_ERROR_PROFILER_ALREADY_STARTED",
    8: "CUDA_ERROR_PROFILER_ALREADY_STOPPED",
    34: "CUDA_ERROR_STUB_LIBRARY",
    36: "CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER",
    46: "CUDA_ERROR_DEVICE_UNAVAILABLE",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    102: "CUDA_ERROR_DEVICE_NOT_LICENSED",
    200: "CUDA_ERROR_INVALID_IMAGE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    202: "CUDA_ERROR_CONTEXT_ALREADY_CURRENT",
    205: "CUDA_ERROR_MAP_FAILED",
    206: "CUDA_ERROR_UNMAP_FAILED",
    207: "CUDA_ERROR_ARRAY_IS_MAPPED",
    208: "CUDA_ERROR_ALREADY_MAPPED",
    209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
    210: "CUDA_ERROR_ALREADY_ACQUIRED",
    211: "CUDA_ERROR_NOT_MAPPED",
    212: "CUDA_ERROR_NOT_MAPPED_AS_ARRAY",
    213: "CUDA_ERROR_NOT_MAPPED_AS_POINTER",
    214: "CUDA_ERROR_ECC_UNCORRECTABLE",
    215: "CUDA_ERROR_UNSUPPORTED_LIMIT",
    216: "CUDA_ERROR_CONTEXT_ALREADY_IN_USE",
    217: "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED",
    218: "CUDA_ERROR_INVALID_PTX",
    219: "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT",
    220: "CUDA_ERROR_NVLINK_UNCORRECTABLE",
    221: "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",
    222: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
    223: "CUDA_ERROR_JIT_COMPILATION_DISABLED",
    224: "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
    225: "CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC",
    226: "CUDA_ERROR_CONTAINED",
    300: "CUDA_ERROR_INVALID_SOURCE",
    301: "CUDA_ERROR_FILE_NOT_FOUND",
    302: "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
    303: "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    400: "CUDA_ERROR_INVALID_HANDLE",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    402: "CUDA_ERROR_LOSSY_QUERY",
    500: "CUDA_ERROR_NOT_FOUND",
    600: "CUDA_ERROR_NOT_READY",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT",
    703: "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING",
    704: "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED",
    705: "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED",
    708: "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE",
    709: "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    710: "CUDA_ERROR_ASSERT",
    711: "CUDA_ERROR_TOO_MANY_PEERS",
    712: "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
    713: "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
    714: "CUDA_ERROR_HARDWARE_STACK_ERROR",
    715: "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    716: "CUDA_ERROR_MISALIGNED_ADDRESS",
    717: "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    718: "CUDA_ERROR_INVALID_PC",
    719: "CUDA_ERROR_LAUNCH_FAILED",
    720: "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
    721: "CUDA_ERROR_TENSOR_MEMORY_LEAK",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    802: "CUDA_ERROR_SYSTEM_NOT_READY",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    805: "CUDA_ERROR_MPS_CONNECTION_FAILED",
    806: "CUDA_ERROR_MPS_RPC_FAILURE",
    807: "CUDA_ERROR_MPS_SERVER_NOT_READY",
    808: "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED",
    809: "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED",
    810: "CUDA_ERROR_MPS_CLIENT_TERMINATED",
    811: "CUDA_ERROR_CDP_NOT_SUPPORTED",
    812: "CUDA_ERROR_CDP_VERSION_MISMATCH",
    900: "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
    901: "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
    902: "CUDA_ERROR_STREAM_CAPTURE_MERGE",
    903: "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
    904: "CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
    905: "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
    906: "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
    907: "CUDA_ERROR_CAPTURED_EVENT",
    908: "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
    909: "CUDA_ERROR_TIMEOUT",
    910: "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE",
    911: "CUDA_ERROR_EXTERNAL_DEVICE",
    912: "CUDA_ERROR_INVALID_CLUSTER_SIZE",
    913: "CUDA_ERROR_FUNCTION_NOT_LOADED",
    914: "CUDA_ERROR_INVALID_RESOURCE_TYPE",
    915: "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION",
    916: "CUDA_ERROR_KEY_ROTATION",
    999: "CUDA_ERROR_UNKNOWN",

}
CURESULT = {v: k for k, v in CURESULT_NAMES.items()}
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = CURESULT["CUDA_ERROR_INVALID_VALUE"]
CUDA_ERROR_OUT_OF_MEMORY = CURESULT["CUDA_ERROR_OUT_OF_MEMORY"]
CUDA_ERROR_NOT_INITIALIZED = CURESULT["CUDA_ERROR_NOT_INITIALIZED"]
CUDA_ERROR_INVALID_DEVICE = CURESULT["CUDA_ERROR_INVALID_DEVICE"]
CUDA_ERROR_INVALID_IMAGE = CURESULT["CUDA_ERROR_INVALID_IMAGE"]
CUDA_ERROR_INVALID_CONTEXT = CURESULT["CUDA_ERROR_INVALID_CONTEXT"]
CUDA_ERROR_INVALID_HANDLE = CURESULT["CUDA_ERROR_INVALID_HANDLE"]
CUDA_ERROR_NOT_FOUND = CURESULT["CUDA_ERROR_NOT_FOUND"]
CUDA_ERROR_NOT_READY = CURESULT["CUDA_ERROR_NOT_READY"]
CUDA_ERROR_ILLEGAL_ADDRESS = CURESULT["CUDA_ERROR_ILLEGAL_ADDRESS"]
CUDA_ERROR_LAUNCH_FAILED = CURESULT["CUDA_ERROR_LAUNCH_FAILED"]
CUDA_ERROR_NOT_SUPPORTED = CURESULT["CUDA_ERROR_NOT_SUPPORTED"]
CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = CURESULT["CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"]
CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = CURESULT["CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"]
CUDA_ERROR_UNKNOWN = CURESULT["CUDA_ERROR_UNKNOWN"]


def result_name(code: int) -> str:
    return CURESULT_NAMES.get(code, f"CUresult({code})")


def result_string(code: int) -> str:
    """A short description of a CUresult (the GPU executor answers with the driver's own)."""
    name = CURESULT_NAMES.get(code)
    if name is None:
        return f"unknown CUresult {code}"
    if code == 0:
        return "no error"
    return name.replace("CUDA_ERROR_", "").replace("_", " ").lower()


def pack_error(seq: int, status: int, message: str) -> bytes:
    """An error reply: header (F_ERROR) + status + message (UTF-8, at most 4000 bytes)."""
    msg = message.encode("utf-8", "replace")[:4000]
    body = ERROR_HEAD.pack(status, len(msg)) + msg
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, F_ERROR, seq & 0xFFFFFFFF, 0, len(body)) + body


def parse_error(buf: Any, n: int) -> "tuple[int, str]":
    """(status, message) of an error reply of n bytes (any protocol version)."""
    mv = memoryview(buf)
    if n < HEADER_SIZE + ERROR_HEAD.size:
        return ST_TRUNCATED, "truncated error reply"
    st, ln = ERROR_HEAD.unpack_from(mv, HEADER_SIZE)
    text = bytes(mv[HEADER_SIZE + ERROR_HEAD.size:min(n, HEADER_SIZE + ERROR_HEAD.size + ln)])
    return st, text.decode("utf-8", "replace")


# ----------------------------------------------------------------------------- exceptions

class RPCError(Exception):
    """Base of gpuwire.rpc errors."""


class ProtocolError(RPCError):
    """The peer sent something this side cannot accept, or refused our frame."""

    def __init__(self, message: str, status: int = ST_MALFORMED):
        super().__init__(message)
        self.status = status


class AuthenticationError(ProtocolError, PermissionError):
    """The server refused the token."""


class VersionMismatch(ProtocolError):
    """Client and server speak different protocol versions or specs."""


class SessionClosed(RPCError):
    """The session was closed (by us, or the server went away)."""


class CudaError(RPCError):
    """A CUDA call failed on the server: ``result`` is the CUresult."""

    def __init__(self, result: int, call: str = "", message: Optional[str] = None, reason: str = ""):
        self.result = int(result)
        self.name = result_name(self.result)
        self.call = call
        self.reason = reason  # a sync call: why the server says it failed (when it says)
        if message is None:
            message = f"{call}: {self.name}" if call else self.name
            if reason:
                message += f": {reason}"
        super().__init__(message)


class DeferredCudaError(CudaError):
    """A deferred (batched) call failed; raised at the next sync point.

    Attributes: ``call`` (name of the failing call), ``call_id``, ``call_args`` (the
    call with its arguments as rendered by the server, and the server's reason), ``batch_position`` (index of the call in
    its frame), ``frame_seq``, ``call_seq`` (index of the call on the connection),
    ``later_failures`` (deferred calls that failed after it, not reported
    separately) and ``surfaced_at`` (the sync call that reported it)."""

    def __init__(self, result: int, call: str, call_id: int, args: str, batch_position: int,
                 frame_seq: int, call_seq: int, later_failures: int, surfaced_at: str):
        self.call_id = call_id
        self.call_args = args
        self.batch_position = batch_position
        self.frame_seq = frame_seq
        self.call_seq = call_seq
        self.later_failures = later_failures
        self.surfaced_at = surfaced_at
        msg = (f"deferred call {args or call} failed with {result_name(result)} "
               f"(call #{batch_position} of batch {frame_seq}, call {call_seq} on the connection); "
               f"reported at {surfaced_at}")
        if later_failures:
            msg += f"; {later_failures} later deferred call(s) also failed"
        super().__init__(result, call, msg)
