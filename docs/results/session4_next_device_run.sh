# the first device run after session 4 (nothing of session 4 ran on a GPU): the whole GPU suite,
# then every target's bench with A/B variants of what session 4 changed. Run with the wheels
# carried, in two calls (each under the 10-minute limit of one command):
#   bash -c 'source .whl/next.sh tests'     the GPU suite, then the pinned bench (~5 min)
#   bash -c 'source .whl/next.sh rpc'       the rpc benches (~6 min)
PART=${1:-tests}
source .whl/setup_device.sh || exit 1
R=$OUT
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
if [ "$PART" = tests ]; then
el gpu tests
timeout 230 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rf --tb=short > $R/gpu_tests.log 2>&1; echo "rc=$?" >> $R/gpu_tests.log
tail -n 25 $R/gpu_tests.log | grep -v "^SKIPPED"
el pinned: written vs compare
timeout 100 python3 -m gpuwire.cli bench pinned --executor gpu --tests mirror,unchanged,detect --modes default,written,compare,protect,explicit --reps 3 --launches 1000 > $R/pinned.log 2>&1
grep -E "^test=|written_tracking" $R/pinned.log | cut -c1-330
el done
fi
[ "$PART" = rpc ] || return 0 2>/dev/null || exit 0
B="python3 -m gpuwire.cli bench rpc --executor gpu"
S=1024,256,256,16
{
el mlp: batched sync in C on/off, both transports
for t in tcp sm; do
  for v in 1 0; do GPUWIRE_RPC_C_SYNC_BATCH=$v timeout 30 $B --tls $t --tests mlp --mlp-shapes $S --mlp-steps 2000 --pin auto 2>&1 | grep -E "^test=" | sed "s/^/c_sync_batch=$v /" | cut -c1-400; done
done
el mlp traced, tcp
timeout 40 $B --tls tcp --tests mlp --mlp-shapes $S --mlp-steps 2000 --pin auto --trace 2>&1 | grep -E "^test=" | cut -c1-1500
el rtt
for t in sm tcp; do timeout 30 $B --tls $t --tests rtt --iters 30000 --pin auto 2>&1 | grep -E "^test=" | cut -c1-300; done
el bw variants
for t in tcp sm; do
  timeout 40 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 --extra-windows 8 2>&1 | grep -E "^test=" | sed "s/^/default /" | cut -c1-500
  GPUWIRE_RPC_C_BULK_SLOTS=32 GPUWIRE_RPC_C_BULK_INFLIGHT=33554432 timeout 40 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/slots32 /" | cut -c1-500
  GPUWIRE_RPC_BULK_PROGRESS=1 timeout 40 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/progress /" | cut -c1-500
  GPUWIRE_RPC_C_BULK_DTOH_MIN=65536 timeout 40 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/dtohC /" | cut -c1-500
done
el bw traced: per-frame server timestamps of 1 MiB async copies, kept for offline analysis
mkdir -p $R/trace_tcp $R/trace_sm
GPUWIRE_RPC_TRACE_DIR=$R/trace_tcp timeout 30 $B --tls tcp --tests bw --sizes 1M --bw-reps 1 --no-baseline 2>&1 | grep -E "^test=" | cut -c1-300
GPUWIRE_RPC_TRACE_DIR=$R/trace_sm timeout 30 $B --tls sm --tests bw --sizes 1M --bw-reps 1 --no-baseline 2>&1 | grep -E "^test=" | cut -c1-300
el done
} > $R/rpc.log 2>&1
cat $R/rpc.log | cut -c1-600
el done
