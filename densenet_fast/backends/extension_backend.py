"""Backends on the csrc extension's torch ops (``torch.ops.densenet_fast``).

Every BN backward runs as two ops with the ``batch_mean`` hook between them
(backends.interface): pass 1 (``*_backward_sums``) forms ``dA`` tile by tile,
writes or adds ``scale * dA`` into ``grad_x`` and returns the local sums
``[sum dA, sum dA * xhat]``; pass 2 (``bn_backward_finish``) adds the
statistics terms ``-scale * (mean(dA) + xhat * mean(dA * xhat))``.  In eval
mode (``batch_mean is None``) there is no pass 2.

The fused ops take float32, float64 and bfloat16 data, and on the CPU float16
too; other dtypes run the torch backend's implementation.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from .interface import Stats
from .torch_backend import TorchBackend, stats_dtype

ops = torch.ops.densenet_fast


def native_only(takes: Callable[[TorchBackend, Tensor], bool]):
    """A decorator: run the primitive where its kernels take ``x``
    (``takes(self, x)``), TorchBackend's primitive of the same name otherwise."""
    def decorate(method):
        fallback = getattr(TorchBackend, method.__name__)

        @functools.wraps(method)
        def primitive(self, x, *args, **kwargs):
            return (method if takes(self, x) else fallback)(self, x, *args, **kwargs)

        return primitive

    return decorate


# for the dtypes of the backend's kernels (``self.native_dtypes``); TorchBackend's primitive for others
native_dtypes_only = native_only(lambda backend, x: x.dtype in backend.native_dtypes)


def finish_bn_backward(x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, sums: Tensor, grad_x: Tensor,
                       batch_mean: Optional[Callable[[Tensor], Tensor]]) -> tuple[Tensor, Tensor]:
    """Pass 2 of the BN backward for rows ``x``, ``grad_x`` ``(M, C)`` after pass 1
    left ``scale * dA`` in ``grad_x`` and returned ``sums (2, C)``; returns
    ``(grad_gamma, grad_beta)``."""
    if batch_mean is not None:
        ops.bn_backward_finish(x, scale, mean, rstd, batch_mean(sums), grad_x)
    return sums[1], sums[0]


class ExtensionStatsBackend(TorchBackend):
    """The torch backend with the extension's channel statistics (CPU and CUDA kernels)."""

    def channel_stats(self, x: Tensor) -> Stats:
        # Sums of values shifted by the first row keep E[x^2] - E[x]^2 stable.  The shift
        # must be finite: then the mean is +-Inf or NaN and the variance NaN exactly where
        # torch's are (a non-finite value in the channel).
        shift = x[0].to(torch.float64).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        total, total_sq = ops.channel_stats(x, shift)
        m = x.shape[0]
        delta = total / m
        mean = shift + delta
        var = (total_sq / m - delta * delta).clamp_(min=0)
        dtype = stats_dtype(x.dtype)
        return mean.to(dtype), var.to(dtype)


class CppBackend(ExtensionStatsBackend):
    """The C++ CPU kernels (tiled over pixels, ATen BLAS, ATen parallel_for)."""

    name = "cpp"
    native_dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    @native_dtypes_only
    def bn_relu_conv1x1(self, x, scale, shift, weight, out, with_stats):
        stats = ops.bn_relu_conv1x1(x, scale, shift, weight, out, with_stats)
        return stats if with_stats else None

    @native_dtypes_only
    def bn_relu_conv1x1_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        grad_weight, sums = ops.bn_relu_conv1x1_backward_sums(x, scale, shift, mean, rstd, weight, grad_out, grad_x)
        return (grad_weight, *finish_bn_backward(x, scale, mean, rstd, sums, grad_x, batch_mean))

    @native_dtypes_only
    def bn_relu(self, x, scale, shift, out):
        ops.bn_relu(x, scale, shift, out)

    @native_dtypes_only
    def bn_relu_backward(self, x, scale, shift, mean, rstd, grad_z, grad_x, batch_mean):
        sums = ops.bn_relu_backward_sums(x, scale, shift, mean, rstd, grad_z, grad_x)
        return finish_bn_backward(x, scale, mean, rstd, sums, grad_x, batch_mean)

    @native_dtypes_only
    def transition(self, x, scale, shift, weight, out):
        ops.transition(x, scale, shift, weight, out)

    @native_dtypes_only
    def transition_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        grad_weight, sums = ops.transition_backward_sums(x, scale, shift, mean, rstd, weight, grad_out, grad_x)
        c = x.shape[-1]
        return (grad_weight, *finish_bn_backward(x.view(-1, c), scale, mean, rstd, sums, grad_x.view(-1, c),
                                                 batch_mean))


class CudaBackend(ExtensionStatsBackend):
    """The extension's CUDA kernels: channel statistics, BN-ReLU and its
    backward; the GEMM primitives are the torch backend's."""

    name = "cuda"
    native_dtypes = (torch.float32, torch.float64, torch.bfloat16)
    bn_relu = CppBackend.bn_relu
    bn_relu_backward = CppBackend.bn_relu_backward
