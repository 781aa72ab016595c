"""The kernels gpuwire's tests and `gpuwire bench rpc` run (shipped as package data):
gw_test_kernels.cu, its PTX (compute_80) and a fatbin. ``PTX`` / ``FATBIN`` / ``SOURCE``
are their paths inside the installed package."""
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "gw_test_kernels.cu"
PTX = HERE / "gw_test_kernels.ptx"
FATBIN = HERE / "gw_test_kernels.fatbin"
MIRROR_DIFF_PTX = HERE / "gw_mirror_diff.ptx"     # gwMirrorPull's diff kernel (docs/pinned.md)
