# session 10 run 6 (carry [".whl"]; needs the temporary GPUWIRE_EXP_POLL_GAP_NS build, not in the tree): EXPERIMENT: does the client's back-to-back polling (an epoll_wait syscall per
# pass over tcp) cost the mid/small MLP shapes over tcp? GPUWIRE_EXP_POLL_GAP_NS: pause between empty passes
source .whl/setup_device.sh || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto --mlp-shapes 2048,512,512,32;1024,256,256,16"
F='shape=[^ ]* [^ ]* [^ ]* [^ ]*|ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]'
for g in 0 2000 0 2000 0 2000; do
  echo "# tcp mid+small, gap $g ns"
  GPUWIRE_EXP_POLL_GAP_NS=$g timeout 90 $B --tls tcp 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
