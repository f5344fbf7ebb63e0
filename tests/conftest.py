"""Shared test configuration: the ``gpu`` marker and the ``device`` fixture."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton backend runs in Triton's interpreter, which must
    # be chosen before anything imports triton (tests/test_triton_ops.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Runs a test on the CPU and, when a GPU is present, on CUDA (``-m gpu`` selects the CUDA runs)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return request.param
