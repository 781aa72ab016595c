# session 10 run 5 (carry [".whl"]): does polling fewer tcp interfaces shorten the tcp hop? smallest MLP shape over
# tcp, UCX's default devices vs UCX_NET_DEVICES=lo (client and loopback server), alternating on one host; rtt too
source .whl/setup_device.sh || exit 1
ip -o link | awk '{print $2}' | paste -sd' '
python3 -c "import gpuwire.transport as t; print(t.__file__)" >/dev/null
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests rtt,mlp --mlp-steps 2000 --mlp-rounds 5 --pin auto --mlp-shapes 1024,256,256,16"
F='connected.*|ratio=[0-9.]*|rtt_ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]|remote_ms_per_step=[0-9.]*'
for d in default lo default lo default lo; do
  echo "# tcp small, devices $d"
  if [ $d = lo ]; then export UCX_NET_DEVICES=lo; else unset UCX_NET_DEVICES; fi
  timeout 95 $B --tls tcp --json $OUT/small_${d}_$RANDOM.json 2>&1 | grep -E "^test=(mlp|rtt)|connected" | grep -oE "$F" | paste -sd' '
done
