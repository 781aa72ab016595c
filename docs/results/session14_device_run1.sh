# session 14 run 1 (carry [".whl"]): the GPU suite on session 14's code (audit fixes)
source .whl/setup_device.sh || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 570 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -25
