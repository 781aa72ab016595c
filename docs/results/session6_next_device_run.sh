# the first device run of session 6: re-check session 5's closing state on a fresh host, in two
# calls (carry [".whl"]):
#   bash -c 'source .whl/next6.sh tests'   the GPU suite (~4 min)
#   bash -c 'source .whl/next6.sh bench'   pinned (mirror, unchanged + hook, cubin detect), rpc bw
#                                          with phases on both transports, MLP twice per transport
PART=${1:-bench}
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
if [ "$PART" = tests ]; then
el gpu tests
timeout 290 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rf --tb=short > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log
tail -n 25 $OUT/gpu_tests.log | grep -v "^SKIPPED"
return 0 2>/dev/null || exit 0
fi
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
el pinned
timeout 150 python3 -m gpuwire.cli bench pinned --executor gpu --tests mirror,unchanged,detect --sizes 4K,1M,16M,64M --modes default,written,protect,explicit --reps 3 --launches 2000 2>&1 | grep -E "^test=" | cut -c1-330
el bw
for t in tcp sm; do
  timeout 45 $B --tls $t --tests bw --sizes 1M,16M,64M --bw-reps 3 2>&1 | grep -E "^test=" | cut -c1-600
  timeout 45 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 1 --no-baseline --trace 2>&1 | grep -E "^test=" | sed "s/^/traced /" | cut -c1-1500
done
el mlp
for t in tcp sm tcp sm; do timeout 30 $B --tls $t --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --pin auto 2>&1 | grep -E "^test=" | cut -c1-330; done
el mlp traced over tcp: where where the extra time per step goes on a slow host
timeout 40 $B --tls tcp --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --pin auto --trace 2>&1 | grep -E "^test=" | cut -c1-1500
el rtt
for t in sm tcp; do timeout 30 $B --tls $t --tests rtt --iters 30000 --pin auto 2>&1 | grep -E "^test=.*ratio" | cut -c1-300; done
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-1500
