# session 6, second device run (carry [".whl"]): same-host mapped regions on the GPU.
#   bash -c 'source .whl/run6b.sh tests'   GPU tests of the mapping (+ test_rpc, test_pinned)
#   bash -c 'source .whl/run6b.sh bench'   bw: sm mapped / sm registered / tcp / tcp mapped; MLP (3 rounds); rtt;
#                                          pinned unchanged launches (the hook's cost after the change)
PART=${1:-bench}
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
if [ "$PART" = tests ]; then
el gpu tests
timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_hostmap.py tests/test_rpc.py tests/test_pinned.py -rf --tb=short > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log
tail -n 25 $OUT/gpu_tests.log | grep -v "^SKIPPED"
return 0 2>/dev/null || exit 0
fi
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
el bw sm mapped
timeout 60 $B --tls sm --tests bw --sizes 1M,16M,64M --bw-reps 3 2>&1 | grep -E "^test=" | cut -c1-600
el bw sm registered
timeout 60 $B --tls sm --tests bw --sizes 1M,16M,64M --bw-reps 3 --host-mem registered 2>&1 | grep -E "^test=" | cut -c1-600
el bw tcp
timeout 60 $B --tls tcp --tests bw --sizes 1M,16M,64M --bw-reps 3 2>&1 | grep -E "^test=" | cut -c1-700
el bw tcp with rpc_hostmap=on
GPUWIRE_RPC_HOSTMAP=on timeout 45 $B --tls tcp --tests bw --sizes 1M,16M,64M --bw-reps 1 2>&1 | grep -E "^test=" | cut -c1-600
el mlp 3 rounds
for t in tcp sm; do timeout 45 $B --tls $t --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --mlp-rounds 3 --pin auto 2>&1 | grep -E "^test=" | cut -c1-400; done
el rtt
for t in sm tcp; do timeout 30 $B --tls $t --tests rtt --iters 30000 --pin auto 2>&1 | grep -E "^test=.*ratio" | cut -c1-300; done
el pinned unchanged
timeout 60 python3 -m gpuwire.cli bench pinned --executor gpu --tests unchanged --sizes 4K,1M,16M,64M --modes default --launches 2000 2>&1 | grep -E "^test=" | cut -c1-330
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-1500
