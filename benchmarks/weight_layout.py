"""Training-step time with the dense layers' 3x3 (3x3x3) weights stored
channels-last against contiguous, in one process, alternating the layout
(docs/performance.md, "Weight layout").

    python benchmarks/weight_layout.py bc100 --repeats 4

Models: ``bc100`` (DenseNet-BC-100, k=12, `keep`, 64 images of 32x32),
``densenet121`` (`keep`, 4 images of 224x224), ``monai3d`` (MONAI's 3-D
DenseNet-121, `recompute`, one 64^3 volume); the default backend (cpp on the CPU), SGD with momentum,
2 threads.  Each repeat times two steps in each layout (the order alternating
between repeats) after one untimed step; prints the medians in seconds.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

import densenet_fast
from densenet_fast import monai
from densenet_fast.engine import fastpath

MODELS = {
    "bc100": lambda: (densenet_fast.densenet_bc(100, 12, recompute="keep"), (64, 3, 32, 32), 10),
    "densenet121": lambda: (densenet_fast.densenet121(num_classes=10, recompute="keep"), (4, 3, 224, 224), 10),
    "monai3d": lambda: (monai.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, recompute="recompute"),
                        (1, 1, 64, 64, 64), 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, shape, classes = MODELS[args.model]()
    x, y = torch.randn(shape), torch.randint(0, classes, shape[:1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    weights = [fastpath.dense_layer_parts(layer).conv2.weight for block in model.blocks() for layer in block.children()]
    channels_last = torch.channels_last if len(shape) == 4 else torch.channels_last_3d

    def use(layout: str) -> None:
        for w in weights:
            w.data = w.data.contiguous(memory_format=channels_last if layout == "channels_last" else
                                       torch.contiguous_format)
        optimizer.state.clear()  # momentum buffers in the new layout

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times = {"channels_last": [], "contiguous": []}
    for layout in times:
        use(layout)
        step()
    for repeat in range(args.repeats):
        for layout in (list(times) if repeat % 2 == 0 else list(reversed(times))):
            use(layout)
            step()
            start = time.perf_counter()
            step()
            step()
            times[layout].append((time.perf_counter() - start) / 2)
    medians = {layout: statistics.median(t) for layout, t in times.items()}
    print(f"{args.model}: step s, median of {args.repeats}: channels-last {medians['channels_last']:.4f}, "
          f"contiguous {medians['contiguous']:.4f}, contiguous / channels-last "
          f"{medians['contiguous'] / medians['channels_last']:.3f} ({len(weights)} weights)")


if __name__ == "__main__":
    main()
