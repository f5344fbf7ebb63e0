"""Builds densenet_fast with its extension densenet_fast._C from csrc/.

The C++ (CPU) kernels are always built.  The CUDA kernels (csrc/**/*.cu) are
built when torch is a CUDA build and a usable CUDA toolkit is found: nvcc,
cuda_runtime.h and libcudart of torch's CUDA major version, in CUDA_HOME (or
CUDA_PATH) when that is set, else in the toolkit of the `nvcc` on PATH (asked
of nvcc itself, so that a wrapper script outside the toolkit works), else in
/usr/local/cuda.  Without one, the C++ kernels alone are built and a one-line
message says why.  DENSENET_FAST_CUDA=1 requires the CUDA kernels (and fails,
saying why, when they cannot be built), =0 skips them.

TORCH_CUDA_ARCH_LIST chooses the GPU architectures; without it torch compiles
for the GPUs it sees, and where it sees none, for the architectures this torch
was built for that nvcc can compile (PTX for the newest).
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def run_nvcc(nvcc: Path, *args: str) -> str:
    """nvcc's output (stdout and stderr) for ``args``; raises if it fails."""
    result = subprocess.run([str(nvcc), *args], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout + result.stderr


def nvcc_toolkit(nvcc: Path) -> Path:
    """The toolkit that the nvcc command ``nvcc`` runs: nvcc states it (``TOP``) in
    its dry-run output, also when ``nvcc`` is a wrapper script outside the toolkit."""
    try:
        match = re.search(r"^#\$ TOP=(.+)$", run_nvcc(nvcc, "--dryrun", "-E", "-x", "cu", os.devnull), re.M)
    except (OSError, subprocess.SubprocessError):
        match = None
    return Path(match.group(1).strip()).resolve() if match else nvcc.resolve().parent.parent


def toolkit_problem(root: Path) -> Optional[str]:
    """Why torch cannot build CUDA code with the toolkit at ``root``, or None."""
    # torch links against lib64, or lib where there is no lib64.
    lib = root / "lib64" if (root / "lib64").exists() else root / "lib"
    for path in (root / "bin" / "nvcc", root / "include" / "cuda_runtime.h", lib / "libcudart.so"):
        if not path.exists():
            return f"{path} not found"
    try:
        release = re.search(r"release (\d+)\.(\d+)", run_nvcc(root / "bin" / "nvcc", "--version"))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{root / 'bin' / 'nvcc'} --version failed ({exc})"
    if release is None or release.group(1) != torch.version.cuda.split(".")[0]:
        found = f"CUDA {release.group(1)}.{release.group(2)}" if release else "an unknown CUDA version"
        return f"{root} has {found}, torch was built with CUDA {torch.version.cuda}"
    return None


def find_cuda_toolkit(environ: Mapping[str, str]) -> tuple[Optional[Path], str]:
    """``(root, "")`` of the CUDA toolkit to build with (see the module docstring),
    or ``(None, why there is none)``."""
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        candidates = [Path(explicit)]
    else:
        nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
        candidates = [nvcc_toolkit(Path(nvcc))] if nvcc else []
        candidates.append(DEFAULT_CUDA_HOME)
    problems = []
    for root in candidates:
        problem = toolkit_problem(root)
        if problem is None:
            return root.resolve(), ""
        problems.append(problem)
    return None, "; ".join(problems)


def arch_version(name: str, prefix: str) -> Optional[str]:
    """'9.0' for 'sm_90' (prefix 'sm_'), '10.0' for 'compute_100'; None for other names."""
    match = re.fullmatch(prefix + r"(\d+)(\d)", name)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def version_key(arch: str) -> tuple[int, ...]:
    return tuple(map(int, arch.split(".")))


def default_cuda_arch_list(nvcc: Path) -> str:
    """TORCH_CUDA_ARCH_LIST for a machine without a visible GPU: the architectures
    this torch was built for that ``nvcc`` can compile (else nvcc's oldest), PTX
    for the newest, so that the extension runs wherever this torch does."""
    nvcc_archs = {arch_version(name, "compute_") for name in run_nvcc(nvcc, "--list-gpu-arch").split()} - {None}
    torch_archs = {arch_version(name, "sm_") for name in torch.cuda.get_arch_list()}
    archs = sorted(torch_archs & nvcc_archs, key=version_key) or [min(nvcc_archs, key=version_key)]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


@dataclass
class CudaBuild:
    toolkit: Path
    arch_list: Optional[str]  # None: torch's choice (the visible GPUs, or TORCH_CUDA_ARCH_LIST)


def cuda_build(environ: Mapping[str, str]) -> Optional[CudaBuild]:
    """How to build the CUDA kernels, or None to build the C++ kernels alone
    (with a one-line message); raises where DENSENET_FAST_CUDA=1 cannot be met."""
    setting = environ.get("DENSENET_FAST_CUDA", "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"DENSENET_FAST_CUDA must be 0 or 1, got {setting!r}")
    if setting == "0":
        print("densenet_fast: building the C++ kernels only (DENSENET_FAST_CUDA=0)")
        return None
    if torch.version.cuda is None:
        toolkit, problem = None, f"torch {torch.__version__} is not a CUDA build"
    else:
        toolkit, problem = find_cuda_toolkit(environ)
    if toolkit is None:
        if setting == "1":
            raise RuntimeError(f"DENSENET_FAST_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        print(f"densenet_fast: building the C++ kernels only, no usable CUDA toolkit ({problem})")
        return None
    no_gpu = not environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0
    return CudaBuild(toolkit, default_cuda_arch_list(toolkit / "bin" / "nvcc") if no_gpu else None)


def main() -> None:
    cuda = cuda_build(os.environ)
    if cuda is not None:
        os.environ["CUDA_HOME"] = str(cuda.toolkit)
        if cuda.arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = cuda.arch_list
        print(f"densenet_fast: building the C++ and CUDA kernels (CUDA toolkit {cuda.toolkit}, architectures "
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST') or 'of the visible GPUs'})")
    # Imported only now: it reads CUDA_HOME when it is first imported.
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build, with the object files always in build/temp: pip's
        editable installs would otherwise compile in a fresh temporary directory, so
        `pip install -e .` and `setup.py build_ext --inplace` share what is compiled."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / "temp")

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
    # Compile time (docs/cpp.md, "Compile time"): ATen's per-operator headers only (including ATen/ATen.h is then
    # an error), and no debug information (Python's CFLAGS carry -g: 2.4x the time of a file).
    macros = [("TORCH_ASSERT_ONLY_METHOD_OPERATORS", None)]
    compile_args = {"cxx": ["-O3", "-g0", "-fopenmp"]}
    if cuda is None:
        extension = cpp_extension.CppExtension("densenet_fast._C", sources, define_macros=macros,
                                               extra_compile_args=compile_args, extra_link_args=["-fopenmp"])
    else:
        sources += sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu"))
        compile_args["nvcc"] = ["-O3"]
        extension = cpp_extension.CUDAExtension("densenet_fast._C", sources,
                                                define_macros=macros + [("WITH_CUDA", None)],
                                                extra_compile_args=compile_args, extra_link_args=["-fopenmp"])
    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


if __name__ == "__main__":
    main()
