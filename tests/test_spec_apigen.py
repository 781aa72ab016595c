"""`gpuwire apigen`: header reading, the spec-vs-header check, regeneration keeping annotations, the CLI."""
from __future__ import annotations

import argparse
import re
import copy
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from gpuwire.rpc import apigen as G
from gpuwire.rpc import spec as S

HAVE_CC = any(shutil.which(x) for x in ("cc", "gcc", "clang", "cpp"))
CUDA_INC = G.find_cuda_include()
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C preprocessor (cc/gcc/clang/cpp) on PATH")
needs_cuda = pytest.mark.skipif(not (HAVE_CC and CUDA_INC),
                                reason="no cuda.h found ($CUDA_HOME, /usr/local/cuda/include, nvcc) or no cc")


@pytest.fixture(scope="module")
def protos():
    if not (HAVE_CC and CUDA_INC):
        pytest.skip("no cuda.h found ($CUDA_HOME, /usr/local/cuda/include, nvcc) or no C preprocessor")
    return G.read_prototypes(G.default_headers(CUDA_INC))


@pytest.fixture()
def raw():
    return yaml.safe_load(S.DEFAULT_SPEC_PATH.read_text())


# ----------------------------------------------------------------- parsing a synthetic header

SYNTH = textwrap.dedent("""\
    #ifndef SYNTH_H
    #define SYNTH_H
    #include <stddef.h>
    #define MYAPI
    #define MYCB
    #define SYNTH_VERSION 4200
    #if defined(SYNTH_INTERNAL)
    #define PTDS(api) api ## _ptds
    #else
    #define PTDS(api) api
    #endif
    #define fooAlloc fooAlloc_v2
    #define fooCopy PTDS(fooCopy_v3)
    #define fooChain fooAlloc
    typedef struct foo_st *FooHandle;
    typedef enum foo_enum { FOO_A = 1, FOO_B = 2 } FooEnum;
    typedef void (MYCB *FooCallback)(void *user);
    typedef int FooDev_v1;
    typedef FooDev_v1 FooDev;
    /**
     * \\brief Allocate a foo
     *
     * Long text.
     */
    int MYAPI fooAlloc(FooHandle *h, unsigned long long size) __attribute__((deprecated));
    __attribute__((visibility("default"))) int MYAPI fooCopy(void *dst,
                                                             const void   *  src,
                                                             size_t n);
    int fooCb(FooCallback cb, void *user);
    int fooFp(int (*fp)(int, int), int x);
    int fooArr(int a[4], const char **names);
    int fooNoArgs(void);
    int fooVar(const char *fmt, ...);
    int fooUnnamed(int, unsigned int);
    static inline int fooInline(int x) { return x + 1; }
    extern int fooExtern(const struct foo_st *p, FooEnum e, FooDev d);
    struct not_a_function { int x; };
    int (*fooPointerVariable)(int);
    #endif
""")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    if not HAVE_CC:
        pytest.skip("no C preprocessor")
    d = tmp_path_factory.mktemp("inc")
    (d / "synth.h").write_text(SYNTH)
    return G.read_prototypes([str(d / "synth.h")])


def test_parse_renames_and_attributes(synth):
    assert synth.resolve("fooAlloc") == "fooAlloc_v2"
    assert synth.resolve("fooChain") == "fooAlloc_v2"            # chains of renames
    assert synth.resolve("fooCopy") == "fooCopy_v3"              # function-like macro, SYNTH_INTERNAL unset
    assert synth.resolve("fooCb") == "fooCb"
    assert G.resolve_api_name("fooCopy", synth) == "fooCopy_v3"
    a = synth["fooAlloc_v2"]
    assert a.returns == "int" and [(p.name, p.ctype) for p in a.params] == [("h", "FooHandle *"),
                                                                             ("size", "unsigned long long")]
    c = synth["fooCopy_v3"]                                     # multi-line, odd spacing, leading attribute
    assert [(p.name, p.ctype) for p in c.params] == [("dst", "void *"), ("src", "const void *"), ("n", "size_t")]
    assert c.line > 0 and c.header.endswith("synth.h")
    assert "fooAlloc" not in synth and "fooCopy" not in synth


def test_parse_unsupported_and_odd_params(synth):
    assert synth["fooCb"].unsupported and "function-pointer" in synth["fooCb"].unsupported
    fp = synth["fooFp"]
    assert fp.params[0].unsupported and fp.params[0].name == "fp" and fp.params[1].name == "x"
    assert [(p.name, p.ctype) for p in synth["fooArr"].params] == [("a", "int [4]"), ("names", "const char **")]
    assert synth["fooNoArgs"].params == ()
    assert synth["fooVar"].variadic and synth["fooVar"].unsupported == "variadic"
    assert [(p.name, p.ctype) for p in synth["fooUnnamed"].params] == [(None, "int"), (None, "unsigned int")]
    assert [(p.name, p.ctype) for p in synth["fooExtern"].params] == [
        ("p", "const struct foo_st *"), ("e", "FooEnum"), ("d", "FooDev")]
    assert "fooInline" not in synth and "fooPointerVariable" not in synth and "not_a_function" not in synth
    assert not any(k.startswith("__") or k in ("malloc", "free") for k in synth)   # system headers excluded


def test_parse_typedefs(synth):
    assert synth.typedef_kind("FooEnum") == "enum"
    assert synth.typedef_kind("FooHandle") == "handle"
    assert synth.typedef_kind("FooCallback") == "funcptr"
    assert synth.typedef_kind("FooDev") == "builtin:int"
    assert synth.macros["SYNTH_VERSION"].body == "4200"


def test_normalize_ctype():
    assert G.normalize_ctype("const  char**") == "const char **"
    assert G.normalize_ctype("CUdeviceptr*") == "CUdeviceptr *"
    assert G.normalize_ctype(" unsigned\tint ") == "unsigned int"
    assert G.normalize_ctype("int[4]") == "int [4]"


def test_generate_guesses_for_synthetic(synth):
    d = G.generate_entries(["fooAlloc", "fooCopy", "fooExtern"], None, synth)
    alloc = d["calls"]["fooAlloc"]
    assert alloc["symbol"] == "fooAlloc_v2" and alloc["needs_review"] is True
    assert alloc["doc"] == "Allocate a foo"
    ext = d["calls"]["fooExtern"]["args"]
    assert ext[1]["kind"] == "scalar" and ext[1]["wire"] == "I"        # enum from the header's typedefs
    assert ext[2]["wire"] == "i"                                       # typedef chain to int
    cp = d["calls"]["fooCopy"]["args"]
    assert cp[1]["kind"] == "hostbuf" and cp[1]["dir"] == "in" and cp[1]["size"] == "n"
    with pytest.raises(KeyError, match="function-pointer"):
        G.generate_entries(["fooCb"], None, synth)
    with pytest.raises(KeyError, match="no prototype"):
        G.generate_entries(["fooMissing"], None, synth)


# ----------------------------------------------------------------- the real headers

@needs_cuda
def test_header_check_passes(protos):
    spec = S.load_spec()
    assert G.check_spec(spec, protos) == []
    assert G.check_spec(yaml.safe_load(S.DEFAULT_SPEC_PATH.read_text()), protos) == []


@needs_cuda
def test_headers_resolve_versioned_names(protos):
    assert protos.cuda_version and protos.cuda_version >= 12000
    assert G.resolve_api_name("cuMemAlloc", protos) == "cuMemAlloc_v2"
    assert G.resolve_api_name("cuCtxSynchronize", protos) == "cuCtxSynchronize"
    lk = protos["cuLaunchKernel"]
    assert [p.ctype for p in lk.params][-2:] == ["void **", "void **"]
    assert protos["cuLaunchHostFunc"].unsupported                     # CUhostFn is a function pointer
    assert "cudaMalloc" in protos                                     # cuda_runtime_api.h read too
    assert "malloc" not in protos


@needs_cuda
def test_spec_matches_header_version(protos):
    # not an error when it differs (signatures are what is checked), but the
    # packaged spec should be regenerated from the toolkit CI uses
    assert S.load_spec().cuda_version <= protos.cuda_version


@needs_cuda
@pytest.mark.parametrize("corrupt,expect", [
    (lambda d: d["calls"]["cuMemcpyHtoD"]["args"][1].__setitem__("ctype", "void *"),
     r"cuMemcpyHtoD \(cuMemcpyHtoD_v2\): arg 1 \(srcHost\) has ctype 'void \*' in the spec, 'const void \*'"),
    (lambda d: d["calls"]["cuEventRecord"]["args"].pop(),
     r"cuEventRecord: 1 args in the spec, 2 in the header"),
    (lambda d: d["calls"]["cuStreamWaitEvent"]["args"][2].__setitem__("name", "flags"),
     r"cuStreamWaitEvent: arg 2 is named 'flags' in the spec, 'Flags' in the header"),
    (lambda d: d["calls"]["cuMemAlloc"].__setitem__("symbol", "cuMemAlloc"),
     r"cuMemAlloc: the header maps cuMemAlloc to cuMemAlloc_v2, the spec says symbol cuMemAlloc"),
    (lambda d: d["calls"]["cuInit"].__setitem__("symbol", "cuInitX"),
     r"cuInit: symbol cuInitX is not declared"),
    (lambda d: d["calls"]["cuInit"].__setitem__("returns", "int"),
     r"cuInit: returns 'int' in the spec, 'CUresult' in the header"),
    (lambda d: d["calls"]["cuLaunchKernel"]["args"].insert(3, {"name": "x", "ctype": "int"}),
     r"cuLaunchKernel: 12 args in the spec, 11 in the header"),
])
def test_check_reports_each_corruption(protos, raw, corrupt, expect):
    import re
    d = copy.deepcopy(raw)
    corrupt(d)
    problems = G.check_spec(d, protos)
    assert problems, "corruption not detected"
    assert any(re.search(expect, p) for p in problems), problems


@needs_cuda
def test_check_whitespace_insensitive(protos, raw):
    raw["calls"]["cuMemAlloc"]["args"][0]["ctype"] = "CUdeviceptr*"
    assert G.check_spec(raw, protos) == []


# ----------------------------------------------------------------- regeneration keeps annotations

@needs_cuda
def test_regeneration_is_identity(protos, raw):
    names = list(raw["calls"])
    again = G.generate_entries(names, raw, protos)
    assert again == raw
    assert G.dump_spec(again) == S.DEFAULT_SPEC_PATH.read_text()   # the file is in canonical form


@needs_cuda
def test_regeneration_keeps_hand_annotations(protos, raw):
    before = copy.deepcopy(raw["calls"]["cuMemcpyDtoHAsync"])
    e = raw["calls"]["cuMemcpyDtoHAsync"]
    # header-owned fields gone stale
    e["symbol"] = "cuMemcpyDtoHAsync"
    e["returns"] = "int"
    e["args"][2]["name"] = "nbytes"                          # renamed: annotations follow by position
    e["args"][0]["size"] = "nbytes"
    e["args"][1]["size"] = "nbytes"
    e["args"][0]["ctype"] = "void*"                          # same type, other spelling
    out = G.generate_entries(["cuMemcpyDtoHAsync"], raw, protos)
    after = out["calls"]["cuMemcpyDtoHAsync"]
    assert after == before
    assert raw["calls"]["cuMemcpyDtoHAsync"]["symbol"] == "cuMemcpyDtoHAsync"   # input untouched
    # every hand annotation of every entry survives a full refresh
    assert out["calls"]["cuLaunchKernel"] == raw["calls"]["cuLaunchKernel"]


@needs_cuda
def test_regeneration_flags_changed_types(protos, raw):
    e = raw["calls"]["cuMemsetD32"]
    e["args"][1]["ctype"] = "unsigned short"                 # "header changed the type": stale annotations
    e["args"].append({"name": "gone", "ctype": "int", "dir": "in", "kind": "scalar"})
    out = G.generate_entries(["cuMemsetD32"], raw, protos)["calls"]["cuMemsetD32"]
    assert out["needs_review"] is True
    assert out["args"][1]["ctype"] == "unsigned int" and out["args"][1]["needs_review"] is True
    assert [a["name"] for a in out["args"]] == ["dstDevice", "ui", "N"]
    assert out["args"][0]["size"] == "N * 4" and out["args"][0]["elem"] == 4 and out["id"] == e["id"]


@needs_cuda
def test_new_entry_guesses(protos, raw):
    top = max([e["id"] for s in ("calls", "gpuwire_calls") for e in raw[s].values()] + raw["retired_ids"])
    raw["retired_ids"].append(top + 1)
    out = G.generate_entries(["cuMemPrefetchAsync", "cuMemcpyPeer"], raw, protos)
    new = out["calls"]["cuMemPrefetchAsync"]
    assert new["id"] == top + 2 and out["calls"]["cuMemcpyPeer"]["id"] == top + 3   # retired ids not reused
    assert new["symbol"] == protos.resolve("cuMemPrefetchAsync") and new["needs_review"] is True
    assert new["stream"] == "hStream" and new["sync"] == "deferred"
    peer = {a["name"]: a for a in out["calls"]["cuMemcpyPeer"]["args"]}
    assert peer["dstDevice"]["kind"] == "devptr" and peer["dstContext"]["handle"] == "context"
    with pytest.raises(S.SpecError, match="needs_review"):
        S.spec_from_dict(out)
    S.spec_from_dict(
        {**out, "calls": {k: v for k, v in out["calls"].items() if k != "cuMemPrefetchAsync"}},
        allow_review=True)


# ----------------------------------------------------------------- YAML layout

def test_dump_roundtrip(raw):
    text = G.dump_spec(raw)
    assert yaml.safe_load(text) == raw
    assert text == S.DEFAULT_SPEC_PATH.read_text()
    odd = {"spec_version": 1, "api": "x", "calls": {"f": {"id": 1, "doc": "a, b: {c} [d] #e 'f'", "args": [
        {"name": "a", "ctype": "int", "doc": "x: y, z"}]}}, "semantics": "line one\n  indented\nlast"}
    assert yaml.safe_load(G.dump_spec(odd)) == odd


# ----------------------------------------------------------------- finding headers, CLI

def test_find_cuda_include_env(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("/* fake */\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert G.find_cuda_include() == str(tmp_path / "include")
    assert G.default_headers() == [str(tmp_path / "include" / "cuda.h")]


@needs_cuda
def test_cli_check_passes(capsys):
    assert G.main(["--check"]) == 0
    assert "agrees with" in capsys.readouterr().err


@needs_cuda
def test_cli_via_subparser(capsys):
    p = argparse.ArgumentParser(prog="gpuwire")
    sub = p.add_subparsers(dest="command")
    G.add_parser(sub)
    args = p.parse_args(["apigen", "--check", "--header", str(Path(CUDA_INC) / "cuda.h")])
    assert args.func(args) == 0


@needs_cuda
def test_cli_check_fails_on_disagreement(tmp_path, raw, capsys):
    raw["calls"]["cuMemcpyHtoD"]["args"][1]["ctype"] = "void *"
    p = tmp_path / "spec.yaml"
    p.write_text(G.dump_spec(raw))
    assert G.main(["--check", "--spec", str(p)]) == 1
    assert "cuMemcpyHtoD (cuMemcpyHtoD_v2): arg 1 (srcHost)" in capsys.readouterr().out


@needs_cuda
def test_cli_add_write_review_cycle(tmp_path, capsys):
    p = tmp_path / "spec.yaml"
    shutil.copy(S.DEFAULT_SPEC_PATH, p)
    assert G.main(["--spec", str(p), "--add", "cuStreamGetFlags"]) == 0        # prints, does not write
    out = capsys.readouterr().out
    assert "cuStreamGetFlags:" in out and "needs_review: true" in out
    assert p.read_text() == S.DEFAULT_SPEC_PATH.read_text()
    assert G.main(["--spec", str(p), "--add", "cuStreamGetFlags", "--write"]) == 0
    assert G.main(["--spec", str(p), "--check"]) == 1                          # not reviewed yet
    assert "needs_review" in capsys.readouterr().out
    d = yaml.safe_load(p.read_text())
    e = d["calls"]["cuStreamGetFlags"]
    assert [(a["name"], a["dir"], a["kind"]) for a in e["args"]] == [
        ("hStream", "in", "handle"), ("flags", "out", "scalar")]
    assert e["sync"] == "sync"
    del e["needs_review"]                                                      # the review
    p.write_text(G.dump_spec(d))
    assert G.main(["--spec", str(p), "--check"]) == 0
    assert S.load_spec(p).calls["cuStreamGetFlags"].wire_format.reply == "<II"


def test_cli_no_headers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(G, "default_headers", lambda *a: [])
    assert G.main(["--check"]) == 2
    assert "no cuda.h" in capsys.readouterr().err
    assert G.main(["--check", "--header", str(tmp_path / "nope.h")]) == 2


# ----------------------------------------------------------------- CLI misuse (audit)

_HEAD = "spec_version: 1\napi: cuda-driver\ncuda_version: 13000\nretired_ids: []\n"


@pytest.mark.parametrize("body, match", [
    ("calls: 5\n", "calls must be a mapping"),
    ("calls:\n  cuMemAlloc: 7\n", r"calls.cuMemAlloc must be a mapping"),
    ("calls:\n  cuMemAlloc: {id: 1, symbol: cuMemAlloc_v2, returns: CUresult, sync: sync, args: 5}\n",
     r"calls.cuMemAlloc.args must be a list"),
    ("calls:\n  cuMemAlloc: {id: 1, symbol: cuMemAlloc_v2, returns: CUresult, sync: sync, args: [3]}\n",
     r"calls.cuMemAlloc.args\[0\] must be a mapping"),
    ("retired_ids: 4\ncalls: {}\n", "retired_ids must be a list"),
])
def test_malformed_spec_shapes_are_spec_errors(tmp_path, body, match):
    p = tmp_path / "spec.yaml"
    p.write_text(_HEAD.replace("retired_ids: []\n", "") + body if body.startswith("retired") else _HEAD + body)
    with pytest.raises(S.SpecError, match=match):
        G.load_raw_spec(str(p))


def test_missing_spec_is_refused_unless_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="spec file not found"):
        G.load_raw_spec(str(tmp_path / "typo.yaml"))
    assert G.load_raw_spec(str(tmp_path / "typo.yaml"), missing_ok=True)["calls"] == {}
    with pytest.raises(S.SpecError, match="directory"):
        G.load_raw_spec(str(tmp_path))


def test_header_that_is_a_directory(tmp_path):
    with pytest.raises(G.HeaderError, match="is a directory"):
        G.preprocess([str(tmp_path)])


@needs_cc
def test_non_utf8_header_is_read(tmp_path):
    h = tmp_path / "bin.h"
    h.write_bytes(b"#define FOO_NAME \"\xd0\xff\xfe\"\nint fooBar(int x);\n")   # kept by cc -E -dD
    protos = G.read_prototypes([str(h)])
    assert "fooBar" in protos


@needs_cuda
@pytest.mark.parametrize("argv, match", [
    (["--spec", "{tmp}/callsint.yaml", "--check"], "calls must be a mapping"),
    (["--spec", "{tmp}/callsint.yaml", "--add", "cuStreamGetFlags"], "calls must be a mapping"),
    (["--spec", "{tmp}/missing.yaml", "--check"], "spec file not found"),
    (["--spec", "/nonexistent/dir/spec.yaml", "--add", "cuStreamGetFlags", "--write"], "does not exist"),
    (["--header", "{tmp}", "--check"], "is a directory"),
    (["--add", "cudaMalloc"], "runtime API"),
])
def test_cli_misuse_is_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "callsint.yaml").write_text(_HEAD + "calls: 5\n")
    assert G.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1


@needs_cuda
def test_cli_write_creates_a_new_spec(tmp_path, capsys):
    p = tmp_path / "new.yaml"
    assert G.main(["--spec", str(p), "--add", "cuStreamGetFlags", "--write"]) == 0
    assert "cuStreamGetFlags" in yaml.safe_load(p.read_text())["calls"]


@needs_cuda
def test_cli_write_to_an_unwritable_spec(tmp_path, capsys):
    import os
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    p = tmp_path / "ro.yaml"
    shutil.copy(S.DEFAULT_SPEC_PATH, p)
    p.chmod(0o444)
    assert G.main(["--spec", str(p), "--add", "cuStreamGetFlags", "--write"]) == 2
    assert "not writable" in capsys.readouterr().err
