# session 9 run 2 (carry [".whl"]): the MLP bench's smallest shape with each block's first 3 steps
# outside its time (--mlp-warm 3, the new default), tcp and sm alternating, 5 invocations each.
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 2000"
F='ratio=[0-9.]*|ratio_incl_warm=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*|local_first_step_us=[0-9.]*|remote_first_step_us=[0-9.]*'
for i in 1 2 3 4 5; do for t in tcp sm; do
  echo "# $i $t small, warm 3, 5 rounds, pin auto"
  timeout 100 $B --tls $t --mlp-shapes 1024,256,256,16 --mlp-rounds 5 --pin auto --json $OUT/small_${t}_$i.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done; done
