"""Where a training step of densenet_fast.monai's 3-D DenseNet-121 peaks: the
anonymous resident memory now and the peak of each phase since the previous
mark, above the memory worker's baseline (warm-up step, heap trimmed),
MiB, for two steps.

    python benchmarks/monai_step_phases.py [--size 64x128x128] [--policy recompute]

Two volumes, one input channel, 2 classes, C++ backend, the SGD recipe, as
``benchmarks/monai_volumes.py`` measures them.  The marks: the forward starts
(after ``zero_grad``), the stem's forward ends (``pool0``), the forward ends,
the stem's backward starts (the gradient of ``pool0``'s output), its
``norm0``, ``relu0`` and ``pool0`` backward ends (the gradient of ``conv0``'s
output), backward ends, the optimizer's update ends (docs/performance.md,
"MONAI volumes").  The stem's marks wrap the fused BN-ReLU-max-pool
(``engine.stem``): a hook on ``norm0``, ``relu0`` or ``pool0`` would make the
three run as modules."""

import argparse

from densenet_fast import memory
from densenet_fast.bench import common, harness, monai_impls, worker
from densenet_fast.bench.common import MIB
from densenet_fast.engine import stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="64x128x128", help="DxHxW of the volumes")
    parser.add_argument("--policy", default="recompute", choices=["keep", "recompute"])
    args = parser.parse_args()
    size = [int(side) for side in args.size.split("x")]
    spec = {"impls": [f"fast-cpp-{args.policy}"], "model": monai_impls.parse("monai-densenet121", size).to_dict(),
            "batch": 2, "image_size": size, "device": "cpu", "dtype": "float32", "optimizer": "sgd",
            "warmup_batch": 2, "malloc_mmap_threshold": harness.MMAP_THRESHOLD}
    memory.set_mmap_threshold(spec["malloc_mmap_threshold"])
    step = worker.warmed_up_step(spec)
    baseline = common.current_anon_bytes()

    def mark(phase: str):
        def report(*_) -> None:
            print(f"{phase:<26} now {(common.current_anon_bytes() - baseline) / MIB:7.1f}  "
                  f"peak since the last mark {(sampler.restart() - baseline) / MIB:7.1f}", flush=True)
        return report

    def on_gradient(phase: str):
        def hook(module, inputs, output) -> None:  # marks when backward reaches the output's gradient
            output.register_hook(mark(phase))
        return hook

    features = step.model.features
    features.conv0.register_forward_pre_hook(mark("forward starts"))
    fused_stem = stem.norm_relu_max_pool

    def marked_stem(norm, x):
        out = fused_stem(norm, x)
        mark("stem forward ends")()
        on_gradient("stem backward starts")(None, None, out)
        return out

    stem.norm_relu_max_pool = marked_stem
    step.model.register_forward_hook(mark("forward ends"))
    features.conv0.register_forward_hook(on_gradient("pool0-norm0 backward ends"))
    step.optimizer.register_step_pre_hook(mark("backward ends"))
    step.optimizer.register_step_post_hook(mark("optimizer ends"))
    with common.AnonPeakSampler() as sampler:
        for _ in range(2):
            step()


if __name__ == "__main__":
    main()
