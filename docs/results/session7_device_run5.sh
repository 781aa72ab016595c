# session 7, closing benches after the lane wait fix (carry [".whl"]): the MLP and rtt on both
# transports (3 rounds, --pin auto; rpc_bulk_lanes=auto: 4 lanes over tcp, none over sm), and bw over
# tcp with the defaults once more. (Run 4's tcp MLP hung on its first copy: a frame left in the session
# worker's queue while the client waited for a lane payload; lanes.wait_requests now drives it.)
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
K="size_bytes=[0-9]*|htod_async_MBps=[0-9.]*|dtoh_async_MBps=[0-9.]*|perftest_MBps=[0-9.]*|htod_ratio=[0-9.]*|dtoh_ratio=[0-9.]*|htod_sync_ratio=[0-9.]*|dtoh_sync_ratio=[0-9.]*|perftest_error=.*"
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
for t in tcp sm; do
  el rtt+mlp $t
  timeout 120 $B --tls $t --tests rtt,mlp --iters 30000 --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --mlp-rounds 3 --pin auto --json $OUT/rttmlp5_$t.json 2>&1 | grep -E "^test=(mlp|rtt.*ratio)" | cut -c1-260
done
el bw tcp default
timeout 80 $B --tls tcp --tests bw --sizes 1M,16M,64M --bw-reps 3 --json $OUT/bw5_tcp.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-700
