"""Bench CLI misuse (audit fixes): bad sizes, counts, test names, transports and output paths
are one-line usage errors (exit status 2) before anything runs; a shared `bench transport
--serve` survives bad clients; a spawned server that prints no port is never left running."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpuwire.bench import report
from gpuwire.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _usage_error(argv, capsys, match):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(match, err), err
    return err


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("spec", ["8:4", "x", "-5", "inf", "nan", "", " , ", "0:8"])
def test_bad_size_specs_are_value_errors(spec):
    with pytest.raises(ValueError):
        report.size_range(spec)
    with pytest.raises(argparse.ArgumentTypeError):
        report.sizes_arg(0)(spec)


def test_size_minimum_and_good_specs():
    assert report.size_range("8:32") == [8, 16, 32]
    assert report.size_range("0,1K") == [0, 1024]
    with pytest.raises(ValueError, match="minimum 1"):
        report.size_range("0,1K", 1)
    with pytest.raises(argparse.ArgumentTypeError):
        report.size_arg(1)("0")
    with pytest.raises(argparse.ArgumentTypeError):
        report.int_arg(1, 1024)("0")
    assert report.int_arg(1, 1024)("1024") == 1024


# ----------------------------------------------------------------------------- bench gds

G = ["bench", "gds", "--size", "64K", "--small-count", "4", "--small-size", "4K", "--record-size", "4K",
     "--batch", "2", "--backends", "host", "--cache", "warm", "--no-progress"]


@pytest.mark.parametrize("extra, match", [
    (["--cases", "seq", "--chunk", "0"], "--chunk"),              # used to loop forever
    (["--cases", "loader", "--batch", "0"], "--batch"),           # used to loop forever
    (["--cases", "loader", "--record-size", "0"], "--record-size"),
    (["--cases", "loader", "--batch", "-1"], "--batch"),
    (["--cases", "loader", "--prefetch", "-1"], "--prefetch"),
    (["--cases", "seq", "--size", "inf"], "--size"),
    (["--cases", "seq", "--size", "0"], "--size"),
    (["--cases", "loader", "--size", "5000", "--record-size", "3000"], "whole number"),
    (["--cases", "seq", "--json", "/nonexistent/x.json"], "/nonexistent"),
    (["--cases", "seq,bogus"], "--cases"),
])
def test_bench_gds_usage_errors(tmp_path, capsys, extra, match):
    _usage_error(G + ["--dir", str(tmp_path / "d")] + extra, capsys, match)
    assert not (tmp_path / "d").exists()        # refused before any file was written


def test_bench_gds_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    _usage_error(G + ["--dir", str(f), "--cases", "seq"], capsys, "not a directory")


# ----------------------------------------------------------------------------- bench transport

T = ["bench", "transport", "--server", "127.0.0.1:1", "--no-baseline", "--tls", "tcp"]


@pytest.mark.parametrize("extra, match", [
    (["--sizes", "8:4"], "--sizes"), (["--sizes", "x"], "--sizes"), (["--sizes", "inf"], "--sizes"),
    (["--sizes", ""], "--sizes"), (["--sizes", "-5"], "--sizes"),
    (["--window", "0"], "--window"), (["--window", "2000"], "--window"),
    (["--repeat", "0"], "--repeat"), (["--iters", "0"], "--iters"),
    (["--tests", ""], "--tests"), (["--tests", "lat,nope"], "--tests"),
    (["--tls", "bogus"], "--tls 'bogus'"), (["--tls", "tcp+rc_xx"], "rc_xx"),
    (["--json", "/nonexistent/x.json"], "/nonexistent"),
])
def test_bench_transport_usage_errors(capsys, extra, match):
    _usage_error(T + ["--sizes", "8"] + extra if "--sizes" not in extra else T + extra, capsys, match)


def test_bench_transport_unreachable_server_is_one_line(capsys):
    _usage_error(T + ["--sizes", "8", "--tests", "lat"], capsys, "cannot connect")


def test_known_transports_pass():
    for tls in ("tcp", "sm", "shm", "tcp,self", "tcp,sm,self", "^rc", "rc_x:aux,tcp", "tcp,cuda_copy,cuda_ipc"):
        report.check_tls(tls, ("tcp", "sm", "shm"))


def _serve(max_size="64K"):
    p = subprocess.Popen([sys.executable, "-m", "gpuwire.bench.transport", "--serve", "--listen", "127.0.0.1:0",
                          "--tls-raw", "tcp,self", "--max-size", max_size, "--ready-stdout"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return p, f"127.0.0.1:{report.wait_ready_port(p, 'bench server')}"


def test_a_shared_server_survives_bad_clients():
    from gpuwire.bench import transport as tb
    p, addr = _serve()
    try:
        cl = tb._Client(addr, "tcp,self")
        try:
            with pytest.raises(tb.ServerError, match="window"):
                cl.command(op="bw", size=8, count=10, window=0)       # used to kill the server
            with pytest.raises(tb.ServerError, match="max-size"):
                cl.command(op="lat", count=3, size=1 << 20)           # used to kill the server
            cl.command(op="lat", count=1)                             # an old client: no size ...
            cl.ep.send_nb(bytes(1 << 20), tag=tb.DATA)                # ... then a message too big
        finally:
            cl.ep.close()
            cl.w.close()
            cl.ctx.close()
        time.sleep(1)
        assert p.poll() is None, p.stderr.read()
        cl = tb._Client(addr, "tcp,self")
        try:
            assert cl.latency(8, 2, 16)["iters"] == 16                 # and still serves
            assert cl.bandwidth(64, 20, 4)["count"] == 20
        finally:
            cl.close()
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


# ----------------------------------------------------------------------------- spawned servers


def _child(code: str):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


def test_ready_port_skips_warning_lines():
    p = _child("""
        import time
        print("[1700000000.0] ucp_context.c:1 UCX WARN transport 'bogus' is not available", flush=True)
        print(4321, flush=True)
        time.sleep(30)
    """)
    try:
        assert report.wait_ready_port(p, "child") == 4321
    finally:
        p.kill()
        p.wait()


def test_a_server_that_prints_no_port_is_not_left_running():
    for tail in ("os.close(1); time.sleep(60)",     # stdout closed, still running
                 "time.sleep(60)"):                  # silent: the timeout ends the wait
        p = _child(f"""
            import os, time
            print("not a port", flush=True)
            {tail}
        """)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="failed to start"):
            report.wait_ready_port(p, "child", timeout=3)
        assert p.poll() is not None and p.returncode != 0 and time.monotonic() - t0 < 30


# ----------------------------------------------------------------------------- bench rpc / pinned


@pytest.mark.parametrize("argv, match", [
    (["bench", "rpc", "--executor", "cpu", "--tests", "rtt,bogus"], "unknown test 'bogus'"),
    (["bench", "rpc", "--executor", "cpu", "--tests", ""], "no test"),
    (["bench", "rpc", "--executor", "cpu", "--iters", "0"], "--iters"),
    (["bench", "rpc", "--executor", "cpu", "--window", "0"], "--window"),
    (["bench", "rpc", "--executor", "cpu", "--tls", "bogus"], "--tls"),
    (["bench", "rpc", "--executor", "cpu", "--tests", "bw", "--sizes", "0"], "--sizes"),
    (["bench", "rpc", "--executor", "cpu", "--json", "/nonexistent/x.json"], "/nonexistent"),
    (["bench", "pinned", "--executor", "cpu", "--tests", "bogus"], "unknown test"),
    (["bench", "pinned", "--executor", "cpu", "--tests", "mirror", "--modes", "bogus"], "--modes"),
    (["bench", "pinned", "--executor", "cpu", "--sizes", "0"], "--sizes"),
    (["bench", "pinned", "--executor", "cpu", "--tls", "nope"], "--tls"),
])
def test_bench_rpc_and_pinned_usage_errors(capsys, argv, match):
    _usage_error(argv, capsys, match)


def test_bench_rpc_unreachable_server_is_one_line(capsys):
    _usage_error(["bench", "rpc", "--server", "127.0.0.1:1", "--token", "x", "--tests", "rtt"], capsys,
                 "cannot connect")


# ----------------------------------------------------------------------------- docs/settings.md


def test_settings_doc_python_example_runs():
    text = (ROOT / "docs" / "settings.md").read_text()
    code = re.search(r"From Python.*?```python\n(.*?)```", text, re.S).group(1).replace("...", "pass")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr


def test_settings_doc_lists_gpuwire_progress():
    text = (ROOT / "docs" / "settings.md").read_text()
    assert "| `GPUWIRE_PROGRESS` |" in text
    src = (ROOT / "gpuwire" / "bench" / "_progress.py").read_text()
    assert "GPUWIRE_PROGRESS" in src
