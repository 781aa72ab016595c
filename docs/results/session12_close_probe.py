"""Session 12: sessions over loopback tcp (GPU or CPU executor, server process, 3 MiB copies both
ways), closed one after another, with 0 and 4 bulk lanes: the client's close() time (median, max)
and the UCX error/warning lines both processes wrote (the server's stderr is captured here).
Usage: python3 session12_close_probe.py {gpu|cpu} SESSIONS"""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import gpuwire
from gpuwire import settings
from gpuwire.rpc import client as _client  # noqa: F401 - registers the rpc settings

kind, n = sys.argv[1], int(sys.argv[2])
err = tempfile.TemporaryFile(mode="w+")
cmd = [sys.executable, "-m", "gpuwire.rpc.cli", "--executor", kind, "--listen", "127.0.0.1:0", "--ready-stdout",
       "--no-auth", "--log-level", "warning"] + (["--cpu-mem-gib", "1"] if kind == "cpu" else [])
srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, UCX_TLS="tcp,self"))
port = int(srv.stdout.readline())
try:
    for lanes in (0, 4):
        ts = []
        for i in range(n):
            with settings.override(rpc_bulk_lanes=lanes):
                s = gpuwire.connect(f"127.0.0.1:{port}", tls="tcp,self")
            a = (np.arange(3 << 20) % (251 - i)).astype(np.uint8)
            d = s.alloc(a.nbytes)
            s.cuMemcpyHtoD(d, a, a.nbytes)
            b = np.zeros_like(a)
            s.cuMemcpyDtoH(b, d, a.nbytes)
            assert np.array_equal(a, b) and len(s._lane_eps) == lanes
            t0 = time.perf_counter()
            s.close()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        print(f"lanes={lanes} sessions={n} close_ms_median={ts[len(ts) // 2]:.1f} close_ms_max={ts[-1]:.1f}", flush=True)
finally:
    srv.terminate()
    srv.wait(timeout=20)
err.seek(0)
server_err = err.read()
print("server UCX error lines:", server_err.count("UCX  ERROR"), "warn lines:", server_err.count("UCX  WARN"))
