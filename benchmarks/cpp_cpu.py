"""The C++ CPU backend at DenseNet-BC-100 (k=12), batch 64, 32x32 images: presets of the one harness.

    python benchmarks/cpp_cpu.py models [bench models options]    # step time side by side, peak memory per process
    python benchmarks/cpp_cpu.py kernels [bench kernels options]  # each primitive against its roofline bound

``models`` runs ``python -m densenet_fast bench models`` for torchvision eager
and densenet_fast on the torch and cpp backends, one thread each; ``kernels``
runs ``python -m densenet_fast bench kernels`` for the cpp and torch backends
at DenseNet-BC batch 64.  Options given after the preset's name override its
settings (``--help`` lists them).
"""

import sys

from densenet_fast.bench import kernels, models

PRESETS = {
    "models": (models.main, ["--model", "densenet_bc-100", "--growth-rate", "12", "--batch", "64", "--image-size",
                             "32", "--impls", "tv-eager", "fast-torch-keep", "fast-cpp-keep", "--threads", "1",
                             "--budget-gib", "0", "--out", "benchmarks/results/cpp_cpu_models.json"]),
    "kernels": (kernels.main, ["--device", "cpu", "--backends", "cpp", "torch", "--batch-bc", "64",
                               "--out", "benchmarks/results/cpp_cpu_kernels.json"]),
}

if __name__ == "__main__":
    if sys.argv[1:2] not in ([name] for name in PRESETS):
        sys.exit(f"usage: python benchmarks/cpp_cpu.py {{{','.join(PRESETS)}}} [options]")
    run, preset = PRESETS[sys.argv[1]]
    run(preset + sys.argv[2:])
