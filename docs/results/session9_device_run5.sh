# session 9 run 5 (carry [".whl"]): which part of a fresh round brings the slow blocks
source .whl/setup_device.sh > /dev/null || exit 1
for m in fresh_remote fresh_local fresh; do timeout 120 python3 docs/results/session9_slowmode2.py sm $m 4 2>&1 | grep round; done
