"""CPU seconds of ``import densenet_fast`` and of each of four SGD training steps.

    PYTHONPATH=CHECKOUT python benchmarks/step_time.py {densenet121,bc100} [--threads N]

Imports densenet_fast from ``CHECKOUT``, so that two revisions can be compared
with the same script, run alternately (docs/performance.md, "Before and after").
densenet121: batch 8, 96x96, 10 classes; bc100: DenseNet-BC-100 (k=12), batch
32, 32x32.  CPU time (``time.process_time``), not wall time: on a shared
machine it is the steadier of the two, with one thread.
"""

import argparse
import time

t0 = time.process_time()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import densenet_fast  # noqa: E402

IMPORT_SECONDS = time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["densenet121", "bc100"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "bc100":
        model, x = densenet_fast.densenet_bc(depth=100, growth_rate=12, num_classes=10), torch.randn(32, 3, 32, 32)
    else:
        model, x = densenet_fast.densenet121(num_classes=10), torch.randn(8, 3, 96, 96)
    target = torch.randint(10, (x.shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = []
    for _ in range(4):
        start = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        steps.append(time.process_time() - start)
    print(f"{densenet_fast.__file__}: import {IMPORT_SECONDS:.2f} s CPU; steps (s CPU): "
          + " ".join(f"{s:.2f}" for s in steps))


if __name__ == "__main__":
    main()
