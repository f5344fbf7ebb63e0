"""BatchNorm folding: ``(scale, shift, mean, rstd)`` per channel from the
statistics that normalise and the affine parameters, and, in a training
forward, the running statistics' update, in one launch instead of a dozen
small torch kernels (see ``RunningUpdate`` in
:mod:`densenet_fast.backends.interface` for the rules)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import Launcher, cdiv, custom_op

BLOCK_C = 256


@triton.jit
def _fold_kernel(mean_ptr, var_ptr,  # (C,) fp32: the statistics that normalise
                 weight_ptr, bias_ptr,  # (C,) any float dtype; unused without HAS_WEIGHT / HAS_BIAS
                 coeffs_ptr,  # (4, C) fp32 out: scale, shift, mean, rstd
                 running_mean_ptr, running_var_ptr,  # (C,) any float dtype, updated in place; UPDATE only
                 batches_ptr,  # () int64 num_batches_tracked, + 1; UPDATE only
                 C, eps, momentum, unbias,  # scalars; unbias = count / (count - 1)
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr,
                 CUMULATIVE: tl.constexpr,  # momentum None: factor 1 / batches (one program, see fold)
                 BLOCK_C: tl.constexpr):
    factor = momentum
    if UPDATE:
        batches = tl.load(batches_ptr) + 1  # read by every program before program 0 writes it (CUMULATIVE: one)
        if CUMULATIVE:
            factor = 1.0 / batches.to(tl.float32)
    for c0 in range(tl.program_id(0) * BLOCK_C, C, tl.num_programs(0) * BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        mask = channels < C
        mean = tl.load(mean_ptr + channels, mask=mask, other=0.0)
        var = tl.load(var_ptr + channels, mask=mask, other=0.0)
        rstd = tl.math.rsqrt(var + eps)
        scale = rstd
        if HAS_WEIGHT:
            scale = tl.load(weight_ptr + channels, mask=mask, other=0.0).to(tl.float32) * rstd
        shift = -mean * scale
        if HAS_BIAS:
            shift = tl.load(bias_ptr + channels, mask=mask, other=0.0).to(tl.float32) - mean * scale
        tl.store(coeffs_ptr + channels, scale, mask=mask)
        tl.store(coeffs_ptr + C + channels, shift, mask=mask)
        tl.store(coeffs_ptr + 2 * C + channels, mean, mask=mask)
        tl.store(coeffs_ptr + 3 * C + channels, rstd, mask=mask)
        if UPDATE:
            running_mean = tl.load(running_mean_ptr + channels, mask=mask, other=0.0).to(tl.float32)
            running_var = tl.load(running_var_ptr + channels, mask=mask, other=0.0).to(tl.float32)
            running_mean = running_mean * (1 - factor) + mean * factor
            running_var = running_var * (1 - factor) + var * unbias * factor
            tl.store(running_mean_ptr + channels, running_mean.to(running_mean_ptr.dtype.element_ty), mask=mask)
            tl.store(running_var_ptr + channels, running_var.to(running_var_ptr.dtype.element_ty), mask=mask)
    if UPDATE:
        if tl.program_id(0) == 0:
            tl.store(batches_ptr, batches)


_fold = Launcher(_fold_kernel, [triton.Config({}, num_warps=4)])


def _launch_fold(coeffs: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 num_batches_tracked: Optional[Tensor], momentum: Optional[float], count: int) -> None:
    """Fill ``coeffs`` ``(4, C)`` (fp32, contiguous); the arguments as :func:`fold_batchnorm`'s."""
    if coeffs.dtype != torch.float32 or not coeffs.is_contiguous() or coeffs.shape != (4, mean.shape[0]):
        raise ValueError(f"coeffs must be a contiguous fp32 (4, {mean.shape[0]}) tensor, got {coeffs.dtype} "
                         f"{tuple(coeffs.shape)} with strides {coeffs.stride()}")
    c = mean.shape[0]
    update = running_mean is not None
    cumulative = update and momentum is None
    # with momentum None every program reads num_batches_tracked before it changes: one program then
    programs = 1 if cumulative else cdiv(c, BLOCK_C)
    running = (running_mean, running_var, num_batches_tracked) if update else (mean, var, mean)
    _fold[lambda meta: (programs,)](
        mean.contiguous(), var.contiguous(), weight if weight is not None else mean,
        bias if bias is not None else mean, coeffs, *running, c, eps,
        (momentum or 0.0) if update else 0.0, count / (count - 1) if update else 1.0,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE=update,
        CUMULATIVE=cumulative, BLOCK_C=BLOCK_C)


@custom_op("fold_batchnorm", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def fold_batchnorm(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], momentum: Optional[float], count: int) -> Tensor:
    """``(4, C)`` fp32 rows ``scale, shift, mean, rstd`` for fp32 ``mean, var``
    ``(C,)`` and the affine ``weight, bias`` (``(C,)`` or None); with
    ``running_mean`` (and ``running_var``, ``num_batches_tracked``) the running
    statistics' update of ``interface.RunningUpdate`` (``momentum`` None: the
    cumulative average; ``count`` values per channel), else no update."""
    coeffs = torch.empty(4, mean.shape[0], device=mean.device, dtype=torch.float32)
    _launch_fold(coeffs, mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum,
                 count)
    return coeffs


@fold_batchnorm.register_fake
def _(mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, count):
    return mean.new_empty(4, mean.shape[0], dtype=torch.float32)


@custom_op("fold_batchnorm_into", mutates_args=("coeffs", "running_mean", "running_var", "num_batches_tracked"))
def fold_batchnorm_into(coeffs: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        num_batches_tracked: Optional[Tensor], momentum: Optional[float], count: int) -> None:
    """:func:`fold_batchnorm` into ``coeffs`` (``(4, C)`` fp32, contiguous; a
    block of the engine's coefficient store)."""
    _launch_fold(coeffs, mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum,
                 count)


@fold_batchnorm_into.register_fake
def _(coeffs, mean, var, weight, bias, eps, running_mean, running_var, num_batches_tracked, momentum, count):
    return None
