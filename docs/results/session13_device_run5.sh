# session 13 run 5 (carry [".whl"]): UCX_PROTO_ENABLE=n (UCX's older protocol selection) against the
# defaults, alternating four times: the smallest MLP shape over tcp (1000 steps, 3 rounds, --pin auto)
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --mlp-shapes 1024,256,256,16 --tls tcp --pin auto"
for k in 1 2 3 4; do
  for v in "" UCX_PROTO_ENABLE=n; do
    echo -n "${v:-defaults} "
    env $v timeout 120 $B 2> /dev/null | grep -E "^test=mlp" | grep -oE " ratio=[0-9.]+|round_ratios=\[[^]]*\]" | paste -sd' '
  done
done
