# session 5, last device run: pinned defaults after 'auto' -> protect from 1 MiB (hot regions, spinning
# handler), the pinned GPU tests, the MLP smallest shape on both transports.
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
el pinned
timeout 130 python3 -m gpuwire.cli bench pinned --executor gpu --tests mirror,unchanged --sizes 4K,1M,16M,64M --modes default,written,protect,explicit --reps 3 --launches 2000 2>&1 | grep -E "^test=" | cut -c1-300
el mlp
for t in tcp sm; do timeout 30 $B --tls $t --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --pin auto 2>&1 | grep -E "^test=" | cut -c1-330; done
el pinned gpu tests
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_pinned.py tests/test_pinned_written.py -rf --tb=short 2>&1 | tail -n 4
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log
