# session 8 run 1 (carry [".whl"]): the flush timer's arm without a lock (new) vs session 7's
# (old: the arm took the mutex the waiter holds on its wake-ups, once per delay), and --pin
# auto with the client's calling thread alone on its core (new) vs all client threads on one CPU.
# .whl/old/gw_rpc.[ch]: cffi_src/gw_rpc.[ch] of commit 4d9292c (session 7's timer)
source .whl/setup_device.sh || exit 1
nproc; lscpu | grep -E "Model name|Thread|Core|Socket|NUMA node\(s\)"
NEW=$(ls gpuwire/_rpc*.so | head -1); cp $NEW /tmp/rpc_new.so
mkdir -p /tmp/oldsrc /tmp/oldbuild && cp cffi_src/* /tmp/oldsrc/ && cp .whl/old/gw_rpc.[ch] /tmp/oldsrc/
(cd /tmp/oldbuild && python3 -c "import sys; sys.path.insert(0,'/tmp/oldsrc'); import build_rpc; build_rpc.ffi.compile(tmpdir='.')" >/dev/null 2>&1)
cp $(ls /tmp/oldbuild/gpuwire/_rpc*.so | head -1) /tmp/rpc_old.so || exit 1
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-shapes 1024,256,256,16 --mlp-steps 2000 --mlp-rounds 3"
F='ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|local_ms_per_step=[0-9.]*|remote_ms_per_step=[0-9.]*|remote_gpu_gap_us=[0-9.]*'
for rep in 1 2; do
 for v in new old; do
  cp /tmp/rpc_$v.so $NEW
  for pin in auto 1:2,3 none; do
    echo "# tcp timer=$v pin=$pin"
    timeout 90 $B --tls tcp --pin $pin 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
  done
 done
done
cp /tmp/rpc_new.so $NEW
for pin in auto none; do
  echo "# sm timer=new pin=$pin"
  timeout 90 $B --tls sm --pin $pin 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
done
echo "# tcp timer=new pin=auto, flush timer off"
timeout 90 $B --tls tcp --pin auto --flush-us 0 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
