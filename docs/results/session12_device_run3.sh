# session 12 run 3 (carry [".whl"]): the smallest MLP shape over tcp and sm on session 12's code
# (defaults, --pin auto), two invocations per transport alternating; every ratio against the local
# loop measured in the same invocation
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
for k in 1 2; do
  for tls in tcp sm; do
    timeout 120 python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 \
      --mlp-shapes 1024,256,256,16 --tls $tls --pin auto 2> $OUT/mlp_${tls}_$k.err | grep -E "^test=mlp" \
      | grep -oE " ratio=[0-9.]+|round_ratios=\[[^]]*\]|tls=[a-z]+" | paste -sd' '
    echo "   UCX lines: $(grep -c 'UCX  ' $OUT/mlp_${tls}_$k.err)"
  done
done
