"""What scratch per stage pass (densenet_fast/engine/buffers.py, ScratchArena)
costs in a CPU training step against one set kept for the model's life (the
engine before f1abd89, rebuilt here by keeping each thread's set between
passes): DenseNet-BC (k=12, 32x32), or with ``--volume D H W`` MONAI's 3-D
DenseNet-121 (one channel, 2 classes), SGD with momentum, 2 threads, the two
alternating in one process, the order swapped every round, one warm-up step
per arrangement before each timed step.

    python benchmarks/scratch_cost.py --depth 100 --batch 16 --recompute keep --rounds 8
    python benchmarks/scratch_cost.py --volume 64 128 128 --batch 2 --recompute recompute --rounds 8

Prints each arrangement's step times and the ratio of the medians
(docs/engine.md, "The scratch arena").
"""

import argparse
import contextlib
import statistics
import threading
import time

import torch

import densenet_fast
from densenet_fast.engine import ScratchArena
from densenet_fast.monai import DenseNet121


def kept_sets(arena: ScratchArena):
    """``arena.scope`` as before f1abd89: the calling thread's one set, kept between passes."""
    held = threading.local()

    @contextlib.contextmanager
    def scope():
        outer = getattr(arena._local, "slots", None)
        if not hasattr(held, "slots"):
            held.slots = {}
        arena._local.slots = held.slots
        try:
            yield
        finally:
            arena._local.slots = outer

    return scope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=100, help="DenseNet-BC depth")
    parser.add_argument("--volume", type=int, nargs=3, default=None, help="MONAI's DenseNet-121 on D H W volumes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--recompute", default="keep", choices=["keep", "recompute"])
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    if args.volume:
        model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, recompute=args.recompute,
                            backend=args.backend)
        x = torch.randn(args.batch, 1, *args.volume)
    else:
        model = densenet_fast.densenet_bc(args.depth, recompute=args.recompute, backend=args.backend)
        x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 2, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    per_pass, kept = model.arena.scope, kept_sets(model.arena)
    times = {"per pass": [], "kept": []}
    for r in range(args.rounds):
        for kind in ("per pass", "kept") if r % 2 == 0 else ("kept", "per pass"):
            model.arena.scope = per_pass if kind == "per pass" else kept
            step()
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
    for kind, seconds in times.items():
        print(f"{kind:8s} median {statistics.median(seconds):.3f} s  {[round(s, 3) for s in seconds]}")
    print(f"per pass / kept: {statistics.median(times['per pass']) / statistics.median(times['kept']):.3f}")


if __name__ == "__main__":
    main()
