# session 5, third device run: pinned 'unchanged' with all launches for written/protect, and bw with
# rpc_bulk_progress=auto (off over shared memory) against forced on/off, same run.
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
el pinned unchanged
timeout 150 python3 -m gpuwire.cli bench pinned --executor gpu --tests unchanged --sizes 4K,1M,16M,64M --modes default,written,protect,explicit --launches 2000 2>&1 | grep -E "^test=" | cut -c1-300
el bw
for t in sm tcp; do
  for v in auto on off; do
    GPUWIRE_RPC_BULK_PROGRESS=$v timeout 45 $B --tls $t --tests bw --sizes 1M,16M --bw-reps 3 2>&1 | grep -E "^test=" | sed "s/^/progress=$v /" | cut -c1-600
  done
done
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log
