# session 15 run 1 (carry [".whl"]): launch-run graphs on the GPU: their tests, then the launch
# loop and the MLP with graphs on (default) and off (GPUWIRE_RPC_GPU_GRAPH_MIN=0), tcp and sm
source .whl/setup_device.sh > $OUT/setup.log 2>&1 || { tail -20 $OUT/setup.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rpc_graphs.py tests/test_rpc_c.py 2>&1 | tail -4
for tls in tcp sm; do
  for g in 8 0; do
    echo "== tls $tls graph_min $g"
    GPUWIRE_RPC_GPU_GRAPH_MIN=$g timeout 150 python3 -m gpuwire.cli bench rpc --executor gpu --tests launch,mlp \
      --mlp-steps 600 --mlp-rounds 2 --mlp-shapes 1024,256,256,16 --tls $tls --pin auto \
      --json $OUT/launch_${tls}_g$g.json 2>&1 | grep -v "UCX  WARN" | grep "^test=\|summary"
  done
done
