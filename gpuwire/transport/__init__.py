"""gpuwire.transport: UCX endpoints, memory registration and the progress engine.

Quick start::

    from gpuwire import transport as t
    ctx = t.Context({"TLS": "tcp,sm,self"})
    w = ctx.worker()
    lst = w.listen("127.0.0.1", 0)            # server
    ep = w.connect(f"127.0.0.1:{lst.port}")   # client (upgrades to shared memory on one node)
"""
from ._lib import built_version, runtime_version, library_path, load_source, UCXLibraryError
from .core import (
    ANY_TAG_MASK, ECHO_STOP_TAG, EXACT_TAG, MAX_TAG, Buffer, ConnRequest, Context, Endpoint, Listener,
    MemoryRegion,
    RawBuffer, Received, RemoteKey, Request, Worker, check_listen, parse_hostport, status_string,
)
from .errors import (
    ConnectionClosed, ConnectionLost, ConnectionRefused, ConnectTimeout, MessageTruncated,
    OperationTimeout, RMAOutOfRange, RMAReadOnly, TransportError,
)

__all__ = [
    "Context", "Worker", "Listener", "ConnRequest", "Endpoint", "Request", "Received", "MemoryRegion",
    "RemoteKey", "Buffer", "RawBuffer", "ANY_TAG_MASK", "EXACT_TAG", "MAX_TAG", "ECHO_STOP_TAG",
    "TransportError", "ConnectionLost", "ConnectionClosed", "ConnectionRefused",
    "ConnectTimeout", "OperationTimeout", "MessageTruncated", "RMAOutOfRange", "RMAReadOnly",
    "built_version", "runtime_version", "library_path", "load_source", "UCXLibraryError",
    "check_listen", "parse_hostport", "status_string",
]
