"""TCP segments per round trip over the UCX tcp transport (loopback): hot vs after a D us server wait."""
import os, struct, sys, time
import multiprocessing as mp
os.environ["UCX_TLS"] = "tcp,self"
import gpuwire.transport as t
N = 3000

def nst():
    d = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = open(path).read().splitlines()
        for h, v in zip(lines[0::2], lines[1::2]):
            hp, vp = h.split(), v.split()
            pre = {"Tcp:": "Tcp", "TcpExt:": "TcpExt"}.get(hp[0])
            if pre:
                d.update({pre + k: int(x) for k, x in zip(hp[1:], vp[1:])})
    return d

def server(q):
    ctx = t.Context(); w = t.Worker(ctx); w.spin_us = 5000
    l = w.listen("127.0.0.1", 0); q.put(l.address); ep = l.accept(timeout=30)
    buf = bytearray(64); pc = time.perf_counter_ns
    while True:
        ep.recv(buf, tag=1); a = pc()
        d = struct.unpack_from("<I", buf, 0)[0]
        if d == 0xFFFFFFFF: break
        end = a + d * 1000
        while pc() < end: pass
        ep.send(bytes(buf[:16]), tag=2)

def main():
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=server, args=(q,)); p.start()
    addr = q.get(timeout=60)
    ctx = t.Context(); w = t.Worker(ctx); w.spin_us = 5000
    host, port = addr.rsplit(":", 1); ep = w.connect(host, int(port), timeout=30)
    msg, rep = bytearray(64), bytearray(64)
    f = ep.prepare_call(msg, rep, tag=1, reply_tag=2)
    keys = ["TcpOutSegs", "TcpExtDelayedACKs", "TcpExtTCPPureAcks", "TcpExtTCPHPAcks", "TcpExtTCPHPHits", "TcpExtTCPAutoCorking"]
    for d in (0, 150, 700, 0, 150):
        struct.pack_into("<I", msg, 0, d)
        for _ in range(200): f()
        a = nst(); t0 = time.perf_counter()
        for _ in range(N): f()
        el = time.perf_counter() - t0
        b = nst()
        print(f"wait {d:4d} us: {el/N*1e6:7.1f} us/rt  " + "  ".join(f"{k[6:] if k.startswith('TcpExt') else k}={(b.get(k,0)-a.get(k,0))/N:.2f}" for k in keys))
    struct.pack_into("<I", msg, 0, 0xFFFFFFFF); ep.send(bytes(msg[:16]), tag=1); p.join(10)

main()
