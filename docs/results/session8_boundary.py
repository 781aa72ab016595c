"""Per-call client times of the smallest MLP step (medians, p90; us), remote on the GPU
executor over tcp or sm, client calling thread alone on its core (--pin auto's plan)."""
import os, sys, time, secrets, json
import numpy as np
from gpuwire.bench import rpc as R, _pin
import gpuwire, gpuwire.rpc.client  # noqa
tls = R.tls_of(sys.argv[1])
plan = _pin.plan("auto"); _pin.settle(plan)
tok = secrets.token_hex(8)
srv, addr = R.start_rpc_server("gpu", tls, tok, cpus=plan.server)
try:
    s = gpuwire.connect(addr, token=tok, tls=tls); _pin.settle(plan)
    B, I, H, O = 1024, 256, 256, 16
    mod = s.load_module(R.find_ptx(None).read_bytes())
    fns = {k: mod.function(k) for k in R.MLP_KERNELS}
    bufs = {k: s.alloc(4 * n) for k, n in R._mlp_buffers(B, I, H, O).items()}
    for k, v in R._mlp_init(B, I, H, O).items():
        s.copy_to_device(bufs[k], v)
    st = s.stream()
    plan_ = [(fns[name].handle, grid, fns[name].pack([bufs[a] if isinstance(a, str) else a for a in args]))
             for name, grid, args in R._mlp_plan(B, I, H, O)]
    loss = np.zeros(1, np.float32); L = s.cuLaunchKernel; lossbuf = bufs["loss"]
    pc = time.perf_counter_ns
    def step(T):
        t = [pc()]
        s.cuMemsetD32Async(lossbuf, 0, 1, st); t.append(pc())
        for h, grid, params in plan_:
            L(h, grid, 1, 1, 256, 1, 1, 0, st, params); t.append(pc())
        s.cuMemcpyDtoHAsync(loss, lossbuf, 4, st); t.append(pc())
        s.cuStreamSynchronize(st); t.append(pc())
        float(loss[0]); t.append(pc())
        T.append(t)
    for _ in range(100): step([])
    T = []
    for _ in range(3000): step(T)
    a = np.diff(np.array(T), axis=1) / 1e3
    names = ["memset"] + [f"L{i}" for i in range(len(plan_))] + ["d2h", "sync", "float"]
    print(sys.argv[1], "median", " ".join(f"{n}={m:.2f}" for n, m in zip(names, np.median(a, axis=0))))
    print(sys.argv[1], "p90   ", " ".join(f"{n}={m:.2f}" for n, m in zip(names, np.percentile(a, 90, axis=0))))
    print(sys.argv[1], "step median %.1f us, issue (memset..d2h) median %.1f" % (np.median(a.sum(1)), np.median(a[:, :-2].sum(1))))
    t0 = pc()
    for _ in range(3000): s.gwSync()
    print(sys.argv[1], "gwSync %.2f us" % ((pc() - t0) / 3000 / 1e3))
    s.close()
finally:
    R.stop(srv)
