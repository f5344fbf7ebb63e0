"""The memory-efficient dense stage: one autograd Function per dense block,
fused with the transition or the classifier head that follows it.

Forward (DESIGN.md §2-§3): the block input and every layer's ``k`` new
channels live in one channels-last buffer ``(N, H, W, C_total)``; per-channel
batch statistics are computed once, when a channel is written; each layer's
BN-ReLU-Conv1x1 reads a channel range of the buffer.  Saved for backward: the
buffer, the folded BN coefficients (``O(L * C)`` numbers) and, with
``recompute="keep"``, each layer's bottleneck output.  Backward walks the
layers in reverse, recomputing BN-ReLU outputs, and accumulates ``dL/dX`` into
one gradient buffer from the scratch arena.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backends import get_backend
from .backends.interface import Backend
from .backends.torch_backend import stats_dtype
from .memory import ScratchArena, block_buffer, nchw

__all__ = ["ScratchArena", "run_stage"]


@dataclass
class BNCoefficients:
    """BatchNorm folded for one use: ``a = x * scale + shift``; ``batch_mean``
    is ``None`` for running statistics (see backends.interface)."""

    scale: Tensor
    shift: Tensor
    mean: Tensor
    rstd: Tensor
    batch_mean: Optional[Callable[[Tensor], Tensor]]


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d's rule: batch statistics in training or without running ones."""
    return bn.training or bn.running_mean is None


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What nn.BatchNorm2d does to its buffers in one training forward."""
    if not (bn.training and bn.track_running_stats):
        return
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var * (count / (count - 1))
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


class _Stage:
    """Everything about one stage that is not a tensor autograd must track."""

    def __init__(self, block: nn.ModuleDict, tail: Optional[nn.Module], backend: Backend, recompute: str,
                 arena: ScratchArena, dtype: torch.dtype) -> None:
        self.layers = list(block.values())
        self.tail = tail
        self.backend = backend
        self.recompute = recompute
        self.arena = arena
        self.dtype = dtype
        self.growth = self.layers[0].conv2.out_channels
        self.width = self.layers[0].conv1.out_channels  # bottleneck channels, 4k
        self.drop_rate = self.layers[0].drop_rate if self.layers[0].training else 0.0
        self.sync_group = getattr(block, "sync_group", None)
        self._global_count: Optional[int] = None
        if tail is None:
            self.tail_kind, self.tail_bn = "none", None
        elif isinstance(tail, nn.BatchNorm2d):
            self.tail_kind, self.tail_bn = "head", tail
        else:
            self.tail_kind, self.tail_bn = "transition", tail.norm

    def params(self) -> list[Tensor]:
        """The differentiable parameters, in the order the Function receives them."""
        out = []
        for layer in self.layers:
            out += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                    layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
        if self.tail_kind == "transition":
            out += [self.tail.norm.weight, self.tail.norm.bias, self.tail.conv.weight]
        elif self.tail_kind == "head":
            out += [self.tail.weight, self.tail.bias]
        return out

    def needs_channel_stats(self) -> bool:
        bns = [layer.norm1 for layer in self.layers] + ([self.tail_bn] if self.tail_bn is not None else [])
        return any(uses_batch_stats(bn) for bn in bns)

    # -- statistics ----------------------------------------------------------------------
    def stats(self, local: tuple[Tensor, Tensor], count: int) -> tuple[Tensor, Tensor]:
        """Per-channel ``(mean, var)`` over the batch (over all processes of the
        synchronisation group, merged with Chan's formula)."""
        if self.sync_group is None:
            return local
        mean, var = local
        packed = torch.stack([torch.full_like(mean, count), mean, var])
        gathered = [torch.empty_like(packed) for _ in range(torch.distributed.get_world_size(self.sync_group))]
        torch.distributed.all_gather(gathered, packed, group=self.sync_group)
        counts, means, variances = torch.stack(gathered).unbind(1)
        total = counts.sum(0)
        global_mean = (counts * means).sum(0) / total
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
        return global_mean, global_var

    def global_count(self, count: int) -> int:
        """Pixels per channel over the batch (summed over the synchronisation group)."""
        if self.sync_group is None:
            return count
        if self._global_count is None:
            total = torch.tensor([count], dtype=torch.float64)
            torch.distributed.all_reduce(total, group=self.sync_group)
            self._global_count = int(total.item())
        return self._global_count

    def batch_mean(self, count: int) -> Callable[[Tensor], Tensor]:
        """The between-passes reduction of the BN backward (see backends.interface)."""
        if self.sync_group is None:
            return lambda sums: sums / count
        total = self.global_count(count)

        def synced(sums: Tensor) -> Tensor:
            sums = sums.clone()
            torch.distributed.all_reduce(sums, group=self.sync_group)
            return sums / total

        return synced

    def coefficients(self, bn: nn.BatchNorm2d, batch: Optional[tuple[Tensor, Tensor]], count: int,
                     like: Tensor) -> BNCoefficients:
        """Fold ``bn`` for this forward; updates its running statistics once."""
        dtype = stats_dtype(like.dtype)
        if uses_batch_stats(bn):
            mean, var = batch
            update_running_stats(bn, mean, var, self.global_count(count))
            batch_mean = self.batch_mean(count)
        else:
            mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
            batch_mean = None
        rstd = torch.rsqrt(var + bn.eps)
        scale = bn.weight.detach().to(dtype) * rstd
        shift = bn.bias.detach().to(dtype) - mean * scale
        return BNCoefficients(scale, shift, mean, rstd, batch_mean)

    # -- dropout ------------------------------------------------------------------------
    def dropout_mask(self, seed: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The keep-mask scaled by ``1/(1-p)``, regenerated from ``seed``."""
        generator = torch.Generator(device=like.device).manual_seed(seed)
        keep = 1.0 - self.drop_rate
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep, generator=generator) / keep


class _Saved:
    """What forward leaves for backward besides the buffer and parameters."""

    def __init__(self) -> None:
        self.bn1: list[BNCoefficients] = []
        self.bn2: list[BNCoefficients] = []
        self.bottlenecks: list[Optional[Tensor]] = []
        self.seeds: list[Optional[int]] = []
        self.tail: Optional[BNCoefficients] = None


def stage_forward(stage: _Stage, x: Tensor, keep_for_backward: bool) -> tuple[Tensor, Tensor, _Saved]:
    """Returns ``(output, block buffer, saved state)``; ``x`` is ``(N, C0, H, W)``."""
    backend, arena = stage.backend, stage.arena
    n, c0, h, w = x.shape
    k, width = stage.growth, stage.width
    c_total = c0 + len(stage.layers) * k
    m = n * h * w
    buffer = block_buffer(n, h, w, c_total, x)
    nchw(buffer)[:, :c0].copy_(x)
    rows = buffer.view(m, c_total)
    saved = _Saved()

    cache_mean = cache_var = None
    if stage.needs_channel_stats():
        cache_mean = torch.empty(c_total, dtype=stats_dtype(x.dtype), device=x.device)
        cache_var = torch.empty_like(cache_mean)
        cache_mean[:c0], cache_var[:c0] = stage.stats(backend.channel_stats(rows[:, :c0]), m)

    def cached(c: int) -> Optional[tuple[Tensor, Tensor]]:
        return None if cache_mean is None else (cache_mean[:c], cache_var[:c])

    keep = keep_for_backward and stage.recompute == "keep"
    for i, layer in enumerate(stage.layers):
        c = c0 + i * k
        bn1 = stage.coefficients(layer.norm1, cached(c), m, x)
        w1 = layer.conv1.weight.detach().to(x.dtype).view(width, c)
        bottleneck = torch.empty((m, width), dtype=x.dtype, device=x.device) if keep else \
            arena.get("bottleneck", (m, width), x)
        batch2 = uses_batch_stats(layer.norm2)
        local2 = backend.bn_relu_conv1x1(rows[:, :c], bn1.scale, bn1.shift, w1, bottleneck, with_stats=batch2)
        bn2 = stage.coefficients(layer.norm2, stage.stats(local2, m) if batch2 else None, m, x)
        activated = arena.get("bn2_out", (n, h, w, width), x)
        backend.bn_relu(bottleneck, bn2.scale, bn2.shift, activated.view(m, width))
        new = F.conv2d(nchw(activated), layer.conv2.weight.detach().to(x.dtype), padding=1)
        seed = None
        if stage.drop_rate > 0:
            seed = int(torch.randint(2**62, (1,)).item())
            new = new * nchw(stage.dropout_mask(seed, (n, h, w, k), x))
        nchw(buffer)[:, c:c + k].copy_(new)
        del new
        if cache_mean is not None:
            cache_mean[c:c + k], cache_var[c:c + k] = stage.stats(backend.channel_stats(rows[:, c:c + k]), m)
        if keep_for_backward:
            saved.bn1.append(bn1)
            saved.bn2.append(bn2)
            saved.bottlenecks.append(bottleneck if keep else None)
            saved.seeds.append(seed)

    if stage.tail_kind == "none":
        return nchw(buffer), buffer, saved
    tail = stage.coefficients(stage.tail_bn, cached(c_total), m, x)
    saved.tail = tail
    if stage.tail_kind == "transition":
        conv = stage.tail.conv
        out = torch.empty((n, h // 2, w // 2, conv.out_channels), dtype=x.dtype, device=x.device)
        backend.transition(buffer, tail.scale, tail.shift, conv.weight.detach().to(x.dtype).view(conv.out_channels, c_total), out)
        return nchw(out), buffer, saved
    activated = arena.get("head", (m, c_total), x)
    backend.bn_relu(rows, tail.scale, tail.shift, activated)
    return activated.view(n, h * w, c_total).mean(1), buffer, saved


def stage_backward(stage: _Stage, buffer: Tensor, saved: _Saved, grad_out: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Returns ``(dL/dx (N, C0, H, W), gradients of stage.params())``."""
    backend, arena = stage.backend, stage.arena
    n, h, w, c_total = buffer.shape
    k, width = stage.growth, stage.width
    c0 = c_total - len(stage.layers) * k
    m = n * h * w
    if torch.compiler.is_compiling():
        # Inductor keeps the saved buffer in a layout of its choosing; the ops need (N, H, W, C)
        # contiguous.  A plain clone would be dropped as a no-op (traced, the buffer is contiguous).
        buffer = nchw(buffer).contiguous().permute(0, 2, 3, 1).contiguous()
    rows = buffer.view(m, c_total)
    grad_buffer = arena.get("grad_buffer", (n, h, w, c_total), buffer)
    grad_rows = grad_buffer.view(m, c_total)
    tail_grads: list[Tensor] = []
    tail = saved.tail

    if stage.tail_kind == "none":
        nchw(grad_buffer).copy_(grad_out)
    elif stage.tail_kind == "transition":
        conv = stage.tail.conv
        weight = conv.weight.detach().to(buffer.dtype).view(conv.out_channels, c_total)
        grad_w, grad_gamma, grad_beta = backend.transition_backward(
            buffer, tail.scale, tail.shift, tail.mean, tail.rstd, weight,
            grad_out.to(buffer.dtype).permute(0, 2, 3, 1).contiguous(), grad_buffer, tail.batch_mean)
        tail_grads = [grad_gamma, grad_beta, grad_w.view_as(conv.weight)]
    else:
        grad_z = arena.get("head", (m, c_total), buffer)
        grad_z.view(n, h * w, c_total).copy_((grad_out / (h * w)).unsqueeze(1))
        grad_gamma, grad_beta = backend.bn_relu_backward(rows, tail.scale, tail.shift, tail.mean, tail.rstd,
                                                         grad_z, grad_rows, tail.batch_mean)
        tail_grads = [grad_gamma, grad_beta]

    layer_grads: list[list[Tensor]] = []
    for i in reversed(range(len(stage.layers))):
        layer = stage.layers[i]
        c = c0 + i * k
        bn1, bn2 = saved.bn1[i], saved.bn2[i]
        w1 = layer.conv1.weight.detach().to(buffer.dtype).view(width, c)
        w2 = layer.conv2.weight.detach().to(buffer.dtype)
        grad_new = nchw(grad_buffer)[:, c:c + k]
        if saved.seeds[i] is not None:
            grad_new = grad_new * nchw(stage.dropout_mask(saved.seeds[i], (n, h, w, k), buffer))
        bottleneck = saved.bottlenecks[i]
        if bottleneck is None:
            bottleneck = arena.get("bottleneck", (m, width), buffer)
            backend.bn_relu_conv1x1(rows[:, :c], bn1.scale, bn1.shift, w1, bottleneck, with_stats=False)
        activated = arena.get("bn2_out", (n, h, w, width), buffer)
        backend.bn_relu(bottleneck, bn2.scale, bn2.shift, activated.view(m, width))
        grad_activated, grad_w2, _ = torch.ops.aten.convolution_backward(
            grad_new.contiguous(memory_format=torch.channels_last), nchw(activated), w2, None,
            [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
        del grad_new
        grad_bottleneck = grad_activated.permute(0, 2, 3, 1).reshape(m, width)
        grad_gamma2, grad_beta2 = backend.bn_relu_backward(bottleneck, bn2.scale, bn2.shift, bn2.mean, bn2.rstd,
                                                           grad_bottleneck, grad_bottleneck, bn2.batch_mean)
        grad_w1, grad_gamma1, grad_beta1 = backend.bn_relu_conv1x1_backward(
            rows[:, :c], bn1.scale, bn1.shift, bn1.mean, bn1.rstd, w1, grad_bottleneck.to(buffer.dtype),
            grad_rows[:, :c], bn1.batch_mean)
        layer_grads.append([grad_gamma1, grad_beta1, grad_w1.view_as(layer.conv1.weight),
                            grad_gamma2, grad_beta2, grad_w2])

    grads = [g for layer in reversed(layer_grads) for g in layer] + tail_grads
    grad_x = nchw(grad_buffer)[:, :c0].clone(memory_format=torch.channels_last)
    return grad_x, grads


class DenseStageFunction(torch.autograd.Function):
    """``apply(x, stage, *params)``: the stage's output; see the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, stage: _Stage, *params: Tensor) -> Tensor:
        out, buffer, saved = stage_forward(stage, x, keep_for_backward=True)
        ctx.stage, ctx.saved = stage, saved
        ctx.save_for_backward(buffer, *params)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        buffer, *params = ctx.saved_tensors
        grad_x, grads = stage_backward(ctx.stage, buffer, ctx.saved, grad_out)
        grads = [g.to(p.dtype) for g, p in zip(grads, params)]
        return (grad_x.to(ctx.x_dtype), None, *grads)


def run_stage(block: nn.ModuleDict, tail: Optional[nn.Module], x: Tensor, backend_name: Optional[str],
              recompute: str, arena: ScratchArena) -> Tensor:
    """Run dense ``block`` and then ``tail`` (a ``_Transition``, the final
    ``BatchNorm2d`` (head: BN, ReLU, global average pool -> ``(N, C)``), or
    ``None`` (returns the block's features)) on ``x (N, C0, H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"a dense block expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    first = next(iter(block.values()))
    if x.shape[1] != first.norm1.num_features:
        raise ValueError(f"this dense block expects {first.norm1.num_features} input channels, got {x.shape[1]}")
    if first.norm1.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    stage = _Stage(block, tail, get_backend(backend_name, x.device), recompute, arena, dtype)
    params = stage.params()
    with torch.autocast(device_type, enabled=False):
        x = x.to(dtype)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return DenseStageFunction.apply(x, stage, *params)
        with torch.no_grad():
            return stage_forward(stage, x, keep_for_backward=False)[0]
