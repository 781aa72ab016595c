# session 14 run 2 (carry [".whl"]): the rpc targets after the audit fixes (tcp and shm)
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
for tls in tcp sm; do
  timeout 250 python3 -m gpuwire.cli bench rpc --executor gpu --tests rtt,issue,launch,mlp --mlp-steps 1000 --mlp-rounds 3 \
    --mlp-shapes 1024,256,256,16 --tls $tls --pin auto --json $OUT/rpc_$tls.json 2>&1 | grep -v "UCX  WARN" | grep "^test=\|summary"
done
