# session 16 run 1 (carry [".whl"]): the rpc targets after the stub rewrite (acquire/release,
# one byte test and one count test per call, one-pack cuLaunchKernel), tcp and sm; then the
# launch loop and MLP two more invocations over tcp
source .whl/setup_device.sh > $OUT/setup.log 2>&1 || { tail -20 $OUT/setup.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
for tls in tcp sm; do
  timeout 200 python3 -m gpuwire.cli bench rpc --executor gpu --tests rtt,issue,launch,mlp --mlp-steps 1000 --mlp-rounds 3 \
    --mlp-shapes 1024,256,256,16 --tls $tls --pin auto --json $OUT/rpc_$tls.json 2>&1 | grep -v "UCX  WARN" | grep "^test=\|summary"
done
for i in 2 3; do
  timeout 120 python3 -m gpuwire.cli bench rpc --executor gpu --tests issue,launch,mlp --rtt-us 0 --mlp-steps 1000 --mlp-rounds 3 \
    --mlp-shapes 1024,256,256,16 --tls tcp --pin auto --json $OUT/rpc_tcp_$i.json 2>&1 | grep -v "UCX  WARN" | grep "^test=\|summary"
done
