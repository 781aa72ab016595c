"""Transport exceptions. All derive from TransportError."""
from __future__ import annotations


class TransportError(Exception):
    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class ConnectionLost(TransportError, ConnectionError):
    """The peer died (e.g. SIGKILL), reset, or closed the connection."""

    def __init__(self, peer: str, reason: str, operation: str = ""):
        msg = f"connection to {peer} lost ({reason})"
        if operation:
            msg = f"{operation}: {msg}"
        super().__init__(msg)
        self.peer = peer
        self.reason = reason


class ConnectionClosed(TransportError):
    """The operation was on (or pending when we closed) a locally closed endpoint."""


class ConnectionRefused(TransportError, ConnectionError):
    """Connect failed: nobody listening, unreachable, or refused."""


class ConnectTimeout(TransportError, TimeoutError):
    """Connect got no handshake in time."""


class OperationTimeout(TransportError, TimeoutError):
    """A wait ran past its timeout."""


class MessageTruncated(TransportError):
    """A received message was longer than the receive buffer."""


class RMAOutOfRange(TransportError, ValueError):
    """Put/get outside the remote memory region the key was packed for."""


class RMAReadOnly(TransportError, PermissionError):
    """Put into a remote memory region its owner registered read-only (a read-only buffer,
    e.g. bytes): the packed key says so, and the put is refused before it leaves."""
