"""The ImageNet stem's BatchNorm-ReLU-max-pool (``norm0``, ``relu0``, ``pool0``)
as one autograd Function that does not keep the normalised activation.

Run as three modules, autograd keeps ``norm0``'s input ``x`` (conv0's output,
``(N, C, *spatial)``), ``norm0``'s output (ReLU's and the max-pool's input, the
same size) and the pool's int64 indices through the whole step, and its backward
holds four tensors of ``x``'s size at once (``x``, the activation, the pool's
and ReLU's input gradients, then BatchNorm's).  Here forward keeps ``x``, the
indices and a bool per pooled value (whether ReLU passes its gradient), and
backward holds two: ``x`` and one gradient, which BatchNorm's backward rewrites
in place.

Backward, with ``g`` the max-pool's input gradient (zero but at each window's
maximum) and ``x^ = (x - mean) * rstd``:

- ReLU's mask at a window's maximum is that of the pooled value (``p <= 0``
  stops the gradient, NaN passes it, as ``threshold_backward``), so it is
  applied to the pooled gradient, before the scatter;
- ``db = sum g``, ``dw = sum g x^`` per channel (``native_batch_norm_backward``
  without the input gradient, so exactly torch's parameter gradients);
- ``dx = w rstd (g - db/M - x^ dw/M) = g a + (x - mean) b + c`` per channel,
  with ``a = w rstd``, ``b = -a rstd dw/M``, ``c = -a db/M``, written over
  ``g`` (``M``: values per channel; :func:`_input_gradient_over`).

Only the configuration of torchvision's and MONAI's stem (affine BatchNorm of
the batch statistics, ReLU, 3x3 max-pool with stride 2 and padding 1) runs here;
:func:`stem_blocker` says why another one does not.  Double backward
differentiates the three operations recomputed from what forward saved.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..backends.interface import count_batch, stats_dtype
from .batchnorm import check_values_per_channel
from .fastpath import BATCH_NORMS, _as_tuple, _observed, differentiates_recomputation

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
POOL = {"kernel_size": 3, "stride": 2, "padding": 1}  # the stems' max-pool (torchvision's, MONAI's)


def stem_blocker(norm: nn.Module, relu: nn.Module, pool: nn.Module) -> Optional[str]:
    """Why ``norm, relu, pool`` cannot run as :class:`NormReluMaxPool`, or ``None``."""
    reason = next((r for r in (_observed(m) for m in (norm, relu, pool)) if r is not None), None)
    if reason is not None:
        return reason
    dims = MAX_POOLS.index(type(pool)) + 1 if type(pool) in MAX_POOLS else None
    standard = (dims is not None and type(norm) is BATCH_NORMS[dims - 1] and norm.affine and type(relu) is nn.ReLU
                and all(_as_tuple(getattr(pool, name), dims) == (value,) * dims for name, value in POOL.items())
                and _as_tuple(pool.dilation, dims) == (1,) * dims and not pool.ceil_mode and not pool.return_indices)
    return None if standard else "modules other than an affine BatchNorm, ReLU and a 3x3/2 max-pool in the stem"


def momentum_factor(norm: nn.modules.batchnorm._BatchNorm) -> float:
    """The running statistics' update factor of this training forward, counting
    the batch as ``nn.BatchNorm*d.forward`` does."""
    if not (norm.training and norm.track_running_stats and norm.num_batches_tracked is not None):
        return 0.0 if norm.momentum is None else norm.momentum
    return count_batch(norm.num_batches_tracked, norm.momentum)


def _pool_ops(dims: int):
    """``(pool, pool_backward, arguments)`` of the stem's max-pool over 2 or 3
    spatial dimensions (1-D runs as 2-D with a unit height)."""
    if dims == 3:
        return torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.max_pool3d_with_indices_backward, \
            ([3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    kernel, stride, padding = ([1, 3], [1, 2], [0, 1]) if dims == 1 else ([3, 3], [2, 2], [1, 1])
    return torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d_with_indices_backward, \
        (kernel, stride, padding, [1, 1], False)


class NormReluMaxPool(torch.autograd.Function):
    """``apply(x, weight, bias, running_mean, running_var, momentum, eps)``:
    ``max_pool(relu(batch_norm(x)))`` of ``x (N, C, *spatial)`` with batch
    statistics (running ones updated in place when given); ``(N, C, *pooled)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float, eps: float) -> Tensor:
        dims = x.dim() - 2
        activated, mean, rstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum,
                                                        eps)
        if running_mean is not None:  # changed as the blocks' statistics are (a graph that saved them raises),
            for running in (running_mean, running_var):  # which torch's kernel does not say (one at a time: torch 2.4)
                torch.autograd.graph.increment_version(running)
        pool, _, arguments = _pool_ops(dims)
        activated.relu_()
        pooled, indices = pool(activated.unsqueeze(2) if dims == 1 else activated, *arguments)
        del activated
        if dims == 1:
            pooled, indices = pooled.squeeze(2), indices.squeeze(2)
        ctx.save_for_backward(x, weight, bias, mean, rstd, indices, ~(pooled <= 0))
        ctx.eps = eps
        return pooled

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, mean, rstd, indices, passes = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:3]
        if differentiates_recomputation(grad):  # create_graph=True, or vmap around backward: the recomputed operations
            return (*_reference_gradients(x, weight, bias, ctx.eps, grad, wanted), None, None, None, None)
        dims = x.dim() - 2
        _, pool_backward, arguments = _pool_ops(dims)
        as_2d = (lambda t: t.unsqueeze(2)) if dims == 1 else (lambda t: t)
        g = pool_backward(as_2d(grad * passes), as_2d(x), *arguments, as_2d(indices))
        g = g.squeeze(2) if dims == 1 else g
        _, dw, db = torch.ops.aten.native_batch_norm_backward(g, x, weight, None, None, mean, rstd, True, ctx.eps,
                                                              [False, True, True])
        grad_x = None
        if wanted[0]:
            # the coefficients in float32 for 16-bit data, whatever dtype the statistics have: the CPU kernel
            # returns float32 ones for bfloat16 data and float32 parameters (autocast), where the meta function
            # torch.compile traces with says bfloat16 (the compiled backward then failed in conv0)
            dtype, count = stats_dtype(x.dtype), x.numel() // x.shape[1]
            rstd = rstd.to(dtype)
            a = weight.to(dtype) * rstd
            b = -a * rstd * dw.to(dtype) / count
            grad_x = _input_gradient_over(g, x, a, b, -a * db.to(dtype) / count, mean.to(dtype))
        return grad_x, dw if wanted[1] else None, db if wanted[2] else None, None, None, None, None


REDUCED_PRECISION_SLICES = 16  # a bfloat16/float16 gradient is finished in float32 this many slices at a time


def reduced_precision_rows(side: int) -> int:
    """Rows of the first spatial dimension (of ``side``) in each float32 slice."""
    return -(-side // min(side, REDUCED_PRECISION_SLICES))


def _input_gradient_over(g: Tensor, x: Tensor, a: Tensor, b: Tensor, c: Tensor, mean: Tensor) -> Tensor:
    """``g`` overwritten by ``g a + (x - mean) b + c`` (per channel ``(C,)``
    coefficients in float32, float64 for float64 data).  In that dtype each value is
    rounded once; a bfloat16 or float16 ``g`` is finished in float32 along
    its first spatial dimension in :data:`REDUCED_PRECISION_SLICES` slices, so
    that ``x b`` and ``mean b``, which cancel, are not rounded apart, and the
    float32 temporaries are a slice's."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a, b, mean = a.view(shape), b.view(shape), mean.view(shape)
    if g.dtype == a.dtype:
        return g.mul_(a).addcmul_(x, b).add_((c.view(shape) - mean * b))
    step = reduced_precision_rows(g.shape[2])
    for g_slice, x_slice in zip(g.split(step, 2), x.split(step, 2)):
        exact = x_slice.to(a.dtype).sub_(mean).mul_(b).add_(c.view(shape)).addcmul_(g_slice, a)
        g_slice.copy_(exact)
    return g


def _reference_gradients(x: Tensor, weight: Tensor, bias: Tensor, eps: float, grad: Tensor,
                         wanted: tuple[bool, ...]) -> tuple[Optional[Tensor], ...]:
    """The three gradients as a graph (double backward), from the batch statistics
    of ``x`` recomputed differentiably."""
    inputs = (x, weight, bias)
    with torch.enable_grad():
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[x.dim() - 3]
        out = pool(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)), **POOL)
        needed = [t for t, need in zip(inputs, wanted) if need]
        grads = iter(torch.autograd.grad(out, needed, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in wanted)


def norm_relu_max_pool(norm: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``norm``, ReLU and the stem's max-pool on ``x (N, C, *spatial)`` in a
    forward where ``norm`` uses batch statistics."""
    check_values_per_channel(x.numel() // x.shape[1], tuple(x.shape))
    updates = norm.training and norm.track_running_stats  # as nn.BatchNorm*d.forward decides
    return NormReluMaxPool.apply(x, norm.weight, norm.bias, norm.running_mean if updates else None,
                                 norm.running_var if updates else None, momentum_factor(norm), norm.eps)
