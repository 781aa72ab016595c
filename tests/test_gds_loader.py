"""gpuwire.gds.DataLoader on the CPU path (host reader): content, order, prefetch,
epochs, the buffer-ring contract, and the stream/event protocol (with a stand-in
stream-ordered reader that records what it is asked to do)."""
import hashlib
import threading
import time

import numpy as np
import pytest

from gpuwire.gds import DataLoader, HostReader, NpyDataset, RecordDataset, ShortReadError

REC = 16


@pytest.fixture
def shards(tmp_path):
    """5 shards of unequal length (one empty) holding 200 int32 records of shape (4,)."""
    data = np.arange(200 * 4, dtype=np.int32).reshape(200, 4) * 7 + 3
    cuts = [0, 37, 37, 100, 161, 200]
    for i in range(5):
        np.save(tmp_path / f"s{i}.npy", data[cuts[i]:cuts[i + 1]])
    return NpyDataset(str(tmp_path / "s*.npy")), data


@pytest.fixture
def onefile(tmp_path):
    raw = np.random.default_rng(3).integers(0, 256, 100 * REC, dtype=np.uint8)
    (tmp_path / "one.bin").write_bytes(raw.tobytes())
    return RecordDataset(str(tmp_path / "one.bin"), REC), raw.reshape(100, REC)


def _epoch(loader):
    return [np.array(x, copy=True) for x in loader]


def test_unshuffled_epoch_is_the_files_in_order(shards):
    ds, data = shards
    loader = DataLoader(ds, 32, shuffle=False, reader=HostReader())
    out = _epoch(loader)
    assert len(out) == len(loader) == 7
    assert all(b.dtype == np.int32 and b.shape[1:] == (4,) for b in out)
    got = np.concatenate(out)
    assert hashlib.sha256(got.tobytes()).digest() == hashlib.sha256(data.tobytes()).digest()


def test_raw_records_are_uint8(onefile):
    ds, raw = onefile
    out = _epoch(DataLoader(ds, 10, shuffle=False, reader=HostReader()))
    assert out[0].dtype == np.uint8 and out[0].shape == (10, REC)
    assert np.array_equal(np.concatenate(out), raw)


@pytest.mark.parametrize("mode", [True, "shards", "global"])
def test_shuffled_epoch_is_a_permutation_in_batch_order(shards, mode):
    ds, data = shards
    loader = DataLoader(ds, 32, shuffle=mode, seed=5, reader=HostReader())
    order = loader.epoch_order(0)
    assert sorted(order.tolist()) == list(range(200))
    assert not np.array_equal(order, np.arange(200))
    out = np.concatenate(_epoch(loader))
    assert np.array_equal(out, data[order])


def _shard_runs(order):
    shard_of = np.searchsorted([37, 37, 100, 161, 200], order, side="right")
    return [int(shard_of[0])] + [int(s) for a, s in zip(shard_of, shard_of[1:]) if s != a]


def test_shard_shuffle_keeps_each_shard_together(shards):
    ds, _ = shards
    orders = []
    for seed in range(8):
        runs = _shard_runs(DataLoader(ds, 8, shuffle="shards", seed=seed, reader=HostReader()).epoch_order(0))
        assert sorted(runs) == [0, 2, 3, 4]  # each non-empty shard is one contiguous run
        orders.append(tuple(runs))
    assert len(set(orders)) > 1  # the shard order itself depends on the seed
    glob = _shard_runs(DataLoader(ds, 8, shuffle="global", seed=0, reader=HostReader()).epoch_order(0))
    assert len(glob) > 4  # a global shuffle interleaves shards


def test_seed_reproducibility_and_epoch_differences(shards):
    ds, _ = shards
    a = DataLoader(ds, 16, seed=42, reader=HostReader())
    b = DataLoader(ds, 16, seed=42, reader=HostReader())
    c = DataLoader(ds, 16, seed=43, reader=HostReader())
    a0, a1 = np.concatenate(_epoch(a)), np.concatenate(_epoch(a))  # two passes: epochs 0, 1
    b0, b1 = np.concatenate(_epoch(b)), np.concatenate(_epoch(b))
    assert np.array_equal(a0, b0) and np.array_equal(a1, b1)
    assert not np.array_equal(a0, a1)
    assert not np.array_equal(np.concatenate(_epoch(c)), a0)
    assert a.epoch == 2
    a.set_epoch(1)
    assert np.array_equal(np.concatenate(_epoch(a)), a1)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))


def test_batch_metadata_follows_the_plan(shards):
    ds, data = shards
    loader = DataLoader(ds, 24, seed=9, prefetch=3, reader=HostReader())
    loader.set_epoch(4)
    plan = loader.batch_plan(4)
    seen = []
    for b in loader.iter_batches():
        assert b.epoch == 4
        assert np.array_equal(b.indices, plan[b.number])
        assert np.array_equal(b.data, data[b.indices])
        seen.append(b.number)
    assert seen == list(range(len(plan)))


@pytest.mark.parametrize("drop_last,expect", [(False, [32] * 6 + [8]), (True, [32] * 6)])
def test_drop_last(shards, drop_last, expect):
    ds, _ = shards
    loader = DataLoader(ds, 32, drop_last=drop_last, reader=HostReader())
    sizes = [len(x) for x in loader]
    assert sizes == expect and len(loader) == len(expect)


def test_batch_larger_than_dataset(shards):
    ds, data = shards
    assert [len(x) for x in DataLoader(ds, 500, shuffle=False, reader=HostReader())] == [200]
    assert list(DataLoader(ds, 500, drop_last=True, reader=HostReader())) == []


def test_consecutive_records_are_read_together(shards, onefile):
    ds, _ = onefile
    loader = DataLoader(ds, 10, shuffle=False, reader=HostReader())
    _epoch(loader)
    assert loader.reads_issued == 10 and loader.bytes_read == ds.nbytes  # one read per batch
    sds, _ = shards
    reqs = DataLoader(sds, 64, shuffle=False, reader=HostReader()).requests(np.arange(30, 94))
    assert [(r[0].rsplit("/", 1)[1], r[2], r[3]) for r in reqs] == [
        ("s0.npy", 7 * 16, 0), ("s2.npy", 57 * 16, 7 * 16)]  # split at the file boundary
    shuffled = DataLoader(ds, 10, seed=0, reader=HostReader())
    _epoch(shuffled)
    assert shuffled.reads_issued > 50


class RecordingReader(HostReader):
    """Host reader logging which batch (by first request) each read_batch is for."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.log = []
        self.delay = delay
        self.cv = threading.Condition()

    def read_batch(self, requests, dst, stream=None):
        requests = list(requests)
        if self.delay:
            time.sleep(self.delay)
        n = super().read_batch(requests, dst, stream)
        with self.cv:
            self.log.append(requests[0][1])
            self.cv.notify_all()
        return n

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: len(self.log) >= count, timeout)


def test_prefetch_reads_ahead_by_exactly_prefetch_batches(onefile):
    ds, raw = onefile
    r = RecordingReader()
    loader = DataLoader(ds, 10, shuffle=False, prefetch=3, reader=r)
    it = iter(loader)
    first = next(it)
    assert np.array_equal(first, raw[:10])
    assert r.wait_for(4)           # batches 1..3 read ahead in the background
    time.sleep(0.2)
    assert len(r.log) == 4         # ... and no further: the ring would be overwritten
    next(it)
    assert r.wait_for(5)
    time.sleep(0.1)
    assert len(r.log) == 5
    assert sorted(r.log) == [i * 10 * REC for i in range(5)]  # workers finish in any order
    rest = list(it)
    assert len(rest) == 8


def test_no_prefetch_reads_on_demand(onefile):
    ds, raw = onefile
    r = RecordingReader()
    it = iter(DataLoader(ds, 10, shuffle=False, prefetch=0, reader=r))
    next(it)
    time.sleep(0.1)
    assert len(r.log) == 1
    assert np.array_equal(next(it), raw[10:20])


def test_batches_arrive_in_order_with_uneven_read_times(shards):
    ds, data = shards

    class Jittery(HostReader):
        def read_batch(self, requests, dst, stream=None):
            time.sleep(np.random.default_rng(len(requests)).random() * 0.01)
            return super().read_batch(requests, dst, stream)

    loader = DataLoader(ds, 8, seed=2, prefetch=4, workers=4, reader=Jittery())
    order = loader.epoch_order(0)
    assert np.array_equal(np.concatenate(_epoch(loader)), data[order])


def test_ring_contract_keep_batches_stay_valid(onefile):
    """A batch stays intact until ``keep`` later batches were asked for; then its slot is reused."""
    ds, raw = onefile
    loader = DataLoader(ds, 5, shuffle=False, prefetch=2, keep=2, reader=RecordingReader(delay=0.002))
    held = []
    for i, x in enumerate(loader):
        held.append((i, x))
        time.sleep(0.01)  # let the workers run ahead as far as they may
        for j, y in held[-2:]:  # this batch and the one before it
            assert np.array_equal(y, raw[j * 5:(j + 1) * 5]), f"batch {j} overwritten while held"
    ring = loader.ring_size
    assert ring == 4
    assert np.shares_memory(held[0][1], held[ring][1])  # slot reused: only the ring is allocated
    assert not np.array_equal(held[0][1], raw[0:5])     # ... so a batch kept too long changes


def test_copy_true_batches_are_never_overwritten(onefile):
    ds, raw = onefile
    loader = DataLoader(ds, 5, shuffle=False, prefetch=2, copy=True, reader=HostReader())
    held = list(loader)
    assert np.array_equal(np.concatenate(held), raw)


def test_dataset_larger_than_the_device(tmp_path):
    rec, n = 256, 4000  # 1 MB of records; the "device" holds 16 KB
    raw = np.random.default_rng(0).integers(0, 256, rec * n, dtype=np.uint8)
    (tmp_path / "big.bin").write_bytes(raw.tobytes())
    ds = RecordDataset(str(tmp_path / "big.bin"), rec)
    r = HostReader(capacity=16 * 1024)
    loader = DataLoader(ds, 16, seed=1, prefetch=2, reader=r)
    assert loader.ring_size * loader.batch_nbytes <= 16 * 1024 < ds.nbytes
    for epoch in range(2):
        order = loader.epoch_order(epoch)
        got = np.concatenate(_epoch(loader))
        assert np.array_equal(got, raw.reshape(n, rec)[order])
    assert r.allocated_bytes == loader.ring_size * loader.batch_nbytes


def test_truncated_file_during_an_epoch_is_named(onefile, tmp_path):
    ds, _ = onefile
    with open(tmp_path / "one.bin", "r+b") as f:
        f.truncate(50 * REC + 3)
    loader = DataLoader(ds, 10, shuffle=False, reader=HostReader())
    got = []
    with pytest.raises(ShortReadError, match="one.bin") as e:
        for x in loader:
            got.append(x)
    assert "160 bytes at offset 800" in str(e.value) and "got 3" in str(e.value)
    assert len(got) == 5  # the batches before the damage were delivered


def test_break_and_restart_closes_the_previous_pass(onefile):
    ds, raw = onefile
    base = threading.active_count()
    loader = DataLoader(ds, 10, shuffle=False, prefetch=3, reader=HostReader())
    for i, x in enumerate(loader):
        if i == 2:
            break
    again = _epoch(loader)  # epoch 1; the previous pass's workers are gone
    assert np.array_equal(np.concatenate(again), raw)
    loader.close()
    time.sleep(0.05)
    assert threading.active_count() <= base


def test_empty_dataset(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    loader = DataLoader(RecordDataset(str(tmp_path / "e.bin"), 8), 4, reader=HostReader())
    assert len(loader) == 0 and list(loader) == []


def test_argument_checks(onefile):
    ds, _ = onefile
    for kw in ({"batch_size": 0}, {"batch_size": 2, "seed": -1}, {"batch_size": 2, "shuffle": "bogus"},
               {"batch_size": 2, "keep": 0}, {"batch_size": 2, "prefetch": -1}):
        with pytest.raises(ValueError):
            DataLoader(ds, reader=HostReader(), **kw)


# --------------------------------------------------------------------------- stream/event protocol


class FakeEvent:
    def __init__(self, name):
        self.name = name
        self.recorded_on = None


class FakeStream:
    def __init__(self, name):
        self.name = name


class ProtocolReader(HostReader):
    """Host reads, plus a log of the stream/event calls a GPU reader would get."""

    def __init__(self, stream_ordered: bool):
        super().__init__()
        self.stream_ordered = stream_ordered
        self.calls = []
        self.lock = threading.Lock()
        self.consumer = FakeStream("consumer")
        self.consumer_thread = threading.get_ident()
        self.n = 0

    def _log(self, *what):
        with self.lock:
            self.calls.append((threading.get_ident() == self.consumer_thread,) + what)

    def new_stream(self):
        self.n += 1
        return FakeStream(f"slot{self.n}")

    def current_stream(self):
        return self.consumer

    def record_event(self, stream, event=None):
        ev = event or FakeEvent(f"ev{len(self.calls)}")
        self._log("record", stream.name, ev)
        return ev

    def wait_event(self, stream, event):
        self._log("wait", stream.name, event)

    def host_wait(self, event):
        self._log("host_wait", None, event)

    def read_batch(self, requests, dst, stream=None):
        self._log("read", stream.name, None)
        return super().read_batch(requests, dst, stream)


@pytest.mark.parametrize("stream_ordered", [True, False])
def test_consumer_waits_on_events_not_on_the_host(onefile, stream_ordered):
    ds, raw = onefile
    r = ProtocolReader(stream_ordered)
    loader = DataLoader(ds, 10, shuffle=False, prefetch=2, reader=r)
    out = _epoch(loader)
    assert np.array_equal(np.concatenate(out), raw)
    consumer = [c for c in r.calls if c[0]]
    workers = [c for c in r.calls if not c[0]]
    assert not any(c[1] in ("host_wait", "read") for c in consumer)  # never blocks on the GPU
    waits = [c for c in consumer if c[1] == "wait"]
    assert len(waits) == 10 and all(c[2] == "consumer" for c in waits)
    # each batch's ready event was recorded on a slot stream by a worker, after its read
    for c in waits:
        rec = [w for w in workers if w[1] == "record" and w[3] is c[3]]
        assert rec and rec[0][2].startswith("slot")
    # slot reuse waits for the consumer's release event: on the slot stream if the
    # backend's writes are stream-ordered, else on the host (in a worker thread)
    kind = "wait" if stream_ordered else "host_wait"
    released = {id(c[3]) for c in consumer if c[1] == "record" and c[2] == "consumer"}
    guarded = [w for w in workers if w[1] == kind and id(w[3]) in released]
    assert len(guarded) == 10  # every fill of a slot waited for the consumer's release
    if stream_ordered:
        assert not any(w[1] == "host_wait" for w in workers)
