"""Does warming each side's loopback TCP path shortly before a reply crossing (a 1-byte ping on a
private loopback socket pair, ~W us before the reply is due) make the crossings after a wait as
fast as hot ones? Client: send request, spin until due-W, [warm], then wait for the reply.
Server: busy D us in a CPU loop, [warm at D-W], reply. Reports medians of RTT-minus-handler."""
import os, socket, struct, sys, time
import multiprocessing as mp
os.environ["UCX_TLS"] = sys.argv[1] if len(sys.argv) > 1 else "tcp,self"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
W = int(sys.argv[3]) if len(sys.argv) > 3 else 20
import gpuwire.transport as t


def pair():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
    a = socket.create_connection(l.getsockname()); b, _ = l.accept(); l.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); s.setblocking(False)
    return a, b


def warm(a, b, one=b"x"):
    a.send(one)
    while True:
        try:
            b.recv(16); return
        except BlockingIOError:
            pass


def server(q, cpu):
    os.sched_setaffinity(0, {cpu})
    wa, wb = pair()
    ctx = t.Context(); w = t.Worker(ctx); w.spin_us = 5000
    l = w.listen("127.0.0.1", 0); q.put(l.address); ep = l.accept(timeout=30)
    buf = bytearray(64); pc = time.perf_counter_ns
    while True:
        ep.recv(buf, tag=1); a = pc()
        d, kind = struct.unpack_from("<II", buf, 0)
        if d == 0xFFFFFFFF:
            break
        end = a + d * 1000
        if kind & 1:
            while pc() < end - W * 1000:
                pass
            warm(wa, wb)
        while pc() < end:
            pass
        b = pc()
        struct.pack_into("<Q", buf, 8, b - a)
        ep.send(bytes(buf[:16]), tag=2)


def main():
    q = mp.get_context("fork").Queue()
    cpus = sorted(os.sched_getaffinity(0))
    p = mp.get_context("fork").Process(target=server, args=(q, cpus[2] if len(cpus) > 3 else cpus[-1])); p.start()
    addr = q.get(timeout=60)
    os.sched_setaffinity(0, {cpus[1] if len(cpus) > 3 else cpus[0]})
    wa, wb = pair()
    ctx = t.Context(); w = t.Worker(ctx); w.spin_us = 5000
    host, port = addr.rsplit(":", 1); ep = w.connect(host, int(port), timeout=30)
    msg, rep = bytearray(64), bytearray(64)
    pn = time.perf_counter_ns
    kinds = [("hot", 0, 0), ("cpu150", 150, 0), ("warmS150", 150, 1), ("warmC150", 150, 2), ("warmCS150", 150, 3),
             ("cpu700", 700, 0), ("warmCS700", 700, 3)]
    res = {}
    for _ in range(ROUNDS):
        for name, d, k in kinds:
            struct.pack_into("<II", msg, 0, d, k)
            v = []
            for i in range(300 if d < 500 else 120):
                a = pn()
                ep.send(bytes(msg[:16]), tag=1)
                r = ep.recv_nb(rep, tag=2)
                if k & 2:
                    due = a + (d - W) * 1000
                    while pn() < due:
                        w.progress()
                    warm(wa, wb)
                r.wait(timeout=5)
                c = pn()
                v.append(c - a - struct.unpack_from("<Q", rep, 8)[0])
            res.setdefault(name, []).append(round(sorted(v)[len(v) // 2] / 1e3, 2))
    print(f"# {os.environ['UCX_TLS']} W={W}us: median RTT outside the handler (us) per round; {ep.transports}")
    for name, x in res.items():
        print(f"{name:10s}", " ".join(f"{y:.1f}" for y in x), " med", sorted(x)[len(x)//2])
    struct.pack_into("<II", msg, 0, 0xFFFFFFFF, 0); ep.send(bytes(msg[:16]), tag=1); p.join(10)


if __name__ == "__main__":
    main()
