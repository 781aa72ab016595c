"""gpuwire.rpc: forwarding CUDA driver calls to a gpuwire server.

    import gpuwire
    s = gpuwire.connect("gpu-host:13371", token="...")
    with s.alloc(4096) as buf:                 # no round trip (client-side sub-allocation)
        s.copy_to_device(buf, np.arange(1024, dtype=np.float32))
        mod = s.load_module("kernels.ptx")
        s.launch(mod.function("fill_f32"), grid=4, block=256, args=(buf, 1.5, 1024))
        out = s.copy_to_host(np.empty(1024, np.float32), buf)   # a sync point

Submodules: :mod:`.spec` (the call spec), :mod:`.protocol` (wire format),
:mod:`.codegen` (stubs and dispatch from the spec), :mod:`.client`,
:mod:`.server`, :mod:`.executors`. docs/protocol.md describes the protocol.
"""
from __future__ import annotations

from .protocol import (
    AuthenticationError, CudaError, DeferredCudaError, ProtocolError, RPCError, SessionClosed, VersionMismatch,
    result_name,
)

__all__ = [
    "connect", "Session", "DeviceBuffer", "Stream", "Event", "Module", "Function",
    "CudaError", "DeferredCudaError", "ProtocolError", "AuthenticationError", "VersionMismatch",
    "SessionClosed", "RPCError", "result_name", "register_kernel",
]


def connect(address: str, token=None, timeout=None, tls=None, device=None, name: str = ""):
    """Connect to ``gpuwire serve`` at 'host:port' and return a :class:`Session`."""
    from .client import connect as _c
    return _c(address, token=token, timeout=timeout, tls=tls, device=device, name=name)


def register_kernel(name, fn, param_types):
    """Register a Python kernel with the CPU executor (server side)."""
    from .executors.cpu import register_kernel as _r
    return _r(name, fn, param_types)


def __getattr__(name):
    if name in ("Session", "DeviceBuffer", "Stream", "Event", "Module", "Function"):
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module 'gpuwire.rpc' has no attribute {name!r}")
