"""Where torch's bfloat16 (or ``--dtype``) 3x3 convolution (padding 1) on the CPU is wrong:
random shapes, NaN left on the heap before each call, each result against
float64 (docs/engine.md, "A bfloat16 3-D weight gradient").

    python benchmarks/bf16_conv3d_check.py --shapes 400 [--dtype float16]

Prints, for 2-D and 3-D shapes with and without a spatial side of 2, how many
shapes gave a wrong forward, input gradient or weight gradient (relative
error above 5% or not finite, in any of 5 calls).
"""

import argparse
import random
from collections import Counter

import torch

PARTS = ("forward", "grad_input", "grad_weight")


def wrong_parts(batch: int, c_in: int, c_out: int, sides: tuple[int, ...], channels_last: bool,
                dtype: torch.dtype) -> set[str]:
    """The parts of the convolution of these sizes in ``dtype`` that were wrong in any of 5 calls."""
    dims = len(sides)
    go = torch.randn(batch, c_out, *sides).to(dtype)
    x = torch.relu(torch.randn(batch, c_in, *sides)).to(dtype)
    w = torch.randn(c_out, c_in, *([3] * dims)).to(dtype)
    if channels_last:
        layout = torch.channels_last_3d if dims == 3 else torch.channels_last
        go, x, w = (t.contiguous(memory_format=layout) for t in (go, x, w))
    args = (None, [1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1, [True, True, False])
    conv = torch.nn.functional.conv3d if dims == 3 else torch.nn.functional.conv2d

    def results(go, x, w):
        return (conv(x, w, padding=1), *torch.ops.aten.convolution_backward(go, x, w, *args)[:2])
    exact = results(go.double(), x.double(), w.double())
    wrong = set()
    for _ in range(5):
        junk = [torch.full((1 << random.randint(8, 18),), float("nan")) for _ in range(3)]
        del junk
        for part, got, want in zip(PARTS, results(go, x, w), exact):
            if not ((got.double() - want).norm() / want.norm()).item() <= 0.05:
                wrong.add(part)
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    shapes, wrong = Counter(), Counter()
    for _ in range(args.shapes):
        sides = tuple(random.choice([1, 2, 2, 3, 4, 5, 7, 9]) for _ in range(random.choice([2, 3, 3, 3])))
        group = (f"{len(sides)}-D", "a side of 2" if 2 in sides else "no side of 2")
        shapes[group] += 1
        for part in wrong_parts(random.choice([1, 2, 3, 4]), random.choice([4, 8, 16, 40, 96]),
                                random.choice([4, 8, 12, 32]), sides, random.random() < 0.7,
                                getattr(torch, args.dtype)):
            wrong[group + (part,)] += 1
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.dtype}")
    for group in sorted(shapes):
        print(f"{group[0]}, {group[1]}: {shapes[group]} shapes; wrong: "
              + ", ".join(f"{part} {wrong[group + (part,)]}" for part in PARTS))


if __name__ == "__main__":
    main()
