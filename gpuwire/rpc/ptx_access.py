"""Which kernel parameters may be written through: a conservative scan of PTX text.

Used by the pinned-buffer mirroring (gpuwire/rpc/pinned.py, docs/pinned.md): a region
reached only through parameters the kernel never writes through need not be pulled
back after the launch. For each ``.entry`` the scan follows every parameter's value
from its ``ld.param`` through registers (any instruction whose sources include a
tainted register taints its destinations: mov, cvta, add, mad, selp, ...; iterated to
a fixed point, so loops are covered) and marks a parameter **written** when

* a register derived from it is the address of a store-like instruction to global or
  generic memory (``st``, ``atom``, ``red``, ``cp.*``, ``multimem``, any memory
  instruction other than ``ld``/``ldu``/``prefetch``/``prefetchu``/``isspacep``/
  ``cvta``); shared, local and param-space stores do not count;
* a value derived from it is stored anywhere or passed to a ``call`` (the pointer
  escapes: something else may write through it later);
* the parameter symbol is used other than as the address of ``ld.param`` (its address
  is taken).

And **every** parameter is marked written when a global/generic store, atomic or
reduction goes through an address derived from no parameter at all (a pointer loaded
from memory, a global symbol: it may point anywhere), or when the entry cannot be
parsed. Anything not understood counts as "may write": the scan can only turn a
pull off where it is sure. Cubin/fatbin images are not scanned (nothing is inferred).
"""
from __future__ import annotations

import re
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$.][\w$.]*)\s*\(")
_PARAM = re.compile(r"\.param\b[^,)]*?\s([A-Za-z_$][\w$]*)\s*(?:\[\s*\d+\s*\])?\s*$")
_REG = re.compile(r"%[A-Za-z_$][\w$]*")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_READS = ("ld", "ldu", "prefetch", "prefetchu", "isspacep", "cvta", "applypriority", "discard", "createpolicy")
_NOMEM_SPACES = (".shared", ".local", ".param", ".const")
_SPECIAL = frozenset(("%tid", "%ntid", "%ctaid", "%nctaid", "%laneid", "%warpid", "%nwarpid", "%smid", "%nsmid",
                      "%gridid", "%clock", "%clock64", "%globaltimer", "%lanemask_eq", "%lanemask_le",
                      "%lanemask_lt", "%lanemask_ge", "%lanemask_gt", "%dynamic_smem_size", "%total_smem_size"))


def _body(text: str, start: int) -> Optional[Tuple[str, str, int]]:
    """(parameter list, body, end) of the entry whose '(' is at start-1."""
    close = text.find(")", start)
    if close < 0:
        return None
    params = text[start:close]
    o = text.find("{", close)
    if o < 0:
        return None
    depth, i = 0, o
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return params, text[o + 1:i], i + 1
        i += 1
    return None


def _statements(body: str) -> List[str]:
    out = []
    # scope braces stand on lines of their own; braces inside a statement are vector operands
    lines = [ln for ln in body.splitlines() if ln.strip() not in ("{", "}")]
    for st in "\n".join(lines).split(";"):

        st = st.strip()
        while st and re.match(r"^[\w$.]+:", st):           # labels
            st = st.split(":", 1)[1].strip()
        if not st or st.startswith("."):                   # directives (.reg, .local decls, .pragma)
            continue
        out.append(st)
    return out


def _analyse_entry(params_text: str, body: str) -> Tuple[int, FrozenSet[int]]:
    """(parameter count, indices that may be written through)."""
    names: List[str] = []
    for part in params_text.split(","):
        part = part.strip()
        if not part:
            continue
        m = _PARAM.search(part)
        if not m:
            raise ValueError(f"unparsed parameter {part!r}")
        names.append(m.group(1))
    index = {n: i for i, n in enumerate(names)}
    allp = frozenset(range(len(names)))
    written: Set[int] = set()
    taint: Dict[str, Set[int]] = {}
    insns = []
    for st in _statements(body):
        pred = re.match(r"^@!?%[\w$]+\s+", st)
        if pred:
            st = st[pred.end():]
        parts = st.split(None, 1)
        op = parts[0]
        rest = parts[1].strip() if len(parts) > 1 else ""
        base = op.split(".", 1)[0]
        # parameter symbols used anywhere but as an ld.param address
        for name, i in index.items():
            if name in rest:
                for m in re.finditer(r"(?<![\w$.])" + re.escape(name) + r"(?![\w$])", rest):
                    before = rest[:m.start()].rstrip()
                    if not (base == "ld" and ".param" in op and before.endswith("[")):
                        written.add(i)
        insns.append((op, base, rest))
    changed = True
    rounds = 0
    final = False
    while changed or not final:
        if not changed:
            final = True            # taint is at its fixed point: judge the writes once, now
        changed = False
        rounds += 1
        if rounds > 200:
            return len(names), allp
        for op, base, rest in insns:
            ops = _operands(rest)
            if base == "ld" and ".param" in op:
                m = re.search(r"\[\s*([A-Za-z_$.][\w$.]*)", rest)
                dst = _regs(ops[0]) if ops else []
                if m and m.group(1) in index:
                    src = {index[m.group(1)]}
                else:
                    src = set()
                for d in dst:
                    if not src <= taint.get(d, set()):
                        taint.setdefault(d, set()).update(src)
                        changed = True
                continue
            mem = [o for o in ops if o.startswith("[")]
            if base in ("bra", "ret", "exit", "bar", "barrier", "membar", "fence", "trap", "brkpt", "nanosleep"):
                continue
            if base == "call":
                for r in _regs(rest):
                    if final: written |= taint.get(r, set())
                continue
            if base in ("st", "red") or (mem and base not in _READS and base != "atom"):
                # store-like, no destination register: address operand + stored values
                if final:
                    for o in ops:
                        written |= _stored_through(o, op, taint, allp)
                continue
            if base == "atom":
                if final:                                 # (its destination: a loaded value)
                    for o in ops[1:]:
                        written |= _stored_through(o, op, taint, allp)
                continue
            if not ops:
                continue
            # value instructions: destinations first (a|b pairs), sources after
            if base == "ld" or base == "ldu":
                continue                                  # a loaded value derives from no parameter
            dsts = _regs(ops[0].split("|")[0]) + (_regs(ops[0].split("|")[1]) if "|" in ops[0] else [])
            src = set()
            for o in ops[1:]:
                for r in _regs(o):
                    src |= taint.get(r, set())
            if src:
                for d in dsts:
                    if not src <= taint.get(d, set()):
                        taint.setdefault(d, set()).update(src)
                        changed = True
    return len(names), frozenset(written)


def _stored_through(o: str, op: str, taint, allp):
    """The parameters a store-like instruction ``op`` may write through its operand ``o``:
    an address from parameters writes those (one from no parameter: any of them, unless it
    names a symbol or a space that is not global memory); a stored value that derives from
    a parameter escapes to memory, so that parameter counts as written."""
    regs = _regs(o)
    t = set().union(*[taint.get(r, set()) for r in regs]) if regs else set()
    if not o.startswith("["):
        return t                                  # a pointer stored to memory escapes
    if any(s in op for s in _NOMEM_SPACES):
        return set()
    if t:
        return t
    return set() if _symbol_address(o) else allp   # an address from no parameter: anywhere


def _operands(rest: str) -> List[str]:
    out, depth, cur = [], 0, []
    for c in rest:
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _regs(s: str) -> List[str]:
    return [r for r in _REG.findall(s) if r.split(".")[0] not in _SPECIAL]


def _symbol_address(o: str) -> bool:
    """[sym] / [sym+8]: a named variable (global or shared symbol), not a register."""
    return not _regs(o) and bool(re.match(r"^\[\s*[A-Za-z_$]", o))


def analyse(ptx: str) -> Dict[str, Tuple[int, FrozenSet[int]]]:
    """{entry name: (parameter count, indices of parameters that may be written through)}.
    An entry that cannot be parsed gets every parameter as written."""
    text = _COMMENT.sub("", ptx)
    out: Dict[str, Tuple[int, FrozenSet[int]]] = {}
    pos = 0
    while True:
        m = _ENTRY.search(text, pos)
        if not m:
            break
        name = m.group(1)
        got = _body(text, m.end())
        if got is None:
            break
        params, body, pos = got
        try:
            out[name] = _analyse_entry(params, body)
        except (ValueError, IndexError, re.error):
            n = params.count(".param")
            out[name] = (n, frozenset(range(n)))
    return out


def readonly_params(ptx: str, name: str) -> Optional[FrozenSet[int]]:
    """Indices of the entry's parameters never written through, or None when the entry is
    not in the PTX (nothing inferred)."""
    got = analyse(ptx).get(name)
    if got is None:
        return None
    n, written = got
    return frozenset(range(n)) - written


_PARAM_TYPE = re.compile(r"\.([usbf])(8|16|32|64)\b")


def param_kinds(ptx: str) -> Dict[str, List[str]]:
    """{entry name: per parameter 'f' (a .f16/.f32/.f64 scalar), 'i' (a .u/.s/.b
    scalar) or 'b' (an array, e.g. ``.align 8 .b8 p[16]``: a struct passed by value)}.
    Entries whose parameter list is not understood are left out (callers then go by the
    values they are given)."""
    text = _COMMENT.sub("", ptx)
    out: Dict[str, List[str]] = {}
    for m in _ENTRY.finditer(text):
        close = text.find(")", m.end())
        if close < 0:
            break
        params = text[m.end():close].strip()
        kinds: List[str] = []
        ok = True
        for p in (params.split(",") if params else []):
            if ".param" not in p:
                ok = False
                break
            if "[" in p:
                kinds.append("b")
                continue
            t = _PARAM_TYPE.search(p)
            if t is None:
                ok = False
                break
            kinds.append("f" if t.group(1) == "f" else "i")
        if ok:
            out[m.group(1)] = kinds
    return out
