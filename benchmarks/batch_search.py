"""The planner's searches (largest batch, deepest depth) against brute force
(docs/memory.md, "Searches").

    python benchmarks/batch_search.py --batches 700

For each model below, each setting (float32 with this machine's threads;
bfloat16 autocast; 1 and 16 threads; the torch backend) and each policy,
predicts every batch from 1 to ``--batches - 1``; then, for up to 150 budgets
among those predictions (those no batch in the last 50 fits), compares
``planner.largest_batch`` with the largest batch whose prediction fits.
Then, for the DenseNet-BCs in ``DEPTH_MODELS``, does the same for
``planner.deepest_depth`` over depths 10 to 358 (budgets no depth above 298
fits).  Prints one line per case: the mismatches, the batches or depths where
the predicted peak dips below the one before (the searches must step over
them), for depths how many depths the search may step down from where the
floor (``memory.peak_floor``) stops it, and the time one search took on
average; exits 1 on any mismatch.
Predictions only: nothing is trained.
"""

import argparse
import sys
import time
from typing import Callable, Optional

import torch

from densenet_fast import planner
from densenet_fast.memory import Architecture, Setup, peak_floor, predict

MODELS = [  # name, depth, image size, tree
    ("densenet_bc", 40, (32, 32), None), ("densenet_bc", 22, (16, 16), "monai"),
    ("densenet121", None, (32, 32), None), ("densenet121", None, (32,), "monai"),
    ("densenet121", None, (48,), "monai"), ("densenet121", None, (64,), "monai"),
    ("densenet_bc", 22, (16, 16, 16), None), ("densenet_bc", 22, (32, 32, 32), None),
]
SETTINGS = [{}, {"autocast": torch.bfloat16}, {"threads": 1}, {"threads": 16}, {"backend": "torch"}]
DEPTH_MODELS = [  # growth rate, image size, tree, batches, settings
    (12, (32, 32), "torchvision", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (12, (8, 8), "torchvision", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (12, (16, 16), "monai", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (12, (48,), "monai", (1, 2, 16), ({}, {"autocast": torch.bfloat16})),
    (4, (4, 4), "torchvision", (16,), ({"autocast": torch.bfloat16, "threads": 16},)),
]


def check(peaks: dict[int, int], search: Callable[[int], Optional[int]], tail: int
          ) -> tuple[int, int, list[int], float]:
    """(mismatches, budgets tried, dips, seconds per search) of ``search(budget)``
    against the largest key of ``peaks`` whose peak fits, for up to 150 budgets
    among the peaks that none of the last ``tail`` keys fits."""
    keys = sorted(peaks)
    budgets = sorted({peak for peak in peaks.values() if peak < min(peaks[x] for x in keys[-tail:])})
    mismatches, seconds, tried = 0, 0.0, budgets[::max(1, len(budgets) // 150)]
    for budget in tried:
        expected = max((x for x, peak in peaks.items() if peak <= budget), default=None)
        start = time.perf_counter()
        found = search(budget)
        seconds += time.perf_counter() - start
        if found != expected:
            mismatches += 1
            print(f"  budget {budget}: expected {expected}, search {found}")
    dips = [x for x, before in zip(keys[1:], keys) if peaks[x] < peaks[before]]
    return mismatches, len(tried), dips, seconds / len(tried)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=700, help="brute force over batches 1 to this - 1")
    args = parser.parse_args()
    failed = 0
    for name, depth, size, tree in MODELS:
        arch = Architecture.named(name, depth, spatial_dims=len(size), tree=tree)
        for setting in SETTINGS:
            for policy in ("keep", "recompute"):
                setup = Setup(1, size, **setting)
                peaks = {b: predict(arch, setup.with_batch(b), policy).total_bytes for b in range(1, args.batches)}
                mismatches, tried, dips, seconds = check(
                    peaks, lambda budget: planner.largest_batch(arch, setup, budget, policy), tail=50)
                failed += mismatches
                print(f"{planner.describe_model(arch)} {planner.size_text(size)} {setting or 'float32'} {policy}: "
                      f"{mismatches} mismatches in {tried} budgets, dips at batches {dips or 'none'}, "
                      f"{1000 * seconds:.0f} ms per search", flush=True)
    for growth_rate, size, tree, batches, settings in DEPTH_MODELS:
        for batch in batches:
            for setting in settings:
                for policy in ("keep", "recompute"):
                    base = Architecture.named("densenet_bc", 10, growth_rate, spatial_dims=len(size), tree=tree)
                    setup = Setup(batch, size, **setting)
                    peaks = {d: predict(base.with_depth(d), setup, policy).total_bytes for d in range(10, 359, 6)}
                    floors = {d: peak_floor(base.with_depth(d), setup, policy) for d in peaks}
                    trail = max(sum(floors[deeper] <= peak for deeper in peaks if deeper > d)
                                for d, peak in peaks.items())
                    mismatches, tried, dips, seconds = check(
                        peaks, lambda budget: planner.deepest_depth(base, setup, budget, policy), tail=10)
                    failed += mismatches
                    print(f"DenseNet-BC (k={growth_rate}, {tree}) {planner.size_text(size)} batch {batch} "
                          f"{setting or 'float32'} {policy}: {mismatches} mismatches in {tried} budgets, "
                          f"dips at depths {dips or 'none'}, the floor trails by up to {trail} depths, "
                          f"{1000 * seconds:.0f} ms per search", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
