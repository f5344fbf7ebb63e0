"""A stage recomputed in plain, differentiable torch operations, from exactly
what forward saved: double backward (``create_graph=True``) differentiates this
graph, so gradient penalties and Hessian-vector products see every term."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.torch_backend import avg_pool2
from .batchnorm import Folded

__all__ = ["avg_pool2", "batch_norm", "convolution", "stage_gradients", "stage_output"]


def convolution(x: Tensor, weight: Tensor, padding: int) -> Tensor:
    """Stride-1 convolution of ``x (N, C, *spatial)`` for any number of spatial dimensions."""
    d = x.dim() - 2
    return torch.ops.aten.convolution(x, weight.to(x.dtype), None, [1] * d, [padding] * d, [1] * d, False,
                                      [0] * d, 1)


def batch_norm(t: Tensor, folded: Folded, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """BatchNorm of ``t (N, C, *spatial)`` as forward applied it: batch statistics
    recomputed from ``t`` (so they are differentiated), running ones as constants."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    if folded.batch_mean is None:
        mean, rstd = folded.mean.to(t.dtype), folded.rstd.to(t.dtype)
    else:
        var, mean = torch.var_mean(t, dim=[0, *range(2, t.dim())], correction=0)
        rstd = torch.rsqrt(var + folded.eps)
    y = (t - mean.view(shape)) * rstd.view(shape)
    return y if weight is None else y * weight.to(t.dtype).view(shape) + bias.to(t.dtype).view(shape)


def stage_output(stage, records, x: Tensor, params: list[Tensor]) -> Tensor:
    """The output of ``stage`` as a graph of ``x`` and ``params``, with the
    statistics modes, running statistics and dropout seeds its forward ``records``."""
    from .stage import PARAMS_PER_LAYER

    features = x
    for i, record in enumerate(records.layers):
        gamma1, beta1, w1, gamma2, beta2, w2 = params[i * PARAMS_PER_LAYER:(i + 1) * PARAMS_PER_LAYER]
        bottleneck = convolution(F.relu(batch_norm(features, record.bn1, gamma1, beta1)), w1, padding=0)
        new = convolution(F.relu(batch_norm(bottleneck, record.bn2, gamma2, beta2)), w2, padding=1)
        if record.seed is not None:
            new = new * stage.dropout_mask(record.seed, new)
        features = torch.cat([features, new], 1)
    return stage.tail.reference(features, records.tail, params[len(records.layers) * PARAMS_PER_LAYER:])


def stage_gradients(stage, records, x: Tensor, params: list[Tensor], grad_out: Tensor, needs_input_grad: tuple[bool, ...]
                    ) -> tuple[Optional[Tensor], ...]:
    """``(dL/dx, None, *dL/dparams)`` with a graph (for ``StageFunction.backward``
    under ``create_graph=True``); ``None`` where no gradient is needed."""
    if stage.group is not None:
        raise NotImplementedError("double backward through synchronised batch statistics is not supported")
    if x is None:
        raise NotImplementedError("double backward of a dense stage compiled by torch.compile is not supported")
    inputs = [x, *params]
    needed = [needs_input_grad[0], *needs_input_grad[2:]]
    wanted = [t for t, need in zip(inputs, needed) if need]
    with torch.enable_grad():
        out = stage_output(stage, records, x, params)
        grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    result = [next(grads) if need else None for need in needed]
    result = [torch.zeros_like(t) if need and g is None else g for t, need, g in zip(inputs, needed, result)]
    return (result[0], None, *result[1:])
