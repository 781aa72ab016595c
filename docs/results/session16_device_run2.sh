# session 16 run 2 (carry [".whl"]): the GPU suite on session 16's code
source .whl/setup_device.sh > $OUT/setup.log 2>&1 || { tail -20 $OUT/setup.log; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 570 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -25
