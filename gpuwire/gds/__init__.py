"""gpuwire.gds: file reads into GPU (or host) memory, and a dataloader on top.

* :mod:`~gpuwire.gds.backends` -- readers: kvikio (cuFile GDS or kvikio's compat
  mode), posix pread + H2D copy, host-only; :func:`select_reader`.
* :mod:`~gpuwire.gds.dataset` -- :class:`RecordDataset` (fixed-size records),
  :class:`NpyDataset` (.npy shards).
* :mod:`~gpuwire.gds.loader` -- :class:`DataLoader` (seeded shuffling, prefetch into
  a ring of device buffers, stream/event ordering).
* :mod:`~gpuwire.gds.roots` -- :class:`DataRoots`, the directories a server may read.
* :mod:`~gpuwire.gds.torch` -- :class:`TorchLoader` (needs torch, imported lazily).
* :mod:`~gpuwire.gds.remote` -- reads by a gpuwire server into its session's device
  memory (:class:`RemoteFiles`, :class:`RemoteReader` for the DataLoader, remote
  datasets); :mod:`~gpuwire.gds.service` is the server side (``--data-root``).

cupy, kvikio and torch are optional and imported only when used. See docs/gds.md.
"""
from __future__ import annotations

from . import _settings  # noqa: F401  (registers the GPUWIRE_GDS_* settings)
from .backends import (
    FileHandle,
    HostReader,
    KvikioReader,
    PosixH2DReader,
    Reader,
    apply_kvikio_settings,
    backend_status,
    gpu_status,
    kvikio_status,
    select_reader,
)
from .dataset import NpyDataset, NpyHeader, RecordDataset, Shard, parse_npy_header
from .errors import BackendUnavailable, CorruptFileError, GdsError, ShortReadError, TruncatedFileError
from .loader import Batch, DataLoader
from .remote import (
    RemoteArray, RemoteFileNotFoundError, RemoteFiles, RemoteNpyDataset, RemotePermissionError,
    RemoteReadError, RemoteReader, RemoteRecordDataset, RemoteShortReadError,
)
from .roots import DataRoots, OutsideDataRootsError

__all__ = [
    "Reader", "HostReader", "PosixH2DReader", "KvikioReader", "FileHandle",
    "select_reader", "backend_status", "gpu_status", "kvikio_status", "apply_kvikio_settings",
    "RecordDataset", "NpyDataset", "NpyHeader", "Shard", "parse_npy_header",
    "DataLoader", "Batch", "TorchLoader",
    "DataRoots", "OutsideDataRootsError",
    "RemoteFiles", "RemoteReader", "RemoteArray", "RemoteRecordDataset", "RemoteNpyDataset",
    "RemoteReadError", "RemoteFileNotFoundError", "RemotePermissionError", "RemoteShortReadError",
    "GdsError", "ShortReadError", "CorruptFileError", "TruncatedFileError", "BackendUnavailable",
]


def __getattr__(name: str):
    if name == "TorchLoader":  # keeps `import torch` out of `import gpuwire.gds`
        from .torch import TorchLoader

        return TorchLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
