"""Backends on the csrc extension's torch ops (``torch.ops.densenet_fast``).

Primitives the extension does not implement yet come from the torch backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .interface import Stats
from .torch_backend import TorchBackend, stats_dtype


class CppBackend(TorchBackend):
    """The C++ CPU kernels (OpenMP / ATen parallel_for)."""

    name = "cpp"

    def channel_stats(self, x: Tensor) -> Stats:
        # Sums of values shifted by the first row keep E[x^2] - E[x]^2 stable.
        shift = x[0].to(torch.float64)
        total, total_sq = torch.ops.densenet_fast.channel_sums(x, shift)
        m = x.shape[0]
        delta = total / m
        mean = shift + delta
        var = (total_sq / m - delta * delta).clamp_(min=0)
        dtype = stats_dtype(x.dtype)
        return mean.to(dtype), var.to(dtype)


class CudaBackend(CppBackend):
    """The extension's CUDA kernels (same ops, CUDA dispatch)."""

    name = "cuda"
