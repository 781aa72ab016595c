# session 10 run 4 (carry [".whl"]): another host: smallest MLP shape, tcp x4 and sm x2 (final code, defaults)
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 2000 --mlp-rounds 5 --pin auto --mlp-shapes 1024,256,256,16"
F='ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*'
for t in tcp sm tcp tcp sm tcp; do
  echo "# $t small"
  timeout 90 $B --tls $t --json $OUT/small_${t}_$RANDOM.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
