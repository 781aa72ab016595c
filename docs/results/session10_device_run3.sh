# session 10 run 3 (carry [".whl"]): the GPU suite on the session's code (adaptive sync spin); run 12: the same on the final code (timer layout)
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 570 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -15
