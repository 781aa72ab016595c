"""The PTX scan that finds kernel parameters never written through (gpuwire/rpc/ptx_access.py),
used by the pinned mirroring to skip pulling regions a kernel only reads (docs/pinned.md)."""
from __future__ import annotations

from gpuwire.rpc import ptx_access as A
from gpuwire.rpc.kernels import pinned as PK

# one entry with a load-only and a store-only pointer and every other way to write through
# a parameter; entries that must be judged "may write everything"
BOTH = r"""
.version 8.0
.target sm_80
.address_size 64
.extern .shared .align 4 .b8 smem[];

.visible .entry both(
	.param .u64 both_param_0,
	.param .u64 both_param_1,
	.param .u64 both_param_2,
	.param .u64 both_param_3,
	.param .u64 both_param_4,
	.param .u64 both_param_5,
	.param .f32 both_param_6
)
{
	.reg .pred 	%p<3>;
	.reg .f32 	%f<6>;
	.reg .b32 	%r<8>;
	.reg .b64 	%rd<24>;

	ld.param.u64 	%rd1, [both_param_0];   // in: loaded from only
	ld.param.u64 	%rd2, [both_param_1];   // out: stored to
	ld.param.u64 	%rd3, [both_param_2];   // escapes: its value is stored to memory
	ld.param.u64 	%rd4, [both_param_3];   // atomics
	ld.param.u64 	%rd5, [both_param_4];   // reductions, through a loop-carried pointer
	ld.param.u64 	%rd6, [both_param_5];   // loaded from, vector load
	ld.param.f32 	%f1, [both_param_6];
	mov.u32 	%r1, %tid.x;
	cvta.to.global.u64 	%rd7, %rd1;
	mul.wide.u32 	%rd8, %r1, 4;
	add.s64 	%rd9, %rd7, %rd8;
	ld.global.f32 	%f2, [%rd9];
	cvta.to.global.u64 	%rd10, %rd2;
	add.s64 	%rd11, %rd10, %rd8;
	st.global.f32 	[%rd11+4], %f2;
	st.global.u64 	[%rd11], %rd3;
	cvta.to.global.u64 	%rd12, %rd4;
	atom.global.add.u32 	%r2, [%rd12], 1;
	mov.b64 	%rd13, 0;
$L__loop:
	add.s64 	%rd14, %rd13, 4;
	red.global.add.f32 	[%rd13], %f2;
	mov.b64 	%rd13, %rd15;
	cvta.to.global.u64 	%rd15, %rd5;
	setp.lt.u32 	%p1, %r1, 4;
	@%p1 bra 	$L__loop;
	cvta.to.global.u64 	%rd16, %rd6;
	ld.global.v2.f32 	{%f3, %f4}, [%rd16];
	mov.u32 	%r3, smem;
	st.shared.f32 	[%r3], %f3;
	ret;
}

.visible .entry chase(
	.param .u64 chase_param_0,
	.param .u64 chase_param_1
)
{
	.reg .b64 	%rd<6>;
	ld.param.u64 	%rd1, [chase_param_0];
	cvta.to.global.u64 	%rd2, %rd1;
	ld.global.u64 	%rd3, [%rd2];        // a pointer read from memory ...
	st.u32 	[%rd3], 7;                   // ... written through: may be any region
	ret;
}

.visible .entry addr_taken(
	.param .u64 addr_taken_param_0,
	.param .u64 addr_taken_param_1
)
{
	.reg .b64 	%rd<4>;
	mov.u64 	%rd1, addr_taken_param_0;
	ld.param.u64 	%rd2, [addr_taken_param_1];
	ret;
}

.visible .entry called(
	.param .u64 called_param_0,
	.param .u64 called_param_1
)
{
	.reg .b64 	%rd<4>;
	ld.param.u64 	%rd1, [called_param_0];
	ld.param.u64 	%rd2, [called_param_1];
	{
	.param .b64 param0;
	st.param.b64 	[param0], %rd1;
	call.uni 	helper, (param0);
	}
	ret;
}
"""


def test_load_only_is_readonly_store_only_is_written():
    got = A.analyse(BOTH)
    n, written = got["both"]
    assert n == 7
    assert 0 not in written and 5 not in written          # only loaded from
    assert {1, 2, 3, 4} <= written                         # store, escape, atom, red (via a loop)
    assert A.readonly_params(BOTH, "both") >= {0, 5}
    assert not ({1, 2, 3, 4} & A.readonly_params(BOTH, "both"))


def test_unclear_cases_count_as_written():
    got = A.analyse(BOTH)
    assert got["chase"] == (2, frozenset({0, 1}))          # store through a loaded pointer: anything
    assert 0 in got["addr_taken"][1] and 1 not in got["addr_taken"][1]
    assert got["called"][1] == frozenset({0})              # passed to a call
    assert A.readonly_params(BOTH, "missing") is None
    broken = ".visible .entry bad(\n .param .u64 bad_param_0,\n .param .weird\n)\n{\n ret;\n}\n"
    assert A.analyse(broken)["bad"][1] == frozenset({0, 1})


def test_the_shipped_pinned_kernels():
    got = A.analyse(PK.PTX.read_text())
    ro = {k: frozenset(range(n)) - w for k, (n, w) in got.items()}
    assert 0 in ro["pin_scale"] and 1 not in ro["pin_scale"]          # in / out
    assert {0, 1} <= ro["pin_add"] and 2 not in ro["pin_add"]
    assert 0 not in ro["pin_inc"]                                      # read-modify-write
    assert 0 not in ro["pin_struct"]                                   # struct holding the out pointer
    assert 0 in ro["pin_sum"] and 1 not in ro["pin_sum"]
    assert 2 not in ro["pin_span"] and {0, 1} <= ro["pin_span"]
