"""Where a CPU training step's C heap goes: glibc's malloc counters at each
phase of several steps, set up as the memory worker sets up its measurement.

    python benchmarks/heap_phases.py fast-cpp-recompute 1000 1 --steps 4

DenseNet-BC of the given depth (k=12, 32x32, the SGD recipe, 2 threads) at the
given batch.  After the worker's warm-up and heap trim, prints
per step and phase (after zero_grad, after forward, after backward, after the
optimizer) the anonymous resident memory and its peak in that phase above the
baseline, ``mallinfo2``'s heap extent (``arena``), bytes in use
(``uordblks``) and free (``fordblks``), summed over glibc's arenas, and the
main arena's resident pages (the ``[heap]`` mapping's ``Rss``; other threads'
arenas are mappings of their own), in MiB (docs/memory.md, "The CPU allocator",
"What the heap adds").

``--flat-gradients``: every gradient is a view of one buffer made before the
baseline and zeroed in place (``zero_grad(set_to_none=False)``), so that no
gradient is freed or made again on the heap.
"""

import argparse

import torch

from densenet_fast import memory
from densenet_fast.bench import common, harness, worker
from densenet_fast.bench.common import MIB



def heap_resident_bytes() -> int:
    """Resident bytes of the main arena's heap (the ``[heap]`` mapping in /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        in_heap = False
        for line in f:
            if line.rstrip().endswith(" [heap]"):
                in_heap = True
            elif in_heap and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    return 0


def use_flat_gradients(step) -> None:
    """Make every parameter's gradient a zeroed view of one flat buffer that the
    optimizer's ``zero_grad`` keeps (backward then accumulates into it in place)."""
    params = list(step.model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].as_strided(p.shape, p.stride())  # p's layout
        offset += p.numel()
    zero_grad = step.optimizer.zero_grad
    step.optimizer.zero_grad = lambda set_to_none=True: zero_grad(set_to_none=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("impl", help="fast-cpp-keep, fast-cpp-recompute, ...")
    parser.add_argument("depth", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--flat-gradients", action="store_true")
    args = parser.parse_args()
    spec = {"impls": [args.impl], "model": {"name": "densenet_bc", "depth": args.depth, "growth_rate": 12},
            "batch": args.batch, "image_size": 32, "device": "cpu", "dtype": "float32", "optimizer": "sgd",
            "warmup_batch": min(2, args.batch), "malloc_mmap_threshold": harness.MMAP_THRESHOLD}
    memory.set_mmap_threshold(spec["malloc_mmap_threshold"])
    torch.set_num_threads(2)
    step = worker.warmed_up_step(spec)
    if args.flat_gradients:
        use_flat_gradients(step)
        memory.trim_heap()
    baseline = common.current_anon_bytes()

    def report(phase: str) -> None:
        info = memory.heap_info()
        print(f"{phase:<16} anon {(common.current_anon_bytes() - baseline) / MIB:+8.2f}  "
              f"peak {(sampler.restart() - baseline) / MIB:+8.2f}  heap {info.arena / MIB:8.2f}  "
              f"in use {info.uordblks / MIB:8.2f}  free {info.fordblks / MIB:7.2f}  "
              f"resident {heap_resident_bytes() / MIB:8.2f}", flush=True)

    step.model.register_forward_pre_hook(lambda *_: report("after zero_grad"))
    step.model.register_forward_hook(lambda *_: report("after forward"))
    step.optimizer.register_step_pre_hook(lambda *_: report("after backward"))
    step.optimizer.register_step_post_hook(lambda *_: report("after optimizer"))
    with common.AnonPeakSampler() as sampler:
        report("baseline")
        for _ in range(args.steps):
            step()


if __name__ == "__main__":
    main()
