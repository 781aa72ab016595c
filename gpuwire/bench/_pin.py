"""CPU placement for the benches that run a loopback server: ``--pin``.

``none`` leaves placement to the OS. ``auto`` gives the client process one whole physical
core (all its hardware threads: the calling thread and the flush timer) and the server the
next two whole cores, so no spinning thread of one side shares a core with the other side;
the first core is skipped when there are at least four (it usually takes the interrupts).
``C:S`` names the CPUs explicitly, e.g. ``2,3:4-7``. The plan is reported in the bench's
config rows so a result says where it ran."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Set, Tuple


def _parse_list(s: str) -> Set[int]:
    out: Set[int] = set()
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"bad CPU range {part!r}")
            out.update(range(lo, hi + 1))
        else:
            out.add(int(part))
    return out


def cores(allowed: Optional[Set[int]] = None) -> List[Tuple[int, ...]]:
    """The physical cores of the CPUs this process may use, as tuples of CPU ids (from
    sysfs thread_siblings_list; one CPU per core where sysfs does not say)."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    seen: Dict[Tuple[int, ...], None] = {}
    for c in sorted(allowed):
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                sib = tuple(sorted(_parse_list(f.read()) & allowed))
        except (OSError, ValueError):
            sib = (c,)
        seen.setdefault(sib or (c,), None)
    return sorted(seen, key=lambda t: t[0])


def plan(spec: Optional[str]) -> Optional[Tuple[Set[int], Set[int]]]:
    """(client CPUs, server CPUs) for ``spec``, or None for ``none``. Raises ValueError with
    what is wrong for a bad spec or too few CPUs."""
    if spec is None or spec == "none":
        return None
    allowed = set(os.sched_getaffinity(0))
    if spec == "auto":
        cs = cores(allowed)
        if len(cs) < 2:
            raise ValueError(f"--pin auto: needs at least 2 physical cores, this process may use {len(cs)}")
        if len(cs) >= 4:
            cs = cs[1:]
        client = set(cs[0])
        server = set(cs[1])
        if len(cs) >= 3:
            server |= set(cs[2])
        return client, server
    if ":" not in spec:
        raise ValueError(f"--pin {spec!r}: expected none, auto or CLIENT_CPUS:SERVER_CPUS (e.g. 2,3:4-7)")
    a, b = spec.split(":", 1)
    try:
        client, server = _parse_list(a), _parse_list(b)
    except ValueError as e:
        raise ValueError(f"--pin {spec!r}: {e}") from None
    if not client or not server:
        raise ValueError(f"--pin {spec!r}: both sides need at least one CPU")
    bad = (client | server) - allowed
    if bad:
        raise ValueError(f"--pin {spec!r}: CPUs {sorted(bad)} are not available to this process "
                         f"(allowed: {sorted(allowed)})")
    return client, server


def describe(p: Optional[Tuple[Set[int], Set[int]]]) -> str:
    if p is None:
        return "none"
    return f"client {sorted(p[0])} server {sorted(p[1])}"
