"""Thread placement inside this process (Linux): the calling thread on some CPUs, every
other thread of the process on others. Used by the benches' ``--pin`` and by the server's
``rpc_server_session_cpu``. Threads inherit their creator's CPUs, so callers place again
after new threads start (a session's timers and lanes, CUDA's helper threads)."""
from __future__ import annotations

import os
import threading
from typing import FrozenSet, Iterable, Optional, Set


def parse_cpus(s: str) -> Set[int]:
    """A CPU list as Linux writes them, ``"2,4-6"`` -> ``{2, 4, 5, 6}`` (empty string: empty
    set). Raises ValueError naming the part that is not a CPU number or range."""
    out: Set[int] = set()
    for part in str(s).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo or lo < 0:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                v = int(part)
                if v < 0:
                    raise ValueError
                out.add(v)
        except ValueError:
            raise ValueError(f"bad CPU number or range {part!r} in {s!r} (expected e.g. 2,4-6)") from None
    return out


def cpu_list(value) -> FrozenSet[int]:
    """A settings type: a CPU list (:func:`parse_cpus`); empty: none named."""
    if isinstance(value, (set, frozenset, list, tuple)):
        v = frozenset(int(x) for x in value)
        if any(x < 0 for x in v):
            raise ValueError(f"bad CPU numbers {sorted(v)}")
        return v
    return frozenset(parse_cpus(value))


def place_threads(mine: Optional[Iterable[int]], others: Iterable[int]) -> int:
    """The calling thread on ``mine`` (unchanged when None), every other thread of this
    process on ``others``. Returns how many threads were placed; threads that ended
    meanwhile are skipped. Raises ValueError naming the CPUs for an empty or unusable set."""
    mine_s: Optional[Set[int]] = set(mine) if mine is not None else None
    others_s = set(others)
    if not others_s or (mine_s is not None and not mine_s):
        raise ValueError(f"place_threads: empty CPU set (mine {sorted(mine_s) if mine_s is not None else None}, "
                         f"others {sorted(others_s)})")
    me = threading.get_native_id()
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [me]
    n = 0
    for tid in tids:
        cpus = mine_s if tid == me else others_s
        if cpus is None:
            continue
        try:
            os.sched_setaffinity(tid, cpus)
            n += 1
        except (ProcessLookupError, PermissionError):
            pass
        except OSError as e:
            raise ValueError(f"place_threads: CPUs {sorted(cpus)}: {e}") from None
    return n
