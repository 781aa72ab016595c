# session 12 run 1 (carry [".whl"]): after the orderly goodbye (docs/protocol.md "Bulk lanes": closing):
# tcp copies with 4 lanes against ucx_perftest (same invocation), UCX error/warning lines of client and
# loopback server per invocation, session close time with and without lanes
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests bw --sizes 1M,16M,64M --bw-reps 3 --tls tcp"
for k in 1 2; do
  timeout 80 $B > $OUT/bw_$k.out 2> $OUT/bw_$k.err
  echo "== bw $k rc=$? ucx_error_lines=$(cat $OUT/bw_$k.* | grep -c 'UCX  ERROR') ucx_warn_lines=$(cat $OUT/bw_$k.* | grep -c 'UCX  WARN')"
  grep -E "^test=" $OUT/bw_$k.out | cut -c1-420
done
timeout 90 python3 docs/results/session12_close_probe.py gpu 10 > $OUT/close.out 2>&1
grep -v "^\[" $OUT/close.out | tail -4; echo "client's UCX lines: $(grep -c 'UCX  ' $OUT/close.out)"
