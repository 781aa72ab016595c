# session 5, second device run: verifies the session-5 changes on the GPU.
#   bash -c 'source .whl/next5.sh bench'   pinned bench (granule protect, auto), rpc bw A/B + traced phases, MLP
#   bash -c 'source .whl/next5.sh tests'   the whole GPU suite
PART=${1:-bench}
source .whl/setup_device.sh || exit 1
R=$OUT
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
if [ "$PART" = tests ]; then
el gpu tests
timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rf --tb=short > $R/gpu_tests.log 2>&1; echo "rc=$?" >> $R/gpu_tests.log
tail -n 25 $R/gpu_tests.log | grep -v "^SKIPPED"
el done
return 0 2>/dev/null || exit 0
fi
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
el pinned: auto vs written vs protect vs explicit
timeout 120 python3 -m gpuwire.cli bench pinned --executor gpu --tests mirror,unchanged --sizes 4K,1M,16M,64M --modes default,written,protect,explicit --reps 3 --launches 1000 2>&1 | grep -E "^test=|written_tracking" | cut -c1-300
el bw: new defaults, then A/B
for t in tcp sm; do
  timeout 45 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/default /" | cut -c1-600
  timeout 45 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 1 --no-baseline --trace 2>&1 | grep -E "^test=" | sed "s/^/traced /" | cut -c1-1500
  GPUWIRE_RPC_BULK_PROGRESS=0 timeout 45 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/progress0 /" | cut -c1-600
  GPUWIRE_RPC_C_BULK_DTOH_MIN=0 timeout 45 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/dtoh0 /" | cut -c1-600
done
for k in 2 3 4; do
  GPUWIRE_RPC_C_BULK_SLOTS=$k timeout 45 $B --tls sm --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/sm_slots$k /" | cut -c1-600
done
GPUWIRE_RPC_C_BULK_SLOTS=2 timeout 45 $B --tls sm --tests bw --sizes 1M --bw-reps 1 --no-baseline --trace 2>&1 | grep -E "^test=" | sed "s/^/traced_slots2 /" | cut -c1-1500
el mlp smallest, new defaults
for t in tcp sm; do timeout 30 $B --tls $t --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --pin auto 2>&1 | grep -E "^test=" | cut -c1-400; done
el done
} > $R/bench.log 2>&1
cat $R/bench.log | cut -c1-1500
