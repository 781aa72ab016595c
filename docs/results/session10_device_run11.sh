# session 10 run 11 (carry [".whl"]): the flush timer's waiter, arm and seq cell on separate cache lines: does
# the timer still cost the MLP over tcp? rpc_flush_us 200 (default) / 0 (off) alternating, mid and smallest shapes
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto --mlp-shapes 2048,512,512,32;1024,256,256,16"
F='shape=[^ ]* [^ ]* [^ ]* [^ ]*|ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]'
for f in 200 0 200 0 200 0 200 0; do
  echo "# tcp mid+small, flush_us $f"
  timeout 90 $B --tls tcp --flush-us $f 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
