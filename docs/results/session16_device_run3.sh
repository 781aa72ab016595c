# session 16 run 3 (carry [".whl"]): the GPU suite on the final code (frame order checked),
# then the issue test and the MLP over tcp twice more
source .whl/setup_device.sh > $OUT/setup.log 2>&1 || { tail -20 $OUT/setup.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 480 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -8
for i in 1 2; do
  timeout 50 python3 -m gpuwire.cli bench rpc --executor gpu --tests issue,mlp --mlp-steps 1000 --mlp-rounds 3 \
    --mlp-shapes 1024,256,256,16 --tls tcp --pin auto --json $OUT/final_tcp_$i.json 2>&1 | grep -v "UCX  WARN" | grep "^test=\|summary" | cut -c1-420
done
