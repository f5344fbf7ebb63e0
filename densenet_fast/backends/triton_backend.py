"""The Triton backend: the primitives of :mod:`.interface` as fused Triton
kernels (:mod:`densenet_fast.backends.triton_kernels`; designs in docs/triton.md),
called through their torch ops (``torch.ops.densenet_fast_triton``).  Each BN
backward is two ops with the ``batch_mean`` hook between them, as on the
extension backend (a Python callable cannot cross an op): ``*_backward_sums``
(the reduce pass: the ``dW`` partials and the sums ``[sum dA, sum dA * xhat]``),
then ``*_backward_finish`` (the dx pass, which also sums the ``dW`` partials).

Runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
The kernels take fp32, fp16 and bf16 data; other dtypes (fp64) run the torch
backend's primitives, as the cpp backend does for the dtypes its kernels lack.
The transition kernels pool 2-D images; 1-D and 3-D transitions run the torch
backend's primitive too (the row primitives serve every number of spatial
dimensions).
BN coefficients and statistics are fp32.  No kernel adds values atomically
(the only atomics are arrival counters that pick which program reduces the
partials, in a fixed order), and unless
autotuning is switched on (``DENSENET_FAST_AUTOTUNE=1``, ignored under
``torch.use_deterministic_algorithms(True)``) each kernel's configuration
depends only on the shapes, dtype and device, so results are bit-identical
run to run.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import triton_kernels  # noqa: F401  (registers the ops)
from .triton_kernels.common import DATA_DTYPES
from .extension_backend import native_dtypes_only, native_only
from .interface import Stats
from .torch_backend import TorchBackend

ops = torch.ops.densenet_fast_triton

# x (N, H, W, C) of a 2-D transition in a dtype of the kernels
native_images_only = native_only(lambda backend, x: x.dtype in backend.native_dtypes and x.dim() == 4)
NO_UPDATE = (None, None, None, None, 0)  # fold_batchnorm's running-statistics arguments without an update


def batch_means(sums: Tensor, batch_mean: Optional[Callable[[Tensor], Tensor]]) -> Optional[Tensor]:
    """The hook between the backward's two ops: pass 1's sums as means over the
    batch, or None with running statistics (interface.py)."""
    return batch_mean(sums) if batch_mean is not None else None


class TritonBackend(TorchBackend):
    """Every primitive is one op, or (the backward ones) two, of
    ``torch.ops.densenet_fast_triton``, so torch.compile and opcheck see what runs."""

    name = "triton"
    native_dtypes = DATA_DTYPES

    @native_dtypes_only
    def fold_batchnorm(self, mean, var, weight, bias, eps, update, out=None):
        args = (mean, var, weight, bias, eps, *(update if update is not None else NO_UPDATE))
        if out is None:
            return ops.fold_batchnorm(*args)
        ops.fold_batchnorm_into(out, *args)
        return out

    @native_dtypes_only
    def channel_stats(self, x: Tensor) -> Stats:
        return ops.channel_stats(x)

    @native_dtypes_only
    def bn_relu_conv1x1(self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                        with_stats: bool) -> Optional[Stats]:
        stats = ops.bn_relu_conv1x1(x, scale, shift, weight, out, with_stats)
        return stats if with_stats else None

    @native_dtypes_only
    def bn_relu_conv1x1_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        dw_partials, sums = ops.bn_relu_conv1x1_backward_sums(x, scale, shift, mean, rstd, weight, grad_out)
        grad_weight = ops.bn_relu_conv1x1_backward_finish(x, scale, shift, mean, rstd, weight, grad_out, dw_partials,
                                                          batch_means(sums, batch_mean), grad_x)
        return grad_weight, sums[1], sums[0]

    @native_dtypes_only
    def bn_relu(self, x, scale, shift, out):
        ops.bn_relu(x, scale, shift, out)

    @native_dtypes_only
    def bn_relu_backward(self, x, scale, shift, mean, rstd, grad_z, grad_x, batch_mean):
        sums = ops.bn_relu_backward_sums(x, scale, shift, mean, rstd, grad_z)
        ops.bn_relu_backward_finish(x, scale, shift, mean, rstd, grad_z, batch_means(sums, batch_mean), grad_x)
        return sums[1], sums[0]

    @native_images_only
    def transition(self, x, scale, shift, weight, out):
        ops.transition(x, scale, shift, weight, out)

    @native_images_only
    def transition_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        dw_partials, sums = ops.transition_backward_sums(x, scale, shift, mean, rstd, weight, grad_out)
        grad_weight = ops.transition_backward_finish(x, scale, shift, mean, rstd, weight, grad_out, dw_partials,
                                                     batch_means(sums, batch_mean), grad_x)
        return grad_weight, sums[1], sums[0]
