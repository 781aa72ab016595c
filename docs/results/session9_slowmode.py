"""Session 9 probe: where the smallest MLP shape's slow blocks over sm (session 8: 10 % or
more of the blocks 1.5x slower in some invocations) lose their time.

Local and remote loops alternate in blocks (as `gpuwire bench rpc --tests mlp`), each step
timed on its own; the loopback server writes its frame trace, and around every block the per-thread context switches (voluntary: the thread
blocked; involuntary: it was preempted) and last CPU of the client's and the server's threads
are read from /proc. Output: one JSON document (argv[3]) with a row per block.

usage: python3 session9_slowmode.py sm|tcp NBLOCKS OUT.json [BLOCK [TRACE_EVERY]]

Steps are timed one by one into numpy arrays (no allocation per step); every TRACE_EVERY-th
remote block runs the bench's --trace step instead (its split joined with the server trace).
"""
import gc
import json
import os
import secrets
import sys
import tempfile
import time

import numpy as np

import gpuwire
import gpuwire.rpc.client  # noqa: F401  (registers the rpc settings)
from gpuwire.bench import _pin
from gpuwire.bench import rpc as R


def threads(pid):
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/{tid}/status") as f:
                st = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"{base}/{tid}/stat") as f:
                cpu = int(f.read().rsplit(")", 1)[1].split()[36])
        except OSError:
            continue
        out[tid] = (comm, int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"]), cpu)
    return out


def delta(a, b):
    d = {}
    for tid, (comm, v, nv, cpu) in b.items():
        v0, nv0 = (a[tid][1], a[tid][2]) if tid in a else (0, 0)
        if v - v0 or nv - nv0:
            d[f"{comm}/{tid}"] = (v - v0, nv - nv0, cpu)
    return d


def main():
    tls = R.tls_of(sys.argv[1])
    nblocks, out = int(sys.argv[2]), sys.argv[3]
    block = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    trace_every = int(sys.argv[5]) if len(sys.argv) > 5 else 0   # every n-th remote block with the split
    plan = _pin.plan("auto")
    _pin.settle(plan)
    tdir = tempfile.mkdtemp(prefix="gw-s9-")
    env = dict(os.environ, GPUWIRE_RPC_TRACE_DIR=tdir)
    if plan and plan.session is not None:
        env["GPUWIRE_RPC_SERVER_SESSION_CPU"] = str(plan.session)
    tok = secrets.token_hex(8)
    srv, addr = R.start_rpc_server("gpu", tls, tok, cpus=plan.server if plan else None, env=env)
    rows = []
    try:
        s = gpuwire.connect(addr, token=tok, tls=tls)
        _pin.settle(plan)
        ptx = R.find_ptx(None).read_bytes()
        shape = (1024, 256, 256, 16)
        loc = R.LocalMLP(ptx, *shape)
        rem = R.RemoteMLP(s, ptx, *shape)
        st, plan_, loss, lossbuf = rem.st, rem.plan, rem.loss, rem.bufs["loss"]
        loc.timed(200)
        rem.timed(200)
        me, sp = os.getpid(), srv.pid
        traces = []
        gcs = []
        gc.callbacks.append(lambda phase, info: gcs.append((phase, info["generation"], time.perf_counter_ns())))
        lt_ns = np.zeros(block + 1, np.int64)
        rt_ns = np.zeros(block + 1, np.int64)
        pc = time.perf_counter_ns

        def local_steps(n):          # LocalMLP.timed's step, each step's end time kept (no allocation)
            d, lst, lloss, lplan, lbuf = loc.d, loc.st, loc.loss, loc.plan, loc.bufs["loss"]
            lp = loc.loss_ptr
            lt_ns[0] = pc()
            for i in range(n):
                d.cuMemsetD32Async(lbuf, 0, 1, lst)
                for f, grid, ptr in lplan:
                    d.cuLaunchKernel(f, grid, 1, 1, 256, 1, 1, 0, lst, ptr, 0)
                d.cuMemcpyDtoHAsync(lp, lbuf, 4, lst)
                d.cuStreamSynchronize(lst)
                float(lloss[0])
                lt_ns[i + 1] = pc()

        def remote_steps(n):
            L = s.cuLaunchKernel
            rt_ns[0] = pc()
            for i in range(n):
                s.cuMemsetD32Async(lossbuf, 0, 1, st)
                for h, grid, params in plan_:
                    L(h, grid, 1, 1, 256, 1, 1, 0, st, params)
                s.cuMemcpyDtoHAsync(loss, lossbuf, 4, st)
                s.cuStreamSynchronize(st)
                float(loss[0])
                rt_ns[i + 1] = pc()
        for k in range(nblocks):
            c0, s0 = threads(me), threads(sp)
            g0 = len(gcs)
            traced = trace_every and k % trace_every == trace_every - 1
            rfun = (lambda n: traces.append(R._mlp_remote_trace(s, st, plan_, loss, lossbuf, n))) if traced \
                else remote_steps
            if k % 2 == 0:
                local_steps(block)
                c1, s1 = threads(me), threads(sp)
                rfun(block)
            else:
                rfun(block)
                c1, s1 = threads(me), threads(sp)
                local_steps(block)
            c2, s2 = threads(me), threads(sp)
            # the remote block's switches: (c0..c1) when it ran second, else (c1..c2)
            ra, rb = ((c1, c2), (s1, s2)) if k % 2 == 0 else ((c0, c1), (s0, s1))
            if traced:
                ct = traces[-1]
                steps = [ct[j + 1][1] - ct[j][1] for j in range(len(ct) - 1)]
            else:
                steps = np.diff(rt_ns).tolist()
            rows.append({"k": k, "traced": bool(traced), "local_steps_us": (np.diff(lt_ns) / 1e3).tolist(),
                         "local_us": float(np.diff(lt_ns).mean() / 1e3),
                         "remote_steps_us": [x / 1e3 for x in steps], "gc": gcs[g0:],
                         "client_sw": delta(*ra), "server_sw": delta(*rb)})
        s.close()
        doc = R._new_trace(tdir, set(), traces[-1][-1][0])
        if doc is None:
            print("no server trace file", file=sys.stderr)
        else:
            print("trace frames", doc.get("frames_total"), "c_frames", doc.get("c_frames"),
                  "passed", doc.get("passed"), file=sys.stderr)
            for row, ct in zip([r for r in rows if r["traced"]], traces):
                row["split"] = R._trace_split(ct, doc, raw=True)
        loc.close()
    finally:
        R.stop(srv)
    with open(out, "w") as f:
        json.dump({"tls": tls, "block": block, "plan": _pin.describe(plan), "rows": rows}, f)


if __name__ == "__main__":
    main()
