"""Shared test configuration: the ``gpu`` marker, the ``device`` fixture and
``--shard I/N`` (parallel test processes, as benchmarks/gpu_check.sh runs them)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton backend runs in Triton's interpreter, which must
    # be chosen before anything imports triton (tests/test_triton_ops.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the selected tests I, I+N, I+2N, ... (0 <= I < N), so that N processes share them")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    index, count = (int(part) for part in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {shard}: need 0 <= I < N")
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = items[index::count]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Runs a test on the CPU and, when a GPU is present, on CUDA (``-m gpu`` selects the CUDA runs)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return request.param


@pytest.fixture
def nan_filled_fresh_memory():
    """Deterministic algorithms on: torch then fills every fresh ``torch.empty``
    with NaN, on the CPU too, so a kernel that reads memory nobody wrote fails
    (warn only: some torchvision ops on CUDA lack a deterministic implementation)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture
def no_tf32(monkeypatch):
    """Exact fp32 GEMMs and convolutions on the GPU, so that fp32 tolerances can be tight."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)
