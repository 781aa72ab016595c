# session 7, second device run (carry [".whl"]): why async H2D over tcp trails sync H2D and D2H
# (run 1: async H2D 0.83-0.91 of perftest at 16/64 MiB where sync H2D read 1.00 and async D2H 0.97-1.00).
# Variants of the server's H2D receive window and the client's progress, alternated with the default.
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests bw --sizes 1M,16M,64M --bw-reps 3 --tls tcp"
K="size_bytes=[0-9]*|htod_async_MBps=[0-9.]*|htod_sync_MBps=[0-9.]*|dtoh_async_MBps=[0-9.]*|htod_issue_us=[0-9.]*|perftest_MBps=[0-9.]*|htod_ratio=[0-9.]*|htod_sync_ratio=[0-9.]*|dtoh_ratio=[0-9.]*|perftest_error=.*|srv_[a-z0-9_]*=[0-9.]*"
one() { name=$1; shift; el $name; env "$@" timeout 75 $B --json $OUT/bw2_$name.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'; }
{
one default A=1
one progress_off GPUWIRE_RPC_BULK_PROGRESS=off
one window32 GPUWIRE_RPC_C_BULK_INFLIGHT=33554432 GPUWIRE_RPC_C_BULK_SLOTS=16
one overlap_off GPUWIRE_RPC_GPU_H2D_OVERLAP=0
one cpath64_window32 GPUWIRE_RPC_C_BULK_H2D_MAX=0 GPUWIRE_RPC_C_BULK_INFLIGHT=33554432 GPUWIRE_RPC_C_BULK_SLOTS=16
one default_again A=1
el traced default
timeout 90 python3 -m gpuwire.cli bench rpc --executor gpu --tests bw --sizes 1M,16M,64M --bw-reps 2 --tls tcp --no-baseline --trace --json $OUT/bw2_trace.json 2>&1 | grep -E "^test=" | grep -oE "$K" | paste -sd' ' | sed 's/size_bytes/\nsize_bytes/g'
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-1500
