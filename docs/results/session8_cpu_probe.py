"""Hidden SMT probe: vCPU pairs whose simultaneous busy loops slow each other (host hyperthread
siblings the guest's topology does not show)."""
import os, time, multiprocessing as mp, itertools, json, sys
def spin(cpu, dur, q, go):
    os.sched_setaffinity(0, {cpu})
    go.wait()
    n = 0; end = time.perf_counter() + dur
    while time.perf_counter() < end:
        for _ in range(1000): n += 1
    q.put((cpu, n))
def run(cpus, dur=0.05):
    q = mp.Queue(); go = mp.Event()
    ps = [mp.Process(target=spin, args=(c, dur, q, go)) for c in cpus]
    for p in ps: p.start()
    time.sleep(0.02); go.set()
    out = dict(q.get() for _ in ps)
    for p in ps: p.join()
    return out
if __name__ == '__main__':
  cpus = sorted(os.sched_getaffinity(0))
  alone = {}
  for c in cpus:
    alone[c] = max(run([c])[c] for _ in range(2))
  slow = []
  for a, b in itertools.combinations(cpus, 2):
    r = run([a, b])
    f = min(r[a] / alone[a], r[b] / alone[b])
    slow.append((round(f, 3), a, b))
  slow.sort()
  print("alone rates:", {c: alone[c] for c in cpus})
  print("slowest pairs (rate vs alone):", slow[:12])
  print("median pair:", slow[len(slow) // 2])
