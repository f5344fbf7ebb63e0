"""What the gradient store adds to a CPU training step: making each stage's
store (fresh pages, touched once per step) and copying every layer's
gradients into it, timed alone on one thread, without the rest of the step.

    python benchmarks/gradient_store_cost.py 100 250 1000

For DenseNet-BC of each depth (k=12): the gradients' MiB and the minimum and
median over 20 repetitions of the stores and copies of one step, in ms
(docs/performance.md, "The gradient store's cost").
"""

import argparse
import time

import torch

from densenet_fast import densenet_bc
from densenet_fast.engine.stage import PARAMS_PER_LAYER, GradientStore


def store_and_copy_seconds(depth: int, repeats: int) -> tuple[float, list[float]]:
    """(gradient MiB, seconds of each repetition) for DenseNet-BC-``depth``."""
    stages = []  # each dense block's parameters, then its transition's (or the final BatchNorm's)
    for name, module in densenet_bc(depth, 12).features.named_children():
        if name.startswith("denseblock"):
            stages.append([])
        if stages:
            stages[-1] += list(module.parameters())
    grads = [[torch.randn(p.shape) for p in params] for params in stages]  # contiguous, as the primitives return them
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for params, stage_grads in zip(stages, grads):
            store = GradientStore(params)
            for i in range(0, len(params), PARAMS_PER_LAYER):
                store.put(i, stage_grads[i:i + PARAMS_PER_LAYER])
        times.append(time.perf_counter() - start)
    return sum(p.numel() for params in stages for p in params) * 4 / 2**20, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("depths", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for depth in args.depths:
        mib, times = store_and_copy_seconds(depth, args.repeats)
        times.sort()
        print(f"DenseNet-BC-{depth}: {mib:.1f} MiB of gradients; stores and copies per step: "
              f"min {1e3 * times[0]:.2f} ms, median {1e3 * times[len(times) // 2]:.2f} ms")


if __name__ == "__main__":
    main()
