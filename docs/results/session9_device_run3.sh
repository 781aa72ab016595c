# session 9 run 3 (carry [".whl"]): the slow-block probe with per-step times (numpy), on the host of run 2
source .whl/setup_device.sh > /dev/null || exit 1
for i in 1 2; do timeout 100 python3 docs/results/session9_slowmode.py sm 60 $OUT/p_sm_$i.json 100 10 2>&1 | grep -v "UCX  \(ERROR\|WARN\)" | tail -2; done
timeout 100 python3 docs/results/session9_slowmode.py tcp 60 $OUT/p_tcp_1.json 100 10 2>&1 | grep -v "UCX  \(ERROR\|WARN\)" | tail -2
python3 docs/results/session9_slowmode_report.py $OUT/p_*.json
