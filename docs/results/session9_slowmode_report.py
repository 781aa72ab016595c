"""Summarise session9_slowmode.py's JSON: per block the remote/local ratio (mean step times),
then for slow blocks (ratio > 1.2) against the others: the step-time percentiles, the split
parts (medians) and the threads that switched."""
import json
import statistics as S
import sys


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else float("nan")


def main(path):
    d = json.load(open(path))
    rows = d["rows"]
    print(f"== {path}: tls={d['tls']} block={d['block']} plan={d['plan']}")
    rat = []
    for r in rows:
        st = r["remote_steps_us"]
        rat.append(S.mean(st) / r["local_us"] if st else float("nan"))
    print("block ratios:", " ".join(f"{x:.2f}" for x in rat))
    for r, x in zip(rows, rat):
        if x > 1.15:
            st, lo = r["remote_steps_us"], r.get("local_steps_us") or []
            med = pct(st, 50)
            print(f"  slow block {r['k']}: ratio {x:.2f}; remote p50 {med:.0f} mean {S.mean(st):.0f} max {max(st):.0f}"
                  f" steps>1.5x p50: {sum(v > 1.5 * med for v in st)}"
                  + (f"; local p50 {pct(lo, 50):.0f} mean {S.mean(lo):.0f} max {max(lo):.0f}" if lo else "")
                  + f"; gc events {len(r.get('gc', []))}"
                  + "; remote steps: " + " ".join(f"{v:.0f}" for v in st[:12]) + " ...")
    slow = [r for r, x in zip(rows, rat) if x > 1.2]
    norm = [r for r, x in zip(rows, rat) if x <= 1.2]
    for name, grp in (("normal", norm), ("slow", slow)):
        if not grp:
            continue
        steps = [x for r in grp for x in r["remote_steps_us"]]
        print(f"  {name}: {len(grp)} blocks; remote step p10/50/90/99/max "
              + "/".join(f"{pct(steps, p):.0f}" for p in (10, 50, 90, 99, 100))
              + f"; local step mean {S.mean(r['local_us'] for r in grp):.1f}")
        parts = {}
        for r in grp:
            for k, v in (r.get("split") or {}).items():
                parts.setdefault(k, []).extend(v)
        print("    split medians: " + ", ".join(f"{k}={pct(v, 50):.1f}" for k, v in parts.items() if v))
        print("    split p90:     " + ", ".join(f"{k}={pct(v, 90):.1f}" for k, v in parts.items() if v))
        sw = {}
        for side in ("client_sw", "server_sw"):
            for th, (v, nv, cpu) in ((k, tuple(x)) for r in grp for k, x in r[side].items()):
                key = side[0] + ":" + th.split("/")[0]
                a = sw.setdefault(key, [0, 0, set()])
                a[0] += v
                a[1] += nv
                a[2].add(cpu)
        print("    switches per block (vol/invol, cpus): " + ", ".join(
            f"{k}={a[0] / len(grp):.0f}/{a[1] / len(grp):.0f}{sorted(a[2])}" for k, a in sorted(sw.items())))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
