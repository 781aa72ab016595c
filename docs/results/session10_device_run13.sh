# session 10 run 13 (carry [".whl"], with .whl/old_rpc/gw_rpc.c = cffi_src/gw_rpc.c of 12d1d91): the timer's
# cache-line layout A/B on one host: the C module built from the old source vs the new, swapped between invocations
# (client and loopback server both load the tree's module); default settings, tcp, mid and smallest shapes
source .whl/setup_device.sh || exit 1
NEW=$(ls gpuwire/_rpc.cpython-3*.so); cp $NEW /tmp/new_rpc.so
(rm -rf /tmp/oldb && mkdir -p /tmp/oldb && cp -r cffi_src /tmp/oldb/ && cp .whl/old_rpc/gw_rpc.c /tmp/oldb/cffi_src/ && cd /tmp/oldb && \
 python3 -c "import sys; sys.path.insert(0,'cffi_src'); import build_rpc; build_rpc.ffi.compile(tmpdir='.')" > /dev/null 2>&1) || exit 1
OLD=$(ls /tmp/oldb/gpuwire/_rpc.cpython-3*.so); cmp -s $OLD /tmp/new_rpc.so && { echo "same module?"; exit 1; }
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --pin auto --mlp-shapes 2048,512,512,32;1024,256,256,16"
F='shape=[^ ]* [^ ]* [^ ]* [^ ]*|ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]'
for v in old new old new old new old new; do
  if [ $v = old ]; then cp $OLD $NEW; else cp /tmp/new_rpc.so $NEW; fi
  echo "# tcp mid+small, timer layout $v"
  timeout 90 $B --tls tcp 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
cp /tmp/new_rpc.so $NEW
