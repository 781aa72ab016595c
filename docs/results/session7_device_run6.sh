# session 7 (carry [".whl"]): does having bulk lanes change the tcp MLP? rpc_bulk_lanes 0 vs auto (4),
# alternated, 3 rounds each, --pin auto (the MLP moves no payload of lane size after its set-up copies).
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tls tcp --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --mlp-rounds 3 --pin auto"
for v in 0 auto 0 auto; do
  echo "# lanes=$v"
  GPUWIRE_RPC_BULK_LANES=$v timeout 60 $B 2>&1 | grep -E "^test=mlp" | grep -oE "ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*|remote_gpu_gap_us=[0-9.]*" | paste -sd' '
done
