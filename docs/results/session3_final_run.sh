# session 3 final device run: every gpu test, then the benches (each bounded)
source .whl/setup_device.sh || exit 1
R=$OUT
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
el gpu tests
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -rf --tb=short --durations=15 > $R/gpu_tests.log 2>&1; echo "rc=$?" >> $R/gpu_tests.log
tail -n 30 $R/gpu_tests.log | grep -v "^SKIPPED"
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
el rtt
for t in sm tcp; do timeout 30 $B --tls $t --tests rtt --iters 30000 --pin auto 2>&1 | grep -E "^test=|pin:"; done
el mlp
S=1024,256,256,16
for tp in "tcp auto" "sm auto" "tcp none"; do set -- $tp; timeout 30 $B --tls $1 --tests mlp --mlp-shapes $S --mlp-steps 2000 --pin $2 2>&1 | grep -E "^test=|pin:" | cut -c1-700; done
el bw
for t in tcp sm; do timeout 45 $B --tls $t --tests bw --sizes 1M,16M,64M --bw-reps 3 2>&1 | grep -E "^test=" | cut -c1-400; done
GPUWIRE_RPC_C_BULK=0 timeout 45 $B --tls tcp --tests bw --sizes 1M,16M,64M --bw-reps 3 2>&1 | grep -E "^test=" | cut -c1-400
} > $R/rpc.log 2>&1
cat $R/rpc.log | grep -E "^#|ratio|mlp" | cut -c1-300
el pinned
timeout 50 python3 -m gpuwire.cli bench pinned --executor gpu --tests mirror --modes default,explicit --reps 4 > $R/pinned.log 2>&1
grep -E "^test=" $R/pinned.log | cut -c1-300 | tail -n 12
el gds
timeout 80 python3 -m gpuwire.cli bench gds --remote --backends kvikio,posix --cases small,loader --no-progress > $R/gds.log 2>&1
grep -v "^#" $R/gds.log | tail -n 20
el done
