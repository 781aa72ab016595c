# session 9 run 6 (carry [".whl"]): spare workers start on their own core (rpc_worker_spawn_cpus via --pin auto),
# each block's first 3 steps outside its time, the local baseline's pointers read once; smallest shape x4 per
# transport, then all shapes with rtt
source .whl/setup_device.sh || exit 1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_bench_mlp.py 2>&1 | tail -1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 2000"
F='ratio=[0-9.]*|ratio_incl_warm=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*|local_first_step_us=[0-9.]*|remote_first_step_us=[0-9.]*'
for i in 1 2 3 4; do for t in tcp sm; do
  echo "# $i $t small, 5 rounds, pin auto"
  timeout 100 $B --tls $t --mlp-shapes 1024,256,256,16 --mlp-rounds 5 --pin auto --json $OUT/small_${t}_$i.json 2>&1 | grep -E "^test=mlp|pin=" | grep -oE "$F|spare workers start on \[[0-9, ]*\]" | paste -sd' '
done; done
for t in tcp sm; do
  echo "# $t all shapes, rtt, pin auto"
  timeout 150 $B --tls $t --tests rtt,mlp --mlp-steps 1000 --pin auto --json $OUT/all_$t.json 2>&1 | grep -E "^# summary|^test=mlp" | grep -oE "^# summary.*|shape=B[0-9]+|$F" | paste -sd' '
done
