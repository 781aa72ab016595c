# session 8 run 4 (carry [".whl"]): the MLP bench with the local and remote loops interleaved in
# blocks of 100 steps, 5 rounds, --pin auto now also placing the server session thread alone (rpc_server_session_cpu); then all shapes.
source .whl/setup_device.sh || exit 1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_bench_mlp.py tests/test_server_placement.py 2>&1 | tail -2
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 2000"
F='ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*|loss_rel_diff=[0-9.e-]*'
for t in tcp sm tcp sm; do
  echo "# $t small, interleaved, 5 rounds, pin auto"
  timeout 120 $B --tls $t --mlp-shapes 1024,256,256,16 --mlp-rounds 5 --pin auto --json $OUT/small_$t.json 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
for t in tcp sm; do
  echo "# $t all shapes, rtt, pin auto"
  timeout 200 $B --tls $t --tests rtt,mlp --mlp-steps 1000 --pin auto --json $OUT/all_$t.json 2>&1 | grep -E "^# summary|^test=mlp" | grep -oE "^# summary.*|shape=B[0-9]+|$F" | paste -sd' '
done
