"""RMA (put/get/flush) against memory registered in a peer process, over tcp
("tcp,self") and shared memory ("tcp,sm,self"): content checked with crc32 on
both sides and byte-for-byte here; remote range errors; foreign and garbage
keys."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from gpuwire import transport as t
from _transport_peer import pattern

pytestmark = pytest.mark.timeout(90)


def _remote_region(link, size, seed):
    """Have the peer register ``size`` bytes of pattern(size, seed); returns
    (base, length, RemoteKey)."""
    hdr, body = link.command("reg", struct.pack("<QQ", size, seed))
    assert hdr == b"reg"
    base, length = struct.unpack_from("<QQ", body)
    assert length == size
    return base, length, link.ep.unpack_rkey(body[16:])


def _remote_crc(link, base):
    hdr, body = link.command("regcrc", struct.pack("<Q", base))
    assert hdr == b"crc"
    return struct.unpack("<QI", body)


def test_get_whole_region_then_put_and_check_remotely(link):
    size = (1 << 20) + 4097
    base, length, rk = _remote_region(link, size, seed=5)
    assert (rk.base, rk.length) == (base, size)
    want = pattern(size, 5)
    got = np.zeros(size, dtype=np.uint8)
    link.ep.get(got, base, rk, timeout=30)
    assert np.array_equal(got, want)

    new = np.frombuffer(os.urandom(size), dtype=np.uint8)
    link.ep.put(new, base, rk, timeout=30)
    link.ep.flush(timeout=30)
    assert _remote_crc(link, base) == (size, zlib.crc32(new))
    back = np.zeros(size, dtype=np.uint8)
    link.ep.get(back, base, rk, timeout=30)
    assert np.array_equal(back, new)


@pytest.mark.parametrize("n", [1, 8, 93, 5029, 65536, 262145, (1 << 20) + 1])
def test_put_get_sizes_at_offsets(link, n):
    size = (2 << 20) + 64
    base, _, rk = _remote_region(link, size, seed=n)
    model = bytearray(pattern(size, n).tobytes())
    for off in (0, 1, 4093, size - n):
        chunk = os.urandom(n)
        link.ep.put(chunk, base + off, rk, timeout=30)
        model[off:off + n] = chunk
        buf = bytearray(n)
        link.ep.get(buf, base + off, rk, timeout=30)
        assert buf == chunk, f"offset {off}"
    link.ep.flush(timeout=30)
    assert _remote_crc(link, base) == (size, zlib.crc32(model))


def test_many_outstanding_puts_then_flush(link):
    size = 1 << 20
    base, _, rk = _remote_region(link, size, seed=77)
    src = np.frombuffer(os.urandom(size), dtype=np.uint8)
    reqs = [link.ep.put_nb(src[i:i + 4096], base + i, rk) for i in range(0, size, 4096)]
    link.ep.flush(timeout=30)
    link.w.wait_all(reqs, timeout=30)
    assert _remote_crc(link, base) == (size, zlib.crc32(src))
    dst = np.zeros(size, dtype=np.uint8)
    gets = [link.ep.get_nb(dst[i:i + 65536], base + i, rk) for i in range(0, size, 65536)]
    link.w.wait_all(gets, timeout=30)
    assert np.array_equal(dst, src)


def test_local_registered_buffers_work_as_rma_sources_and_targets(link):
    size = 300000
    base, _, rk = _remote_region(link, size, seed=9)
    local = link.ctx.register(size=size)
    try:
        link.ep.get(local.buffer, base, rk, timeout=30)
        assert bytes(local.view()) == pattern(size, 9).tobytes()
        local.view()[:5] = b"HELLO"
        link.ep.put(local.buffer, base, rk, timeout=30)
        link.ep.flush(timeout=10)
        expect = b"HELLO" + pattern(size, 9).tobytes()[5:]
        assert _remote_crc(link, base) == (size, zlib.crc32(expect))
    finally:
        local.close()


def test_out_of_range_access_names_the_range(link):
    size = 4096
    base, _, rk = _remote_region(link, size, seed=1)
    rng = f"[{base:#x}, {base + size:#x})"
    bad = [(b"x", base + size), (b"x" * 2, base + size - 1), (b"x", base - 1),
           (bytes(size + 1), base), (b"x", 0), (b"x", base + (1 << 40))]
    for data, addr in bad:
        with pytest.raises(t.RMAOutOfRange) as ei:
            link.ep.put(data, addr, rk, timeout=5)
        assert rng in str(ei.value) and f"{addr:#x}" in str(ei.value)
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, t.TransportError)
        with pytest.raises(t.RMAOutOfRange, match=rng.replace("[", r"\[").replace(")", r"\)")):
            link.ep.get(bytearray(len(data)), addr, rk, timeout=5)
    # the edges themselves are fine
    link.ep.put(b"E", base + size - 1, rk, timeout=5)
    link.ep.put(b"", base + size, rk, timeout=5)
    first = bytearray(1)
    link.ep.get(first, base, rk, timeout=5)
    assert first == pattern(size, 1).tobytes()[:1]
    with pytest.raises(ValueError, match="non-negative"):
        link.ep.get(bytearray(1), -1, rk)
    with pytest.raises(TypeError, match="read-only"):
        link.ep.get(b"immutable", base, rk)


def test_rkey_from_another_endpoint_is_rejected(link):
    base, _, rk = _remote_region(link, 4096, seed=2)
    other = link.w.connect(link.peer.address, timeout=10)
    try:
        with pytest.raises(ValueError, match="another endpoint"):
            other.put(b"x", base, rk, timeout=5)
        with pytest.raises(ValueError, match="another endpoint"):
            other.get(bytearray(1), base, rk, timeout=5)
        # unpacked on the right endpoint, the same bytes work
        hdr, body = link.command("reg", struct.pack("<QQ", 64, 3))
        b2 = struct.unpack_from("<QQ", body)[0]
        rk2 = other.unpack_rkey(body[16:])
        buf = bytearray(64)
        other.get(buf, b2, rk2, timeout=5)
        assert buf == pattern(64, 3).tobytes()
        with pytest.raises(ValueError, match="another endpoint"):
            link.ep.get(buf, b2, rk2, timeout=5)
    finally:
        other.close()


def test_garbage_keys_and_wrong_key_types(link):
    for bad in (b"", b"\x00", os.urandom(64), os.urandom(1000)):
        with pytest.raises(ValueError, match="not a packed gpuwire memory key"):
            link.ep.unpack_rkey(bad)
    base, _, rk = _remote_region(link, 64, seed=4)
    for bad in (None, b"packed-bytes", 5):
        with pytest.raises(TypeError, match="RemoteKey"):
            link.ep.put(b"x", base, bad)
    assert link.ep.state == "up"
