import threading, time
from gpuwire.bench import perftest
def run(k, out, size, n):
    t0=time.perf_counter()
    r = perftest.run_local("tag_bw", size, n, "tcp,self", warmup=2, window=32)
    out[k]=(r["bw_overall_MiBps"]*perftest.MIB_TO_MB, t0, time.perf_counter())
for size,n in ((1<<20, 2000), (16<<20, 200)):
  for rep in range(2):
    for par in (1, 2, 4):
        out={}
        ths=[threading.Thread(target=run,args=(k,out,size,n)) for k in range(par)]
        [t.start() for t in ths]; [t.join() for t in ths]
        bws=[v[0] for v in out.values()]
        print(f"size={size} par={par} rep={rep} each_MBps={[round(b) for b in bws]} sum={round(sum(bws))}", flush=True)
