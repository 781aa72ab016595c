"""CPU placement for the benches that run a loopback server: ``--pin``.

``none`` leaves placement to the OS. ``auto`` gives the client's calling thread one whole
physical core of its own, the client's other threads (the flush timer, progress threads of
bulk lanes, UCX's and CUDA's helper threads) the next whole core, and the server the next two
(its session thread alone on the first: ``rpc_server_session_cpu``; its spare session workers
start on a fifth core when there is one: ``rpc_worker_spawn_cpus``), so no spinning thread of
one side shares a core with the other side, and no helper thread preempts the calling thread
or the server's session thread (a flush timer that wakes once per delay would
otherwise interrupt it on a shared CPU, at any point of a step). With only two or three cores
the client's threads share one core. The first core is skipped when there are at least five
(it usually takes the interrupts). ``C:S`` names the CPUs explicitly, e.g. ``2,3:4-7`` (all
client threads on C); ``M/H:S/R`` writes the auto plan out by hand: the calling thread on M,
the client's other threads on H, the server's session thread on the one CPU S, its other
threads (and spare workers' starts) on R, e.g. ``1/2:3/4``. The plan is reported in the
bench's config rows so a result says where it ran."""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from .._affinity import parse_cpus, place_threads


class Plan(NamedTuple):
    client: Set[int]                 # every CPU of the client process
    server: Set[int]
    main: Optional[Set[int]] = None  # the client's calling thread alone (its other threads: client - main)
    session: Optional[int] = None    # the server's session thread alone (rpc_server_session_cpu; others: server - {session})
    spawn: Optional[Set[int]] = None  # where the server's spare session workers start (rpc_worker_spawn_cpus)


def cores(allowed: Optional[Set[int]] = None) -> List[Tuple[int, ...]]:
    """The physical cores of the CPUs this process may use, as tuples of CPU ids (from
    sysfs thread_siblings_list; one CPU per core where sysfs does not say)."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else allowed
    seen: Dict[Tuple[int, ...], None] = {}
    for c in sorted(allowed):
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                sib = tuple(sorted(parse_cpus(f.read()) & allowed))
        except (OSError, ValueError):
            sib = (c,)
        seen.setdefault(sib or (c,), None)
    return sorted(seen, key=lambda t: t[0])


def plan(spec: Optional[str]) -> Optional[Plan]:
    """The :class:`Plan` for ``spec``, or None for ``none``. Raises ValueError with what is
    wrong for a bad spec or too few CPUs."""
    if spec is None or spec == "none":
        return None
    allowed = set(os.sched_getaffinity(0))
    if spec == "auto":
        cs = cores(allowed)
        if len(cs) < 2:
            raise ValueError(f"--pin auto: needs at least 2 physical cores, this process may use {len(cs)}")
        if len(cs) >= 5:
            cs = cs[1:]
        if len(cs) >= 4:
            main, helpers, server = set(cs[0]), set(cs[1]), set(cs[2]) | set(cs[3])
            # a fifth core, when there is one, for the server's spare workers to start on: the
            # pool refills at each connect, and a start (Python, UCX, CUDA: ~1 s of a CPU) on the
            # server's two cores slowed the session measured meanwhile by up to 1.5x (session 9)
            return Plan(main | helpers, server, main, min(server), set(cs[4]) if len(cs) >= 5 else None)
        return Plan(set(cs[0]), set().union(*cs[1:3]))
    if ":" not in spec:
        raise ValueError(f"--pin {spec!r}: expected none, auto, CLIENT_CPUS:SERVER_CPUS (e.g. 2,3:4-7) "
                         f"or MAIN/HELPERS:SESSION/SERVER_REST (e.g. 1/2:3/4)")
    a, b = spec.split(":", 1)
    if "/" in a or "/" in b:
        return _split_plan(spec, a, b, allowed)
    try:
        client, server = parse_cpus(a), parse_cpus(b)
    except ValueError as e:
        raise ValueError(f"--pin {spec!r}: {e}") from None
    if not client or not server:
        raise ValueError(f"--pin {spec!r}: both sides need at least one CPU")
    _check_allowed(spec, client | server, allowed)
    return Plan(client, server)


def _check_allowed(spec: str, cpus: Set[int], allowed: Set[int]) -> None:
    bad = cpus - allowed
    if bad:
        raise ValueError(f"--pin {spec!r}: CPUs {sorted(bad)} are not available to this process "
                         f"(allowed: {sorted(allowed)})")


def _split_plan(spec: str, a: str, b: str, allowed: Set[int]) -> Plan:
    """``MAIN/HELPERS:SESSION/REST``: the client's calling thread on MAIN and its other
    threads on HELPERS; the server's session thread on the one CPU SESSION and its other
    threads on REST (spare workers start there too). The auto plan written out, for placing
    the threads on CPUs chosen by hand (e.g. away from vCPUs that share a host core)."""
    parts = []
    for side, what in ((a, ("MAIN", "HELPERS")), (b, ("SESSION", "SERVER_REST"))):
        if side.count("/") != 1:
            raise ValueError(f"--pin {spec!r}: expected MAIN/HELPERS:SESSION/SERVER_REST (e.g. 1/2:3/4)")
        for name, txt in zip(what, side.split("/")):
            try:
                cpus = parse_cpus(txt)
            except ValueError as e:
                raise ValueError(f"--pin {spec!r}: {name}: {e}") from None
            if not cpus:
                raise ValueError(f"--pin {spec!r}: {name} needs at least one CPU")
            parts.append(cpus)
    main, helpers, session, rest = parts
    if len(session) != 1:
        raise ValueError(f"--pin {spec!r}: SESSION is one CPU (the server's session thread), got {sorted(session)}")
    _check_allowed(spec, main | helpers | session | rest, allowed)
    if main & helpers:
        raise ValueError(f"--pin {spec!r}: MAIN and HELPERS share CPUs {sorted(main & helpers)} "
                         f"(the calling thread is placed alone)")
    if session & rest:
        raise ValueError(f"--pin {spec!r}: SESSION and SERVER_REST share CPU {min(session)} "
                         f"(the session thread is placed alone)")
    return Plan(main | helpers, session | rest, main, min(session), rest)


def settle(p: Optional[Plan]) -> int:
    """Apply ``p`` to this process's threads as they are now: the calling thread on
    ``p.main``, every other thread on the rest of the client's CPUs (without ``main``: all
    on ``p.client``). Threads started later inherit their creator's CPUs, so call it again
    after a session connects (its flush timer and lane threads) or CUDA starts (its helper
    threads). Returns how many threads were placed; threads that ended meanwhile are skipped."""
    if p is None:
        return 0
    if p.main:
        return place_threads(p.main, p.client - p.main)
    return place_threads(p.client, p.client)


def describe(p: Optional[Plan]) -> str:
    if p is None:
        return "none"
    cl = f"client {sorted(p.client)}"
    if p.main:
        cl += f" (calling thread {sorted(p.main)}, others {sorted(p.client - p.main)})"
    srv = f"server {sorted(p.server)}"
    if p.session is not None:
        srv += f" (session thread {p.session}, others {sorted(p.server - {p.session})})"
    if p.spawn:
        srv += f", spare workers start on {sorted(p.spawn)}"
    return f"{cl} {srv}"
