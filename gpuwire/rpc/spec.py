"""Loader and validator for the forwarded-call spec (``gpuwire/rpc/spec/*.yaml``).

The YAML spec is the single source of truth for what crosses the wire: client
stubs and server dispatch are generated from the :class:`Spec` this module
returns, never hand-written. docs/api-spec.md is the schema reference.

    from gpuwire.rpc.spec import load_spec
    spec = load_spec()                      # the packaged cuda_driver.yaml
    call = spec.calls["cuMemcpyHtoDAsync"]
    call.wire_format.request                # '<QQQ'  (dstDevice, ByteCount, hStream)
    call.arg("srcHost").size_fn({"ByteCount": 4096})   # 4096

Nothing here needs CUDA, a compiler or the network; reading headers is
:mod:`gpuwire.rpc.apigen`'s job.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

__all__ = [
    "SPEC_VERSION", "SPEC_DIR", "DEFAULT_SPEC_PATH", "KINDS", "DIRS", "SYNC_CLASSES", "HANDLE_TYPES",
    "SpecError", "Arg", "Call", "Spec", "WireFormat",
    "load_spec", "default_spec", "spec_from_dict", "compile_size_expr", "scalar_code", "split_ctype",
    "image_format", "image_bytes", "image_size",
]

SPEC_VERSION = 1
SUPPORTED_SPEC_VERSIONS = (1,)
SPEC_DIR = Path(__file__).resolve().with_name("spec")
DEFAULT_SPEC_PATH = SPEC_DIR / "cuda_driver.yaml"

KINDS = ("scalar", "devptr", "hostbuf", "handle", "string", "kernel_params", "image")
DIRS = ("in", "out", "inout")
SYNC_CLASSES = ("sync", "deferred")
# What a `kind: handle` argument names. The first eight are the ones the
# packaged spec uses; the rest are reserved for calls added later.
HANDLE_TYPES = (
    "stream", "event", "module", "function", "context", "device", "devptr", "hostptr",
    "library", "kernel", "graph", "graph_exec", "graph_node", "mempool", "array",
    "mipmapped_array", "texobject", "surfobject", "linkstate", "green_ctx", "memhandle",
)
# kinds whose bytes travel as variable-length blobs (not in the fixed struct)
VARIABLE_KINDS = ("hostbuf", "string", "image", "kernel_params")

CALL_KEYS = ("id", "symbol", "returns", "sync", "handle_create", "stream", "needs_review", "doc", "args")
ARG_KEYS = ("name", "ctype", "dir", "kind", "handle", "size", "elem", "optional", "wire", "needs_review", "doc")
TOP_KEYS = ("spec_version", "api", "cuda_version", "retired_ids", "semantics", "gpuwire_calls", "calls")

# struct codes (little-endian, no padding) for scalar C types passed by value or
# returned through a pointer. Handles and device pointers are always 'Q' (u64).
_BUILTIN_CODES = {
    "char": "b", "signed char": "b", "unsigned char": "B",
    "short": "h", "short int": "h", "signed short": "h", "unsigned short": "H", "unsigned short int": "H",
    "int": "i", "signed": "i", "signed int": "i", "unsigned": "I", "unsigned int": "I",
    "long": "q", "long int": "q", "unsigned long": "Q", "unsigned long int": "Q",
    "long long": "q", "long long int": "q", "unsigned long long": "Q", "unsigned long long int": "Q",
    "size_t": "Q", "ssize_t": "q", "float": "f", "double": "d", "_Bool": "B", "bool": "B",
    "int8_t": "b", "uint8_t": "B", "int16_t": "h", "uint16_t": "H",
    "int32_t": "i", "uint32_t": "I", "int64_t": "q", "uint64_t": "Q",
    "cuuint32_t": "I", "cuuint64_t": "Q",
    "CUdeviceptr": "Q", "CUdeviceptr_v2": "Q", "CUdevice": "i", "CUdevice_v1": "i",
}
# CUDA enum typedefs travel as u32. Enums not listed here need `wire: I` on the
# argument (apigen sets it from the header's typedefs).
_ENUM_TYPES = frozenset("""
CUresult CUdevice_attribute CUfunction_attribute CUpointer_attribute CUlimit CUfunc_cache
CUsharedconfig CUjit_option CUjitInputType CUmemorytype CUstreamCaptureMode CUstreamCaptureStatus
CUctx_flags CUstream_flags CUevent_flags CUarray_format CUmem_advise CUmem_range_attribute
CUdevice_P2PAttribute CUfunction_loading_state CUlibraryOption CUmemAllocationHandleType
CUmemPool_attribute CUstreamAttrID CUlaunchAttributeID CUexecAffinityType CUmoduleLoadingMode
CUflushGPUDirectRDMAWritesTarget CUflushGPUDirectRDMAWritesScope CUmemAllocationGranularity_flags
CUmemRangeHandleType CUgraphInstantiate_flags CUDA_POINTER_ATTRIBUTE_ACCESS_FLAGS
""".split())
_VALID_WIRE_CODES = frozenset("bBhHiIqQfd")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecError(ValueError):
    """The spec is malformed; the message names the file, call and field."""


# --------------------------------------------------------------------------- ctypes

def split_ctype(ctype: str) -> Tuple[str, int, bool]:
    """``"const char **"`` -> ``("char", 2, True)``: base type, pointer depth,
    whether the outermost pointee (the base) is const-qualified."""
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\*|\[[^\]]*\]", ctype)
    stars = sum(1 for w in words if w == "*" or w.startswith("["))
    first_star = next((i for i, w in enumerate(words) if w == "*" or w.startswith("[")), len(words))
    base_words = [w for w in words[:first_star] if w not in ("const", "volatile", "restrict", "__restrict", "struct", "enum")]
    is_const = "const" in words[:first_star]
    return " ".join(base_words), stars, is_const


def scalar_code(ctype: str) -> Optional[str]:
    """struct code of a scalar C type (by value, or the pointee of ``T *``);
    None when the type is unknown (set ``wire:`` on the argument)."""
    base, _stars, _const = split_ctype(ctype)
    if base in _BUILTIN_CODES:
        return _BUILTIN_CODES[base]
    if base in _ENUM_TYPES or base.endswith("_enum"):
        return "I"
    return None


# --------------------------------------------------------------------------- size expressions

_SIZE_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


def compile_size_expr(expr: Any, names: Optional[Sequence[str]] = ()) -> Tuple[Callable[[Mapping[str, int]], int], Tuple[str, ...]]:
    """Compile a size expression (``ByteCount``, ``N * 4``, ``16``) into a
    function of the argument values. Only argument names in ``names`` (any
    identifier when ``names`` is None), integer literals, parentheses and
    ``+ - * //`` are accepted; nothing is evaluated with :func:`eval`.
    Returns ``(fn, referenced_names)``; raises ValueError."""
    if isinstance(expr, bool):
        raise ValueError(f"size expression must be a string or integer, not {expr!r}")
    if isinstance(expr, int):
        if expr < 0:
            raise ValueError(f"negative size {expr}")
        return (lambda values, _v=expr: _v), ()
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"size expression must be a non-empty string or integer, not {expr!r}")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"size expression {expr!r} is not valid: {e.msg}") from None
    allowed = None if names is None else set(names)
    used: List[str] = []

    def build(node: ast.AST) -> Callable[[Mapping[str, int]], int]:
        if isinstance(node, ast.BinOp) and type(node.op) in _SIZE_OPS:
            op = _SIZE_OPS[type(node.op)]
            lhs, rhs = build(node.left), build(node.right)
            return lambda v: op(lhs(v), rhs(v))
        if isinstance(node, ast.Name):
            if allowed is not None and node.id not in allowed:
                raise ValueError(f"size expression {expr!r} names {node.id!r}, which is not another argument"
                                 + (f" (have: {', '.join(sorted(allowed))})" if allowed else ""))
            if node.id not in used:
                used.append(node.id)
            key = node.id

            def get(v: Mapping[str, int], _k: str = key) -> int:
                x = v[_k]
                if isinstance(x, bool) or not isinstance(x, int):
                    x = int(x)
                return x
            return get
        if isinstance(node, ast.Constant) and type(node.value) is int:
            c = node.value
            return lambda v: c
        what = type(node.op).__name__ if isinstance(node, (ast.BinOp, ast.UnaryOp)) else type(node).__name__
        raise ValueError(f"size expression {expr!r}: {what} is not allowed (only argument names, integer "
                         f"literals and + - * //)")

    fn = build(tree.body)

    def size_fn(values: Mapping[str, int]) -> int:
        n = fn(values)
        if n < 0:
            raise ValueError(f"size expression {expr!r} gave {n} for {dict(values)!r}")
        return n
    return size_fn, tuple(used)


# --------------------------------------------------------------------------- dataclasses

@dataclass(frozen=True)
class Arg:
    name: str
    ctype: str
    dir: str                       # in | out | inout (what the call does to the value / pointee)
    kind: str                      # one of KINDS
    handle: Optional[str] = None   # HANDLE_TYPES entry, for kind == handle (devptr for kind == devptr)
    size: Optional[Any] = None     # size expression (str) or int literal, for byte ranges
    elem: Optional[int] = None     # element width in bytes (memset variants)
    optional: bool = False         # the pointer / handle may be NULL
    wire: Optional[str] = None     # explicit struct code override for a scalar
    doc: Optional[str] = None
    needs_review: bool = False
    _size_fn: Optional[Callable[[Mapping[str, int]], int]] = field(default=None, repr=False, compare=False)
    size_names: Tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size is not None and self._size_fn is None:  # built by hand, not by the loader
            fn, names = compile_size_expr(self.size, None)
            object.__setattr__(self, "_size_fn", fn)
            object.__setattr__(self, "size_names", names)

    def size_fn(self, values: Mapping[str, int]) -> int:
        """Byte size of this argument's range given the other arguments' values."""
        if self._size_fn is None:
            raise ValueError(f"argument {self.name!r} has no size expression")
        return self._size_fn(values)

    @property
    def is_pointer(self) -> bool:
        return split_ctype(self.ctype)[1] > 0

    @property
    def variable(self) -> bool:
        """Travels as a variable-length blob rather than in the fixed struct."""
        return self.kind in VARIABLE_KINDS

    @property
    def code(self) -> Optional[str]:
        """struct code of this argument's fixed-size value (None for blobs)."""
        if self.kind in ("handle", "devptr"):
            return "Q"
        if self.kind == "scalar":
            return self.wire or scalar_code(self.ctype)
        return None


@dataclass(frozen=True)
class WireFormat:
    """Data-driven layout of one call on the wire (see docs/api-spec.md).

    Request = ``struct.pack(request, *fixed values)`` followed by one blob per
    ``request_var`` entry, in order. Reply = ``struct.pack(reply, result, *out
    values)`` followed by one blob per ``reply_var`` entry. Names ending in
    ``?`` are u8 presence flags for optional pointers (1 = non-NULL). How a blob
    is framed (length prefix, registered memory) is the transport's choice.
    """
    request: str
    request_args: Tuple[str, ...]
    request_var: Tuple[Tuple[str, str], ...]   # (arg name, kind)
    reply: str
    reply_args: Tuple[str, ...]                # ("return", *out arg names)
    reply_var: Tuple[Tuple[str, str], ...]

    @property
    def request_size(self) -> int:
        return struct.calcsize(self.request)

    @property
    def reply_size(self) -> int:
        return struct.calcsize(self.reply)


@dataclass(frozen=True)
class Call:
    name: str
    id: int
    symbol: Optional[str]          # exported driver symbol; None for gpuwire pseudo-calls
    sync: str                      # "sync" | "deferred"
    returns: str
    args: Tuple[Arg, ...]
    stream_arg: Optional[str] = None
    handle_create: bool = False
    doc: Optional[str] = None
    needs_review: bool = False
    section: str = "calls"         # "calls" (CUDA symbols) | "gpuwire_calls" (protocol pseudo-calls)

    @property
    def deferred(self) -> bool:
        return self.sync == "deferred"

    @property
    def is_cuda(self) -> bool:
        return self.symbol is not None

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no argument {name!r}")

    @property
    def created_arg(self) -> Optional[Arg]:
        """The out handle whose id the client assigns (handle_create calls)."""
        if not self.handle_create:
            return None
        return next(a for a in self.args if a.kind == "handle" and a.dir == "out")

    @functools.cached_property
    def wire_format(self) -> WireFormat:
        return _wire_format(self)


@dataclass
class Spec:
    version: int
    cuda_version: Optional[int]
    calls: Dict[str, Call]          # every call, CUDA and gpuwire pseudo-calls, in file order
    by_id: Dict[int, Call]
    api: str = "cuda-driver"
    retired_ids: Tuple[int, ...] = ()
    semantics: Optional[str] = None
    path: Optional[str] = None

    def cuda_calls(self) -> List[Call]:
        return [c for c in self.calls.values() if c.is_cuda]

    def gpuwire_calls(self) -> List[Call]:
        return [c for c in self.calls.values() if not c.is_cuda]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hex digest of everything that affects the wire (ids, names, sync
        classes, layouts): client and server must agree on it."""
        rows = []
        for c in sorted(self.calls.values(), key=lambda c: c.id):
            wf = c.wire_format
            rows.append([c.id, c.name, c.symbol, c.sync, c.handle_create, wf.request, list(wf.request_args),
                         [list(v) for v in wf.request_var], wf.reply, list(wf.reply_args),
                         [list(v) for v in wf.reply_var]])
        blob = json.dumps([self.version, self.api, rows], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def fingerprint64(self) -> int:
        return int(self.fingerprint[:16], 16)


# --------------------------------------------------------------------------- wire format

def _wire_format(call: Call) -> WireFormat:
    req_codes, req_names, req_var = ["<"], [], []
    rep_codes, rep_names, rep_var = ["<", "I"], ["return"], []
    created = call.created_arg
    kp_done = False
    for a in call.args:
        if a.kind in ("scalar", "handle", "devptr"):
            if a.kind == "devptr" or a.dir in ("in", "inout") or a is created:
                # by-value scalars/handles/device pointers; inout pointees; the client-assigned id
                req_codes.append(a.code)
                req_names.append(a.name)
            elif a.optional:
                req_codes.append("B")
                req_names.append(a.name + "?")
            if a.kind != "devptr" and a.dir in ("out", "inout") and a is not created:
                rep_codes.append(a.code)
                rep_names.append(a.name)
            continue
        # variable-length kinds
        if a.kind == "kernel_params":
            # kernelParams and extra collapse into one packed parameter buffer
            if not kp_done:
                req_var.append((a.name, a.kind))
                kp_done = True
            continue
        if a.optional:
            req_codes.append("B")
            req_names.append(a.name + "?")
        if a.dir in ("in", "inout"):
            req_var.append((a.name, a.kind))
        if a.dir in ("out", "inout"):
            rep_var.append((a.name, a.kind))
    return WireFormat("".join(req_codes), tuple(req_names), tuple(req_var),
                      "".join(rep_codes), tuple(rep_names), tuple(rep_var))


# --------------------------------------------------------------------------- validation / loading

class _Ctx:
    def __init__(self, source: str):
        self.source = source

    def err(self, where: str, msg: str) -> SpecError:
        return SpecError(f"{self.source}: {where}: {msg}")


def _check_keys(ctx: _Ctx, where: str, d: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for k in d:
        if k not in allowed:
            raise ctx.err(where, f"unknown field {k!r} (allowed: {', '.join(allowed)})")


def _bool(ctx: _Ctx, where: str, d: Mapping[str, Any], key: str) -> bool:
    v = d.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ctx.err(where, f"{key} must be true or false, not {v!r}")
    return v


def _opt_str(ctx: _Ctx, where: str, d: Mapping[str, Any], key: str) -> Optional[str]:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise ctx.err(where, f"{key} must be a string, not {v!r}")
    return v


def _build_arg(ctx: _Ctx, cname: str, i: int, raw: Any, all_names: Sequence[str]) -> Arg:
    if not isinstance(raw, Mapping):
        raise ctx.err(f"{cname}: args[{i}]", f"must be a mapping, not {raw!r}")
    name = raw.get("name")
    where = f"{cname}: arg {name!r}" if isinstance(name, str) else f"{cname}: args[{i}]"
    _check_keys(ctx, where, raw, ARG_KEYS)
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ctx.err(where, f"name must be a C identifier, not {name!r}")
    ctype = raw.get("ctype")
    if not isinstance(ctype, str) or not ctype.strip():
        raise ctx.err(where, f"ctype must be a non-empty string, not {ctype!r}")
    ctype = " ".join(ctype.split())
    d = raw.get("dir")
    if d not in DIRS:
        raise ctx.err(where, f"dir must be one of {', '.join(DIRS)}, not {d!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ctx.err(where, f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    handle = raw.get("handle")
    if kind == "handle":
        if handle not in HANDLE_TYPES:
            raise ctx.err(where, f"handle must be one of {', '.join(HANDLE_TYPES)}, not {handle!r}")
    elif kind == "devptr":
        if handle not in (None, "devptr"):
            raise ctx.err(where, f"a devptr argument cannot have handle: {handle!r}")
        handle = "devptr"
    elif handle is not None:
        raise ctx.err(where, f"handle: is only for kind handle or devptr (kind is {kind})")
    optional = _bool(ctx, where, raw, "optional")
    needs_review = _bool(ctx, where, raw, "needs_review")
    doc = _opt_str(ctx, where, raw, "doc")

    base, stars, _const = split_ctype(ctype)
    # kind / ctype consistency
    if kind == "devptr" and stars != 0:
        raise ctx.err(where, f"kind devptr is a device address passed by value; ctype {ctype!r} is a pointer "
                             f"(an out device pointer is kind: handle, handle: devptr)")
    if kind in ("hostbuf", "string", "image", "kernel_params") and stars == 0:
        raise ctx.err(where, f"kind {kind} needs a pointer ctype, not {ctype!r}")
    if kind == "scalar":
        if d == "in" and stars:
            raise ctx.err(where, f"an in scalar is passed by value; ctype {ctype!r} is a pointer "
                                 f"(use kind hostbuf, or dir out/inout)")
        if d != "in" and stars != 1:
            raise ctx.err(where, f"an {d} scalar must be returned through a single pointer, not {ctype!r}")
    if kind == "handle":
        want = 1 if handle == "hostptr" else 0
        if d != "in":
            want += 1
        if stars != want:
            raise ctx.err(where, f"ctype {ctype!r} does not fit an {d} {handle} handle "
                                 f"({'pointer to the handle' if d != 'in' else 'handle by value'} expected)")
    if kind in ("image", "kernel_params") and d != "in":
        raise ctx.err(where, f"kind {kind} is input only")

    wire = raw.get("wire")
    if wire is not None:
        if kind != "scalar" or not isinstance(wire, str) or len(wire) != 1 or wire not in _VALID_WIRE_CODES:
            raise ctx.err(where, f"wire must be one struct code of {''.join(sorted(_VALID_WIRE_CODES))} "
                                 f"on a scalar, not {wire!r}")
    if kind == "scalar" and wire is None and scalar_code(ctype) is None:
        raise ctx.err(where, f"no wire encoding known for ctype {ctype!r}; add wire: <struct code> "
                             f"(I for enums, i int, Q u64, f float)")

    size = raw.get("size")
    size_fn = None
    size_names: Tuple[str, ...] = ()
    if size is not None:
        if kind not in ("hostbuf", "devptr", "string") and not (kind == "handle" and handle in ("hostptr", "devptr")):
            raise ctx.err(where, f"size: does not apply to kind {kind}")
        others = [n for n in all_names if n != name]
        try:
            size_fn, size_names = compile_size_expr(size, others)
        except ValueError as e:
            raise ctx.err(where, f"size: {e}") from None
    elif kind == "hostbuf":
        raise ctx.err(where, "a hostbuf needs size: <expression over other argument names>")
    elif kind == "string" and d != "in" and stars == 1:
        raise ctx.err(where, "an out string written into a caller buffer needs size: (the buffer length)")
    elem = raw.get("elem")
    if elem is not None:
        if isinstance(elem, bool) or not isinstance(elem, int) or elem <= 0:
            raise ctx.err(where, f"elem must be a positive integer, not {elem!r}")
        if kind not in ("devptr", "hostbuf"):
            raise ctx.err(where, f"elem: does not apply to kind {kind}")
    return Arg(name=name, ctype=ctype, dir=d, kind=kind, handle=handle, size=size, elem=elem,
               optional=optional, wire=wire, doc=doc, needs_review=needs_review,
               _size_fn=size_fn, size_names=size_names)


def _build_call(ctx: _Ctx, section: str, name: Any, raw: Any) -> Call:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ctx.err(f"{section}", f"call name must be an identifier, not {name!r}")
    where = name
    if not isinstance(raw, Mapping):
        raise ctx.err(where, f"entry must be a mapping, not {raw!r}")
    _check_keys(ctx, where, raw, CALL_KEYS)
    cid = raw.get("id")
    if isinstance(cid, bool) or not isinstance(cid, int) or cid <= 0:
        raise ctx.err(where, f"id must be a positive integer, not {cid!r}")
    if cid > 0xFFFF:
        raise ctx.err(where, f"id {cid} does not fit the u16 call-id field")
    symbol = raw.get("symbol")
    if section == "gpuwire_calls":
        if symbol is not None:
            raise ctx.err(where, "gpuwire pseudo-calls must have symbol: null")
    elif not isinstance(symbol, str) or not _IDENT.match(symbol):
        raise ctx.err(where, f"symbol must be the exported driver symbol, not {symbol!r}")
    returns = raw.get("returns")
    if not isinstance(returns, str) or not returns.strip():
        raise ctx.err(where, f"returns must be a C type, not {returns!r}")
    if scalar_code(returns) is None:
        raise ctx.err(where, f"return type {returns!r} has no wire encoding")
    sync = raw.get("sync")
    if sync not in SYNC_CLASSES:
        raise ctx.err(where, f"sync must be one of {', '.join(SYNC_CLASSES)}, not {sync!r}")
    raw_args = raw.get("args", [])
    if raw_args is None:
        raw_args = []
    if not isinstance(raw_args, list):
        raise ctx.err(where, f"args must be a list, not {raw_args!r}")
    names = [a.get("name") for a in raw_args if isinstance(a, Mapping)]
    args = tuple(_build_arg(ctx, name, i, a, names) for i, a in enumerate(raw_args))
    seen = set()
    for a in args:
        if a.name in seen:
            raise ctx.err(f"{name}: arg {a.name!r}", "duplicate argument name")
        seen.add(a.name)
    by_name = {a.name: a for a in args}
    for a in args:
        for ref in a.size_names:
            r = by_name[ref]
            if not (r.kind == "scalar" and r.dir == "in"):
                raise ctx.err(f"{name}: arg {a.name!r}", f"size: refers to {ref!r}, which is not an in scalar "
                                                           f"(the client must know the size before the call)")
    handle_create = _bool(ctx, where, raw, "handle_create")
    if handle_create:
        outs = [a for a in args if a.kind == "handle" and a.dir == "out"]
        if len(outs) != 1:
            raise ctx.err(where, f"handle_create needs exactly one out handle argument, found {len(outs)}")
    stream = raw.get("stream")
    if stream is not None:
        if stream not in by_name:
            raise ctx.err(where, f"stream: {stream!r} is not an argument")
        sa = by_name[stream]
        if not (sa.kind == "handle" and sa.handle == "stream" and sa.dir == "in"):
            raise ctx.err(where, f"stream: {stream!r} must be an in handle of type stream")
    if sync == "deferred":
        for a in args:
            if a.dir == "in" or a.kind == "devptr":
                continue
            if a.kind == "hostbuf":
                continue  # filled at or before the next sync point covering the call's stream
            if handle_create and a.kind == "handle":
                continue
            raise ctx.err(f"{name}: arg {a.name!r}",
                          f"a deferred call cannot return a {a.kind} to the caller; make the call sync: sync"
                          + (" or set handle_create: true" if a.kind == "handle" else ""))
    doc = _opt_str(ctx, where, raw, "doc")
    needs_review = _bool(ctx, where, raw, "needs_review")
    call = Call(name=name, id=cid, symbol=symbol, sync=sync, returns=" ".join(returns.split()), args=args,
                stream_arg=stream, handle_create=handle_create, doc=doc, needs_review=needs_review,
                section=section)
    return call


def spec_from_dict(data: Any, *, source: str = "<spec>", allow_review: bool = False) -> Spec:
    """Validate a parsed spec document and build a :class:`Spec`.

    Entries (or arguments) still carrying ``needs_review: true`` (left by
    ``gpuwire apigen --add``) are refused unless ``allow_review``."""
    ctx = _Ctx(source)
    if not isinstance(data, Mapping):
        raise ctx.err("top level", "must be a mapping")
    _check_keys(ctx, "top level", data, TOP_KEYS)
    version = data.get("spec_version")
    if version not in SUPPORTED_SPEC_VERSIONS:
        raise ctx.err("spec_version", f"{version!r} is not supported (this gpuwire reads {SUPPORTED_SPEC_VERSIONS})")
    api = data.get("api")
    if not isinstance(api, str):
        raise ctx.err("api", f"must be a string, not {api!r}")
    cuda_version = data.get("cuda_version")
    if cuda_version is not None and (isinstance(cuda_version, bool) or not isinstance(cuda_version, int)):
        raise ctx.err("cuda_version", f"must be an integer like 13000, not {cuda_version!r}")
    retired = data.get("retired_ids") or []
    if not isinstance(retired, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in retired):
        raise ctx.err("retired_ids", f"must be a list of integers, not {retired!r}")
    semantics = data.get("semantics")
    if semantics is not None and not isinstance(semantics, str):
        raise ctx.err("semantics", "must be a string")

    calls: Dict[str, Call] = {}
    by_id: Dict[int, Call] = {}
    for section in ("gpuwire_calls", "calls"):
        entries = data.get(section) or {}
        if not isinstance(entries, Mapping):
            raise ctx.err(section, "must be a mapping of call name -> entry")
        for name, raw in entries.items():
            if not allow_review and isinstance(raw, Mapping):
                flagged = [a.get("name") for a in (raw.get("args") or [])
                           if isinstance(a, Mapping) and a.get("needs_review")]
                if raw.get("needs_review") or flagged:
                    raise ctx.err(name, "needs_review is set (guessed by apigen"
                                        + (f"; arguments {', '.join(map(str, flagged))}" if flagged else "")
                                        + "): check kind/dir/size/sync, then delete the needs_review flags")
            call = _build_call(ctx, section, name, raw)
            if name in calls:
                raise ctx.err(name, f"defined twice (in {calls[name].section} and {section})")
            if call.id in by_id:
                raise ctx.err(name, f"id {call.id} is already used by {by_id[call.id].name}")
            if call.id in retired:
                raise ctx.err(name, f"id {call.id} is retired and must not be reused")
            calls[name] = call
            by_id[call.id] = call
    if not calls:
        raise ctx.err("calls", "no calls defined")
    return Spec(version=version, cuda_version=cuda_version, calls=calls, by_id=by_id, api=api,
                retired_ids=tuple(retired), semantics=semantics, path=None if source.startswith("<") else source)


def load_spec(path: Optional["os.PathLike[str] | str"] = None, *, allow_review: bool = False) -> Spec:
    """Load and validate a spec file (default: the packaged cuda_driver.yaml)."""
    p = Path(path) if path is not None else DEFAULT_SPEC_PATH
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"{p}: cannot read spec: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    spec = spec_from_dict(data, source=str(p), allow_review=allow_review)
    spec.path = str(p)
    return spec


@functools.lru_cache(maxsize=None)
def default_spec() -> Spec:
    """The packaged spec, loaded once per process (for codegen at import)."""
    return load_spec()


# --------------------------------------------------------------------------- kind: image

_FATBIN_MAGIC = 0xBA55ED50
_ELF_MAGIC = b"\x7fELF"


def image_format(buf: Any) -> str:
    """'cubin' (ELF), 'fatbin' or 'ptx' (NUL-terminated text) for a module image."""
    mv = memoryview(buf).cast("B")
    if bytes(mv[:4]) == _ELF_MAGIC:
        return "cubin"
    if len(mv) >= 16 and struct.unpack_from("<I", mv, 0)[0] == _FATBIN_MAGIC:
        return "fatbin"
    return "ptx"


def image_size(buf: Any) -> int:
    """Bytes of a module image as cuModuleLoadData would read them: the ELF file
    extent for a cubin, header + payload for a fatbin, text up to and including
    the NUL for PTX (one more than ``len(buf)`` when ``buf`` has no NUL: the
    wire copy from :func:`image_bytes` appends it)."""
    mv = memoryview(buf).cast("B")
    fmt = image_format(mv)
    if fmt == "fatbin":
        _magic, _ver, hdr, fat = struct.unpack_from("<IHHQ", mv, 0)
        return hdr + fat
    if fmt == "cubin":
        if mv[4] != 2 or mv[5] != 1:
            raise ValueError("only little-endian ELF64 cubins are supported")
        phoff, shoff = struct.unpack_from("<QQ", mv, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", mv, 0x36)
        end = max(64, phoff + phentsize * phnum, shoff + shentsize * shnum)
        for i in range(shnum):
            base = shoff + i * shentsize
            sh_type = struct.unpack_from("<I", mv, base + 4)[0]
            off, size = struct.unpack_from("<QQ", mv, base + 0x18)
            if sh_type != 8:  # SHT_NOBITS occupies no file bytes
                end = max(end, off + size)
        for i in range(phnum):
            base = phoff + i * phentsize
            off, _va, _pa, filesz = struct.unpack_from("<QQQQ", mv, base + 8)
            end = max(end, off + filesz)
        return end
    raw = bytes(mv)
    nul = raw.find(b"\0")
    return nul + 1 if nul >= 0 else len(raw) + 1


def image_bytes(buf: Any) -> bytes:
    """The exact bytes of a module image to send (PTX gets its NUL)."""
    n = image_size(buf)
    raw = bytes(memoryview(buf).cast("B")[:n])
    if len(raw) < n:
        if image_format(buf) != "ptx" or len(raw) != n - 1:
            raise ValueError(f"truncated {image_format(buf)} image: {len(raw)} of {n} bytes")
        raw += b"\0"
    return raw

