"""`gpuwire bench gds` on the CPU: rows, skipped backends, page-cache helpers."""
import json

import pytest

from gpuwire.bench import gds as bench
from gpuwire.gds import gpu_status, kvikio_status


def test_bench_runs_small_on_the_host(tmp_path):
    from gpuwire.cli import main

    out = tmp_path / "r.json"
    csv = tmp_path / "r.csv"
    rc = main(["bench", "gds", "--dir", str(tmp_path / "d"), "--size", "1M", "--chunk", "256K",
               "--small-count", "16", "--small-size", "16K", "--record-size", "16K", "--batch", "4",
               "--shuffled", "--no-progress", "--json", str(out), "--csv", str(csv)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    keys = {"bench", "backend", "case", "bytes", "seconds", "GBps", "cache"}
    assert all(keys <= set(r) and r["bench"] == "gds" for r in rows)
    host = [r for r in rows if r["backend"] == "host"]
    cases = {(r["case"], r["cache"] if "not achieved" not in r["note"] else "cold") for r in host}
    assert cases == {(c, k) for c in ("seq", "small", "bare-seq", "loader", "loader-shuffled")
                     for k in ("cold", "warm")}
    for r in host:
        assert r["seconds"] > 0 and r["GBps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert r["bytes"] == (16 * 16 * 1024 if r["case"] == "small" else 1 << 20)
        assert r["cache"] in ("cold", "warm")
    for name, ok in (("kvikio", kvikio_status()[0]), ("posix", gpu_status()[0])):
        skipped = [r for r in rows if r["backend"] == name and r.get("skipped")]
        assert bool(skipped) == (not ok)
        assert all(r["seconds"] is None and r["GBps"] is None for r in skipped)
    assert any("loader epoch time" in x["what"] for x in doc["config"]["ratios"])
    assert csv.read_text().startswith("bench,backend,mode,case")


def test_page_cache_helpers(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"\1" * (1 << 20))
    bench.warm_cache([str(p)])
    frac = bench.resident_fraction(str(p))
    assert frac is None or frac > 0.9
    ok, how = bench.drop_cache([str(p)])
    assert how and isinstance(ok, bool)
    after = bench.resident_fraction(str(p))
    if ok and after is not None:
        assert after <= 0.05


def test_bench_arguments_are_checked(tmp_path):
    from gpuwire.cli import main

    with pytest.raises(SystemExit, match="--cases"):
        main(["bench", "gds", "--dir", str(tmp_path), "--cases", "seq,bogus"])


class _Fake(bench.BenchBackend):
    name = "fake"
    mode = "fake-mode"

    def __init__(self):
        self.calls = []

    def alloc(self, nbytes):
        return bytearray(nbytes)

    def read_ranges(self, requests, dst):
        self.calls.append(list(requests))
        return sum(r[2] for r in requests)


def test_a_backend_object_only_needs_read_ranges(tmp_path):
    """The remote backend will plug in the same way: seq/small cases drive read_ranges."""
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"\0" * 1000)
        paths.append(str(p))
    be = _Fake()
    n, dt = bench.run_small(be, paths, 2500, progress=False)
    assert n == 5000 and dt >= 0
    assert [len(c) for c in be.calls] == [2, 2, 1]
    assert [r[3] for r in be.calls[0]] == [0, 1000]
