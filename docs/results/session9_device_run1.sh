# session 9 run 1 (carry [".whl"]): the sm slow mode probe (docs/results/session9_slowmode.py)
source .whl/setup_device.sh || exit 1
nproc; lscpu | grep -E "Thread|Core|Socket|NUMA node|Model name"
for i in 1 2 3 4; do timeout 100 python3 docs/results/session9_slowmode.py sm 40 $OUT/sm_$i.json 2>&1 | grep -v "UCX  \(ERROR\|WARN\)" | tail -3; done
timeout 100 python3 docs/results/session9_slowmode.py tcp 40 $OUT/tcp_1.json 2>&1 | grep -v "UCX  \(ERROR\|WARN\)" | tail -3
python3 docs/results/session9_slowmode_report.py $OUT/*.json
