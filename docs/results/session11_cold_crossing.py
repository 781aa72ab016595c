"""Round trips over the transport with the server busy for a while before each reply, the
client spinning meanwhile (as in a training step's sync): how much of the round trip lies
outside the server's handler (the two crossings and the client's own path), against a hot
ping-pong? The server is busy either in a CPU loop (no UCX progress) or in a GPU wait
(torch.cuda._sleep + torch.cuda.synchronize, CUDA's default spin-wait), so a CUDA wait's own
effect on the next crossing shows, or in a loop of worker progress calls (prog150); head*: busy
in a CPU loop, but sending the client a small message 20 us before the end (does a crossing
just before the reply make the reply's crossing warm?). Reply carries the handler's duration; the client reports
median(RTT - handler) per setting and round, and the two one-way times
(both processes read CLOCK_MONOTONIC).
Usage: python3 session11_cold_crossing.py TLS [rounds] [gpu]  (TLS e.g. tcp,self, tcp,sm,self or
sm,self: without tcp the two connect by worker address and neither side's polling makes syscalls)"""
import os
import struct
import sys
import time
import multiprocessing as mp

os.environ["UCX_TLS"] = sys.argv[1] if len(sys.argv) > 1 else "tcp,self"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
GPU = len(sys.argv) > 3 and sys.argv[3] == "gpu"
import gpuwire.transport as t


def server(q, cpu):
    os.sched_setaffinity(0, {cpu})
    sleep = sync = None
    cyc_per_us = 0.0
    if GPU:
        import torch
        torch.cuda.init()
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        a = time.perf_counter()
        torch.cuda._sleep(10_000_000)
        torch.cuda.synchronize()
        cyc_per_us = 10_000_000 / ((time.perf_counter() - a) * 1e6)
        sleep, sync = torch.cuda._sleep, torch.cuda.synchronize
    ctx = t.Context()
    w = t.Worker(ctx)
    w.spin_us = 5000
    if "tcp" in os.environ["UCX_TLS"]:
        l = w.listen("127.0.0.1", 0)
        q.put((l.address, cyc_per_us))
        ep = l.accept(timeout=30)
    else:               # no tcp: connect by worker address (no epoll_wait in either side's polling)
        q.put((w.address, cyc_per_us))
        ep = w.accept_address(timeout=30)
    buf = bytearray(64)
    pc = time.perf_counter_ns
    last_send = 0
    while True:
        ep.recv(buf, tag=1)
        a = pc()
        d, kind = struct.unpack_from("<II", buf, 0)
        if d == 0xFFFFFFFF:
            break
        if d and kind == 0:
            end = a + d * 1000
            while pc() < end:
                pass
        elif d and kind == 3:       # busy, with a heads-up message to the client 20 us before the end
            end = a + d * 1000
            while pc() < end - 20000:
                pass
            ep.send(b"headsup!", tag=3)
            while pc() < end:
                pass
        elif d and kind == 2:       # busy, but progressing the worker (epoll_wait per pass over tcp)
            end = a + d * 1000
            while pc() < end:
                w.progress()
        elif d:
            sleep(int(d * cyc_per_us))
            sync()
        b = pc()
        # handler time, recv returned, send called, the previous reply's send call (ns)
        struct.pack_into("<QQQQ", buf, 8, b - a, a, b, last_send)
        ep.send(bytes(buf[:40]), tag=2)
        last_send = pc() - b


def main():
    mc = mp.get_context("spawn" if GPU else "fork")
    q = mc.Queue()
    cpus = sorted(os.sched_getaffinity(0))
    p = mc.Process(target=server, args=(q, cpus[2] if len(cpus) > 3 else cpus[-1]))
    p.start()
    addr, cyc = q.get(timeout=120)
    os.sched_setaffinity(0, {cpus[1] if len(cpus) > 3 else cpus[0]})
    ctx = t.Context()
    w = t.Worker(ctx)
    w.spin_us = 5000
    if isinstance(addr, bytes):
        ep = w.connect_address(addr, timeout=30)
    else:
        host, port = addr.rsplit(":", 1)
        ep = w.connect(host, int(port), timeout=30)
    msg, rep = bytearray(64), bytearray(64)
    f = ep.prepare_call(msg, rep, tag=1, reply_tag=2)
    pn = time.perf_counter_ns
    kinds = [("hot", 0, 0), ("cpu150", 150, 0), ("cpu700", 700, 0), ("prog150", 150, 2),
             ("head150", 150, 3), ("head700", 700, 3)]
    hb = bytearray(16)
    if GPU:
        kinds += [("gpu150", 150, 1), ("gpu700", 700, 1)]
    res = {}
    for _ in range(ROUNDS):
        for name, d, k in kinds:
            struct.pack_into("<II", msg, 0, d, k)
            v, up, down, snd = [], [], [], []
            for i in range(400 if d < 500 else 150):
                hr = ep.recv_nb(hb, tag=3) if k == 3 else None
                a = pn()
                f()
                c = pn()
                if hr is not None:
                    hr.wait(timeout=5)
                h, ra, sb, ls = struct.unpack_from("<QQQQ", rep, 8)
                v.append(c - a - h)
                up.append(ra - a)
                down.append(c - sb)
                if i:
                    snd.append(ls)
            med = lambda x: sorted(x)[len(x) // 2] / 1e3
            res.setdefault(name, []).append(tuple(round(med(x), 2) for x in (v, up, down, snd)))
    print(f"# {os.environ['UCX_TLS']}: medians (us) per round of: round trip outside the server's handler, "
          f"request (client call -> server recv returned), reply (server send called -> client call returned), "
          f"the server's send call (pack + Endpoint.send);"
          f" transports {ep.transports}")
    for name, x in res.items():
        print(f"{name:7s}", " ".join("/".join(f"{y:.1f}" for y in z) for z in x))
    struct.pack_into("<II", msg, 0, 0xFFFFFFFF, 0)
    ep.send(bytes(msg), tag=1)
    p.join(10)


if __name__ == "__main__":
    main()
