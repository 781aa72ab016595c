"""gpuwire: GPUs as a pool reachable over the network.

Layers (each uses only the public API of the one below):
  gpuwire.transport  UCX endpoints, memory registration, progress engine
  gpuwire.rpc        CUDA call forwarding: spec, client batching, server, executors
  gpuwire.gds        file reads into (remote) GPU memory and a dataloader
  gpuwire.bench      the `gpuwire bench` sweeps
"""
from . import settings

__version__ = "0.1.0"

__all__ = ["settings", "__version__", "connect"]


def connect(*args, **kwargs):
    """Connect to a gpuwire server: see :func:`gpuwire.rpc.connect`."""
    from .rpc import connect as _connect

    return _connect(*args, **kwargs)
