# session 6, third device run (carry [".whl"]; .whl/pinned_old.py = gpuwire/rpc/pinned.py of 88df45e):
#   A/B 1: the MLP over tcp with rpc_batch_first 2 (default) vs 1, alternated, 3 rounds each
#   A/B 2: the pinned hook's cost per unchanged launch, this session's pinned.py vs 88df45e's, alternated
source .whl/setup_device.sh || exit 1
T0=$(date +%s)
el() { echo "# [$(( $(date +%s) - T0 )) s] $*"; }
B="python3 -m gpuwire.cli bench rpc --executor gpu"
{
for i in 1 2; do for bf in 2 1; do
  el mlp tcp batch_first=$bf
  GPUWIRE_RPC_BATCH_FIRST=$bf timeout 45 $B --tls tcp --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --mlp-rounds 3 --pin auto 2>&1 | grep -E "^test=" | cut -c1-300
done; done
cp gpuwire/rpc/pinned.py /tmp/pinned_new.py
for v in new old new old; do
  if [ $v = old ]; then cp .whl/pinned_old.py gpuwire/rpc/pinned.py; else cp /tmp/pinned_new.py gpuwire/rpc/pinned.py; fi
  el pinned unchanged $v
  timeout 60 python3 -m gpuwire.cli bench pinned --executor gpu --tests unchanged --sizes 4K,1M,16M,64M --modes default --launches 2000 2>&1 | grep -E "^test=" | cut -c1-200
done
cp /tmp/pinned_new.py gpuwire/rpc/pinned.py
el done
} > $OUT/bench.log 2>&1
cat $OUT/bench.log | cut -c1-400
