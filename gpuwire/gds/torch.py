"""PyTorch adapter: a :class:`~gpuwire.gds.loader.DataLoader` yielding torch tensors.

torch is imported when a :class:`TorchLoader` is made, never before; without torch the
rest of gpuwire.gds works and this raises an ImportError that says what to install.
Tensors are made with ``torch.from_dlpack`` (no copy). On the GPU the consumer stream
is torch's current stream: the batch's ready event is waited on there, and the ring
slot is given back after the work torch queued on it.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator

from .loader import DataLoader

__all__ = ["TorchLoader", "import_torch"]


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "gpuwire.gds.TorchLoader needs PyTorch, which is not installed "
            "(pip install torch); gpuwire.gds.DataLoader works without it"
        ) from e
    return torch


class TorchLoader:
    """Wraps a DataLoader for a training loop: ``for x in TorchLoader(loader): ...``.

    ``len()``, ``set_epoch(e)`` and the buffer contract are those of the wrapped loader
    (a tensor is valid until the next one is asked for, unless the loader has
    ``copy=True`` or ``keep > 1``).
    """

    def __init__(self, loader: DataLoader):
        self._torch = import_torch()
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __iter__(self) -> Iterator[Any]:
        if self.loader.reader.device == "cuda":
            return self._iter_cuda()
        return self._iter_host()

    def _iter_host(self) -> Iterator[Any]:
        from_dlpack = self._torch.from_dlpack
        for b in self.loader.iter_batches():
            yield from_dlpack(b.data)

    def _iter_cuda(self) -> Iterator[Any]:
        import cupy

        torch = self._torch
        wrap = _StreamWrapper(cupy)

        def torch_stream():
            return wrap(torch.cuda.current_stream())

        for b in self.loader.iter_batches(consumer_stream=torch_stream):
            with torch_stream():  # cupy's current stream == torch's: no extra sync in __dlpack__
                t = torch.from_dlpack(b.data)
            yield t


class _StreamWrapper:
    """cupy views of torch streams, made once per stream."""

    def __init__(self, cupy):
        self._cp = cupy
        self._by_ptr = {}

    def __call__(self, ts):
        ptr = int(ts.cuda_stream)
        s = self._by_ptr.get(ptr)
        if s is None:
            s = self._by_ptr[ptr] = self._make(ts, ptr)
        return s

    def _make(self, ts, ptr: int):
        cuda = self._cp.cuda
        from_external = getattr(cuda.Stream, "from_external", None)  # cupy >= 14
        if from_external is not None:
            try:
                return from_external(ts)
            except Exception:
                pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cuda.ExternalStream(ptr)
