"""Session 9 probe 2: the bench's own loops (LocalMLP.timed / RemoteMLP.timed through
interleave, warm 3) in one session for all rounds vs a new session (and local context) per
round as `gpuwire bench rpc` does; prints each round's ratio and block-ratio p10/p50/p90 and
the server's worker processes alive at each round's start (with their CPU time).

Modes: same (one session and local context for all rounds), fresh (both new per round, as the
bench), fresh_remote (a new session per round), fresh_local (a new local context per round).
Also: nvidia-smi's compute processes at each round's start, and how long the closed session's
worker process takes to exit.

usage: python3 session9_slowmode2.py sm|tcp MODE ROUNDS"""
import os
import secrets
import subprocess
import sys
import time

import gpuwire
import gpuwire.rpc.client  # noqa: F401
from gpuwire.bench import _pin
from gpuwire.bench import rpc as R


def workers(pid, pids=False):
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,time=,psr=,stat="], capture_output=True, text=True).stdout
    if pids:
        return {line.split()[0]: line.split()[3] for line in out.splitlines()}
    return " | ".join(" ".join(line.split()) for line in out.splitlines())


def main():
    tls, mode, rounds = R.tls_of(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    plan = _pin.plan("auto")
    _pin.settle(plan)
    env = dict(os.environ, GPUWIRE_RPC_SERVER_SESSION_CPU=str(plan.session))
    tok = secrets.token_hex(8)
    srv, addr = R.start_rpc_server("gpu", tls, tok, cpus=plan.server, env=env)
    ptx = R.find_ptx(None).read_bytes()
    shape = (1024, 256, 256, 16)
    try:
        s = loc = None
        for r in range(rounds):
            gone = ""
            if loc is None or mode in ("fresh", "fresh_local"):
                if loc is not None:
                    loc.close()
                loc = R.LocalMLP(ptx, *shape)
                loc.timed(3)
            if s is None or mode in ("fresh", "fresh_remote"):
                if s is not None:
                    before = set(workers(srv.pid, pids=True))
                    s.close()
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 30:    # the closed session's worker: exited when?
                        now = workers(srv.pid, pids=True)
                        if any(now.get(p, "Z").startswith("Z") for p in before):
                            gone = f" old worker exited after {time.monotonic() - t0:.2f} s;"
                            break
                        time.sleep(0.01)
                    else:
                        gone = " old worker still alive after 30 s;"
                s = gpuwire.connect(addr, token=tok, tls=tls)
                _pin.settle(plan)
                rem = R.RemoteMLP(s, ptx, *shape)
                rem.timed(3)
            w = workers(srv.pid)
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip().replace("\n", " | ")
            iv = R.interleave(loc.timed, rem.timed, 2000, 100, 3)
            br = R._pcts(iv["block_ratios"], (10, 50, 90))
            print(f"{sys.argv[1]} {mode} round {r}: ratio {iv['remote_s'] / iv['local_s']:.3f} blocks p10/50/90 "
                  + "/".join(f"{x:.3f}" for x in br) + f" ;{gone} workers at start: {w}; GPU apps: {apps}", flush=True)
        s.close()
        loc.close()
    finally:
        R.stop(srv)


if __name__ == "__main__":
    main()
