"""The planner's largest-batch search against brute force over every batch
(docs/memory.md, "Searches").

    python benchmarks/batch_search.py --batches 700

For each model below, each setting (float32 with this machine's threads;
bfloat16 autocast; 1 and 16 threads; the torch backend) and each policy,
predicts every batch from 1 to ``--batches - 1``; then, for up to 150 budgets
among those predictions (those no batch in the last 50 fits), compares
``planner.largest_batch`` with the largest batch whose prediction fits.
Prints one line per case: the mismatches, the stretches searched
(``memory.heap_exits``) and the time one search took on average; exits 1 on
any mismatch.  Then, for the DenseNet-BCs in ``DEPTH_MODELS``, the depths
(16 to 358) where the predicted peak dips below the one 6 layers shallower,
which ``planner.deepest_depth`` (a bisection) may step over.  Predictions
only: nothing is trained.
"""

import argparse
import sys
import time

import torch

from densenet_fast import planner
from densenet_fast.memory import Architecture, Setup, heap_exits, predict

MODELS = [  # name, depth, image size, tree
    ("densenet_bc", 40, (32, 32), None), ("densenet_bc", 22, (16, 16), "monai"),
    ("densenet121", None, (32, 32), None), ("densenet121", None, (32,), "monai"),
    ("densenet121", None, (48,), "monai"), ("densenet121", None, (64,), "monai"),
    ("densenet_bc", 22, (16, 16, 16), None), ("densenet_bc", 22, (32, 32, 32), None),
]
SETTINGS = [{}, {"autocast": torch.bfloat16}, {"threads": 1}, {"threads": 16}, {"backend": "torch"}]
DEPTH_MODELS = [  # growth rate, image size, tree, batches, settings: where the peak is predicted to dip with depth
    (12, (32, 32), "torchvision", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (12, (8, 8), "torchvision", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (12, (16, 16), "monai", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (12, (48,), "monai", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (4, (4, 4), "torchvision", (16,), ({"autocast": torch.bfloat16, "threads": 16},)),
]


def check(arch: Architecture, setup: Setup, policy: str, batches: int) -> tuple[int, int, int, float]:
    """(mismatches, budgets tried, stretches, seconds per search) for one case."""
    peaks = {b: predict(arch, setup.with_batch(b), policy).total_bytes for b in range(1, batches)}
    tail = min(peak for b, peak in peaks.items() if b > batches - 50)
    budgets = sorted({peak for peak in peaks.values() if peak < tail})
    mismatches, seconds, tried = 0, 0.0, budgets[::max(1, len(budgets) // 150)]
    for budget in tried:
        expected = max((b for b, peak in peaks.items() if peak <= budget), default=None)
        start = time.perf_counter()
        found = planner.largest_batch(arch, setup, budget, policy)
        seconds += time.perf_counter() - start
        if found != expected:
            mismatches += 1
            print(f"  budget {budget}: largest batch {expected}, search {found}")
    return mismatches, len(tried), len({1, 2} | heap_exits(arch, setup, policy)), seconds / len(tried)


def depth_dips(growth_rate: int, size: tuple[int, ...], tree: str, setup: Setup, policy: str) -> list[int]:
    """The DenseNet-BC depths 16-358 whose predicted peak is below the one 6 layers shallower."""
    base = Architecture.named("densenet_bc", 10, growth_rate, spatial_dims=len(size), tree=tree)
    peaks = [predict(base.with_depth(6 * n + 4), setup, policy).total_bytes for n in range(1, 60)]
    return [6 * n + 4 for n in range(2, 60) if peaks[n - 1] < peaks[n - 2]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=700, help="brute force over batches 1 to this - 1")
    args = parser.parse_args()
    failed = 0
    for name, depth, size, tree in MODELS:
        arch = Architecture.named(name, depth, spatial_dims=len(size), tree=tree)
        for setting in SETTINGS:
            for policy in ("keep", "recompute"):
                mismatches, tried, stretches, seconds = check(arch, Setup(1, size, **setting), policy, args.batches)
                failed += mismatches
                print(f"{planner.describe_model(arch)} {planner.size_text(size)} {setting or 'float32'} {policy}: "
                      f"{mismatches} mismatches in {tried} budgets, {stretches} stretches, "
                      f"{1000 * seconds:.0f} ms per search", flush=True)
    for growth_rate, size, tree, batches, settings in DEPTH_MODELS:
        for batch in batches:
            for setting in settings:
                for policy in ("keep", "recompute"):
                    dips = depth_dips(growth_rate, size, tree, Setup(batch, size, **setting), policy)
                    print(f"DenseNet-BC (k={growth_rate}, {tree}) {planner.size_text(size)} batch {batch} "
                          f"{setting or 'float32'} {policy}: the peak dips with depth at {dips or 'no depth'}",
                          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
