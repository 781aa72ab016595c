"""The packaged call spec: loads, validates, covers the required calls; loader checks and wire formats."""
from __future__ import annotations

import copy
import shutil
import struct
import subprocess

import pytest
import yaml

from gpuwire.rpc import spec as S
from gpuwire.rpc.spec import SpecError, compile_size_expr, load_spec, spec_from_dict

REQUIRED = """
cuInit cuDriverGetVersion cuDeviceGetCount cuDeviceGet cuDeviceGetName cuDeviceGetAttribute cuDeviceTotalMem
cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRelease cuCtxSetCurrent cuCtxGetCurrent cuCtxSynchronize
cuMemAlloc cuMemFree cuMemGetInfo
cuMemcpyHtoD cuMemcpyDtoH cuMemcpyDtoD cuMemcpyHtoDAsync cuMemcpyDtoHAsync cuMemcpyDtoDAsync
cuMemsetD8 cuMemsetD32 cuMemsetD8Async cuMemsetD32Async
cuMemHostAlloc cuMemFreeHost cuMemHostRegister cuMemHostUnregister
cuStreamCreate cuStreamDestroy cuStreamSynchronize cuStreamQuery cuStreamWaitEvent
cuEventCreate cuEventDestroy cuEventRecord cuEventSynchronize cuEventQuery cuEventElapsedTime
cuModuleLoadData cuModuleLoadFatBinary cuModuleUnload cuModuleGetFunction
cuFuncGetParamInfo cuFuncGetAttribute cuLaunchKernel cuGetErrorName cuGetErrorString
""".split()
PSEUDO = ["gwGetLastError", "gwPeekAtLastError", "gwSync"]


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture()
def raw():
    return yaml.safe_load(S.DEFAULT_SPEC_PATH.read_text())


def test_packaged_spec_loads(spec):
    assert spec.version == S.SPEC_VERSION == 1
    assert spec.api == "cuda-driver"
    assert isinstance(spec.cuda_version, int) and spec.cuda_version >= 12000
    assert spec.path and spec.path.endswith("cuda_driver.yaml")
    assert spec.semantics and "sticky" in spec.semantics and "gwGetLastError" in spec.semantics
    assert S.default_spec() is S.default_spec()


@pytest.mark.parametrize("name", REQUIRED)
def test_required_call_present(spec, name):
    call = spec.calls[name]
    assert call.symbol and call.returns == "CUresult"
    assert spec.by_id[call.id] is call


@pytest.mark.parametrize("name", PSEUDO)
def test_pseudo_calls(spec, name):
    call = spec.calls[name]
    assert call.symbol is None and not call.is_cuda and call.section == "gpuwire_calls"
    assert call.sync == "sync"


def test_ids_unique_and_small(spec, raw):
    ids = [e["id"] for sec in ("calls", "gpuwire_calls") for e in raw[sec].values()]
    assert len(ids) == len(set(ids))
    assert all(0 < i <= 0xFFFF for i in ids)
    assert not set(ids) & set(raw.get("retired_ids") or [])
    assert sorted(spec.by_id) == sorted(ids)


def test_symbols_are_the_versioned_exports(spec):
    # the API names are macros for versioned symbols in cuda.h; record what links
    assert spec.calls["cuMemAlloc"].symbol == "cuMemAlloc_v2"
    assert spec.calls["cuMemcpyHtoDAsync"].symbol == "cuMemcpyHtoDAsync_v2"
    assert spec.calls["cuStreamDestroy"].symbol == "cuStreamDestroy_v2"
    assert spec.calls["cuMemsetD8Async"].symbol == "cuMemsetD8Async"


def test_sync_classes(spec):
    for n in ("cuLaunchKernel", "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync", "cuMemsetD32Async", "cuEventRecord",
              "cuStreamWaitEvent", "cuMemFree", "cuStreamDestroy", "cuMemsetD8", "cuMemcpyHtoD"):
        assert spec.calls[n].deferred, n
    for n in ("cuMemcpyDtoH", "cuMemGetInfo", "cuStreamSynchronize", "cuStreamQuery", "cuEventQuery",
              "cuEventSynchronize", "cuEventElapsedTime", "cuCtxSynchronize", "cuDeviceGetAttribute",
              "cuFuncGetParamInfo", "gwGetLastError"):
        assert spec.calls[n].sync == "sync", n
    for n in ("cuStreamCreate", "cuEventCreate", "cuMemAlloc", "cuModuleLoadData", "cuModuleGetFunction",
              "cuMemHostAlloc"):
        c = spec.calls[n]
        assert c.handle_create and c.deferred and c.created_arg.dir == "out", n
    # a deferred call returns nothing but created handles and async host buffers
    for c in spec.calls.values():
        if c.deferred:
            for a in c.args:
                assert a.dir == "in" or a.kind in ("devptr", "hostbuf") or a is c.created_arg, (c.name, a.name)


def test_annotations(spec):
    h2d = spec.calls["cuMemcpyHtoDAsync"]
    assert h2d.stream_arg == "hStream"
    assert h2d.arg("srcHost").kind == "hostbuf" and h2d.arg("srcHost").dir == "in"
    assert h2d.arg("srcHost").size_fn({"ByteCount": 4096, "dstDevice": 0}) == 4096
    assert h2d.arg("dstDevice").kind == "devptr" and h2d.arg("dstDevice").dir == "out"
    assert h2d.arg("hStream").handle == "stream" and h2d.arg("hStream").optional
    d32 = spec.calls["cuMemsetD32Async"].arg("dstDevice")
    assert d32.size == "N * 4" and d32.elem == 4 and d32.size_fn({"N": 10}) == 40
    assert spec.calls["cuMemsetD8"].arg("dstDevice").elem == 1
    assert spec.calls["cuModuleLoadData"].arg("image").kind == "image"
    assert spec.calls["cuModuleLoadFatBinary"].arg("fatCubin").kind == "image"
    assert spec.calls["cuModuleGetFunction"].arg("name").kind == "string"
    lk = spec.calls["cuLaunchKernel"]
    assert lk.stream_arg == "hStream" and lk.arg("kernelParams").kind == "kernel_params"
    assert spec.calls["cuDeviceGetName"].arg("name").size_fn({"len": 256}) == 256


def test_wire_formats(spec):
    wf = spec.calls["cuMemcpyHtoDAsync"].wire_format
    assert wf.request == "<QQQ" and wf.request_args == ("dstDevice", "ByteCount", "hStream")
    assert wf.request_var == (("srcHost", "hostbuf"),)
    assert wf.reply == "<I" and wf.reply_args == ("return",) and wf.reply_var == ()
    assert struct.calcsize(wf.request) == wf.request_size == 24

    lk = spec.calls["cuLaunchKernel"].wire_format
    assert lk.request == "<QIIIIIIIQ"
    assert lk.request_args[0] == "f" and lk.request_args[-1] == "hStream"
    assert lk.request_var == (("kernelParams", "kernel_params"),)  # kernelParams+extra: one packed buffer

    alloc = spec.calls["cuMemAlloc"].wire_format   # client-assigned id travels in the request
    assert alloc.request == "<QQ" and alloc.request_args == ("dptr", "bytesize") and alloc.reply == "<I"

    d2h = spec.calls["cuMemcpyDtoH"].wire_format
    assert d2h.request == "<QQ" and d2h.reply_var == (("dstHost", "hostbuf"),)

    info = spec.calls["cuMemGetInfo"].wire_format
    assert info.request == "<" and info.reply == "<IQQ" and info.reply_args == ("return", "free", "total")

    attr = spec.calls["cuDeviceGetAttribute"].wire_format
    assert attr.request == "<IQ" and attr.reply == "<Ii"     # enum u32, device handle u64; int out

    et = spec.calls["cuEventElapsedTime"].wire_format
    assert et.reply == "<If"

    pi = spec.calls["cuFuncGetParamInfo"].wire_format        # optional out pointer: presence flag
    assert pi.request == "<QQB" and pi.request_args == ("func", "paramIndex", "paramSize?")
    assert pi.reply == "<IQQ"

    m8 = spec.calls["cuMemsetD8"].wire_format
    assert m8.request == "<QBQ"
    for c in spec.calls.values():   # every format is a valid struct format
        struct.calcsize(c.wire_format.request)
        struct.calcsize(c.wire_format.reply)
        assert c.wire_format.request.startswith("<") and c.wire_format.reply.startswith("<I")


def test_fingerprint_is_stable_and_sensitive(spec, raw):
    again = spec_from_dict(copy.deepcopy(raw))
    assert again.fingerprint == spec.fingerprint and len(spec.fingerprint) == 64
    assert 0 <= spec.fingerprint64 < 2 ** 64
    raw["calls"]["cuMemFree"]["sync"] = "sync"
    assert spec_from_dict(raw).fingerprint != spec.fingerprint
    # docs do not change the wire
    raw2 = yaml.safe_load(S.DEFAULT_SPEC_PATH.read_text())
    raw2["calls"]["cuMemFree"]["doc"] = "something else"
    assert spec_from_dict(raw2).fingerprint == spec.fingerprint


# ----------------------------------------------------------------- size expressions

@pytest.mark.parametrize("expr,values,want", [
    ("ByteCount", {"ByteCount": 7}, 7),
    ("N * 4", {"N": 3}, 12),
    ("(Width + 1) * Height", {"Width": 3, "Height": 2}, 8),
    ("N // 2 - 1", {"N": 10}, 4),
    (16, {}, 16),
    ("16", {}, 16),
])
def test_size_expressions(expr, values, want):
    fn, used = compile_size_expr(expr, ["ByteCount", "N", "Width", "Height"])
    assert fn(values) == want
    assert set(used) <= set(values)


@pytest.mark.parametrize("expr", [
    "__import__('os')", "__import__('os').system('true')", "N ** 2", "open('x')", "N.bit_length()",
    "N if N else 1", "lambda: 1", "N / 2", "-N", "1.5", "'a'", "N[0]", "[N]", "N; N", "", "N +",
    True, -1, None,
])
def test_size_expressions_rejected(expr):
    with pytest.raises(ValueError):
        compile_size_expr(expr, ["N"])


def test_size_expression_unknown_name():
    with pytest.raises(ValueError, match="Count"):
        compile_size_expr("Count * 4", ["N"])
    fn, _ = compile_size_expr("N - 8", ["N"])
    with pytest.raises(ValueError):
        fn({"N": 4})  # negative size


# ----------------------------------------------------------------- validation errors

def _mutate(raw, fn):
    d = copy.deepcopy(raw)
    fn(d)
    return d


@pytest.mark.parametrize("mutation,match", [
    (lambda d: d["calls"]["cuMemFree"].__setitem__("id", d["calls"]["cuMemAlloc"]["id"]), r"cuMemFree: id \d+ is already used by cuMemAlloc"),
    (lambda d: d["retired_ids"].append(d["calls"]["cuInit"]["id"]), "cuInit: id .* is retired"),
    (lambda d: d["calls"]["cuMemFree"]["args"][0].__setitem__("kind", "pointer"), "cuMemFree: arg 'dptr': kind must be"),
    (lambda d: d["calls"]["cuMemFree"]["args"][0].__setitem__("dir", "both"), "cuMemFree: arg 'dptr': dir must be"),
    (lambda d: d["calls"]["cuMemFree"].__setitem__("sync", "async"), "cuMemFree: sync must be"),
    (lambda d: d["calls"]["cuMemcpyHtoD"]["args"][1].__setitem__("size", "__import__('os')"), "cuMemcpyHtoD: arg 'srcHost': size:"),
    (lambda d: d["calls"]["cuMemcpyHtoD"]["args"][1].__setitem__("size", "Bytes"), "names 'Bytes'"),
    (lambda d: d["calls"]["cuMemcpyHtoD"]["args"][1].pop("size"), "cuMemcpyHtoD: arg 'srcHost': a hostbuf needs size"),
    (lambda d: d["calls"]["cuMemcpyHtoD"]["args"][1].__setitem__("size", "dstDevice"), "not an in scalar"),
    (lambda d: d["calls"]["cuStreamSynchronize"]["args"][0].__setitem__("handle", "streem"), "handle must be one of"),
    (lambda d: d["calls"]["cuMemGetInfo"].__setitem__("sync", "deferred"), "deferred call cannot return"),
    (lambda d: d["calls"]["cuMemGetInfo"].__setitem__("handle_create", True), "exactly one out handle"),
    (lambda d: d["calls"]["cuMemGetInfo"].__setitem__("stream", "free"), "must be an in handle of type stream"),
    (lambda d: d["calls"]["cuMemGetInfo"].__setitem__("hanlde_create", True), "unknown field 'hanlde_create'"),
    (lambda d: d["calls"]["cuInit"].__setitem__("needs_review", True), "cuInit: needs_review is set"),
    (lambda d: d["calls"]["cuInit"]["args"][0].__setitem__("ctype", "CUfoo"), "no wire encoding known"),
    (lambda d: d["calls"]["cuInit"]["args"][0].__setitem__("wire", "x"), "wire must be"),
    (lambda d: d["calls"]["cuMemFree"]["args"][0].__setitem__("ctype", "CUdeviceptr *"), "devptr"),
    (lambda d: d["calls"]["cuMemsetD8"]["args"][0].__setitem__("elem", 0), "elem must be a positive"),
    (lambda d: d["gpuwire_calls"]["gwSync"].__setitem__("symbol", "gwSync"), "symbol: null"),
    (lambda d: d["calls"]["cuInit"].__setitem__("symbol", None), "symbol must be"),
    (lambda d: d.__setitem__("spec_version", 2), "spec_version"),
    (lambda d: d["calls"]["cuInit"]["args"].append(dict(d["calls"]["cuInit"]["args"][0])), "duplicate argument"),
])
def test_validation_errors_name_call_and_field(raw, mutation, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(_mutate(raw, mutation), source="x.yaml")


def test_needs_review_allowed_on_request(raw):
    d = _mutate(raw, lambda d: d["calls"]["cuInit"].__setitem__("needs_review", True))
    assert spec_from_dict(d, allow_review=True).calls["cuInit"].needs_review


def test_load_spec_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("spec_version: 1\ncalls: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_hand_built_arg_size_fn():
    a = S.Arg(name="dst", ctype="void *", dir="out", kind="hostbuf", size="n * 2")
    assert a.size_fn({"n": 5}) == 10 and a.size_names == ("n",)


# ----------------------------------------------------------------- kind: image

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if not nvcc:
        pytest.skip("nvcc not found")
    d = tmp_path_factory.mktemp("img")
    (d / "k.cu").write_text('extern "C" __global__ void k(float *x, int n) { if (threadIdx.x < n) x[threadIdx.x] = 1; }\n')
    out = {}
    for fmt, flags in (("ptx", ["-ptx"]), ("cubin", ["-cubin", "-arch=sm_80"]),
                       ("fatbin", ["-fatbin", "-gencode", "arch=compute_80,code=[sm_80,compute_80]"])):
        f = d / f"k.{fmt}"
        subprocess.run([nvcc, *flags, str(d / "k.cu"), "-o", str(f)], check=True, capture_output=True)
        out[fmt] = f.read_bytes()
    return out


@pytest.mark.parametrize("fmt", ["ptx", "cubin", "fatbin"])
def test_image_size(images, fmt):
    data = images[fmt]
    assert S.image_format(data) == fmt
    trailing = data + (b"\0" if fmt == "ptx" else b"") + b"\xab" * 64   # a pointer into a larger buffer
    n = S.image_size(trailing)
    if fmt == "ptx":
        assert n == len(data.rstrip(b"\0")) + 1
        assert S.image_bytes(data).endswith(b"\0") and b"\0" not in S.image_bytes(data)[:-1]
    else:
        assert n == len(data)
        assert S.image_bytes(trailing) == data
