"""Host-side time of one Triton-backend primitive call, with every kernel launch
replaced by a no-op: what the backend's wrappers, its torch custom ops and the
``Launcher`` (configuration choice included) cost per call, before Triton's own
launcher and the GPU.  Runs on the CPU (through the interpreter's import path;
nothing is computed).  DenseNet-121 block-3 shapes (batch 256, 14x14, the first
256 of the block's 1024 channels, bottleneck 128), float16.

    python benchmarks/triton_host_time.py [--repeats 200]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors pass the backend's device checks
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from densenet_fast.backends import get_backend  # noqa: E402
from densenet_fast.backends.triton_kernels import common  # noqa: E402


def stub_launches(counter: list[int]) -> None:
    """Every Launcher launch chooses its configuration as before, then launches nothing."""
    def getitem(self, grid):
        def launch(*args, **meta):
            self.usable(grid, args[0], meta)
            counter[0] += 1
        return launch
    common.Launcher.__getitem__ = getitem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    launches = [0]
    stub_launches(launches)
    backend = get_backend("triton", torch.device("cpu"))
    m, c_total, c, k, dtype = 256 * 14 * 14, 1024, 256, 128, torch.float16
    x = torch.randn(m, c_total, dtype=dtype)[:, :c]
    scale, shift, mean, rstd = torch.randn(c), torch.randn(c), torch.randn(c), torch.rand(c) + 0.5
    weight, out = torch.randn(k, c, dtype=dtype), torch.empty(m, k, dtype=dtype)
    grad_out = torch.randn(m, k, dtype=dtype)
    grad_x = torch.zeros(m, c_total, dtype=dtype)[:, :c]
    calls = {"bn_relu_conv1x1 (with statistics)": lambda: backend.bn_relu_conv1x1(x, scale, shift, weight, out, True),
             "bn_relu_conv1x1_backward": lambda: backend.bn_relu_conv1x1_backward(
                 x, scale, shift, mean, rstd, weight, grad_out, grad_x, None)}
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    for name, call in calls.items():
        for _ in range(20):
            call()
        times = []
        for _ in range(args.repeats):
            launches[0] = 0
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        print(f"{name}: median {1e6 * statistics.median(times):.1f} us of host time per call, {launches[0]} launches")


if __name__ == "__main__":
    main()
