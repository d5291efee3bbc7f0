#!/usr/bin/env bash
# Set up a virtual environment in .venv with curvlab and its development tools.
# On a machine without a GPU this installs the CPU build of torch (TORCH_SPEC overrides it);
# it never pulls a multi-GB CUDA build on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "setup: installing curvlab and its development tools"
"${PIP[@]}" install -e ".[dev]"
# Peer libraries for cross-checks and benchmarks. --no-deps: backpack-for-pytorch requires
# torchvision, which would replace the CPU torch with a CUDA build; neither needs it here.
"${PIP[@]}" install --no-deps curvlinops-for-pytorch backpack-for-pytorch
.venv/bin/python -c "import torch, curvlab; print(f'setup: curvlab {curvlab.__version__}, torch {torch.__version__}')"
