# session 10 run 2 (carry [".whl"]): smallest MLP shape over tcp, the adaptive spin off / on alternating (same host)
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 2000 --mlp-rounds 5 --pin auto --mlp-shapes 1024,256,256,16"
F='ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*'
for a in 0 20000 0 20000 0 20000; do
  echo "# tcp small, rpc_spin_adapt_us=$a"
  GPUWIRE_RPC_SPIN_ADAPT_US=$a timeout 90 $B --tls tcp --json $OUT/small_$a_$RANDOM.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
