"""BN-ReLU apply, ``out = relu(x * scale + shift)``, for the 3x3 convolution's
input, and the ops of its backward (the GEMM-free case of :mod:`.bn_relu_conv`)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import bn_relu_conv
from .common import (Launcher, aligned, block_size, cdiv, check_data, check_pixels, custom_op, relu, rows,
                     vector_alignment)


@triton.jit
def _bn_relu_kernel(x_ptr,  # (M, C), row stride sx
                    scale_ptr, shift_ptr,  # (C,) fp32
                    out_ptr,  # (M, C), row stride so
                    M, C, sx, so,  # scalars: sizes, row strides in elements
                    ALIGN: tl.constexpr,  # divides C, sx and so (common.vector_alignment)
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    C, sx, so = aligned(C, ALIGN), aligned(sx, ALIGN), aligned(so, ALIGN)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mask = (rows < M)[:, None] & channel_mask[None, :]
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0)
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0)
    x = tl.load(x_ptr + rows[:, None] * sx + channels[None, :], mask=mask, other=0.0).to(tl.float32)
    z = relu(x * scale[None, :] + shift[None, :])
    tl.store(out_ptr + rows[:, None] * so + channels[None, :], z.to(out_ptr.dtype.element_ty), mask=mask)


_bn_relu = Launcher(_bn_relu_kernel, [triton.Config({"BLOCK_M": 64}, num_warps=4)])


@custom_op("bn_relu", mutates_args=("out",))
def bn_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """``out (M, C) = relu(x * scale + shift)`` for row views ``x``, ``out``."""
    check_data(x, out)
    m, c = x.shape
    check_pixels(m)
    block_c = block_size(c, 64)
    _bn_relu[lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(c, block_c))](
        x, scale, shift, out, m, c, x.stride(0), out.stride(0),
        ALIGN=vector_alignment(x.element_size(), c, x.stride(0), out.stride(0)), BLOCK_C=block_c)


@bn_relu.register_fake
def _(x, scale, shift, out):
    check_data(x, out)


@custom_op("bn_relu_backward_sums")
def bn_relu_backward_sums(x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, grad_z: Tensor
                          ) -> Tensor:
    """Pass 1 of :func:`bn_relu`'s backward for row views ``x``, ``grad_z``
    ``(M, C)``: the sums ``(2, C)`` fp32 ``[sum dA, sum dA * xhat]``."""
    return bn_relu_conv.backward_sums(rows(x), scale, shift, mean, rstd, None, rows(grad_z), pool=1)[1]


@bn_relu_backward_sums.register_fake
def _(x, scale, shift, mean, rstd, grad_z):
    check_data(x, grad_z)
    return x.new_empty(2, x.shape[1], dtype=torch.float32)


@custom_op("bn_relu_backward_finish", mutates_args=("grad_x",))
def bn_relu_backward_finish(x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, grad_z: Tensor,
                            batch_means: Optional[Tensor], grad_x: Tensor) -> None:
    """Pass 2: writes ``dL/dx`` into the row view ``grad_x (M, C)`` (which may be
    ``grad_z`` itself), with ``batch_means (2, C) = [mean(dA), mean(dA * xhat)]``
    over the batch, or None (running statistics)."""
    bn_relu_conv.backward_finish(rows(x), scale, shift, mean, rstd, None, rows(grad_z), None, batch_means,
                                 rows(grad_x), pool=1, accumulate=False)


@bn_relu_backward_finish.register_fake
def _(x, scale, shift, mean, rstd, grad_z, batch_means, grad_x):
    check_data(x, grad_z, grad_x)
