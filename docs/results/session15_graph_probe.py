"""Session 15 probe: is replaying a run of tiny launches as a CUDA graph cheaper than
launching them one by one on this host? (go/no-go for server-side graph replay)

Times, per launch: (a) N cuLaunchKernel + stream sync; (b) one cuGraphLaunch of a graph of
N kernel nodes (a chain) + sync; (c) as (b) with every node's params set again before each
replay (cuGraphExecKernelNodeSetParams); (d) as (b) with one node's params changed.
Kernel: fill_f32 (1 block of 256 threads), the bench's launch loop kernel."""
import ctypes, sys, time
import numpy as np
from cuda.bindings import driver as cu

def ck(r):
    err = r[0] if isinstance(r, tuple) else r
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(str(err))
    return r[1:] if isinstance(r, tuple) and len(r) > 2 else (r[1] if isinstance(r, tuple) and len(r) == 2 else None)

ck(cu.cuInit(0))
dev = ck(cu.cuDeviceGet(0))
ctx = ck(cu.cuDevicePrimaryCtxRetain(dev))
ck(cu.cuCtxSetCurrent(ctx))
ptx = open("gpuwire/rpc/kernels/gw_test_kernels.ptx", "rb").read() + b"\0"
mod = ck(cu.cuModuleLoadData(ptx))
fn = ck(cu.cuModuleGetFunction(mod, b"fill_f32"))
buf = ck(cu.cuMemAlloc(1024))
st = ck(cu.cuStreamCreate(0))
a0 = np.array([int(buf)], np.uint64); a1 = np.array([1.0], np.float32); a2 = np.array([256], np.uint32)
kp = np.array([a0.ctypes.data, a1.ctypes.data, a2.ctypes.data], np.uint64)
res = {}
for N in (100, 1000):
    R = max(20, 20000 // N)
    for _ in range(2):
        t0 = time.perf_counter()
        for r in range(R):
            for i in range(N):
                cu.cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, st, kp.ctypes.data, 0)
            cu.cuStreamSynchronize(st)
        ta = (time.perf_counter() - t0) / (R * N)
    g = ck(cu.cuGraphCreate(0))
    nodes = []
    prev = None
    for i in range(N):
        p = cu.CUDA_KERNEL_NODE_PARAMS()
        p.func = fn; p.gridDimX = p.gridDimY = p.gridDimZ = 1
        p.blockDimX, p.blockDimY, p.blockDimZ = 256, 1, 1
        p.sharedMemBytes = 0; p.kernelParams = int(kp.ctypes.data); p.extra = 0
        deps = [prev] if prev is not None else []
        n = ck(cu.cuGraphAddKernelNode(g, deps, len(deps), p))
        nodes.append((n, p)); prev = n
    t0 = time.perf_counter()
    ge = ck(cu.cuGraphInstantiate(g, 0))
    t_inst = time.perf_counter() - t0
    for _ in range(2):
        t0 = time.perf_counter()
        for r in range(R):
            cu.cuGraphLaunch(ge, st)
            cu.cuStreamSynchronize(st)
        tb = (time.perf_counter() - t0) / (R * N)
    t0 = time.perf_counter()
    for r in range(R):
        for n, p in nodes:
            cu.cuGraphExecKernelNodeSetParams(ge, n, p)
        cu.cuGraphLaunch(ge, st)
        cu.cuStreamSynchronize(st)
    tc = (time.perf_counter() - t0) / (R * N)
    t0 = time.perf_counter()
    for r in range(R):
        cu.cuGraphExecKernelNodeSetParams(ge, nodes[r % N][0], nodes[r % N][1])
        cu.cuGraphLaunch(ge, st)
        cu.cuStreamSynchronize(st)
    td = (time.perf_counter() - t0) / (R * N)
    # the graph's GPU time alone: launch+sync of an empty-ish loop measured by events
    e0 = ck(cu.cuEventCreate(0)); e1 = ck(cu.cuEventCreate(0))
    cu.cuEventRecord(e0, st); cu.cuGraphLaunch(ge, st); cu.cuEventRecord(e1, st); cu.cuStreamSynchronize(st)
    g_ms = ck(cu.cuEventElapsedTime(e0, e1))
    cu.cuEventRecord(e0, st)
    for i in range(N):
        cu.cuLaunchKernel(fn, 1, 1, 1, 256, 1, 1, 0, st, kp.ctypes.data, 0)
    cu.cuEventRecord(e1, st); cu.cuStreamSynchronize(st)
    l_ms = ck(cu.cuEventElapsedTime(e0, e1))
    print(f"N={N}: launches {ta*1e6:.2f} us/launch; graph replay {tb*1e6:.2f}; graph+setparams(all) {tc*1e6:.2f}; "
          f"graph+setparams(one) {td*1e6:.2f}; instantiate {t_inst*1e3:.2f} ms; "
          f"GPU span: graph {g_ms*1e3/N:.2f} us/node, launches {l_ms*1e3/N:.2f} us/launch", flush=True)
    cu.cuGraphExecDestroy(ge); cu.cuGraphDestroy(g)
