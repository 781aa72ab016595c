# session 7, first device run (carry [".whl"]): the transport worker's progress thread for bulk copies.
# tcp, registered client memory (the UCX path): client rpc_bulk_progress auto (= on over tcp) vs thread,
# with and without the server's progress thread; then sm with --host-mem registered: auto (= off) vs thread.
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests bw --sizes 1M,16M,64M --bw-reps 3"
K="size_bytes=[0-9]*|htod_async_MBps=[0-9.]*|dtoh_async_MBps=[0-9.]*|htod_issue_us=[0-9.]*|perftest_MBps=[0-9.]*|htod_ratio=[0-9.]*|dtoh_ratio=[0-9.]*|perftest_error=.*"
{
for round in 1 2; do
 for v in "on 0" "thread 0" "thread 1" "on 1"; do
  set -- $v
  el tcp client=$1 server_thread=$2 round=$round
  GPUWIRE_RPC_BULK_PROGRESS=$1 GPUWIRE_RPC_SERVER_PROGRESS_THREAD=$2 timeout 75 $B --tls tcp --json $OUT/bw_tcp_$1_$2_r$round.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'
  [ $round = 2 ] && [ $1 = thread ] && break
 done
done
for v in "off 0" "thread 0" "thread 1"; do
  set -- $v
  el sm registered client=$1 server_thread=$2
  GPUWIRE_RPC_BULK_PROGRESS=$1 GPUWIRE_RPC_SERVER_PROGRESS_THREAD=$2 timeout 75 $B --tls sm --host-mem registered --json $OUT/bw_sm_$1_$2.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'
done
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-400
