"""setup.py's choice of how to build the extension: which CUDA toolkit (a
wrapper `nvcc` on PATH, a toolkit without libcudart), whether to build the CUDA
kernels at all, and the GPU architectures without a visible GPU.  Fake toolkits
(shell scripts in place of nvcc) make these tests run anywhere; the full builds
are too slow for the test suite (docs/cpp.md gives the commands to run them)."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_setup():
    """setup.py as a module (its `main()`, which builds, runs only as a script)."""
    spec = importlib.util.spec_from_file_location("densenet_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = load_setup()
TORCH_CUDA = torch.version.cuda or "13.0"


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_toolkit(root: Path, release: str = TORCH_CUDA, libcudart: bool = True) -> Path:
    """A CUDA toolkit tree whose nvcc answers --version, --dryrun and --list-gpu-arch."""
    write_script(root / "bin" / "nvcc", f"""
case "$*" in
  *--version*) echo "Cuda compilation tools, release {release}, V{release}.1" ;;
  *--dryrun*) echo '#$ _HERE_={root}/bin' >&2; echo '#$ TOP={root}/bin/..' >&2 ;;
  *--list-gpu-arch*) printf 'compute_75\\ncompute_80\\ncompute_90\\n' ;;
esac
""")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").touch()
    (root / "lib64").mkdir()
    if libcudart:
        (root / "lib64" / "libcudart.so").touch()
    return root


def nvcc_wrapper(directory: Path, nvcc: Path) -> Path:
    """A directory holding an `nvcc` script that runs ``nvcc`` (as /usr/local/bin/nvcc does on some machines)."""
    write_script(directory / "nvcc", f'exec {nvcc} "$@"\n')
    return directory


@pytest.fixture
def no_default_toolkit(monkeypatch, tmp_path):
    """No toolkit at the default location, so that only the tests' toolkits are
    found, and torch's CUDA version that of a CUDA build also where torch is a
    CPU build (which has none: setup.py then never looks for a toolkit)."""
    monkeypatch.setattr(setup_py, "DEFAULT_CUDA_HOME", tmp_path / "no-cuda-here")
    monkeypatch.setattr(torch.version, "cuda", TORCH_CUDA)


def test_toolkit_of_an_nvcc_wrapper_outside_it(tmp_path, no_default_toolkit):
    toolkit = fake_toolkit(tmp_path / "cuda-x")
    wrapper_bin = nvcc_wrapper(tmp_path / "wrappers", toolkit / "bin" / "nvcc")
    # torch's guess would be the wrapper's parent directory (tmp_path), which has no lib64/libcudart.so.
    assert setup_py.find_cuda_toolkit({"PATH": str(wrapper_bin)}) == (toolkit.resolve(), "")


def test_cuda_home_wins_and_must_be_usable(tmp_path, no_default_toolkit):
    usable = fake_toolkit(tmp_path / "usable")
    no_runtime = fake_toolkit(tmp_path / "no-runtime", libcudart=False)
    path = str(nvcc_wrapper(tmp_path / "wrappers", usable / "bin" / "nvcc"))
    assert setup_py.find_cuda_toolkit({"PATH": path, "CUDA_HOME": str(usable)}) == (usable.resolve(), "")
    toolkit, problem = setup_py.find_cuda_toolkit({"PATH": path, "CUDA_HOME": str(no_runtime)})
    assert toolkit is None and "libcudart.so not found" in problem


def test_toolkit_of_another_cuda_major_is_not_usable(tmp_path, no_default_toolkit):
    other = f"{int(TORCH_CUDA.split('.')[0]) - 1}.8"
    toolkit, problem = setup_py.find_cuda_toolkit({"CUDA_HOME": str(fake_toolkit(tmp_path / "old", release=other))})
    assert toolkit is None and f"has CUDA {other}" in problem


def test_no_usable_toolkit_builds_the_cpp_kernels_with_one_line(tmp_path, capsys, no_default_toolkit):
    environ = {"PATH": str(tmp_path), "CUDA_HOME": str(fake_toolkit(tmp_path / "cuda", libcudart=False))}
    assert setup_py.cuda_build(environ) is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "C++ kernels only" in lines[0] and "libcudart.so" in lines[0]
    with pytest.raises(RuntimeError, match="DENSENET_FAST_CUDA=1 but the CUDA kernels cannot be built: .*libcudart"):
        setup_py.cuda_build({**environ, "DENSENET_FAST_CUDA": "1"})
    assert setup_py.cuda_build({"PATH": str(tmp_path), "DENSENET_FAST_CUDA": "0"}) is None
    with pytest.raises(ValueError, match="must be 0 or 1"):
        setup_py.cuda_build({"DENSENET_FAST_CUDA": "yes"})


def test_a_cpu_build_of_torch_builds_the_cpp_kernels_with_one_line(tmp_path, capsys, monkeypatch):
    """Even beside a usable toolkit: torch has no CUDA to build against."""
    monkeypatch.setattr(torch.version, "cuda", None)
    environ = {"CUDA_HOME": str(fake_toolkit(tmp_path / "cuda", release="13.0"))}
    assert setup_py.cuda_build(environ) is None
    assert capsys.readouterr().out == (f"densenet_fast: building the C++ kernels only, no usable CUDA toolkit "
                                       f"(torch {torch.__version__} is not a CUDA build)\n")
    with pytest.raises(RuntimeError, match="DENSENET_FAST_CUDA=1 but .* is not a CUDA build"):
        setup_py.cuda_build({**environ, "DENSENET_FAST_CUDA": "1"})


def test_architectures_without_a_visible_gpu(tmp_path, monkeypatch, no_default_toolkit):
    """torch's own choice raises IndexError without a GPU; the default is torch's
    architectures that nvcc compiles (the fake nvcc: 7.5, 8.0, 9.0), PTX for the newest."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_86", "sm_90", "sm_100"])
    toolkit = fake_toolkit(tmp_path / "cuda")
    build = setup_py.cuda_build({"PATH": str(nvcc_wrapper(tmp_path / "wrappers", toolkit / "bin" / "nvcc"))})
    assert build.toolkit == toolkit.resolve() and build.arch_list == "7.5;9.0+PTX"
    assert setup_py.cuda_build({"CUDA_HOME": str(toolkit), "TORCH_CUDA_ARCH_LIST": "8.0"}).arch_list is None
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    assert setup_py.default_cuda_arch_list(toolkit / "bin" / "nvcc") == "7.5+PTX"


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
def test_default_architectures_are_valid_for_torch(tmp_path, monkeypatch):
    """The default list goes through torch's own parsing into -gencode flags."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_py.default_cuda_arch_list(
        fake_toolkit(tmp_path / "cuda") / "bin" / "nvcc"))
    flags = cpp_extension._get_cuda_arch_flags()
    assert flags and all(flag.startswith("-gencode=arch=compute_") for flag in flags)


@pytest.mark.skipif(not (Path("/usr/local/cuda/bin/nvcc").exists() and torch.version.cuda),
                    reason="no CUDA toolkit in /usr/local/cuda")
def test_real_toolkit_behind_a_wrapper(tmp_path, no_default_toolkit):
    """The real nvcc behind a wrapper script in another directory: found by asking nvcc."""
    toolkit, problem = setup_py.find_cuda_toolkit(
        {"PATH": str(nvcc_wrapper(tmp_path / "wrappers", Path("/usr/local/cuda/bin/nvcc")))})
    assert toolkit == Path("/usr/local/cuda").resolve(), problem
