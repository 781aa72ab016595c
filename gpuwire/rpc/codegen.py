"""Client stubs and server dispatch, generated from the spec at import.

Nothing per call is written by hand: for every :class:`~gpuwire.rpc.spec.Call`
this module emits Python source (one function), compiles it once over
precompiled :class:`struct.Struct` objects and binds it:

* :func:`client_class` -- a mixin with one method per call (``session.cuMemAlloc``),
  raising :class:`~gpuwire.rpc.protocol.CudaError` on failure and returning the out
  values; :func:`raw_class` -- the same calls returning ``(CUresult, *outs)``.
* :func:`server_table` -- per call id: the fixed-part decoder and a dispatch
  function that translates handles, validates device ranges (size expressions
  from the spec, compiled to Python expressions) and calls the target method
  named after the call.

The generated source of any call is available for reading::

    python -m gpuwire.rpc.codegen cuLaunchKernel            # client + server source
"""
from __future__ import annotations

import ast
import keyword
import operator
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import protocol as P
from .spec import Arg, Call, Spec, default_spec

# Semantics the spec has no field for (yet): which argument a call releases, and
# which sync calls return a status rather than fail. Keyed by call name.
RELEASES: Dict[str, str] = {
    "cuMemFree": "dptr", "cuMemFreeHost": "p", "cuMemHostUnregister": "p",
    "cuStreamDestroy": "hStream", "cuEventDestroy": "hEvent", "cuModuleUnload": "hmod",
}
REGISTERS: Dict[str, str] = {"cuMemHostRegister": "p"}               # in hostptr that the call adds
TABLE_HANDLES = ("stream", "event", "module", "function")             # ids the server binds to objects
STATUS_RESULT = frozenset({"gwGetLastError", "gwPeekAtLastError"})   # the CUresult is the value
QUERY_RESULT = frozenset({"cuStreamQuery", "cuEventQuery"})          # SUCCESS -> True, NOT_READY -> False


def pyname(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) or name in ("self", "S") else name


# ----------------------------------------------------------------------------- size expressions

class _Prefix(ast.NodeTransformer):
    def __init__(self, prefix: str):
        self.prefix = prefix

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(id=self.prefix + node.id, ctx=node.ctx), node)


def size_source(arg: Arg, prefix: str) -> str:
    """The spec's size expression as Python source over prefixed argument names
    (the spec loader already restricted it to names, integers, parentheses, + - * //)."""
    if isinstance(arg.size, int):
        return str(arg.size)
    tree = ast.parse(str(arg.size).strip(), mode="eval")
    return ast.unparse(_Prefix(prefix).visit(tree))


def created_size_source(call: Call, prefix: str) -> Optional[str]:
    """Byte size of the range a handle_create call makes (devptr / hostptr handles)."""
    a = call.created_arg
    if a is None or a.handle not in ("devptr", "hostptr"):
        return None
    if a.size is not None:
        return size_source(a, prefix)
    ins = [x for x in call.args if x.kind == "scalar" and x.dir == "in" and x.code == "Q"]
    named = [x for x in ins if "size" in x.name.lower()]
    pick = named or ins
    if len(pick) != 1:
        raise ValueError(f"{call.name}: cannot tell the size of the created {a.handle}")
    return prefix + pick[0].name


# ----------------------------------------------------------------------------- per-call layout

@dataclass
class Layout:
    call: Call
    fixed: struct.Struct            # request fixed part (after the record header)
    client: struct.Struct           # record header + fixed part
    reply: struct.Struct            # reply fixed part
    req_names: Tuple[str, ...]      # wire_format.request_args
    var: Tuple[Tuple[str, str], ...]
    routes: Tuple[str, ...]         # out hostbufs (one u32 route each)
    out_strings: Tuple[str, ...]    # reply_var strings
    rep_names: Tuple[str, ...]      # reply_args without 'return'


def layout(call: Call) -> Layout:
    wf = call.wire_format
    codes = wf.request[1:]
    rv = tuple(n for n, k in wf.reply_var if k == "hostbuf")
    rs = tuple(n for n, k in wf.reply_var if k == "string")
    other = [(n, k) for n, k in wf.reply_var if k not in ("hostbuf", "string")]
    if other:
        raise ValueError(f"{call.name}: reply blob kinds {other} are not supported")
    return Layout(call, struct.Struct("<" + codes), struct.Struct("<HHI" + codes), struct.Struct(wf.reply),
                  wf.request_args, wf.request_var, rv, rs, tuple(wf.reply_args[1:]))


def _params(call: Call) -> List[Tuple[Arg, str]]:
    """Client parameters in C order: (arg, default source or '')."""
    created = call.created_arg
    out: List[Arg] = []
    for a in call.args:
        if a is created:
            continue
        if a.kind in ("scalar", "handle") and a.dir == "out":
            continue
        if a.kind == "string" and a.dir == "out":
            continue
        out.append(a)
    res: List[Tuple[Arg, str]] = []
    tail = True
    for a in reversed(out):
        d = ""
        if tail and (a.optional or a.kind == "kernel_params"):
            d = "None" if a.kind in ("kernel_params", "hostbuf", "string", "image") else "0"
        else:
            tail = False
        res.append((a, d))
    res.reverse()
    return res


# ----------------------------------------------------------------------------- client source

def client_source(call: Call, raw: bool = False, encoder: str = "py") -> str:
    """Source of one client stub. ``encoder``: ``py`` packs with struct.pack_into,
    ``c`` with gpuwire._rpc.gw_rpc_put (deferred calls only; sync ones always use py)."""
    L = layout(call)
    if encoder == "c" and (not call.deferred or len(L.req_names) > 10):
        encoder = "py"
    name = call.name
    cid = call.id
    params = _params(call)
    sig = ", ".join(f"{pyname(a.name)}={d}" if d else pyname(a.name) for a, d in params)
    lines: List[str] = [f"def {name}(self{', ' if sig else ''}{sig}):"]
    body: List[str] = []
    emit = body.append
    emit(f'"""{call.doc or name} (generated from the spec: {call.sync})"""')
    emit("S = self._s" if raw else "S = self")
    byname = {a.name: a for a in call.args}
    local: Dict[str, str] = {a.name: pyname(a.name) for a, _ in params}
    created = call.created_arg
    outs: List[str] = []                       # python expressions returned (order)
    # values of in scalars are plain locals; size expressions use them through prefix ''
    # (we emit them with a prefix of '' after mapping names to locals)

    def sz(a: Arg) -> str:
        src = size_source(a, "\x00")
        for n in sorted(a.size_names, key=len, reverse=True):
            src = src.replace("\x00" + n, local[n])
        return src

    # created handle
    if created is not None:
        if created.handle == "devptr":
            s = created_size_source(call, "\x00")
            for n in sorted(local, key=len, reverse=True):
                s = s.replace("\x00" + n, local[n])
            emit(f"_h = S._va_alloc({s}, {name!r})")
        elif created.handle == "hostptr":
            emit(f"_h = S._host_alloc({sz(created)})")
        else:
            emit("_h = S._new_handle()")
        local[created.name] = "_h"
        outs.append("_h")
    # hostptr in-handles may be given as buffers
    for a, _ in params:
        if a.kind == "handle" and a.handle == "hostptr" and a.dir == "in":
            emit(f"{local[a.name]} = S._hostaddr({local[a.name]})")
    # variable blobs
    var_src: List[Tuple[str, str, str]] = []    # (data var, nbytes var, kind)
    fast_kp = (encoder == "py" and call.deferred and not L.routes and name not in RELEASES
               and [k for _, k in L.var] == ["kernel_params"])
    kp_args = [a for a in call.args if a.kind == "kernel_params"]
    for i, (vname, kind) in enumerate(L.var):
        a = byname[vname]
        d, n = f"_d{i}", f"_n{i}"
        if kind == "kernel_params":
            names = [local[x.name] for x in kp_args]
            emit(f"{d} = {names[0]}")
            for other in names[1:]:
                emit(f"if {d} is None: {d} = {other}")
            emit(f"if {d} is None: {d} = b''")
            if not fast_kp:
                emit(f"if _type({d}) is not bytes: {d} = S._kparams({d}, {name!r})")
                emit(f"{n} = _len({d})")
        elif kind == "hostbuf":
            emit(f"{n} = {sz(a)}")
            emit(f"{d} = S._inbuf({local[a.name]}, {n}, {name!r}, {a.name!r})")
        elif kind == "string":
            emit(f"{d} = S._cstring({local[a.name]})")
            emit(f"{n} = _len({d})")
        elif kind == "image":
            emit(f"{d} = S._image({local[a.name]})")
            emit(f"{n} = _len({d})")
        else:  # pragma: no cover - the spec loader knows no other kinds
            raise ValueError(f"{name}: unsupported request blob kind {kind}")
        var_src.append((d, n, kind))
    # fixed values
    fixed_vals: List[str] = []
    for rn in L.req_names:
        if rn.endswith("?"):
            base = rn[:-1]
            fixed_vals.append("1" if base not in local or byname[base].kind in ("scalar", "handle")
                              and byname[base].dir == "out" else f"(0 if {local[base]} is None else 1)")
        else:
            fixed_vals.append(local[rn])
    # out hostbufs: param given (writable buffer) or allocated here
    route_src: List[Tuple[str, str, str]] = []   # (buffer var, nbytes var, route var)
    for i, rname in enumerate(L.routes):
        a = byname[rname]
        b, n, r = f"_o{i}", f"_on{i}", f"_r{i}"
        emit(f"{n} = {sz(a)}")
        if rname in local:
            emit(f"{b} = S._outbuf({local[rname]}, {n}, {name!r}, {rname!r}, {call.deferred})")
            emit(f"_ret_{i} = {local[rname]} is None")
        else:
            emit(f"{b} = S._outbuf(None, {n}, {name!r}, {rname!r}, {call.deferred})")
            emit(f"_ret_{i} = True")
        route_src.append((b, n, r))
    # record size
    fixed = L.client.size
    size_terms = [str(fixed)] + [f"(4 + {n} if {n} <= S._inline_max else 16)" for _, n, _ in var_src]
    size_terms += ["4"] * len(route_src)
    ind = "    "

    def lock_and_room(at: str) -> None:
        # the session lock: acquire/release, not `with` (a third of a deferred stub's cost);
        # the record's end checked against S._lim (frame buffer or rpc_batch_bytes)
        emit(at + "_l = S._lock")
        emit(at + "_l.acquire()")
        emit(at + "try:")
        emit(at + ind + "_pos = S._pos")
        emit(at + ind + "if _pos + _need > S._lim: _pos = S._make_room(_need)")

    def pack(at: str, src: str) -> None:
        emit(at + "try:")
        emit(at + ind + src)
        emit(at + "except struct.error as _e:")
        emit(at + ind + f"raise S._bad_args({name!r}, _e) from None")

    def batched(at: str) -> None:
        # one test per call: S._fa is 1 for a batch's first call (arms the flush timer), 0
        # once a bulk payload is queued (sent now), else the batch ramp's flush count
        emit(at + ind + "S._pos = _pos + _need")
        emit(at + ind + "_k = S._ncalls = S._ncalls + 1")
        emit(at + ind + "if _k >= S._fa: S._after()")

    def unlock(at: str) -> None:
        emit(at + "finally:")
        emit(at + ind + "_l.release()")

    packed = ''.join(', ' + v for v in fixed_vals)
    if fast_kp:
        # the common launch: parameters as bytes that fit inline; header, fixed part, length
        # and parameter bytes in one pack_into (a struct per parameter length, made once)
        d0, n0, _k = var_src[0]
        emit(f"if _type({d0}) is bytes and ({n0} := _len({d0})) <= S._inline_max:")
        emit(ind + f"_need = {fixed + 4} + {n0}")
        lock_and_room(ind)
        pack(ind * 2, f"_KP[{n0}](S._buf, _pos, {cid}, 0, _need{packed}, {n0}, {d0})")
        batched(ind)
        unlock(ind)
        emit(ind + "return (0,)" if raw else ind + "return None")
        emit(f"if _type({d0}) is not bytes: {d0} = S._kparams({d0}, {name!r})")
        emit(f"{n0} = _len({d0})")
    emit(f"_need = {' + '.join(size_terms)}")
    lock_and_room("")
    emit(ind + "_buf = S._buf")
    if encoder == "c":
        hv = {local[a.name] for a in call.args if a.kind in ("handle", "devptr") and a.name in local}
        cvals = [f"_int({v})" if v in hv else v for v in fixed_vals] + ["0"] * (10 - len(fixed_vals))
        emit(ind + "try:")
        emit(ind + f"    _q = _put(S._cbuf, S._cap, _pos, {cid}, _need, _CODES, {', '.join(cvals)})")
        emit(ind + "except (TypeError, OverflowError) as _e:")
        emit(ind + f"    raise S._bad_args({name!r}, _e) from None")
        emit(ind + f"if _q < 0: raise S._bad_args({name!r}, 'value out of range')")
    else:
        pack(ind, f"_C.pack_into(_buf, _pos, {cid}, 0, _need{packed})")
    if var_src or route_src:
        emit(ind + f"_p = _pos + {fixed}")
        for d, n, kind in var_src:
            emit(ind + f"if {n} <= S._inline_max:")
            emit(ind + f"    _U32.pack_into(_buf, _p, {n}); _buf[_p + 4:_p + 4 + {n}] = {d}; _p += 4 + {n}")
            emit(ind + "else:")
            emit(ind + f"    _p = S._put_bulk(_p, {d}, {n}, {call.stream_arg is not None and call.deferred})")
        for b, n, r in route_src:
            if call.deferred:
                emit(ind + f"{r} = S._post_push({b}, {n})")
            else:
                emit(ind + f"{r} = S._post_out({b}, {n})")
            emit(ind + f"_U32.pack_into(_buf, _p, {r}); _p += 4")
    if name in RELEASES:
        rel = byname[RELEASES[name]]
        if rel.kind == "devptr" or (rel.kind == "handle" and rel.handle in ("devptr", "hostptr")):
            emit(ind + f"S._release({rel.handle!r}, {local[rel.name]})")
    if call.deferred:
        batched("")
        unlock("")
        ret = list(outs)
        if raw:
            emit("return (0," + "".join(" " + x + "," for x in ret) + ")")
        elif not ret:
            emit("return None")
        elif len(ret) == 1:
            emit(f"return {ret[0]}")
        else:
            emit("return (" + ", ".join(ret) + ")")
    else:
        emit(ind + f"_rep, _off = S._roundtrip(_pos + _need, {name!r})")
        rn = ["_res"] + [f"_v_{pyname(x)}" for x in L.rep_names]
        emit(ind + f"{', '.join(rn)}{',' if len(rn) == 1 else ''} = _R.unpack_from(_rep, _off)")
        emit(ind + f"_off += {L.reply.size}")
        for s in L.out_strings:
            emit(ind + f"_v_{pyname(s)}, _off = S._rep_string(_rep, _off)")
        for i, (b, n, r) in enumerate(route_src):
            emit(ind + f"_off = S._rep_hostbuf(_rep, _off, {b}, {n}, {r})")
        emit(ind + f"_rpt = S._rep_report(_rep, _off, {name!r})")
        unlock("")
        # outs in reply order: created handle (none for sync), scalars/handles, strings, hostbufs
        vals = [f"_v_{pyname(x)}" for x in L.rep_names if not x.endswith("?")]
        vals += [f"_v_{pyname(s)}" for s in L.out_strings]
        hb = [(i, b) for i, (b, n, r) in enumerate(route_src)]
        if raw:
            emit("_eff = S._effective(_res, _rpt)")
            # always a tuple (CUresult, *outs), also for calls without outputs
            emit("return (_eff," + "".join(" " + v + "," for v in vals)
                 + "".join(f" (S._as_result({b}) if _ret_{i} else None)," for i, b in hb) + ")")
        else:
            if name in STATUS_RESULT:
                emit("if _rpt is not None: S._deferred_note(_rpt)")
                vals = ["_res"] + vals
            elif name in QUERY_RESULT:
                emit(f"if _rpt is not None or (_res and _res != {P.CUDA_ERROR_NOT_READY}): "
                     f"S._fail(_res, _rpt, {name!r})")
                vals = ["_res == 0"] + vals
            else:
                emit(f"if _res or _rpt is not None: S._fail(_res, _rpt, {name!r})")
            # hostbufs passed in by the caller are filled in place: return them only when we made them
            if hb:
                emit("_outs = [" + ", ".join(vals) + "]")
                for i, b in hb:
                    emit(f"if _ret_{i}: _outs.append(S._as_result({b}))")
                emit("return None if not _outs else (_outs[0] if len(_outs) == 1 else tuple(_outs))")
            elif not vals:
                emit("return None")
            elif len(vals) == 1:
                emit(f"return {vals[0]}")
            else:
                emit("return (" + ", ".join(vals) + ")")
    return "\n".join(lines + ["    " + x for x in body]) + "\n"


class _PackByLength(dict):
    """n -> the pack_into of ``fmt.format(n)`` (made at first use): a record whose one
    variable part of n bytes follows its fixed part, packed in one call."""

    def __init__(self, fmt: str):
        super().__init__()
        self.fmt = fmt

    def __missing__(self, n: int) -> Callable:
        f = self[n] = struct.Struct(self.fmt.format(n)).pack_into
        return f


def _compile(src: str, name: str, ns: Dict[str, Any], filename: str) -> Callable:
    code = compile(src, filename, "exec")
    exec(code, ns)
    return ns[name]


def _client_ns(L: Layout) -> Dict[str, Any]:
    ns = {"_C": L.client, "_R": L.reply, "_U32": P.U32, "struct": struct, "_len": len, "_type": type,
          "_int": operator.index, "_CODES": L.fixed.format.lstrip("<").encode(),
          "_KP": _PackByLength(L.client.format + "I{}s")}
    try:
        from .. import _rpc
        ns["_put"] = _rpc.lib.gw_rpc_put
    except ImportError:
        pass
    return ns


def c_encoder_available() -> bool:
    try:
        from .. import _rpc  # noqa: F401
        return True
    except ImportError:
        return False


def client_class(spec: Optional[Spec] = None, raw: bool = False, encoder: str = "py") -> type:
    """A class with one generated method per spec call (raw: returning (CUresult, *outs));
    ``encoder="c"``: deferred calls encode through gpuwire._rpc (see gpuwire bench rpc)."""
    spec = spec or default_spec()
    if encoder == "c" and not c_encoder_available():
        raise ImportError("the C batch encoder (gpuwire._rpc) is not built")
    methods: Dict[str, Any] = {}
    for call in spec.calls.values():
        L = layout(call)
        src = client_source(call, raw, encoder)
        fn = _compile(src, call.name, _client_ns(L), f"<gpuwire stub {call.name}{' raw' if raw else ''}>")
        fn.__gpuwire_source__ = src
        methods[call.name] = fn
    if raw:
        methods["__slots__"] = ("_s",)

        def __init__(self, session):
            self._s = session
        methods["__init__"] = __init__
        methods["__doc__"] = "session.raw: the spec calls returning (CUresult, *outs) instead of raising."
        return type("RawAPI", (object,), methods)
    methods["__doc__"] = "One generated method per spec call (raising CudaError on failure)."
    return type("GeneratedStubs" if encoder == "py" else "GeneratedStubsC", (object,), methods)


def raw_class(spec: Optional[Spec] = None) -> type:
    return client_class(spec, raw=True)


# ----------------------------------------------------------------------------- server source

def server_source(call: Call) -> str:
    """Dispatch for one call: (session, target, vals, blobs, sinks) -> tuple of reply values.

    ``vals`` is the unpacked fixed part, ``blobs`` the request blobs (memoryview or
    a bulk descriptor), ``sinks`` one sink per out hostbuf. Handles are translated
    with ``sess.h_<type>(id, optional)``, device ranges checked with
    ``sess.devrange(ptr, nbytes, what)``; the target method named after the call
    gets the translated in-arguments in C order (created handles as their client
    id, out hostbufs as sinks, blobs as memoryviews/descriptors) and returns the
    out values in reply order."""
    L = layout(call)
    name = call.name
    lines = [f"def d_{name}(sess, target, vals, blobs, sinks):"]
    body: List[str] = []
    emit = body.append
    names = [("v_" + n[:-1] + "_present") if n.endswith("?") else "v_" + n for n in L.req_names]
    if names:
        emit(f"{', '.join(names)}{',' if len(names) == 1 else ''} = vals")
    byname = {a.name: a for a in call.args}
    created = call.created_arg
    for i, (vname, kind) in enumerate(L.var):
        emit(f"v_{vname} = blobs[{i}]")
    for i, rname in enumerate(L.routes):
        emit(f"v_{rname} = sinks[{i}]")
    call_args: List[str] = []
    kp_done = False
    for a in call.args:
        v = "v_" + a.name
        if a is created:
            call_args.append(v)
            continue
        if a.kind == "kernel_params":
            if not kp_done:
                call_args.append(v)
                kp_done = True
            continue
        if a.kind in ("scalar", "handle", "string") and a.dir == "out":
            continue
        if a.kind == "handle":
            if a.handle == "devptr":
                emit(f"sess.devrange({v}, 0, {a.name!r})")
            elif a.handle == "hostptr":
                mode = "release" if RELEASES.get(name) == a.name else (
                    "register" if REGISTERS.get(name) == a.name else "lookup")
                emit(f"t_{a.name} = sess.h_hostptr({v}, {a.optional}, {mode!r})")
                v = "t_" + a.name
            else:
                emit(f"t_{a.name} = sess.h_{a.handle}({v}, {a.optional})")
                v = "t_" + a.name
        elif a.kind == "devptr":
            if a.size is not None:
                emit(f"sess.devrange({v}, {size_source(a, 'v_')}, {a.name!r})")
            elif name in RELEASES and RELEASES[name] == a.name:
                emit(f"sess.devbase({v}, {a.name!r})")
            else:
                emit(f"sess.devrange({v}, 0, {a.name!r})")
        elif a.kind == "hostbuf" and a.dir in ("in", "inout"):
            emit(f"sess.blob_size(v_{a.name}, {size_source(a, 'v_')}, {a.name!r})")
        call_args.append(v)
    invoke = f"target.{name}({', '.join(call_args)})"
    rel = byname.get(RELEASES.get(name, ""))
    if created is not None and created.handle in TABLE_HANDLES:
        emit(f"sess.fresh_id({created.handle!r}, v_{created.name})")
        parents = [a for a in call.args if a.kind == "handle" and a.dir == "in" and a.handle in TABLE_HANDLES]
        parent = f"v_{parents[0].name}" if parents else "0"
        emit(f"sess.bind({created.handle!r}, v_{created.name}, {invoke}, {parent})")
        emit("return None")
    elif rel is not None and rel.kind == "handle" and rel.handle in TABLE_HANDLES:
        emit(f"sess.releasing({rel.handle!r}, v_{rel.name})")
        emit(f"_r = {invoke}")
        emit(f"sess.unbind({rel.handle!r}, v_{rel.name})")
        emit("return _r")
    else:
        emit(f"return {invoke}")
    return "\n".join(lines + ["    " + x for x in body]) + "\n"


@dataclass
class ServerEntry:
    call: Call
    fixed: struct.Struct
    nvar: int
    nroutes: int
    route_names: Tuple[str, ...]
    reply: struct.Struct
    nstrings: int
    dispatch: Callable
    render: Callable                  # (vals, blobs) -> "name(a=..., b=...)"
    source: str


def _renderer(call: Call, L: Layout) -> Callable:
    names = list(L.req_names)
    byname = {a.name: a for a in call.args}
    hexish = set()
    for n in names:
        a = byname.get(n.rstrip("?"))
        if a is not None and (a.kind in ("devptr", "handle")):
            hexish.add(n)

    def render(vals: Sequence[Any], blobs: Sequence[Any]) -> str:
        parts = []
        for n, v in zip(names, vals):
            if n.endswith("?"):
                continue
            parts.append(f"{n}={v:#x}" if n in hexish and isinstance(v, int) else f"{n}={v!r}")
        for (vn, kind), b in zip(L.var, blobs):
            nb = getattr(b, "nbytes", None)
            parts.append(f"{vn}=<{kind} {nb} B>")
        return f"{call.name}({', '.join(parts)})"
    return render


def server_table(spec: Optional[Spec] = None) -> Dict[int, ServerEntry]:
    spec = spec or default_spec()
    table: Dict[int, ServerEntry] = {}
    for call in spec.calls.values():
        L = layout(call)
        src = server_source(call)
        fn = _compile(src, f"d_{call.name}", {}, f"<gpuwire dispatch {call.name}>")
        table[call.id] = ServerEntry(call, L.fixed, len(L.var), len(L.routes), L.routes, L.reply,
                                     len(L.out_strings), fn, _renderer(call, L), src)
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = default_spec()
    for n in argv or list(spec.calls):
        c = spec.calls[n]
        print(f"# ---- {n}: client\n{client_source(c)}\n# ---- {n}: client (raw)\n{client_source(c, True)}"
              f"\n# ---- {n}: server\n{server_source(c)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
