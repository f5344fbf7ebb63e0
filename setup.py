"""Builds densenet_fast with its extension densenet_fast._C from csrc/.

The C++ (CPU) kernels are always built.  The CUDA kernels (csrc/**/*.cu) are
built when a CUDA toolkit (CUDA_HOME) and a CUDA build of torch are present;
DENSENET_FAST_CUDA=1 forces them (and fails without a toolkit), =0 skips them.
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def want_cuda() -> bool:
    """Whether to compile the CUDA kernels (see the module docstring)."""
    setting = os.environ.get("DENSENET_FAST_CUDA", "").strip()
    toolkit_found = CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    torch_has_cuda = torch.version.cuda is not None
    if setting == "0":
        return False
    if setting == "1":
        if not (toolkit_found and torch_has_cuda):
            raise RuntimeError(f"DENSENET_FAST_CUDA=1 but the CUDA kernels cannot be built: CUDA_HOME={CUDA_HOME}, "
                               f"torch.version.cuda={torch.version.cuda}")
        return True
    if setting:
        raise ValueError(f"DENSENET_FAST_CUDA must be 0 or 1, got {setting!r}")
    return toolkit_found and torch_has_cuda


class BuildExtension(cpp_extension.BuildExtension):
    """torch's ninja build, with the object files always in build/temp: pip's
    editable installs would otherwise compile in a fresh temporary directory, so
    `pip install -e .` and `setup.py build_ext --inplace` share what is compiled."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / "temp")


def extension():
    """The one extension module densenet_fast._C."""
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    compile_args = {"cxx": ["-O3", "-fopenmp"]}
    if not want_cuda():
        print("densenet_fast: building the C++ extension without CUDA kernels")
        return CppExtension("densenet_fast._C", sources, extra_compile_args=compile_args,
                            extra_link_args=["-fopenmp"])
    print(f"densenet_fast: building the C++ extension with CUDA kernels (CUDA_HOME={CUDA_HOME})")
    sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
    compile_args["nvcc"] = ["-O3"]
    return CUDAExtension("densenet_fast._C", sources, define_macros=[("WITH_CUDA", None)],
                         extra_compile_args=compile_args, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
