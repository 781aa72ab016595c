# session 9 run 8 (carry [".whl"]): confirmation on another host with the final code: smallest shape, tcp x5, sm x2
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 2000"
F='ratio=[0-9.]*|ratio_incl_warm=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_first_step_us=[0-9.]*|remote_first_step_us=[0-9.]*'
nvidia-smi --query-gpu=name --format=csv,noheader
for t in tcp tcp sm tcp tcp sm tcp; do
  echo "# $t small, 5 rounds, pin auto"
  timeout 100 $B --tls $t --mlp-shapes 1024,256,256,16 --mlp-rounds 5 --pin auto --json $OUT/small_$t_$RANDOM.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
