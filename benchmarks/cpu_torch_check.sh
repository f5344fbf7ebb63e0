#!/usr/bin/env bash
# The whole test suite on a CPU build of torch 2.13.0 (the release before the
# one the README's commands install, and a build without CUDA), torchvision
# 0.28.0 and Triton 3.7.1 under this machine's Python 3.11.
#
#   benchmarks/cpu_torch_check.sh [VENV [PYTEST ARGS...]]   (added to `pytest tests`: narrow with -k)
#
# Creates VENV (default /tmp/venv-cpu-torch) unless it has a python: pip takes
# torch 2.13.0+cpu from this machine's disk.  PyPI's torchvision 0.28.0 is a CUDA
# build: its C library does not load beside a CPU torch, and its Python then
# fails registering a fake kernel for the missing `torchvision::nms`; the venv
# gets a sitecustomize.py that defines the schemas of `nms` and `qnms` (no
# kernels) at torchvision's first import, so that its models and feature
# extraction, all the tests use, import (torchvision.ops stays unusable).
# Copies the committed tree (HEAD) to a temporary folder, builds the C++
# kernels there (a CPU torch has no CUDA to build against) and runs pytest on it.
set -euo pipefail
VENV=${1:-/tmp/venv-cpu-torch}
shift $(( $# > 0 ? 1 : 0 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q --no-deps torchvision==0.28.0
    "$VENV/bin/pip" install -q numpy pillow pytest scikit-learn tqdm matplotlib ninja setuptools wheel \
        triton==3.7.1 monai==1.6.1
    cat >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sitecustomize.py" <<'EOF'
"""benchmarks/cpu_torch_check.sh: the schemas of torchvision's nms and qnms,
defined at torchvision's first import beside a CPU torch, where its C library
(built for a CUDA torch) does not load and would otherwise define them."""
import importlib.abc
import sys

_LIBRARIES = []


class _TorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            import torch
            if torch.version.cuda is None:  # a CPU torch, where PyPI's torchvision cannot load its C library
                library = torch.library.Library("torchvision", "FRAGMENT")
                library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _LIBRARIES.append(library)  # its definitions live as long as it does
        return None


sys.meta_path.insert(0, _TorchvisionSchemas())
EOF
fi
TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
git -C "$ROOT" archive HEAD | tar -x -C "$TREE"
cd "$TREE"
env -u CUDA_HOME -u CUDA_PATH -u DENSENET_FAST_CUDA MAX_JOBS=${MAX_JOBS:-2} \
    "$VENV/bin/python" setup.py --quiet build_ext --inplace
"$VENV/bin/python" -c "import torch, sys; torch.version.cuda is None or sys.exit('torch ' + torch.__version__ \
+ ' is a CUDA build: this checks a CPU build, which pip installs from local disk on the project machines')"
"$VENV/bin/python" -c "import torch, triton, torchvision, numpy, sys; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'torchvision', torchvision.__version__, 'numpy', \
numpy.__version__, 'revision', '$(git -C "$ROOT" rev-parse --short HEAD)')"
PYTHONPATH="$TREE" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests "$@"
