"""Same-host mapping of client pinned memory (docs/pinned.md "Same-host mapped regions").

When a client and its server share a host, ``host_alloc`` memory can be *one* memory: the
client allocates it in a sealed memfd, hands the file descriptor to its session on the server
over a unix socket (SCM_RIGHTS), and the server maps the same pages and registers them with
the driver (``cuMemHostRegister``, device-mapped). Kernels then read and write the client's
bytes directly, and copies from or to them are one DMA (a device-to-device copy naming the
mapping's device address): no payload over the transport, no mirror, no change tracking.

This module holds the pieces both sides share, with no CUDA and no UCX in it:

* :func:`boot_id` — same host means the same kernel boot (the hello carries it);
* :func:`make_memfd` — the client's allocation: a memfd sealed against shrinking and growing
  (a server mapping can then never fault on a truncated file), mapped shared;
* :func:`check_fd` — the server's checks on what it was handed (a sealed shared-memory file
  of exactly the announced size), before it maps anything;
* :class:`Listener` — the session's socket on the server: an abstract unix socket (so only
  processes in the same network namespace reach it) that accepts descriptors tagged with the
  session's secret (sent to the client in the authenticated hello reply) and a key; anything
  else is refused and closed;
* :class:`Channel` — the client's end.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import select
import socket
import stat
import struct
import threading
import time
from typing import Dict, List, Optional, Tuple

_MSG = struct.Struct("<4s16sQQ")     # magic, session secret, key, bytes
_MAGIC = b"GWHM"
_PAGE = mmap.PAGESIZE
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0x0002) | getattr(fcntl, "F_SEAL_GROW", 0x0004)
_MAX_CONNS = 4


class HostMapError(Exception):
    """A mapping could not be set up (the message says which step and why)."""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def supported() -> Tuple[bool, str]:
    """(whether this process can make and pass mapped regions, why not)."""
    if not hasattr(os, "memfd_create"):
        return False, "os.memfd_create is missing"
    if not hasattr(socket, "send_fds") or not hasattr(socket, "AF_UNIX"):
        return False, "no unix sockets with descriptor passing"
    if not hasattr(fcntl, "F_ADD_SEALS"):
        return False, "no memfd seals (fcntl.F_ADD_SEALS)"
    if not boot_id():
        return False, "no /proc/sys/kernel/random/boot_id"
    return True, ""


def span_of(nbytes: int) -> int:
    return (int(nbytes) + _PAGE - 1) // _PAGE * _PAGE


def make_memfd(nbytes: int, name: str = "gpuwire-host") -> Tuple[int, mmap.mmap]:
    """A sealed memfd of nbytes rounded up to whole pages and its shared mapping (fd, mmap)."""
    span = span_of(nbytes)
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, span)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mm = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


def check_fd(fd: int, nbytes: int) -> int:
    """What the server checks before it maps a descriptor a client sent: a regular shared-memory
    file sealed against shrinking and growing, exactly nbytes rounded up to pages long. Returns
    that span; raises HostMapError naming what is wrong."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise HostMapError("the descriptor is not a memfd (not a regular file)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise HostMapError(f"the descriptor is not a sealable memfd ({e.strerror})") from None
    if seals & _SEALS != _SEALS:
        raise HostMapError("the memfd is not sealed against shrinking and growing "
                           "(F_SEAL_SHRINK | F_SEAL_GROW): a mapping of it could fault")
    span = span_of(nbytes)
    if st.st_size != span:
        raise HostMapError(f"the memfd holds {st.st_size} B, the call maps {nbytes} B ({span} B of pages)")
    return span


class Listener:
    """The server side of one session's descriptor channel."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(16)
        self.name = f"gpuwire-hostmap-{os.getpid()}-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.bind("\0" + self.name)
            self.sock.listen(_MAX_CONNS)
        except BaseException:
            self.sock.close()
            raise
        self.conns: List[socket.socket] = []
        self.pending: Dict[int, Tuple[int, int]] = {}     # key -> (fd, bytes)
        self.refused = 0
        self.lock = threading.Lock()

    def describe(self) -> Dict[str, str]:
        return {"boot_id": boot_id(), "sock": self.name, "secret": self.secret.hex()}

    def take(self, key: int, nbytes: int, timeout: float = 5.0) -> int:
        """The descriptor the client sent for ``key`` (the caller owns and closes it)."""
        with self.lock:
            deadline = time.monotonic() + timeout
            while key not in self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostMapError(f"no descriptor arrived for key {key} within {timeout:g} s "
                                       f"(the client sends it on the session's unix socket before the call)")
                r, _w, _x = select.select([self.sock] + self.conns, [], [], left)
                for s in r:
                    if s is self.sock:
                        c, _ = self.sock.accept()
                        if len(self.conns) >= _MAX_CONNS:
                            c.close()
                            self.refused += 1
                        else:
                            self.conns.append(c)
                    else:
                        self._read(s)
            fd, n = self.pending.pop(key)
            if n != nbytes:
                os.close(fd)
                raise HostMapError(f"the descriptor for key {key} was sent for {n} B, the call maps {nbytes} B")
            return fd

    def _read(self, c: socket.socket) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(c, _MSG.size, 4)
        except OSError:
            msg, fds = b"", []
        ok = len(msg) == _MSG.size and len(fds) == 1
        if ok:
            magic, secret, key, n = _MSG.unpack(msg)
            ok = magic == _MAGIC and secrets.compare_digest(secret, self.secret) and key not in self.pending
        if not ok:
            # a stranger (wrong secret), a malformed message or a closed connection: drop it
            for fd in fds:
                os.close(fd)
            self.conns.remove(c)
            c.close()
            if msg:
                self.refused += 1
            return
        self.pending[key] = (fds[0], n)

    def close(self) -> None:
        with self.lock:
            for fd, _n in self.pending.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.pending.clear()
            for c in self.conns:
                c.close()
            self.conns.clear()
            self.sock.close()


class Channel:
    """The client side: connects to the session's socket and sends descriptors."""

    def __init__(self, name: str, secret: bytes):
        self.secret = secret
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.connect("\0" + name)
        except BaseException:
            self.sock.close()
            raise
        self.next_key = 1
        self.lock = threading.Lock()      # (host_alloc from several threads: one key each)

    def send(self, fd: int, nbytes: int) -> int:
        with self.lock:
            key = self.next_key
            self.next_key += 1
            socket.send_fds(self.sock, [_MSG.pack(_MAGIC, self.secret, key, int(nbytes))], [fd])
        return key

    def close(self) -> None:
        self.sock.close()
