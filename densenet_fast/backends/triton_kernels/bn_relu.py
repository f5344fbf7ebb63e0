"""BN-ReLU apply, ``out = relu(x * scale + shift)``, for the 3x3 convolution's
input (its backward is the GEMM-free case of :mod:`.bn_relu_conv`)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import Launcher, block_size, check_data, check_pixels, relu


@triton.jit
def _bn_relu_kernel(x_ptr,  # (M, C), row stride sx
                    scale_ptr, shift_ptr,  # (C,) fp32
                    out_ptr,  # (M, C), row stride so
                    M, C, sx, so,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
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


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """``out (M, C) = relu(x * scale + shift)`` for row views ``x``, ``out``."""
    check_data(x, out)
    m, c = x.shape
    check_pixels(m)
    block_c = block_size(c, 64)
    _bn_relu[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, block_c))](
        x, scale, shift, out, m, c, x.stride(0), out.stride(0), BLOCK_C=block_c)
