"""`gpuwire apigen`: read the CUDA headers of a local toolkit and keep the call spec in step with them.

    gpuwire apigen --check                     # spec vs headers; exit 1 on any disagreement
    gpuwire apigen --add cuMemPrefetchAsync    # print a guessed entry (needs_review: true)
    gpuwire apigen --add cuMemPrefetchAsync --write
    gpuwire apigen --all --write               # refresh ctype/symbol/arg names of every entry

The headers go through the C preprocessor (``cc -E -dD -x c``) exactly as an
application including them would see them (no ``__CUDA_API_VERSION_INTERNAL``,
no per-thread default stream), so ``cuMemAlloc`` resolves to the exported
``cuMemAlloc_v2`` through the header's own ``#define`` lines. Prototypes are
then read from the preprocessed token stream; parameters that are function
pointers are reported as unsupported rather than guessed at.

Regeneration refreshes only what the header owns (symbol, return type,
argument names and ctypes); every hand-written annotation (kind, dir, size,
elem, handle, optional, sync, id, doc, ...) is kept. docs/api-spec.md has the
walkthrough.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .spec import DEFAULT_SPEC_PATH, Spec, SpecError, scalar_code, spec_from_dict, split_ctype

__all__ = [
    "Param", "Prototype", "Prototypes", "HeaderError",
    "find_cuda_include", "default_headers", "preprocess", "parse_preprocessed", "read_prototypes",
    "resolve_api_name", "normalize_ctype", "generate_entries", "check_spec", "dump_spec",
    "load_raw_spec", "add_parser", "run", "main",
]


class HeaderError(RuntimeError):
    """The headers could not be found or preprocessed."""


# --------------------------------------------------------------------------- finding headers

def find_cuda_include() -> Optional[str]:
    """Directory holding cuda.h: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, next to nvcc; None if none."""
    cands: List[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDA_TOOLKIT_ROOT_DIR"):
        v = os.environ.get(var)
        if v:
            cands += [Path(v) / "include", Path(v)]
    cands.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(nvcc).resolve().parent.parent
        cands += [root / "include", root / "targets" / "x86_64-linux" / "include",
                  root / "targets" / "sbsa-linux" / "include"]
    cands += sorted(Path("/usr/local").glob("cuda-*/include"), reverse=True)
    cands.append(Path("/usr/include"))
    for c in cands:
        if (c / "cuda.h").is_file():
            return str(c)
    return None


def default_headers(include_dir: Optional[str] = None) -> List[str]:
    """cuda.h and (when present) cuda_runtime_api.h of the local toolkit."""
    inc = include_dir or find_cuda_include()
    if not inc:
        return []
    out = [str(Path(inc) / "cuda.h")]
    rt = Path(inc) / "cuda_runtime_api.h"
    if rt.is_file():
        out.append(str(rt))
    return out


# --------------------------------------------------------------------------- preprocessing

def _find_cpp() -> List[str]:
    for exe in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if exe and shutil.which(exe.split()[0]):
            return exe.split() + ["-E"]
    if shutil.which("cpp"):
        return ["cpp"]
    raise HeaderError("no C preprocessor found (need cc, gcc, clang or cpp on PATH)")


def preprocess(headers: Sequence[str], include_dirs: Sequence[str] = ()) -> str:
    """``cc -E -dD -x c`` of a file including each header; returns the text."""
    if not headers:
        raise HeaderError("no headers given")
    for h in headers:
        if Path(h).is_dir():
            raise HeaderError(f"header {h} is a directory, not a file")
        if not Path(h).is_file():
            raise HeaderError(f"header not found: {h}")
    incs: List[str] = []
    for d in list(include_dirs) + [str(Path(h).resolve().parent) for h in headers]:
        if d not in incs:
            incs.append(d)
    with tempfile.TemporaryDirectory(prefix="gpuwire-apigen-") as td:
        src = Path(td) / "apigen_input.c"
        src.write_text("".join(f'#include "{Path(h).resolve()}"\n' for h in headers))
        cmd = _find_cpp() + ["-dD", "-x", "c"] + [f"-I{d}" for d in incs] + [str(src)]
        try:
            # errors="replace": a header that is not UTF-8 is read, not a UnicodeDecodeError
            res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise HeaderError(f"{' '.join(cmd)}: {e}") from None
    if res.returncode != 0:
        raise HeaderError(f"preprocessing failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    return res.stdout


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Param:
    name: Optional[str]
    ctype: str
    unsupported: Optional[str] = None   # e.g. "function-pointer parameter"


@dataclass(frozen=True)
class Prototype:
    name: str                  # the declared (= exported) symbol, after macro renames
    returns: str
    params: Tuple[Param, ...]
    header: str = ""
    line: int = 0
    variadic: bool = False
    unsupported: Optional[str] = None

    @property
    def signature(self) -> str:
        ps = ", ".join((p.ctype + ("" if p.ctype.endswith("*") else " ") + p.name) if p.name else p.ctype
                       for p in self.params)
        if self.variadic:
            ps += ", ..."
        return f"{self.returns} {self.name}({ps or 'void'})"


@dataclass(frozen=True)
class _Macro:
    params: Optional[Tuple[str, ...]]
    body: str


class Prototypes(dict):
    """``dict[symbol, Prototype]`` plus what else the headers said."""

    def __init__(self) -> None:
        super().__init__()
        self.macros: Dict[str, _Macro] = {}
        self.typedefs: Dict[str, str] = {}      # name -> "enum" | "struct" | "handle" | "funcptr" | "alias:<ctype>"
        self.headers: List[str] = []
        self.raw: Dict[str, str] = {}            # header path -> text (for \\brief lines)
        self.skipped: Dict[str, str] = {}        # declarations not understood: name -> reason

    @property
    def cuda_version(self) -> Optional[int]:
        m = self.macros.get("CUDA_VERSION")
        try:
            return int(m.body.strip()) if m else None
        except ValueError:
            return None

    def resolve(self, name: str) -> str:
        return _resolve(name, self.macros)

    def typedef_kind(self, ctype_base: str) -> Optional[str]:
        """enum/struct/handle/funcptr/builtin for a typedef name, following aliases."""
        seen = set()
        cur = ctype_base
        while cur in self.typedefs and cur not in seen:
            seen.add(cur)
            k = self.typedefs[cur]
            if not k.startswith("alias:"):
                return k
            base, stars, _ = split_ctype(k[6:])
            if stars:
                return "pointer"
            cur = base
        if cur in _C_TYPE_WORDS or scalar_code(cur):
            return "builtin:" + cur
        return None


_TOKEN = re.compile(r"""
    (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<num>\.?[0-9][0-9A-Za-z_.]*)
  | (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<punct>\.\.\.|->|<<|>>|::|\#\#|[{}()\[\];,*&=<>+\-/%!~?:.|^\#])
  | (?P<ws>\s+)
  | (?P<other>.)
""", re.X)
_LINEMARK = re.compile(r'^#\s*(\d+)\s+"((?:\\.|[^"\\])*)"')
_DEFINE = re.compile(r"^#\s*define\s+([A-Za-z_]\w*)(\(([^)]*)\))?\s*(.*)$")
_UNDEF = re.compile(r"^#\s*undef\s+([A-Za-z_]\w*)")
_C_TYPE_WORDS = frozenset("""void char short int long float double signed unsigned _Bool bool const volatile
    restrict __restrict __restrict__ struct enum union size_t""".split())
_DROP_WORDS = frozenset("""extern inline __inline __inline__ __extension__ register auto _Noreturn""".split())
_ATTR_WORDS = frozenset("""__attribute__ __attribute __declspec __asm__ __asm asm _Alignas __pragma""".split())
_IDENT = re.compile(r"^[A-Za-z_]\w*$")


@dataclass
class _Tok:
    text: str
    file: str
    line: int


def _resolve(name: str, macros: Mapping[str, _Macro], limit: int = 16) -> str:
    cur = name
    for _ in range(limit):
        m = macros.get(cur)
        if m is None or m.params is not None:
            return cur
        body = m.body.strip()
        nxt = None
        if _IDENT.match(body):
            nxt = body
        else:
            mm = re.fullmatch(r"([A-Za-z_]\w*)\s*\(\s*([A-Za-z_]\w*)\s*\)", body)
            f = macros.get(mm.group(1)) if mm else None
            if f is not None and f.params is not None and len(f.params) == 1:
                exp = re.sub(r"\b%s\b" % re.escape(f.params[0]), mm.group(2), f.body)
                exp = re.sub(r"\s*##\s*", "", exp).strip()
                if _IDENT.match(exp):
                    nxt = exp
        if nxt is None or nxt == cur:
            return cur
        cur = nxt
    return cur


def normalize_ctype(text: Any) -> str:
    """Canonical spelling of a C type: ``const  char**`` -> ``const char **``."""
    toks = [t for t in re.findall(r"[A-Za-z_]\w*|\d+|\S", str(text))]
    return _join(toks)


def _join(toks: Sequence[str]) -> str:
    out = ""
    prev = ""
    for t in toks:
        if not out:
            out = t
        elif t == "*":
            out += "*" if prev == "*" else " *"
        elif t in ("[", "(") and prev not in ("*",):
            out += " " + t if prev not in ("[", "(") else t
        elif t in ("]", ")", ",") or prev in ("[", "("):
            out += t
        else:
            out += " " + t
        prev = t
    return out


def _strip_attrs(toks: List[_Tok]) -> List[_Tok]:
    out: List[_Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i].text
        if t in _ATTR_WORDS:
            i += 1
            if i < len(toks) and toks[i].text == "(":
                depth = 0
                while i < len(toks):
                    if toks[i].text == "(":
                        depth += 1
                    elif toks[i].text == ")":
                        depth -= 1
                        if depth == 0:
                            i += 1
                            break
                    i += 1
            continue
        if t in _DROP_WORDS:
            i += 1
            continue
        out.append(toks[i])
        i += 1
    return out


def _split_commas(toks: List[_Tok]) -> List[List[_Tok]]:
    parts: List[List[_Tok]] = [[]]
    depth = 0
    for t in toks:
        if t.text in "([{":
            depth += 1
        elif t.text in ")]}":
            depth -= 1
        if t.text == "," and depth == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _parse_param(toks: List[_Tok]) -> Param:
    texts = [t.text for t in toks]
    if "(" in texts:
        # function pointer: R (CALLCONV *name)(args)
        name = None
        i = texts.index("(")
        for j in range(i + 1, len(texts)):
            if texts[j] == ")":
                break
            if _IDENT.match(texts[j]) and texts[j - 1] == "*":
                name = texts[j]
        ctype = _join([x for x in texts if x != name])
        return Param(name, ctype, unsupported="function-pointer parameter")
    if "[" in texts:
        i = texts.index("[")
        if i > 0 and _IDENT.match(texts[i - 1]) and i > 1:
            return Param(texts[i - 1], _join(texts[:i - 1] + texts[i:]))
        return Param(None, _join(texts))
    if len(texts) > 1 and _IDENT.match(texts[-1]) and texts[-1] not in _C_TYPE_WORDS:
        return Param(texts[-1], _join(texts[:-1]))
    return Param(None, _join(texts))


def _find_close(toks: List[_Tok], i: int) -> int:
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].text == "(":
            depth += 1
        elif toks[j].text == ")":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _handle_typedef(protos: Prototypes, toks: List[_Tok]) -> None:
    texts = [t.text for t in toks[1:]]
    if not texts:
        return
    if "(" in texts and "{" not in texts:
        # typedef R (CB *NAME)(...)
        i = texts.index("(")
        name = None
        for j in range(i + 1, len(texts)):
            if texts[j] == ")":
                break
            if _IDENT.match(texts[j]):
                name = texts[j]
        if name:
            protos.typedefs[name] = "funcptr"
        return
    # drop brace bodies
    flat: List[str] = []
    depth = 0
    for x in texts:
        if x == "{":
            depth += 1
            continue
        if x == "}":
            depth -= 1
            continue
        if depth == 0:
            flat.append(x)
    if "[" in flat:
        flat = flat[:flat.index("[")]
    for decl in _split_names(flat):
        if not decl or not _IDENT.match(decl[-1]):
            continue
        name, head = decl[-1], decl[:-1]
        if not head:
            continue
        if head[0] == "enum":
            kind = "enum"
        elif head[0] in ("struct", "union"):
            kind = "handle" if head.count("*") == 1 else ("struct" if "*" not in head else "pointer")
        else:
            kind = "alias:" + _join(head)
        protos.typedefs.setdefault(name, kind)


def _split_names(flat: List[str]) -> List[List[str]]:
    # "struct X_st *A, *B" -> [["struct","X_st","*","A"], ["struct","X_st","*","B"]]
    if "," not in flat:
        return [flat]
    first = flat[:flat.index(",")]
    base = [w for w in first if w != "*"][:-1]
    out = [first]
    rest = flat[flat.index(",") + 1:]
    for part in " ".join(rest).split(","):
        out.append(base + part.split())
    return out


def _handle_statement(protos: Prototypes, toks: List[_Tok]) -> None:
    if not toks:
        return
    if toks[0].text == "typedef":
        _handle_typedef(protos, toks)
        return
    toks = _strip_attrs(toks)
    texts = [t.text for t in toks]
    if not texts or "{" in texts or "static" in texts or "=" in texts:
        return
    if "(" not in texts:
        return
    i = texts.index("(")
    if i == 0 or not _IDENT.match(texts[i - 1]):
        return  # function-pointer variable or something else
    name = texts[i - 1]
    ret = texts[:i - 1]
    if not ret or name in _C_TYPE_WORDS:
        return
    close = _find_close(toks, i)
    if close < 0:
        return
    tail = texts[close + 1:]
    start = toks[0]
    if tail:
        protos.skipped.setdefault(name, f"unsupported declarator after the parameter list: {' '.join(tail)}")
        return
    inner = toks[i + 1:close]
    params: List[Param] = []
    variadic = False
    if inner and not (len(inner) == 1 and inner[0].text == "void"):
        for part in _split_commas(inner):
            pt = [t.text for t in part]
            if pt == ["..."]:
                variadic = True
                continue
            if not pt:
                continue
            prm = _parse_param(part)
            base, stars, _c = split_ctype(prm.ctype)
            if not prm.unsupported and stars == 0 and protos.typedefs.get(base) == "funcptr":
                prm = Param(prm.name, prm.ctype, unsupported=f"function-pointer parameter ({base})")
            params.append(prm)
    unsupported = next((f"parameter {p.name or '?'}: {p.unsupported}" for p in params if p.unsupported), None)
    if variadic and not unsupported:
        unsupported = "variadic"
    proto = Prototype(name=name, returns=_join(ret), params=tuple(params), header=start.file, line=start.line,
                      variadic=variadic, unsupported=unsupported)
    protos.setdefault(name, proto)


def parse_preprocessed(text: str, roots: Sequence[str] = ()) -> Prototypes:
    """Prototypes, typedefs and macros from ``cc -E -dD`` output. Only
    declarations from files under ``roots`` (directories) are kept; macros and
    typedefs are kept from everywhere."""
    protos = Prototypes()
    roots = [str(Path(r).resolve()) for r in roots]
    cur_file, cur_line = "", 0
    keep = not roots
    stmt: List[_Tok] = []
    depth = 0
    fn_body = False
    for raw_line in text.split("\n"):
        if raw_line.startswith("#"):
            m = _LINEMARK.match(raw_line)
            if m:
                cur_line = int(m.group(1))
                cur_file = m.group(2)
                rp = cur_file
                if cur_file and not cur_file.startswith("<"):
                    try:
                        rp = str(Path(cur_file).resolve())
                    except OSError:
                        pass
                keep = not roots or any(rp.startswith(r.rstrip("/") + "/") for r in roots)
                continue
            d = _DEFINE.match(raw_line)
            if d:
                params = None
                if d.group(2) is not None:
                    params = tuple(p.strip() for p in d.group(3).split(",") if p.strip())
                protos.macros[d.group(1)] = _Macro(params, d.group(4).strip())
            else:
                u = _UNDEF.match(raw_line)
                if u:
                    protos.macros.pop(u.group(1), None)
            cur_line += 1
            continue
        line_no = cur_line
        cur_line += 1
        if not keep or not raw_line.strip():
            continue
        for m in _TOKEN.finditer(raw_line):
            kind = m.lastgroup
            if kind == "ws":
                continue
            t = m.group()
            if t == "{":
                if depth == 0 and stmt and stmt[-1].text == ")":
                    fn_body = True
                depth += 1
                stmt.append(_Tok(t, cur_file, line_no))
            elif t == "}":
                depth -= 1
                stmt.append(_Tok(t, cur_file, line_no))
                if depth == 0 and fn_body:
                    stmt, fn_body = [], False   # inline definitions are not exported symbols
            elif t == ";" and depth == 0:
                _handle_statement(protos, stmt)
                stmt = []
            else:
                stmt.append(_Tok(t, cur_file, line_no))
    return protos


@functools.lru_cache(maxsize=8)
def _read_cached(headers: Tuple[str, ...], include_dirs: Tuple[str, ...], stamp: Tuple[float, ...]) -> Prototypes:
    text = preprocess(headers, include_dirs)
    roots = sorted({str(Path(h).resolve().parent) for h in headers})
    protos = parse_preprocessed(text, roots)
    protos.headers = list(headers)
    for h in headers:
        try:
            protos.raw[h] = Path(h).read_text(errors="replace")
        except OSError:
            pass
    return protos


def read_prototypes(header_paths: Optional[Sequence[str]] = None, include_dirs: Sequence[str] = ()) -> Prototypes:
    """``dict[symbol, Prototype]`` of every function the headers declare (in
    files under the headers' directories). The returned mapping also carries
    ``.macros``, ``.typedefs``, ``.cuda_version`` and ``.resolve(name)``.
    Default headers: :func:`default_headers`."""
    headers = list(header_paths or default_headers())
    if not headers:
        raise HeaderError("no cuda.h found: pass --header, or set CUDA_HOME")
    headers = [str(Path(h)) for h in headers]
    stamp = tuple(Path(h).stat().st_mtime if Path(h).exists() else 0.0 for h in headers)
    return _read_cached(tuple(headers), tuple(include_dirs), stamp)


def resolve_api_name(name: str, prototypes: Optional[Prototypes] = None) -> str:
    """The exported symbol an application calling ``name`` links against
    (``cuMemAlloc`` -> ``cuMemAlloc_v2``), by the header's own #defines."""
    protos = prototypes if prototypes is not None else read_prototypes()
    return protos.resolve(name)


# --------------------------------------------------------------------------- entry generation

_HANDLE_CTYPES = {
    "CUstream": "stream", "CUevent": "event", "CUmodule": "module", "CUfunction": "function",
    "CUcontext": "context", "CUdevice": "device", "CUlibrary": "library", "CUkernel": "kernel",
    "CUgraph": "graph", "CUgraphExec": "graph_exec", "CUgraphNode": "graph_node", "CUmemoryPool": "mempool",
    "CUarray": "array", "CUmipmappedArray": "mipmapped_array", "CUtexObject": "texobject",
    "CUsurfObject": "surfobject", "CUlinkState": "linkstate", "CUgreenCtx": "green_ctx",
    "CUmemGenericAllocationHandle": "memhandle",
}
_SIZE_NAMES = ("ByteCount", "bytesize", "byteSize", "bytes", "nbytes", "numBytes", "size", "Size", "count", "Count",
               "N", "n")
_LEN_NAMES = ("len", "length", "Len", "size", "bufferSize")


def _pick(params: Sequence[Param], names: Sequence[str], ctypes: Sequence[str]) -> Optional[str]:
    for want in names:
        for p in params:
            if p.name == want and split_ctype(p.ctype)[1] == 0 and split_ctype(p.ctype)[0] in ctypes:
                return p.name
    return None


def _guess_arg(p: Param, proto: Prototype, protos: Prototypes) -> Dict[str, Any]:
    base, stars, const = split_ctype(p.ctype)
    a: Dict[str, Any] = {"name": p.name, "ctype": p.ctype}
    review = False
    size_guess = _pick(proto.params, _SIZE_NAMES, ("size_t", "unsigned int", "unsigned long long"))
    if p.unsupported:
        a.update(dir="in", kind="scalar", doc=f"unsupported: {p.unsupported}")
        return {**a, "needs_review": True}
    if base == "CUdeviceptr" and stars == 0:
        a.update(dir="in", kind="devptr")
        if size_guess:
            a["size"] = size_guess
        review = True  # in (read) or out (written)?
    elif base == "CUdeviceptr" and stars == 1:
        a.update(dir="out", kind="handle", handle="devptr")
    elif base in _HANDLE_CTYPES and stars == 0:
        a.update(dir="in", kind="handle", handle=_HANDLE_CTYPES[base])
        if base == "CUstream":
            a["optional"] = True
    elif base in _HANDLE_CTYPES and stars == 1:
        a.update(dir="in" if const else "out", kind="handle" if not const else "hostbuf",
                 **({"handle": _HANDLE_CTYPES[base]} if not const else {}))
        review = bool(const)
    elif base == "void" and stars == 2 and p.name in ("kernelParams", "extra"):
        a.update(dir="in", kind="kernel_params", optional=True)
    elif base == "void" and stars == 2:
        a.update(dir="out", kind="handle", handle="hostptr")
    elif base == "void" and stars == 1:
        if const:
            a.update(dir="in", kind="hostbuf")
        elif p.name in ("p", "ptr", "hostPtr"):
            a.update(dir="in", kind="handle", handle="hostptr")
        else:
            a.update(dir="out", kind="hostbuf")
        if size_guess and a["kind"] == "hostbuf":
            a["size"] = size_guess
        review = True
    elif base == "char" and stars == 1 and const:
        a.update(dir="in", kind="string")
    elif base == "char" and stars == 1:
        a.update(dir="out", kind="string")
        ln = _pick(proto.params, _LEN_NAMES, ("int", "size_t", "unsigned int"))
        if ln:
            a["size"] = ln
        review = True
    elif base == "char" and stars == 2:
        a.update(dir="out", kind="string")
    else:
        code = scalar_code(base)
        tk = protos.typedef_kind(base)
        if code is None and tk == "enum":
            code = "I"
            a["wire"] = "I"
        elif code is None and tk and tk.startswith("builtin:"):
            code = scalar_code(tk[8:])
            if code:
                a["wire"] = code
        if stars == 0:
            a.update(dir="in", kind="scalar")
            review = review or code is None
        elif stars == 1 and code is not None and not const:
            a.update(dir="out", kind="scalar")
        else:
            # pointer to a struct (or array of scalars): bytes the caller owns
            a.update(dir="in" if const else "out", kind="hostbuf")
            review = True
    if review:
        a["needs_review"] = True
    return a


def _guess_sync(name: str, args: Sequence[Mapping[str, Any]]) -> str:
    returns_data = any(a["dir"] != "in" and a["kind"] not in ("devptr",) for a in args)
    if returns_data:
        return "sync"
    if name.endswith("Async") or any(w in name for w in ("Destroy", "Free", "Unload", "Release", "Record",
                                                         "Launch", "Unregister")):
        return "deferred"
    return "sync"


def _brief(protos: Prototypes, name: str) -> Optional[str]:
    for text in protos.raw.values():
        for m in re.finditer(r"\b%s\s*\(" % re.escape(name), text):
            before = text[:m.start()]
            end = before.rfind("*/")
            if end < 0 or ";" in before[end:] or "}" in before[end:]:
                continue
            start = before.rfind("/**", 0, end)
            if start < 0:
                continue
            body = before[start + 3:end]
            b = re.search(r"\\brief\s+(.*)", body)
            if b:
                line = b.group(1).strip().rstrip("*").strip()
                return line or None
    return None


def _fresh_id(data: Mapping[str, Any]) -> int:
    used = [0]
    for section in ("gpuwire_calls", "calls"):
        for e in (data.get(section) or {}).values():
            if isinstance(e, Mapping) and isinstance(e.get("id"), int):
                used.append(e["id"])
    used += [x for x in (data.get("retired_ids") or []) if isinstance(x, int)]
    return max(used) + 1


def _rename_refs(expr: Any, renames: Mapping[str, str]) -> Any:
    if not isinstance(expr, str) or not renames:
        return expr
    return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: renames.get(m.group(), m.group()), expr)


#: Headers of the CUDA runtime API: read for types, but their functions are not driver calls.
_RUNTIME_HEADERS = frozenset(("cuda_runtime_api.h", "cuda_runtime.h"))


def _empty_spec(protos: Optional[Prototypes]) -> Dict[str, Any]:
    return {"spec_version": 1, "api": "cuda-driver",
            "cuda_version": protos.cuda_version if protos is not None else None,
            "retired_ids": [], "gpuwire_calls": {}, "calls": {}}


def generate_entries(names: Iterable[str], existing_spec: Optional[Mapping[str, Any]] = None,
                     prototypes: Optional[Prototypes] = None) -> Dict[str, Any]:
    """A new spec document with an entry for each API name in ``names``.

    Existing entries keep every hand-written annotation; only ``symbol``,
    ``returns`` and each argument's ``name``/``ctype`` are refreshed from the
    header (an argument renamed in the header keeps its annotations by
    position and size expressions / ``stream:`` follow the rename; an argument
    whose ctype changed, and any added argument, get ``needs_review: true``).
    New names get annotations guessed from the C types, a fresh id and
    ``needs_review: true``. ``existing_spec`` is not modified."""
    protos = prototypes if prototypes is not None else read_prototypes()
    data: Dict[str, Any] = copy.deepcopy(dict(existing_spec)) if existing_spec else _empty_spec(protos)
    data.setdefault("calls", {})
    if data["calls"] is None:
        data["calls"] = {}
    if protos.cuda_version is not None:
        data["cuda_version"] = protos.cuda_version
    for name in names:
        if name in (data.get("gpuwire_calls") or {}):
            raise KeyError(f"{name} is a gpuwire pseudo-call, not a header function")
        symbol = protos.resolve(name)
        proto = protos.get(symbol)
        if proto is None:
            raise KeyError(f"{name}: no prototype for {symbol} in {', '.join(protos.headers) or 'the headers'}"
                           + (f" ({protos.skipped[symbol]})" if symbol in protos.skipped else ""))
        if proto.unsupported:
            raise KeyError(f"{name}: {symbol} cannot be forwarded: {proto.unsupported}")
        if os.path.basename(proto.header) in _RUNTIME_HEADERS:
            raise KeyError(f"{name}: declared in {proto.header} (the CUDA runtime API); the spec forwards "
                           f"the driver API of cuda.h only (e.g. cuMemAlloc, not cudaMalloc)")
        old = data["calls"].get(name)
        if old is None:
            args = [_guess_arg(p, proto, protos) for p in proto.params]
            entry: Dict[str, Any] = {"id": _fresh_id(data), "symbol": symbol, "returns": proto.returns,
                                     "sync": _guess_sync(name, args)}
            stream = next((a["name"] for a in args if a.get("handle") == "stream" and a["dir"] == "in"), None)
            if stream:
                entry["stream"] = stream
            entry["needs_review"] = True
            doc = _brief(protos, name)
            if doc:
                entry["doc"] = doc
            entry["args"] = args
            data["calls"][name] = entry
            continue
        entry = old
        entry["symbol"] = symbol
        entry["returns"] = proto.returns
        old_args = [dict(a) for a in (entry.get("args") or [])]
        by_name = {a.get("name"): a for a in old_args}
        header_names = {p.name for p in proto.params}
        renames: Dict[str, str] = {}
        new_args: List[Dict[str, Any]] = []
        changed = len(old_args) != len(proto.params)
        for i, p in enumerate(proto.params):
            if p.name in by_name:
                a = dict(by_name[p.name])
            elif i < len(old_args) and old_args[i].get("name") not in header_names:
                a = dict(old_args[i])
                renames[a.get("name")] = p.name
            else:
                a = _guess_arg(p, proto, protos)
                a["needs_review"] = True
                changed = True
            a["name"] = p.name
            if normalize_ctype(a.get("ctype", "")) != p.ctype:
                a["needs_review"] = True    # the type changed: kind/dir/size may be stale
                changed = True
            a["ctype"] = p.ctype
            new_args.append(a)
        for a in new_args:
            if "size" in a:
                a["size"] = _rename_refs(a["size"], renames)
        if entry.get("stream") in renames:
            entry["stream"] = renames[entry["stream"]]
        entry["args"] = new_args
        if changed:
            entry["needs_review"] = True
    return data


# --------------------------------------------------------------------------- checking

def _iter_cuda_entries(spec: Any) -> Iterable[Tuple[str, Optional[str], Optional[str], List[Tuple[Any, Any]]]]:
    if isinstance(spec, Spec):
        for c in spec.cuda_calls():
            yield c.name, c.symbol, c.returns, [(a.name, a.ctype) for a in c.args]
        return
    for name, e in ((spec or {}).get("calls") or {}).items():
        if not isinstance(e, Mapping):
            yield name, None, None, []
            continue
        args = [(a.get("name"), a.get("ctype")) if isinstance(a, Mapping) else (None, None)
                for a in (e.get("args") or [])]
        yield name, e.get("symbol"), e.get("returns"), args


def check_spec(spec: Any, prototypes: Prototypes) -> List[str]:
    """Disagreements between a spec (a :class:`Spec` or the parsed YAML
    mapping) and the headers' prototypes, one line each; [] when they agree.
    Pseudo-calls (``symbol: null``, the ``gpuwire_calls`` section) are skipped."""
    problems: List[str] = []
    for name, symbol, returns, args in _iter_cuda_entries(spec):
        if not symbol:
            problems.append(f"{name}: no symbol (CUDA calls need the exported symbol; pseudo-calls belong in "
                            f"gpuwire_calls)")
            continue
        resolved = prototypes.resolve(name) if isinstance(prototypes, Prototypes) else name
        if resolved != symbol and resolved in prototypes:
            problems.append(f"{name}: the header maps {name} to {resolved}, the spec says symbol {symbol}")
        proto = prototypes.get(symbol)
        if proto is None:
            problems.append(f"{name}: symbol {symbol} is not declared in the headers")
            continue
        where = name if name == symbol else f"{name} ({symbol})"
        if normalize_ctype(returns or "") != proto.returns:
            problems.append(f"{where}: returns {returns!r} in the spec, {proto.returns!r} in the header")
        if proto.unsupported:
            problems.append(f"{where}: header declaration is not forwardable: {proto.unsupported}")
        if len(args) != len(proto.params):
            problems.append(f"{where}: {len(args)} args in the spec, {len(proto.params)} in the header "
                            f"({proto.signature}, {Path(proto.header).name}:{proto.line})")
        for i, ((aname, actype), p) in enumerate(zip(args, proto.params)):
            if aname != p.name:
                problems.append(f"{where}: arg {i} is named {aname!r} in the spec, {p.name!r} in the header")
            if normalize_ctype(actype or "") != p.ctype:
                problems.append(f"{where}: arg {i} ({p.name}) has ctype {actype!r} in the spec, "
                                f"{p.ctype!r} in the header")
    return problems


# --------------------------------------------------------------------------- YAML output

_CALL_ORDER = ("id", "symbol", "returns", "sync", "handle_create", "stream", "needs_review", "doc", "args")
_ARG_ORDER = ("name", "ctype", "dir", "kind", "handle", "size", "elem", "optional", "wire", "needs_review", "doc")
_TOP_ORDER = ("spec_version", "api", "cuda_version", "retired_ids", "semantics", "gpuwire_calls", "calls")
_HEADER = """\
# gpuwire forwarded-call spec: the single source of the wire protocol.
# Schema and walkthrough: docs/api-spec.md. Checked against the CUDA headers by
# `gpuwire apigen --check` (and tests/test_spec_apigen.py).
# `gpuwire apigen --write` rewrites this file in this layout and drops comments:
# put notes in `doc:` and `semantics:` fields, not in comments.
"""


def _flow(v: Any) -> str:
    # dump inside a flow sequence so the scalar is quoted as flow context needs
    s = yaml.safe_dump([v], default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    assert s.startswith("[") and s.endswith("]"), s
    return s[1:-1]


def _ordered(d: Mapping[str, Any], order: Sequence[str]) -> List[Tuple[str, Any]]:
    keys = [k for k in order if k in d] + sorted(k for k in d if k not in order)
    return [(k, d[k]) for k in keys]


def _block(key: str, value: Any, indent: str) -> str:
    if (isinstance(value, str) and "\n" in value and not value.startswith((" ", "\n", "\t"))
            and not value.endswith("\n\n") and all(ln == ln.rstrip() for ln in value.split("\n"))):
        chomp = "|" if value.endswith("\n") else "|-"
        body = value[:-1] if chomp == "|" else value
        lines = "".join(f"{indent}  {ln}\n" if ln else "\n" for ln in body.split("\n"))
        return f"{indent}{key}: {chomp}\n{lines}"
    if isinstance(value, (dict, list)) and value:
        dumped = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=100)
        return "".join(f"{indent}{ln}\n" for ln in dumped.rstrip("\n").split("\n"))
    return f"{indent}{key}: {_flow(value)}\n"


def _dump_entry(name: str, e: Any) -> str:
    if not isinstance(e, Mapping):
        return f"  {_flow(name)}: {_flow(e)}\n"
    out = [f"  {name}:\n"]
    for k, v in _ordered(e, _CALL_ORDER):
        if k == "args":
            if not v:
                out.append("    args: []\n")
                continue
            out.append("    args:\n")
            for a in v:
                if isinstance(a, Mapping):
                    items = ", ".join(f"{ak}: {_flow(av)}" for ak, av in _ordered(a, _ARG_ORDER))
                    out.append(f"    - {{{items}}}\n")
                else:
                    out.append(f"    - {_flow(a)}\n")
        else:
            out.append(_block(k, v, "    "))
    return "".join(out)


def dump_spec(data: Mapping[str, Any], entries_only: Optional[Sequence[str]] = None) -> str:
    """The spec in its canonical layout (what ``--write`` produces): block
    style, one call per block, one argument per line. With ``entries_only``,
    just a ``calls:`` mapping holding those entries."""
    if entries_only is not None:
        calls = data.get("calls") or {}
        return "calls:\n" + "".join(_dump_entry(n, calls[n]) for n in entries_only if n in calls)
    out = [_HEADER]
    for k, v in _ordered(data, _TOP_ORDER):
        if k in ("calls", "gpuwire_calls"):
            if not v:
                out.append(f"{k}: {{}}\n")
                continue
            out.append(f"\n{k}:\n")
            for i, (name, e) in enumerate(v.items()):
                if i:
                    out.append("\n")
                out.append(_dump_entry(name, e))
        elif k == "retired_ids":
            out.append(f"{k}: {_flow(list(v or []))}\n")
        else:
            out.append(_block(k, v, ""))
    return "".join(out)


def load_raw_spec(path: Optional[str] = None, missing_ok: bool = False) -> Dict[str, Any]:
    """The spec file as parsed YAML, its shape checked (sections are mappings, entries
    mappings, ``args`` lists of mappings: :class:`SpecError` naming the place otherwise).
    A missing file raises ``FileNotFoundError`` unless ``missing_ok`` (then: an empty spec)."""
    p = Path(path) if path else DEFAULT_SPEC_PATH
    if p.is_dir():
        raise SpecError(f"{p}: is a directory, not a spec file")
    if not p.exists():
        if missing_ok:
            return _empty_spec(None)
        raise FileNotFoundError(f"spec file not found: {p} (to start a new one: --add NAME ... --write)")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(f"{p}: not UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: top level must be a mapping")
    _check_raw_shape(p, data)
    return data


def _check_raw_shape(p: Path, data: Mapping[str, Any]) -> None:
    for section in ("calls", "gpuwire_calls"):
        calls = data.get(section)
        if calls is None:
            continue
        if not isinstance(calls, dict):
            raise SpecError(f"{p}: {section} must be a mapping of name: entry, got {type(calls).__name__}")
        for name, e in calls.items():
            if not isinstance(e, dict):
                raise SpecError(f"{p}: {section}.{name} must be a mapping, got {type(e).__name__} {e!r}")
            args = e.get("args")
            if args is None:
                continue
            if not isinstance(args, list):
                raise SpecError(f"{p}: {section}.{name}.args must be a list, got {type(args).__name__} {args!r}")
            for i, a in enumerate(args):
                if not isinstance(a, dict):
                    raise SpecError(f"{p}: {section}.{name}.args[{i}] must be a mapping, got {a!r}")
    retired = data.get("retired_ids")
    if retired is not None and not isinstance(retired, list):
        raise SpecError(f"{p}: retired_ids must be a list, got {type(retired).__name__}")


# --------------------------------------------------------------------------- CLI

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "apigen", help="read CUDA headers: add/refresh spec entries, check the spec against the headers",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    _configure(p)
    return p


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--header", action="append", default=None, metavar="PATH",
                   help="header to read (repeatable; default: cuda.h and cuda_runtime_api.h of the toolkit "
                        "found via $CUDA_HOME, /usr/local/cuda, or nvcc's location)")
    p.add_argument("-I", "--include", action="append", default=[], metavar="DIR", dest="include",
                   help="extra include directory for the preprocessor")
    p.add_argument("--spec", default=None, metavar="PATH", help=f"spec file (default: {DEFAULT_SPEC_PATH})")
    p.add_argument("--add", nargs="+", default=[], metavar="NAME",
                   help="API names to add (guessed, needs_review: true) or refresh from the header")
    p.add_argument("--all", action="store_true", help="refresh every existing CUDA entry from the header")
    p.add_argument("--check", action="store_true",
                   help="report disagreements between spec and headers (and schema errors); exit 1 if any")
    p.add_argument("--write", action="store_true", help="write the result back to --spec instead of printing it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec_path = args.spec or str(DEFAULT_SPEC_PATH)
    try:
        headers = args.header or default_headers()
        if not headers:
            print("gpuwire apigen: no cuda.h found; pass --header PATH or set CUDA_HOME", file=sys.stderr)
            return 2
        protos = read_prototypes(headers, args.include)
        # a missing spec is an error (a typo must not read as an empty spec), except when
        # --write is to create it
        data = load_raw_spec(spec_path, missing_ok=bool(args.write and args.add))
        if args.write:
            _check_writable(spec_path)
        names = list(args.add)
        if args.all:
            names = list((data.get("calls") or {}).keys()) + [n for n in names if n not in (data.get("calls") or {})]
        touched = list(dict.fromkeys(names))
        if touched:
            data = generate_entries(touched, data, protos)
    except (HeaderError, SpecError, KeyError, OSError, yaml.YAMLError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gpuwire apigen: {msg}", file=sys.stderr)
        return 2
    if args.write:
        try:
            Path(spec_path).write_text(dump_spec(data))
        except OSError as e:
            print(f"gpuwire apigen: cannot write {spec_path}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote {spec_path}" + (f" ({len(touched)} entries added/refreshed)" if touched else ""),
              file=sys.stderr)
    elif touched or not args.check:
        sys.stdout.write(dump_spec(data, entries_only=args.add if args.add and not args.all else None))
    if args.check:
        problems = check_spec(data, protos)
        try:
            spec_from_dict(data, source=spec_path)
        except SpecError as e:
            problems.append(str(e))
        if problems:
            for line in problems:
                print(line)
            print(f"gpuwire apigen: {len(problems)} problem(s) in {spec_path} "
                  f"(headers: {', '.join(protos.headers)}, CUDA_VERSION {protos.cuda_version})", file=sys.stderr)
            return 1
        n = len(data.get("calls") or {})
        print(f"gpuwire apigen: {spec_path} agrees with {', '.join(protos.headers)} "
              f"(CUDA_VERSION {protos.cuda_version}; {n} calls)", file=sys.stderr)
    return 0


def _check_writable(path: str) -> None:
    p = Path(path)
    d = p.parent if str(p.parent) else Path(".")
    if not d.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PermissionError(f"cannot write {path}: not writable")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpuwire apigen", description=__doc__.split("\n\n")[0] if __doc__ else None)
    _configure(p)
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
