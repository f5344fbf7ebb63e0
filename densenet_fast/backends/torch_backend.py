"""The plain-PyTorch backend: the reference implementation of every primitive.

Runs on any device and dtype.  Elementwise work is done in the statistics
dtype (fp32, or fp64 for fp64 data); GEMMs run in the data dtype (``mm``: on
the CPU some float16/bfloat16 ones in float32).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .interface import Backend, RunningUpdate, Stats, count_batch, stats_dtype


def mm(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` (into ``out``).  On the CPU, torch's float16 and bfloat16 gemm is
    oneDNN's, which (torch 2.14.1, CPUs with AMX or AVX512-FP16) can also make the
    row before a NaN or Inf row of ``a`` NaN (docs/cpp.md, "A NaN one row early"):
    such a product that is not all finite is made again in float32 (with autocast
    off, which would make it float16/bfloat16 again).  The check is its float32 sum (one
    pass; an overflowing sum only costs a needless redo).  A compiled graph cannot
    branch on data, so there the product is float32's."""
    if a.device.type != "cpu" or a.dtype not in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out=out)
    if torch.compiler.is_compiling():
        product = float32_mm(a, b)
        return product.to(a.dtype) if out is None else out.copy_(product)
    product = torch.mm(a, b, out=out)
    if not product.sum(dtype=torch.float32).isfinite():
        product.copy_(float32_mm(a, b))
    return product


def float32_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float32 on the CPU, whatever autocast says."""
    with torch.autocast("cpu", enabled=False):
        return torch.mm(a.float(), b.float())


def relu_backward(grad_z: Tensor, z: Tensor) -> Tensor:
    """``grad_z * (z > 0)`` in one fused pass (a new tensor)."""
    return torch.ops.aten.threshold_backward(grad_z, z, 0)


class TorchBackend(Backend):
    name = "torch"

    def fold_batchnorm(self, mean, var, weight, bias, eps, update: Optional[RunningUpdate],
                       out: Optional[Tensor] = None) -> Tensor:
        if update is not None:
            factor = count_batch(update.batches, update.momentum)
            unbiased = var * (update.count / (update.count - 1))
            update.mean.mul_(1 - factor).add_(mean.to(update.mean.dtype), alpha=factor)
            update.var.mul_(1 - factor).add_(unbiased.to(update.var.dtype), alpha=factor)
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else weight.to(var.dtype) * rstd
        shift = -mean * scale if bias is None else bias.to(var.dtype) - mean * scale
        return torch.stack([scale, shift, mean, rstd], out=out)

    def channel_stats(self, x: Tensor) -> Stats:
        # Two passes (mean, then mean of squared deviations): stable, and on the
        # CPU several times faster than torch.var_mean over dim 0.
        x = x.to(stats_dtype(x.dtype))
        mean = x.mean(0)
        return mean, (x - mean).square_().mean(0)

    def _bn_relu(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return torch.addcmul(shift, x.to(scale.dtype), scale).relu_()

    def bn_relu_conv1x1(self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                        with_stats: bool) -> Optional[Stats]:
        z = self._bn_relu(x, scale, shift).to(x.dtype)
        mm(z, weight.t(), out=out)
        return self.channel_stats(out) if with_stats else None

    def _bn_backward(self, x: Tensor, grad_a: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
                     batch_mean: Optional[Callable[[Tensor], Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """From ``grad_a = dL/da`` (statistics dtype, overwritten): returns
        ``(grad_x, grad_gamma, grad_beta)``."""
        centered = x.to(mean.dtype) - mean
        grad_beta = grad_a.sum(0)
        grad_gamma = (grad_a * centered).sum(0).mul_(rstd)
        grad_x = grad_a.mul_(scale)
        if batch_mean is not None:
            mean_grad_a, mean_grad_a_xhat = batch_mean(torch.stack([grad_beta, grad_gamma]))
            # dx = scale * (dA - mean(dA) - (x - mean) * rstd * mean(dA * xhat))
            grad_x.addcmul_(centered, -scale * rstd * mean_grad_a_xhat).sub_(scale * mean_grad_a)
        return grad_x, grad_gamma, grad_beta

    def bn_relu_conv1x1_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        z = self._bn_relu(x, scale, shift)
        grad_weight = mm(grad_out.t(), z.to(grad_out.dtype))
        grad_a = relu_backward(mm(grad_out, weight).to(scale.dtype), z)
        del z
        dx, grad_gamma, grad_beta = self._bn_backward(x, grad_a, scale, mean, rstd, batch_mean)
        grad_x.add_(dx)
        return grad_weight, grad_gamma, grad_beta

    def bn_relu(self, x, scale, shift, out):
        out.copy_(self._bn_relu(x, scale, shift))

    def bn_relu_backward(self, x, scale, shift, mean, rstd, grad_z, grad_x, batch_mean):
        grad_a = relu_backward(grad_z.to(scale.dtype), self._bn_relu(x, scale, shift))
        dx, grad_gamma, grad_beta = self._bn_backward(x, grad_a, scale, mean, rstd, batch_mean)
        grad_x.copy_(dx)
        return grad_gamma, grad_beta

    def _pooled(self, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        """``z = relu(x*scale+shift)`` (N, *spatial, C) and its average pool by 2 as rows."""
        z = self._bn_relu(x, scale, shift)
        pooled = avg_pool2(z.movedim(-1, 1))  # (N, C, *spatial // 2), channels-last
        return z, pooled.movedim(1, -1).reshape(-1, x.shape[-1]).to(x.dtype)

    def transition(self, x, scale, shift, weight, out):
        _, pooled = self._pooled(x, scale, shift)
        mm(pooled, weight.t(), out=out.view(-1, weight.shape[0]))

    def transition_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        c = x.shape[-1]
        z, pooled = self._pooled(x, scale, shift)
        grad_rows = grad_out.reshape(-1, weight.shape[0])
        grad_weight = mm(grad_rows.t(), pooled)
        grad_pooled = mm(grad_rows, weight).to(scale.dtype).view(*grad_out.shape[:-1], c)
        grad_a = relu_backward(avg_pool2_backward(grad_pooled, x.shape).view(-1, c), z.view(-1, c))
        del z
        dx, grad_gamma, grad_beta = self._bn_backward(x.reshape(-1, c), grad_a, scale, mean, rstd, batch_mean)
        grad_x.copy_(dx.view(x.shape))
        return grad_weight, grad_gamma, grad_beta


def avg_pool2(x: Tensor) -> Tensor:
    """Average pooling of ``x (N, C, *spatial)`` by 2 (kernel and stride) along
    each of its 1, 2 or 3 spatial dimensions; odd sizes drop their last pixel."""
    return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[x.dim() - 3](x, 2)


def avg_pool2_backward(grad_pooled: Tensor, shape: torch.Size) -> Tensor:
    """The gradient ``(N, *spatial, C)`` (shape ``shape``) of the input of
    :func:`avg_pool2` from that of its output, ``grad_pooled (N, *spatial // 2, C)``
    (both channels-last as rows): each pixel of a window gets ``1 / 2^d`` of it,
    pixels that pooling drops get 0."""
    pooled = grad_pooled.shape[1:-1]
    grad = grad_pooled.new_zeros(shape)
    windows = grad[(slice(None), *(slice(0, 2 * size) for size in pooled))]
    for i, size in enumerate(pooled):  # (N, p1, 2, p2, 2, ..., C): views, whatever the dropped pixels
        windows = windows.unflatten(1 + 2 * i, (size, 2))
    spread = grad_pooled.reshape(grad_pooled.shape[0], *(s for size in pooled for s in (size, 1)), shape[-1])
    windows.copy_(spread.expand(windows.shape) / 2 ** len(pooled))
    return grad
