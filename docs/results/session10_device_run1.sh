# session 10 run 1 (carry [".whl"]): the adaptive sync spin (rpc_spin_adapt_us) on the big and mid MLP shapes,
# A/B in the same call (GPUWIRE_RPC_SPIN_ADAPT_US=0 = off, as before); all shapes with it on; its GPU test
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto"
F='shape=[^ ]* [^ ]* [^ ]* [^ ]*|ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*|local_gpu_gap_us=[0-9.]*|remote_gpu_gap_us=[0-9.]*'
BM="4096,512,1024,64;2048,512,512,32"
for t in tcp sm; do
  echo "# $t big+mid, adapt OFF"
  GPUWIRE_RPC_SPIN_ADAPT_US=0 timeout 150 $B --tls $t --mlp-shapes "$BM" --json $OUT/bm_off_$t.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
  echo "# $t all shapes, adapt ON (default)"
  timeout 170 $B --tls $t --json $OUT/all_on_$t.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rpc_step.py -k "spin" 2>&1 | tail -3
