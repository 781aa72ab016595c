# A/B on the device: cf629c2 (out/head) vs the working tree, issue + launch over tcp, alternating
# (needs the previous commit unpacked in out/head: mkdir -p out/head && git archive cf629c2 | tar -x -C out/head; carry [".whl", "out/head"])
source .whl/setup_device.sh > /tmp/setup.log 2>&1 || { tail -5 /tmp/setup.log; exit 1; }
ROOT=$PWD
( cd out/head && for f in cffi_src/build_*.py; do m=$(basename $f .py); python3 -c "import sys; sys.path.insert(0,'cffi_src'); import $m; $m.ffi.compile(tmpdir='.', verbose=False)" >> /tmp/head_build.log 2>&1 || { tail -5 /tmp/head_build.log; exit 1; }; done )
for i in 1 2 3; do
  for v in head new; do
    if [ $v = head ]; then P=/tmp/site:$ROOT/out/head; D=$ROOT/out/head; else P=/tmp/site:$ROOT; D=$ROOT; fi
    echo "== $v $i"
    (cd $D && PYTHONPATH=$P timeout 120 python3 -m gpuwire.cli bench rpc --executor gpu --tests issue,launch --rtt-us 0 --tls tcp --pin auto 2>&1 | grep "^test=" | sed -E 's/(burst|target_us|tls|executor|seconds|sync_every|launches|correct|target)=[^ ]* *//g' | cut -c1-200)
  done
done
