# session 9 run 4 (carry [".whl"]): the bench's loops in one session vs a fresh session per round
source .whl/setup_device.sh > /dev/null || exit 1
for m in fresh same fresh same; do timeout 100 python3 docs/results/session9_slowmode2.py sm $m 4 2>&1 | grep round; done
