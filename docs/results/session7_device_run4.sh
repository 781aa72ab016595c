# session 7, closing benches (carry [".whl"]) on the final code: every issue-3 target in one call.
# bw: tcp with the defaults (rpc_bulk_lanes=auto = 4 lanes over tcp) twice and with lanes off once;
# sm with the defaults (mapped host_alloc); rtt and the MLP (3 rounds) on both transports.
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
K="size_bytes=[0-9]*|host_mem=[a-z]*|htod_async_MBps=[0-9.]*|dtoh_async_MBps=[0-9.]*|perftest_MBps=[0-9.]*|htod_ratio=[0-9.]*|dtoh_ratio=[0-9.]*|htod_sync_ratio=[0-9.]*|dtoh_sync_ratio=[0-9.]*|perftest_error=.*"
B="python3 -m gpuwire.cli bench rpc --executor gpu"
bw() { name=$1; tls=$2; shift 2; el bw $name; env "$@" timeout 80 $B --tls $tls --tests bw --sizes 1M,16M,64M --bw-reps 3 --json $OUT/bw4_$name.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'; }
{
bw tcp_default tcp A=1
bw tcp_lanes0 tcp GPUWIRE_RPC_BULK_LANES=0
bw tcp_default_b tcp A=1
bw sm_default sm A=1
for t in tcp sm; do
  el rtt+mlp $t
  timeout 100 $B --tls $t --tests rtt,mlp --iters 30000 --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --mlp-rounds 3 --pin auto --json $OUT/rttmlp_$t.json 2>&1 | grep -E "^test=" | cut -c1-330
done
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-700
