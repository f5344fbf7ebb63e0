#!/usr/bin/env bash
# The whole test suite on the GPU machine's software, on this CPU: torch 2.11.0
# (+cu130), torchvision 0.26.0 and Triton 3.6 under Python 3.12 (the versions
# the device tool's KINDS.md lists), so that an API of a newer torch or Triton
# shows up here, not in the GPU machine's few minutes.
#
#   benchmarks/gpu_versions_check.sh [VENV [PYTEST ARGS...]]   (added to `pytest tests`: narrow with -k)
#
# Creates VENV (default /tmp/venv-gpu-versions; about 5 GB from PyPI) unless it
# has a python, copies the committed tree (HEAD) to a temporary folder, builds
# the extension there (its CUDA kernels too where nvcc is, as `make build`
# does), and runs pytest on it.  numpy < 2 because Triton 3.6's interpreter
# converts one-element arrays with int(), which numpy 2 refuses (every Triton
# test failed); scipy, scikit-learn and contourpy at their last releases for
# numpy 1.  PYTHON312 names the Python 3.12 to use (default: python3.12).
set -euo pipefail
VENV=${1:-/tmp/venv-gpu-versions}
shift $(( $# > 0 ? 1 : 0 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON312:-python3.12}" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 "numpy<2" "scipy<1.14" "scikit-learn<1.6" \
        "contourpy<1.3" setuptools wheel ninja pytest monai==1.6.1 tqdm matplotlib
fi
TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
git -C "$ROOT" archive HEAD | tar -x -C "$TREE"
cd "$TREE"
if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    export DENSENET_FAST_CUDA=${DENSENET_FAST_CUDA:-1}
fi
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py --quiet build_ext --inplace
"$VENV/bin/python" -c "import torch, triton, torchvision, numpy, sys; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, 'numpy', \
numpy.__version__, 'revision', '$(git -C "$ROOT" rev-parse --short HEAD)')"
PYTHONPATH="$TREE" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests "$@"
