"""A dataloader reading batches of records straight into a ring of device buffers.

::

    ds = NpyDataset("/data/train-*.npy")
    loader = DataLoader(ds, batch_size=256, shuffle=True, seed=1, prefetch=2)
    for epoch in range(3):          # each pass is the next epoch (or loader.set_epoch(e))
        for x in loader:            # cupy array (256, *record_shape), dtype of the data
            step(x)

**Order.** The record order of an epoch is a deterministic function of
``(seed, epoch)``: ``shuffle="shards"`` (or ``True``) permutes the files, then the
records within each file; ``"global"`` permutes all records; ``False`` keeps file
order. Records of a batch that are consecutive in the same file are read with one
``read_batch`` request (unshuffled batches are one read each).

**Prefetch.** Up to ``prefetch`` batches after the one the consumer holds are read in
background threads into a ring of ``prefetch + keep`` buffers; on the GPU each ring
slot has its own stream, and an event is recorded after its reads. A batch is handed
out once its reads are *issued*; the consumer's stream then waits on the slot's event
(``stream.wait_event``), so the consumer never blocks the host on the GPU. On the
host backend a batch is handed out once its reads have finished. With
``prefetch=0`` there are no reading threads: each batch is read in the consumer's
thread when it is asked for (and a backend whose writes are not stream-ordered then
waits on the host for the consumer's work on the previous batch).

**Buffer contract.** A yielded batch lives in a ring slot. It stays valid until the
consumer asks for the batch ``keep`` places after it (``keep=1``, the default: until
the next ``next()``), or a new pass over the loader starts. Pass ``copy=True`` to get
batches the loader never overwrites. Slot reuse is ordered after the consumer's work:
when the consumer asks for batch *i*, an event is recorded on its current stream and
the read of the batch that reuses slot of batch *i - keep* waits for it (on the slot's
stream, or on the host for backends whose writes are not stream-ordered). Only the
ring is ever allocated, so a dataset may be far larger than device memory.
"""
from __future__ import annotations

import math
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_all
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .. import settings
from . import _settings  # noqa: F401
from ._files import int_arg
from .backends import Reader, select_reader
from .dataset import RecordFiles

__all__ = ["DataLoader", "Batch"]

ShuffleArg = Union[bool, str]
_SHUFFLES = {False: "none", None: "none", "none": "none", True: "shards", "shards": "shards", "global": "global"}


@dataclass
class Batch:
    """A batch with its metadata; ``DataLoader.iter_batches()`` yields these."""

    data: Any             # cupy array (GPU) or numpy array (host), (n, *record_shape)
    indices: np.ndarray   # flat record indices, in batch order
    number: int           # position of the batch in its epoch
    epoch: int
    ready: Any            # event after which ``data`` is in place (None on the host)


class _Slot:
    __slots__ = ("buf", "stream", "ready", "release")

    def __init__(self, buf, stream):
        self.buf, self.stream = buf, stream
        self.ready = None    # recorded on self.stream after the reads of its batch
        self.release = None  # recorded on the consumer stream when the batch is given back


class DataLoader:
    """Batches of dataset records read by a :class:`~gpuwire.gds.backends.Reader`.

    ``reader`` defaults to :func:`select_reader` (setting ``gds_backend``); ``prefetch``
    to the ``gds_prefetch`` setting; ``workers`` (reading threads) to
    ``min(max(prefetch, 1), 4)``. ``consumer_stream`` returns the stream the consumer's
    work runs on (default: the reader's current stream).
    """

    def __init__(self, dataset: RecordFiles, batch_size: int, *, shuffle: ShuffleArg = True,
                 seed: int = 0, drop_last: bool = False, prefetch: Optional[int] = None,
                 reader: Optional[Reader] = None, keep: int = 1, copy: bool = False,
                 workers: Optional[int] = None,
                 consumer_stream: Optional[Callable[[], Any]] = None):
        batch_size = int_arg("batch_size", batch_size, 1)
        keep = int_arg("keep", keep, 1)
        if workers is not None:
            workers = int_arg("workers", workers, 0)   # 0: the default
        if prefetch is not None:
            prefetch = int_arg("prefetch", prefetch, 0)
        if shuffle not in _SHUFFLES:
            raise ValueError(f"shuffle must be True, False, 'shards' or 'global', got {shuffle!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = _SHUFFLES[shuffle]
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.prefetch = int(settings.get("gds_prefetch") if prefetch is None else prefetch)
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.keep = int(keep)
        self.copy = bool(copy)
        self.workers = int(workers) if workers else min(max(self.prefetch, 1), 4)
        self._own_reader = reader is None
        self.reader = reader if reader is not None else select_reader()
        self._consumer_stream = consumer_stream or self.reader.current_stream
        self._epoch = 0
        self._ring: Optional[List[_Slot]] = None
        self._active: Optional["weakref.ref[_EpochIter]"] = None
        self._pool: Optional[ThreadPoolExecutor] = None  # reading threads, kept across epochs
        self._lock = threading.Lock()
        self.reads_issued = 0   # read requests (after coalescing) issued so far
        self.bytes_read = 0

    # ---------------------------------------------------------------- plan
    @property
    def ring_size(self) -> int:
        return self.prefetch + self.keep

    @property
    def batch_nbytes(self) -> int:
        return self.batch_size * self.dataset.record_nbytes

    @property
    def epoch(self) -> int:
        """The epoch the next pass over the loader will read."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass read ``epoch`` (passes advance it by one by themselves)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch_order(self, epoch: Optional[int] = None) -> np.ndarray:
        """The record order of ``epoch`` (default: the next one): a function of (seed, epoch)."""
        epoch = self._epoch if epoch is None else int(epoch)
        n = len(self.dataset)
        if self.shuffle == "none":
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle == "global":
            return rng.permutation(n).astype(np.int64)
        ranges = self.dataset.shard_ranges()
        parts = [a + rng.permutation(b - a) for a, b in (ranges[s] for s in rng.permutation(len(ranges)))]
        return np.concatenate(parts).astype(np.int64) if parts else np.arange(0, dtype=np.int64)

    def batch_plan(self, epoch: Optional[int] = None) -> List[np.ndarray]:
        """The record indices of every batch of ``epoch``, in order."""
        order = self.epoch_order(epoch)
        plan = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and plan and len(plan[-1]) < self.batch_size:
            plan.pop()
        return plan

    def requests(self, indices: np.ndarray) -> List[Tuple[str, int, int, int]]:
        """``(path, file offset, nbytes, dst offset)`` reads for a batch, runs coalesced."""
        ds = self.dataset
        rec = ds.record_nbytes
        shard, off = ds.locate_many(indices)
        n = len(shard)
        if n == 0:
            return []
        brk = np.ones(n, dtype=bool)
        brk[1:] = (shard[1:] != shard[:-1]) | (off[1:] != off[:-1] + rec)
        starts = np.flatnonzero(brk)
        counts = np.diff(np.append(starts, n))
        shards = ds.shards
        return [(shards[int(shard[s])].path, int(off[s]), int(c) * rec, int(s) * rec)
                for s, c in zip(starts, counts)]

    # ---------------------------------------------------------------- ring
    def allocate(self) -> None:
        """Allocate the ring and start the reading threads now (otherwise the first pass does)."""
        self._get_ring()
        if self.prefetch:
            self._get_pool()

    def _get_ring(self) -> List[_Slot]:
        if self._ring is None or len(self._ring) != self.ring_size:
            nbytes = self.batch_nbytes
            self._ring = [_Slot(self.reader.alloc(nbytes), self.reader.new_stream())
                          for _ in range(self.ring_size)]
        return self._ring

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gpuwire-gds",
                                            initializer=self.reader.bind_thread)
        return self._pool

    def _fill(self, slot: _Slot, indices: np.ndarray) -> None:
        """Worker: read one batch into ``slot`` once the consumer has given it back."""
        r = self.reader
        if slot.release is not None:
            if r.stream_ordered:
                r.wait_event(slot.stream, slot.release)
            else:
                r.host_wait(slot.release)
        reqs = self.requests(indices)
        got = r.read_batch(reqs, slot.buf, slot.stream)
        slot.ready = r.record_event(slot.stream, slot.ready)
        with self._lock:
            self.reads_issued += len(reqs)
            self.bytes_read += got

    # ---------------------------------------------------------------- iteration
    def _start(self, consumer_stream) -> "_EpochIter":
        prev = self._active() if self._active is not None else None
        if prev is not None:
            prev.close()  # its batches are invalid from now on (see the buffer contract)
        epoch = self._epoch
        self._epoch += 1
        it = _EpochIter(self, epoch, consumer_stream or self._consumer_stream)
        self._active = weakref.ref(it)
        return it

    def __iter__(self) -> Iterator[Any]:
        it = self._start(None)
        return (b.data for b in it)

    def iter_batches(self, consumer_stream: Optional[Callable[[], Any]] = None) -> "_EpochIter":
        """Iterate over :class:`Batch` objects (data, indices, number, epoch, ready event)."""
        return self._start(consumer_stream)

    def close(self) -> None:
        """Stop any running pass; close the reader if the loader made it."""
        prev = self._active() if self._active is not None else None
        if prev is not None:
            prev.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._ring = None
        if self._own_reader:
            self.reader.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle!r}, "
                f"prefetch={self.prefetch}, reader={self.reader!r})")


class _EpochIter:
    """One pass over the loader; see the module docstring for the protocol."""

    def __init__(self, loader: DataLoader, epoch: int, consumer_stream: Callable[[], Any]):
        self.loader, self.epoch = loader, epoch
        self._cs = consumer_stream
        self._plan = loader.batch_plan(epoch)
        self._next = 0        # the batch the consumer gets next
        self._submitted = 0   # batches handed to the workers so far
        self._futures: Dict[int, Future] = {}
        self._closed = False
        self._pool: Optional[ThreadPoolExecutor] = None
        if self._plan:
            self._ring = loader._get_ring()
            self._release_all()
            self._pool = loader._get_pool() if loader.prefetch else None  # 0: read in the caller

    def _release_all(self) -> None:
        """A new pass: the consumer's earlier batches are all given back."""
        r, cs = self.loader.reader, self._cs()
        for slot in self._ring:
            slot.release = r.record_event(cs, slot.release)

    def _submit_until(self, last: int) -> None:
        last = min(last, len(self._plan) - 1)
        while self._submitted <= last:
            b = self._submitted
            slot = self._ring[b % len(self._ring)]
            self._futures[b] = self._pool.submit(self.loader._fill, slot, self._plan[b])
            self._submitted += 1

    def __iter__(self) -> "_EpochIter":
        return self

    def __len__(self) -> int:
        return len(self._plan)

    def __next__(self) -> Batch:
        b = self._next
        if self._closed or b >= len(self._plan):
            self.close()
            raise StopIteration
        loader, r = self.loader, self.loader.reader
        cs = self._cs()
        back = b - loader.keep
        if back >= 0:  # batch ``back`` is given back: its slot may be refilled after this event
            slot = self._ring[back % len(self._ring)]
            slot.release = r.record_event(cs, slot.release)
        slot = self._ring[b % len(self._ring)]
        try:
            if self._pool is None:
                loader._fill(slot, self._plan[b])
            else:
                self._submit_until(b + loader.prefetch)
                self._futures.pop(b).result()
        except BaseException:
            self.close()
            raise
        r.wait_event(cs, slot.ready)
        idx = self._plan[b]
        data = r.view(slot.buf, len(idx) * loader.dataset.record_nbytes, loader.dataset.dtype,
                      (len(idx),) + loader.dataset.record_shape)
        if loader.copy:
            data = _copy_on(data, cs)
        self._next = b + 1
        return Batch(data, idx, b, self.epoch, slot.ready)

    def close(self) -> None:
        """Stop reading ahead; wait for reads in flight (they write into the ring)."""
        if self._closed:
            return
        self._closed = True
        for f in self._futures.values():
            f.cancel()
        _wait_all(list(self._futures.values()))
        self._futures.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _copy_on(arr, stream):
    """``arr.copy()`` queued on ``stream`` (cupy, remote) or made at once (numpy)."""
    if hasattr(arr, "copy_on"):  # gds.remote.RemoteArray: a device-to-device copy on the server
        return arr.copy_on(stream)
    if stream is None or isinstance(arr, np.ndarray):
        return arr.copy()
    with stream:
        return arr.copy()
