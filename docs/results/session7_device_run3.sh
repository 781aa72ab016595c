# session 7, third device run (carry [".whl"]): bulk lanes (gpuwire.rpc.lanes).
# 1. the GPU executor's copy tests with every payload on two lanes (GPUWIRE_RPC_LANE_MIN=1: the C bulk
#    copies' lane routing, the Python paths, mirror pulls); 2. bench bw over tcp, rpc_bulk_lanes 0 / 2 / 4,
#    alternated; 3. sm (UCX path, registered memory), lanes 0 / 2.
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
K="size_bytes=[0-9]*|htod_async_MBps=[0-9.]*|dtoh_async_MBps=[0-9.]*|htod_sync_MBps=[0-9.]*|dtoh_sync_MBps=[0-9.]*|perftest_MBps=[0-9.]*|htod_ratio=[0-9.]*|dtoh_ratio=[0-9.]*|htod_sync_ratio=[0-9.]*|dtoh_sync_ratio=[0-9.]*|perftest_error=.*"
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests bw --sizes 1M,16M,64M --bw-reps 3"
one() { name=$1; tls=$2; shift 2; el $name; env "$@" timeout 80 $B --tls $tls $([ $tls = sm ] && echo --host-mem registered) --json $OUT/bw3_$name.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'; }
{
el gpu tests, every payload on 2 lanes
GPUWIRE_RPC_BULK_LANES=2 GPUWIRE_RPC_LANE_MIN=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rpc_bulk.py tests/test_rpc.py tests/test_pinned.py -x 2>&1 | tail -4
one tcp_l0 tcp GPUWIRE_RPC_BULK_LANES=0
one tcp_l2 tcp GPUWIRE_RPC_BULK_LANES=2
one tcp_l4 tcp GPUWIRE_RPC_BULK_LANES=4
one tcp_l0b tcp GPUWIRE_RPC_BULK_LANES=0
one tcp_l2b tcp GPUWIRE_RPC_BULK_LANES=2
one sm_l0 sm GPUWIRE_RPC_BULK_LANES=0
one sm_l2 sm GPUWIRE_RPC_BULK_LANES=2
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-700
