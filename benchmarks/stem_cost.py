"""What the fused ImageNet stem (densenet_fast/engine/stem.py) costs in a CPU
training step: DenseNet-121 (cpp backend, SGD with momentum, 2 threads) timed
with the stem fused and with its BN, ReLU and max-pool run as modules (a no-op
forward hook on ``relu0`` makes them), alternating the order every round, one
warm-up step per arrangement before each timed step.

    python benchmarks/stem_cost.py --batch 8 --image-size 224 --rounds 16

Prints each arrangement's step times and the ratio of the medians
(docs/performance.md, "The fused stem's cost").
"""

import argparse
import statistics
import time
import warnings

import torch

import densenet_fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the hooked stem says it runs as modules
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = densenet_fast.densenet121(num_classes=10, backend="cpp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times = {"fused": [], "modules": []}
    for r in range(args.rounds):
        for kind in ("fused", "modules") if r % 2 == 0 else ("modules", "fused"):
            hook = model.features.relu0.register_forward_hook(lambda *_: None) if kind == "modules" else None
            step()
            start = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - start)
            if hook is not None:
                hook.remove()
    for kind, seconds in times.items():
        print(f"{kind:8s} median {statistics.median(seconds):.3f} s  {[round(s, 3) for s in seconds]}")
    print(f"fused / modules: {statistics.median(times['fused']) / statistics.median(times['modules']):.3f}")


if __name__ == "__main__":
    main()
