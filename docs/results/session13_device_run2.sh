# session 13 run 2 (carry [".whl"]): the warm-up before a reply (rpc_warm_us), A/B on one host:
# the smallest MLP shape over tcp (1000 steps, 3 rounds, --pin auto), warm-up off / 20 us / 40 us
# alternating three times; every ratio against the local loop measured in the same invocation
# NEEDS the experimental build: `git apply docs/results/session13_warm_experiment.diff` first (the
# warm-up was measured, found no gain and removed again; docs/benchmarks.md "Session 13")
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
for k in 1 2 3; do
  for W in 0 20 40; do
    echo -n "warm=$W "
    GPUWIRE_RPC_WARM_US=$W timeout 120 python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 \
      --mlp-rounds 3 --mlp-shapes 1024,256,256,16 --tls tcp --pin auto 2> $OUT/mlp_${W}_$k.err | grep -E "^test=mlp" \
      | grep -oE " ratio=[0-9.]+|round_ratios=\[[^]]*\]" | paste -sd' '
  done
done
