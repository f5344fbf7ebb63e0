"""The primitive interface every backend implements (docs/engine.md).

The block engine (:mod:`densenet_fast.engine`) sees a dense block's features
as one channels-last buffer of shape ``(N, *spatial, C_total)`` (1, 2 or 3
spatial dimensions).  Its rows are the ``M = N * prod(spatial)`` pixels, so a
*channel range* is the 2-D view
``buffer.view(M, C_total)[:, c0:c1]``: shape ``(M, C)``, row stride
``C_total``, channel stride 1.  The primitives below take such row views.

Conventions:
- ``scale``/``shift`` (``(C,)``, fp32, or fp64 for fp64 data) fold BatchNorm:
  ``a = x * scale + shift``, ``z = relu(a)``.  In training
  ``scale = gamma * rstd`` and ``shift = beta - mean * scale``.
- ``mean``/``rstd`` (``(C,)``) are the statistics that normalised ``x``
  (batch or running); ``xhat = (x - mean) * rstd``.
- ``batch_mean``: ``None`` when ``mean``/``rstd`` are running statistics
  (eval mode): then ``dx = scale * dA``.  With batch statistics it is a
  function that maps the local per-channel sums ``(2, C)`` =
  ``[sum(dA), sum(dA * xhat)]`` to their means over the whole batch (``/ M``,
  or over all processes for synchronised BN), and
  ``dx = scale * (dA - mean(dA) - xhat * mean(dA * xhat))``.  This is the
  point between the two passes of the BN backward (docs/engine.md).
- ``grad_gamma = sum(dA * xhat)`` and ``grad_beta = sum(dA)`` are the local sums.
- Gradients of parameters come in the data dtype or in fp32; the engine casts
  them to the parameters' dtype.
- Statistics are returned as ``(mean, var)``, biased variance, in fp32 (fp64
  for fp64 data), computed stably (never ``E[x^2] - E[x]^2`` unshifted).
- Outputs named ``out``/``grad_x`` are written in place; ``grad_x`` of
  :meth:`Backend.bn_relu_conv1x1_backward` is *accumulated* into (``+=``).
- ``grad_weight`` is in the data dtype, or in fp32 for 16-bit data (a backend
  may return its fp32 sums unrounded; the engine casts to the weight's dtype);
  ``grad_gamma``/``grad_beta`` in the statistics dtype.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

Stats = tuple[Tensor, Tensor]


class RunningUpdate(NamedTuple):
    """What one training forward does to a BatchNorm's running statistics
    (torch's BatchNorm rules): ``batches += 1``; with ``factor = momentum``,
    or ``1 / batches`` when ``momentum`` is None (cumulative average),
    ``mean = (1 - factor) * mean + factor * batch mean`` and likewise ``var``
    with the unbiased batch variance of ``count`` values per channel."""

    mean: Tensor  # running_mean (C,), updated in place
    var: Tensor  # running_var (C,), updated in place
    batches: Tensor  # num_batches_tracked, int64 (), updated in place
    momentum: Optional[float]
    count: int


def count_batch(batches: Tensor, momentum: Optional[float]) -> float:
    """``batches += 1`` (num_batches_tracked, in place); the running statistics'
    update factor for this batch: ``momentum``, or ``1 / batches`` when it is None."""
    batches.add_(1)
    return 1.0 / float(batches) if momentum is None else momentum


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and BN coefficients for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Backend:
    """Base class: one instance per backend; the methods are the primitives."""

    name = "abstract"

    def fold_batchnorm(self, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float, update: Optional[RunningUpdate], out: Optional[Tensor] = None) -> Tensor:
        """A BatchNorm that normalises with ``(mean, var)`` (``(C,)``,
        statistics dtype) and has the affine ``weight``, ``bias`` (``None``: 1
        and 0), folded: ``(4, C)`` rows ``scale, shift, mean, rstd`` (statistics
        dtype), written into ``out`` (contiguous) if given, else a new tensor.
        Applies ``update`` to the running statistics (with the batch's
        ``mean, var``) if given."""
        raise NotImplementedError

    def channel_stats(self, x: Tensor) -> Stats:
        """Per-channel ``(mean, var)`` of ``x`` ``(M, C)`` over its ``M`` rows."""
        raise NotImplementedError

    def bn_relu_conv1x1(self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                        with_stats: bool) -> Optional[Stats]:
        """``out (M, K) = relu(x * scale + shift) @ weight.T`` for ``x (M, C)``,
        ``weight (K, C)``; returns the statistics of ``out`` if ``with_stats``."""
        raise NotImplementedError

    def bn_relu_conv1x1_backward(self, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor,
                                 weight: Tensor, grad_out: Tensor, grad_x: Tensor,
                                 batch_mean: Optional[Callable[[Tensor], Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Backward of :meth:`bn_relu_conv1x1` for ``grad_out (M, K)``: adds
        ``dL/dx`` into ``grad_x (M, C)`` and returns
        ``(grad_weight (K, C), grad_gamma (C,), grad_beta (C,))``."""
        raise NotImplementedError

    def bn_relu(self, x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
        """``out (M, C) = relu(x * scale + shift)``."""
        raise NotImplementedError

    def bn_relu_backward(self, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor,
                         grad_z: Tensor, grad_x: Tensor, batch_mean: Optional[Callable[[Tensor], Tensor]]) -> tuple[Tensor, Tensor]:
        """Backward of :meth:`bn_relu` for ``grad_z (M, C)`` (consumed: it may be
        overwritten): writes ``dL/dx`` into ``grad_x (M, C)`` (which may be
        ``grad_z`` itself) and returns
        ``(grad_gamma, grad_beta)``."""
        raise NotImplementedError

    def transition(self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor) -> None:
        """The fused transition for ``x (N, *spatial, C)`` (a channels-last view;
        1, 2 or 3 spatial dimensions):
        ``out (N, *spatial // 2, K) = avgpool2(relu(x * scale + shift)) @ weight.T``,
        pooling by 2 (kernel and stride) along every spatial dimension, odd sizes
        dropping their last pixel (pooling before the 1x1 convolution is exact:
        both are linear)."""
        raise NotImplementedError

    def transition_backward(self, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor,
                            weight: Tensor, grad_out: Tensor, grad_x: Tensor,
                            batch_mean: Optional[Callable[[Tensor], Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Backward of :meth:`transition` for ``grad_out (N, *spatial // 2, K)``:
        writes (not adds) ``dL/dx`` into ``grad_x (N, *spatial, C)`` and returns
        ``(grad_weight (K, C), grad_gamma (C,), grad_beta (C,))``."""
        raise NotImplementedError
