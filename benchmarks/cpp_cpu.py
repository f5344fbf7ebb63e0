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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast import cli  # noqa: E402
from densenet_fast.bench import common  # noqa: E402

# name -> (the preset's options, the name of its JSON in benchmarks/results/ where no --out is given)
PRESETS = {
    "models": (["--model", "densenet_bc-100", "--growth-rate", "12", "--batch", "64", "--image-size", "32",
                "--impls", "tv-eager", "fast-torch-keep", "fast-cpp-keep", "--threads", "1", "--budget-gib", "0"],
               "cpp_cpu_models.json"),
    "kernels": (["--device", "cpu", "--backends", "cpp", "torch", "--batch-bc", "64"], "cpp_cpu_kernels.json"),
}


def main(argv: list[str]) -> int:
    """``bench <preset>`` with the preset's options, then ``argv``'s: its exit status."""
    if argv[:1] not in ([name] for name in PRESETS):
        sys.exit(f"usage: python benchmarks/cpp_cpu.py {{{','.join(PRESETS)}}} [options]")
    options, name = PRESETS[argv[0]]
    return cli.main(["bench", argv[0], *options, *common.out_unless_given(argv, name), *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
