"""`gpuwire bench pinned` runs end to end on the CPU executor (tiny sizes) and writes rows
whose results it checked itself. Timings are not asserted (the targets are for the bench
on the GPU machine, docs/benchmarks.md)."""
from __future__ import annotations

import json
import subprocess
import sys

from gpuwire.rpc import pinned

WRITTEN = pinned.written_support()[0]      # (the bench's server runs on this kernel too)


def test_bench_pinned_cpu_smoke(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUWIRE_PINNED_TRACK", raising=False)            # the default: auto
    out = tmp_path / "pinned.json"
    p = subprocess.run([sys.executable, "-m", "gpuwire.cli", "bench", "pinned", "--executor", "cpu",
                        "--tests", "lookup,mirror,unchanged,detect,pool,placement", "--sizes", "4K,128K", "--iters", "2",
                        "--launches", "20", "--regions", "300", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by = {}
    for r in rows:
        by.setdefault(r["test"], []).append(r)
    assert by["lookup"][0]["regions"] == 300 and by["lookup"][0]["c_lookup_ns"] > 0
    assert {(r["mode"], r["in_readonly"], r["ptx_readonly"]) for r in by["mirror"]} == {
        ("default (auto)", False, True), ("always", False, True), ("compare", False, True),
        ("protect", False, True), ("explicit", True, True), ("always", False, False)} | (
        {("written", False, True)} if WRITTEN else set())
    assert all(r["results_ok"] for r in by["mirror"])
    big = {(r["mode"], r["pull_detect"]): r for r in by["mirror"] if r["size_bytes"] == 128 << 10}
    by["mirror"] = [r for r in by["mirror"] if r["size_bytes"] == 4096]
    # the default moves what the explicit program moves: the input in, the output back
    assert big[("default (auto)", True)]["push_bytes_per_iter"] == 128 << 10
    assert big[("default (auto)", True)]["pull_bytes_per_iter"] == 128 << 10
    if WRITTEN:
        assert big[("written", True)]["push_bytes_per_iter"] == 128 << 10
        assert big[("written", True)]["pull_bytes_per_iter"] == 128 << 10
    # detect: a kernel without PTX pulls its input too; server-side detection sends none of it
    det = {(r["size_bytes"], r["pull_detect"]): r for r in by["detect"]}
    assert all(r["results_ok"] for r in by["detect"])
    assert det[(128 << 10, False)]["pull_bytes_per_iter"] == 2 * (128 << 10)
    assert det[(128 << 10, True)]["pull_bytes_per_iter"] == 128 << 10
    assert det[(128 << 10, True)]["pull_bytes_saved_per_iter"] == 128 << 10
    assert det[(4096, True)]["pull_bytes_per_iter"] == 2 * 4096           # under pinned_detect_min
    assert {r["size_bytes"] for r in by["pool"]} == {4096, 128 << 10}
    by["unchanged"] = [r for r in by["unchanged"] if r["size_bytes"] == 4096]
    assert all(r["result_ok"] for r in by["unchanged"])
    # what each mode moves is decided by the mirroring logic, not by timing
    mir = {(r["mode"], r["ptx_readonly"]): r for r in by["mirror"]}
    assert mir[("always", True)]["push_bytes_per_iter"] == 2 * 4096      # in and out, every launch
    assert mir[("always", True)]["pull_bytes_per_iter"] == 4096          # the PTX scan: `in` stays
    assert mir[("always", False)]["pull_bytes_per_iter"] == 2 * 4096     # scan off: `in` comes back
    assert mir[("explicit", True)]["pull_bytes_per_iter"] == 4096
    for mode in ("compare", "protect") + (("written",) if WRITTEN else ()):   # out: pushed once per rep
        assert 4096 <= mir[(mode, True)]["push_bytes_per_iter"] < 2 * 4096
        assert mir[(mode, True)]["pull_bytes_per_iter"] == 4096
        assert mir[(mode, True)]["plain"]
    unch = {r["mode"]: r for r in by["unchanged"]}
    assert unch["explicit"]["push_bytes"] == 0 and unch["compare"]["push_bytes"] == 0
    assert unch["protect"]["push_bytes"] == 0
    assert not WRITTEN or unch["written"]["push_bytes"] == 0
    assert unch["always"]["push_bytes"] > 0
    # the client-side measure of an unchanged launch: every row has it, finite; 'always' copies
    # the region at every launch, so its hook costs more than 'explicit' (a counter compare)
    import math
    assert all(math.isfinite(r["hook_extra_us"]) and "met_hook" in r for r in unch.values())
    assert unch["always"]["hook_extra_us"] > unch["explicit"]["hook_extra_us"]
    assert "skipped" in by["placement"][0] or "device_mirror_once_us" in by["placement"][0]
