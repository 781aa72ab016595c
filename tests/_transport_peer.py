"""Subprocess peer for the transport tests (tests/test_transport*.py).

Run as ``python tests/_transport_peer.py ROLE --tls TLS [options]``. The peer
prints one JSON line when it is ready (``{"pid", "port", "address", ...}``)
and later JSON event lines (``{"event": ...}``) on stdout; tests start peers
and read those lines through :class:`Peer` (bottom of this file, and the
``spawn_peer`` fixture in conftest.py).

Roles
-----
server   listen on --host:--port, accept connections forever (a thread per
         endpoint) and serve them in --mode:
           cmd   echo every message back (same tag, header and payload), and
                 run commands: a message whose header is b"!gw:" + name is a
                 command with the payload as argument (see ``Server._command``):
                 quiet, reg, regcrc, send, delay, close, waitlost.
           cecho accept one endpoint and run the C echo loop (Endpoint.serve_echo)
                 until the stop tag 0xFFFFFF, then close it and exit 0.
client   connect to --connect HOST:PORT and run --mode:
           hold  connect, send b"hello" (header b"hi"), then wait in recv until the
                 connection goes down (reports an ``lost`` event) or 60 s pass.
           multi connect --conns endpoints from one worker, send a distinct
                 message on each (tag = index), check each endpoint gets back
                 b"ack:" + its own message; reports ``{"event": "multi", "ok": ...}``.
           check exchange --sizes through a cmd-mode server, verify the echoed
                 content; report the result and ep.transports, then hold like
                 ``hold`` so the test can kill the server.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
import zlib

from gpuwire import settings
from gpuwire import transport as t

_print_lock = threading.Lock()
CMD = b"!gw:"  # header prefix of a command message (anything else is echoed)


def emit(obj) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def pattern(n: int, seed: int):
    """Deterministic pseudo-random bytes as a uint8 numpy array (shared by tests
    and peer): random up to 1 MiB, beyond that the 1 MiB block repeats with each
    block's first 8 bytes replaced by its index, so misplaced blocks differ."""
    import numpy as np

    block = np.random.default_rng(seed).integers(0, 256, size=min(n, 1 << 20), dtype=np.uint8)
    if n <= block.size:
        return block
    out = np.resize(block, n)
    # stamp every 1 MiB block with its index so that misplaced blocks differ
    nblk = (n + (1 << 20) - 1) >> 20
    idx = np.arange(nblk, dtype=np.uint64).view(np.uint8).reshape(nblk, 8)
    view = out[: (n >> 20) << 20].reshape(-1, 1 << 20)
    view[:, :8] = idx[: view.shape[0]]
    return out


def _exc(e: BaseException) -> dict:
    return {"type": type(e).__name__, "msg": str(e), "t": time.monotonic()}


# ---------------------------------------------------------------- server


class Server:
    def __init__(self, args):
        self.args = args
        self.ctx = t.Context({"TLS": args.tls})
        self.w = self.ctx.worker()
        self.l = self.w.listen(args.host, args.port)
        self.max_msg = args.max_msg
        self.regions = []

    def ready(self):
        emit({"pid": os.getpid(), "port": self.l.port, "address": self.w.address.hex(),
              "host": self.args.host, "spin_us": self.w.spin_us})

    def run(self):
        self.ready()
        if self.args.mode == "cecho":
            ep = self.l.accept(timeout=60)
            buf = bytearray(2 * (self.max_msg + 256))
            try:
                ep.serve_echo(buf)
            except t.TransportError as e:
                emit({"event": "echo_end", **_exc(e)})
                return 3
            emit({"event": "echo_end", "type": None})
            ep.close()
            return 0
        while True:
            try:
                ep = self.l.accept(timeout=float("inf"))
            except t.TransportError as e:  # pragma: no cover - diagnostic
                emit({"event": "accept_error", **_exc(e)})
                return 2
            th = threading.Thread(target=self.serve, args=(ep,), daemon=True)
            th.start()

    def serve(self, ep):
        buf = bytearray(self.max_msg + 256)
        mv = memoryview(buf)
        quiet = False
        while True:
            try:
                rr = ep.recv(buf, timeout=float("inf"))
            except t.MessageTruncated as e:  # too big for --max-msg: say so, go on
                emit({"event": "peer_error", **_exc(e)})
                continue
            except t.TransportError as e:
                emit({"event": "served_lost", "peer_pid": ep.peer_pid, **_exc(e)})
                ep.close()  # a lost endpoint closes cleanly
                return
            hl, n = rr.header_len, rr.nbytes
            header, payload = bytes(mv[:hl]), mv[hl:n]
            try:
                if header.startswith(CMD):
                    quiet = self._command(ep, header[len(CMD):].decode(errors="replace"),
                                          bytes(payload), rr.tag, quiet)
                    if quiet is None:
                        return
                elif not quiet:
                    ep.send(payload, header=header, tag=rr.tag, timeout=60)
            except t.TransportError as e:
                emit({"event": "served_lost", "peer_pid": ep.peer_pid, **_exc(e)})
                ep.close()  # a lost endpoint closes cleanly
                return
            except Exception as e:  # a bug here: say so, keep serving
                emit({"event": "peer_error", **_exc(e)})

    def _command(self, ep, cmd, arg, tag, quiet):
        """Run one command; returns the new quiet flag, None to end this endpoint."""
        if cmd == "quiet":  # swallow every later message (the peer waits in vain)
            ep.send(b"quiet", header=b"ok", tag=tag, timeout=10)
            return True
        if cmd == "reg":  # register size bytes of pattern(seed): reply base, length, key
            size, seed = struct.unpack("<QQ", arg)
            data = bytearray(pattern(size, seed))
            mr = self.ctx.register(data)
            self.regions.append((mr, data))
            ep.send(struct.pack("<QQ", mr.base, mr.length) + mr.pack(), header=b"reg", tag=tag,
                    timeout=10)
            return quiet
        if cmd == "regcrc":  # crc32 of a region registered by "reg"
            (base,) = struct.unpack("<Q", arg)
            for mr, data in self.regions:
                if mr.base == base:
                    ep.send(struct.pack("<QI", len(data), zlib.crc32(data)), header=b"crc",
                            tag=tag, timeout=10)
                    break
            else:
                ep.send(b"", header=b"nope", tag=tag, timeout=10)
            return quiet
        if cmd == "send":  # arg: (tag, size, seed) triples, sent in that order
            reqs = []
            for i in range(0, len(arg), 24):
                tg, size, seed = struct.unpack_from("<QQQ", arg, i)
                reqs.append(ep.send_nb(pattern(size, seed), tag=tg))
            self.w.wait_all(reqs, timeout=60)
            return quiet
        if cmd == "delay":  # sleep WITHOUT progressing, then reply
            (secs,) = struct.unpack("<d", arg)
            time.sleep(secs)
            ep.send(b"late", header=b"ok", tag=tag, timeout=10)
            return quiet
        if cmd == "close":  # close this endpoint from our side
            ep.close()
            emit({"event": "closed", "token": arg.decode()})
            return None
        if cmd == "waitlost":  # post a recv, say so, and report how it ends
            req = ep.recv_nb(bytearray(64), tag=0x777, tag_mask=t.EXACT_TAG)
            ep.send(b"armed", header=b"ok", tag=tag, timeout=10)
            t0 = time.monotonic()
            try:
                req.wait(timeout=10)
                ev = {"type": None}
            except t.TransportError as e:
                ev = _exc(e)
            lost = [x.id for x in self.w.poll_lost()]
            emit({"event": "waitlost", "token": arg.decode(), "dt": time.monotonic() - t0,
                  "poll_lost": lost, "ep_id": ep.id, "state": ep.state, **ev})
            ep.close()  # a lost endpoint closes cleanly
            return None
        ep.send(f"unknown command {cmd}".encode(), header=b"err", tag=tag, timeout=10)
        return quiet


# ---------------------------------------------------------------- client


def _hold(ep, what="hold"):
    emit({"event": "ready", "mode": what, "ep_id": ep.id, "transports": ep.transports,
          "peer_pid": ep.peer_pid})
    try:
        ep.recv(bytearray(64), tag=0x778, tag_mask=t.EXACT_TAG, timeout=60)
        emit({"event": "lost", "type": None})
        return 1
    except t.TransportError as e:
        emit({"event": "lost", "poll_lost": [x.id for x in ep.worker.poll_lost()], **_exc(e)})
        return 0


def client(args) -> int:
    ctx = t.Context({"TLS": args.tls})
    w = ctx.worker()
    if args.mode == "hold":
        ep = w.connect(args.connect, timeout=10)
        ep.send(b"hello", header=b"hi", tag=1, timeout=10)
        return _hold(ep)
    if args.mode == "check":
        ep = w.connect(args.connect, timeout=10)
        results = []
        ok = True
        buf = bytearray(max(args.sizes) + 256)
        for i, n in enumerate(args.sizes):
            data = pattern(n, 1000 + i)
            hdr = b"h%d" % i if i % 2 else b""
            req = ep.recv_nb(buf, tag=i, tag_mask=t.EXACT_TAG)
            ep.send(data, header=hdr, tag=i, timeout=20)
            rr = req.wait(timeout=20)
            good = (rr.nbytes == len(hdr) + n and rr.header_len == len(hdr)
                    and bytes(buf[:len(hdr)]) == hdr
                    and zlib.crc32(memoryview(buf)[len(hdr):rr.nbytes]) == zlib.crc32(data))
            ok &= good
            results.append([n, good])
        emit({"event": "checked", "ok": ok, "results": results, "transports": ep.transports})
        return _hold(ep, "check")
    if args.mode == "multi":
        eps = [w.connect(args.connect, timeout=20) for _ in range(args.conns)]
        msgs, reqs, bufs = [], [], []
        for i, ep in enumerate(eps):
            m = (b"%d:%d:" % (os.getpid(), i)) * (1 + i % 7)
            msgs.append(m)
            bufs.append(bytearray(len(m) + 64))
            reqs.append(ep.recv_nb(bufs[-1], tag=i, tag_mask=t.EXACT_TAG))
        sends = [ep.send_nb(m, header=b"m", tag=i) for i, (ep, m) in enumerate(zip(eps, msgs))]
        w.wait_all(sends, timeout=30)
        bad = []
        for i, (req, m) in enumerate(zip(reqs, msgs)):
            rr = req.wait(timeout=30)
            got = bytes(bufs[i][rr.header_len:rr.nbytes])
            if got != b"ack:" + m or rr.endpoint is not eps[i]:
                bad.append(i)
        emit({"event": "multi", "ok": not bad, "bad": bad, "n": len(eps)})
        time.sleep(0.2)
        for ep in eps:
            ep.close()
        return 0 if not bad else 1
    raise SystemExit(f"unknown client mode {args.mode}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--tls", default="tcp,self")
    p.add_argument("--mode", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--connect", default=None)
    p.add_argument("--max-msg", type=int, default=2 << 20)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--spin-us", type=float, default=None)
    args = p.parse_args(argv)
    if args.spin_us is not None:
        settings.set("spin_us", args.spin_us)
    if args.role == "server":
        args.mode = args.mode or "cmd"
        return Server(args).run()
    args.mode = args.mode or "hold"
    return client(args)


# ------------------------------------------------- test side: peer handle

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_transport_peer.py")


def _die_with_parent():
    """In the child before exec: SIGKILL it when the test process dies (so a crashed
    test run leaves no peers behind; survives `ip netns exec`/`unshare` execs)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


class Peer:
    """A running peer subprocess (test side): ready info, event lines, kill."""

    def __init__(self, args, prefix=(), env=None, ready_timeout=20.0, ready=True):
        import queue
        import subprocess

        self.argv = list(prefix) + [sys.executable, SCRIPT] + [str(a) for a in args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=full_env, cwd=os.path.dirname(HERE),
                                     preexec_fn=_die_with_parent)
        self._lines = queue.Queue()
        self.stderr_lines = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()
        self.info = {}
        if ready:  # servers print a ready line; clients may not
            try:
                self.info = self.next_line(ready_timeout)
            except BaseException:
                self.close()
                raise
        self.pid = self.info.get("pid", self.proc.pid)
        self.port = self.info.get("port")

    @staticmethod
    def _pump(f, q):
        for line in iter(f.readline, b""):
            q.put(line.decode(errors="replace"))
        q.put(None)

    def _pump_err(self):
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr_lines.append(line.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines[-40:])

    def next_line(self, timeout=10.0) -> dict:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"peer {self.argv} said nothing within {timeout}s; "
                                     f"stderr:\n{self.stderr}") from None
            if line is None:
                self.proc.wait(timeout=5)
                time.sleep(0.05)
                raise AssertionError(f"peer exited (rc={self.proc.returncode}) before the "
                                     f"expected line; stderr:\n{self.stderr}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def event(self, name, timeout=10.0, **match) -> dict:
        """The next event line called ``name`` (whose fields equal ``match``)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next_line(max(deadline - time.monotonic(), 0.001))
            if ev.get("event") == name and all(ev.get(k) == v for k, v in match.items()):
                return ev

    @property
    def address(self) -> str:
        return f"{self.info['host']}:{self.port}"

    def kill(self) -> float:
        """SIGKILL the peer; returns time.monotonic() taken just before the signal."""
        import signal

        t0 = time.monotonic()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return t0

    def wait(self, timeout=10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(getattr(self, "pid", self.proc.pid), 9)
            except ProcessLookupError:
                pass
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                pass
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(main())
