"""Which vCPUs of this VM slow each other down when both are busy (host hyperthread siblings or
vCPUs time-sharing a host CPU, which the guest's topology does not show)?

One worker process pinned to each CPU spins a counting loop over a window the parent names.
For each pair (a, b): a alone, b alone and both together, in adjacent 20 ms windows (the
vCPUs' own speed drifts, so the alone rates are taken right beside the pair's); two passes.
A pair's factor is min(rate_together / rate_alone) of its two CPUs, median of the passes.

Prints the factors (JSON on the last line) and two placements for ``bench --pin
MAIN/HELPERS:SESSION/SERVER_REST``: "good" (the calling thread and the server's session
thread on the least-interfering CPUs, helpers and the server's rest away from both) and
"bad" (calling thread and session thread on the most-interfering pair). CPU 0 is left out when there are 5 or more.
Usage: python3 session11_pair_probe.py [window_ms] [passes]"""
import itertools
import json
import multiprocessing as mp
import os
import sys
import time


def worker(cpu, conn):
    os.sched_setaffinity(0, {cpu})
    pc = time.perf_counter
    while True:
        msg = conn.recv()
        if msg is None:
            return
        t0, t1 = msg
        while pc() < t0:
            pass
        n = 0
        while pc() < t1:
            for _ in range(200):
                n += 1
        conn.send(n)


def main():
    win = float(sys.argv[1]) / 1e3 if len(sys.argv) > 1 else 0.02
    passes = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    allc = sorted(os.sched_getaffinity(0))
    cpus = [c for c in allc if c != 0] if len(allc) >= 5 else allc
    if len(cpus) < 2:
        sys.exit("needs at least 2 CPUs")
    if cpus != allc:
        os.sched_setaffinity(0, set(allc) - set(cpus))
    ctx = mp.get_context("fork")
    pipes, procs = {}, []
    for c in cpus:
        a, b = ctx.Pipe()
        p = ctx.Process(target=worker, args=(c, b), daemon=True)
        p.start()
        procs.append(p)
        pipes[c] = a

    def window(group):
        t0 = time.perf_counter() + 0.002
        for c in group:
            pipes[c].send((t0, t0 + win))
        return {c: pipes[c].recv() for c in group}

    for c in cpus:      # warm up
        window([c])
    fac = {}
    for _ in range(passes):
        for a, b in itertools.combinations(cpus, 2):
            ra, rb = window([a])[a], window([b])[b]
            r = window([a, b])
            f = min(r[a] / ra, r[b] / rb)
            fac.setdefault((a, b), []).append(f)
    for p in pipes.values():
        p.send(None)
    med = {k: sorted(v)[len(v) // 2] for k, v in fac.items()}

    def f(a, b):
        return med[(a, b) if a < b else (b, a)]
    ranked = sorted(med.items(), key=lambda kv: kv[1])
    print("worst pairs:", [(k, round(v, 3)) for k, v in ranked[:10]])
    vals = sorted(med.values())
    print("pair factor p10/p50/p90:", [round(vals[int(q * (len(vals) - 1))], 3) for q in (0.1, 0.5, 0.9)])

    if len(cpus) < 4:
        print(json.dumps({"factors": {f"{a},{b}": round(v, 3) for (a, b), v in med.items()}}))
        return
    # good: the pair with the least interference for calling thread and session thread, then
    # helpers and server rest with the least interference with both
    (m, s), _ = max(med.items(), key=lambda kv: kv[1])
    rest = [c for c in cpus if c not in (m, s)]
    rest.sort(key=lambda c: -min(f(c, m), f(c, s)))
    good = (m, rest[0], s, rest[1])
    (bm, bs), _ = ranked[0]
    rest = [c for c in cpus if c not in (bm, bs)]
    rest.sort(key=lambda c: -min(f(c, bm), f(c, bs)))
    bad = (bm, rest[0], bs, rest[1])
    spec = lambda t: f"{t[0]}/{t[1]}:{t[2]}/{t[3]}"
    print("good:", spec(good), "main-session", round(f(good[0], good[2]), 3))
    print("bad:", spec(bad), "main-session", round(f(bad[0], bad[2]), 3))
    print(json.dumps({"good": spec(good), "bad": spec(bad), "window_ms": win * 1e3, "passes": passes,
                      "factors": {f"{a},{b}": round(v, 3) for (a, b), v in med.items()}}))


if __name__ == "__main__":
    main()
