# session 10 run 7 (carry [".whl"]): do the session's idle bulk lanes (auto: 4 over tcp, none over sm) cost the
# MLP over tcp? mid and smallest shapes, GPUWIRE_RPC_BULK_LANES=0 vs the default, alternating on one host
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto --mlp-shapes 2048,512,512,32;1024,256,256,16"
F='shape=[^ ]* [^ ]* [^ ]* [^ ]*|ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]'
for l in auto 0 auto 0 auto 0; do
  echo "# tcp mid+small, rpc_bulk_lanes=$l"
  GPUWIRE_RPC_BULK_LANES=$l timeout 90 $B --tls tcp 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
