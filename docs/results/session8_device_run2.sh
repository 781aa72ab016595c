# session 8 run 2 (carry [".whl"]): where the client's time goes in the smallest MLP step on the
# GPU VM (per call), the boundary split (--trace), and client knobs on tcp (3 rounds each).
source .whl/setup_device.sh || exit 1
for t in tcp sm; do python3 docs/results/session8_boundary.py $t; done
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --pin auto"
for t in tcp sm; do
  echo "# trace $t"
  timeout 90 $B --tls $t --trace --json $OUT/trace_$t.json 2>&1 | grep -E "^test=mlp" | grep -oE "ratio=[0-9.]*|boundary_split_us=.*" | head -3
done
F='ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*'
for rep in 1 2; do
for v in "X=0" "GPUWIRE_RPC_C_ENCODER=1" "GPUWIRE_RPC_BATCH_FIRST=3" "GPUWIRE_RPC_BATCH_FIRST=4" ; do
  echo "# tcp $v"
  env $v timeout 90 $B --tls tcp --mlp-rounds 3 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
done
