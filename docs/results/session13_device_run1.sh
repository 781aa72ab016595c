# session 13 run 1 (carry [".whl"]): does warming each side's loopback TCP path ~W us before a reply
# crossing (a 1-byte ping on a private loopback socket pair) make crossings after a 150/700 us wait as
# fast as hot ones? (docs/results/session13_warm_probe.py); then the smallest MLP shape over tcp twice
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
for W in 20 40; do
  timeout 150 python3 docs/results/session13_warm_probe.py tcp,self 7 $W 2>&1 | grep -v "UCX  "
done
timeout 100 python3 docs/results/session13_seg_probe.py 2>&1 | grep -v "UCX  "
for k in 1 2; do
  timeout 120 python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 \
    --mlp-shapes 1024,256,256,16 --tls tcp --pin auto 2> $OUT/mlp_tcp_$k.err | grep -E "^test=mlp" \
    | grep -oE " ratio=[0-9.]+|round_ratios=\[[^]]*\]|tls=[a-z]+" | paste -sd' '
done
