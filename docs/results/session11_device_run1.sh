# session 11 run 1 (carry [".whl"]): do vCPUs that slow each other (hidden host siblings) explain the
# tcp smallest shape's spread across hosts? A pair-interference probe of this VM, then the smallest
# shape over tcp with three placements alternating: --pin auto, the probe's "good" plan and its "bad"
# plan (calling thread and server session thread on the most-interfering pair)
source .whl/setup_device.sh || exit 1
nproc; lscpu | grep -E "Model name|Thread|Core|Socket|NUMA node\(s\)|Hypervisor"; cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null
S0=$(awk '/^cpu /{print $9}' /proc/stat)
python3 docs/results/session11_pair_probe.py 20 2 > $OUT/probe.txt 2>&1; head -4 $OUT/probe.txt
GOOD=$(tail -1 $OUT/probe.txt | python3 -c "import json,sys; print(json.load(sys.stdin)['good'])")
BAD=$(tail -1 $OUT/probe.txt | python3 -c "import json,sys; print(json.load(sys.stdin)['bad'])")
tail -1 $OUT/probe.txt | python3 -c "
import json,sys; f=json.load(sys.stdin)['factors']
print('auto plan pairs (main 1, helpers 2, session 3, rest 4, spawn 5):', {k: f[k] for k in ('1,2','1,3','1,4','2,3','3,4','1,5','3,5')})"
B="python3 -m gpuwire.cli bench rpc --executor gpu --tests mlp --mlp-steps 1000 --mlp-rounds 3 --mlp-shapes 1024,256,256,16 --tls tcp"
F='ratio=[0-9.]*|round_ratios=\[[0-9., ]*\]|block_ratio_p10_p50_p90=\[[0-9., ]*\]'
for r in 1 2 3; do
  for p in auto $GOOD $BAD; do
    echo "# pin $p"; timeout 90 $B --pin $p 2>&1 | grep -E "^test=mlp" | grep -oE "$F" | paste -sd' '
  done
done
S1=$(awk '/^cpu /{print $9}' /proc/stat); echo "steal ticks during the run: $((S1 - S0))"
