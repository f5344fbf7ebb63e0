"""The dense stage: one autograd Function that runs a dense block's layers over
the block's channels-last buffer and then the tail that follows them.

A stage is ``L >= 0`` dense layers and a tail:

- :class:`NoTail`: the output is the block's features: the buffer, or, where
  backward will read the buffer, a copy of it (a caller may change the output
  in place, as it may torchvision's concatenation);
- :class:`TransitionTail`: BN-ReLU, average pooling by 2 along each spatial
  dimension, 1x1 convolution (pooling first: both are linear, so this is exact
  and 2, 4 or 8 times cheaper); its output can be written straight into the
  leading channels of the next block's buffer;
- :class:`HeadTail`: BN-ReLU and global average pooling, ``(N, C)``.

Buffers are channels-last over ``(N, C, *spatial)`` for 1, 2 or 3 spatial
dimensions; the primitives see them as rows of channels (``M = N * prod(spatial)``
pixels), and the 3x3 (3, 3x3x3) convolution is torch's of the matching dimension.
Dense layers are read through :func:`.fastpath.dense_layer_parts` (torchvision's
and MONAI's layers name their modules alike, but keep them in different places).

Forward: the block input occupies channels ``[0, C0)`` of the buffer and layer
``l`` writes its ``k`` new channels into ``[C0 + l*k, C0 + (l+1)*k)``, so
concatenation is free.  Per-channel batch statistics are computed once, when a
channel is written, and reused by every later BatchNorm.  Saved for backward
(all through ``save_for_backward``, so saved-tensor hooks see them): the input,
the buffer, the parameters forward used, each BatchNorm's folded coefficients (views
of one tensor per stage forward, :class:`CoefficientStore`)
and, with the ``keep`` policy, each layer's bottleneck output.  Backward uses
only what forward saved: it walks the layers in reverse, recomputes BN-ReLU
outputs from the buffer and accumulates ``dL/dX`` into one gradient buffer.
With ``create_graph=True`` it differentiates a plain recomputation instead
(:mod:`.reference`), so double backward works.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..backends import get_backend
from ..backends.interface import Backend, stats_dtype
from . import reference
from .batchnorm import BatchStatistics, Folded, fold, uses_batch_stats
from .buffers import ScratchArena, channels_last_empty, leading_channels, pixels, rows
from .fastpath import dense_layer_parts, differentiates_recomputation

PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight
# torch.compile traces a stage into its graph from torch 2.14 on (:func:`untraceable`)
COMPILE_TRACES_STAGES = torch.__version__ >= (2, 14)
_said_eager: set[str] = set()  # the reasons _eager_stage has given


def channels_last_copy(t: Tensor) -> Tensor:
    """A channels-last copy of ``t (N, C, *spatial)``."""
    out = channels_last_empty(t.shape[0], t.shape[1], tuple(t.shape[2:]), t)
    return out.copy_(t)


def gemm_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1x1 convolution's weight ``(K, C, 1, ...)`` as the primitives take it:
    ``(K, C)`` in ``dtype`` with stride 1 along ``C`` (a copy only where the
    weight has other strides: one substituted by ``functional_call``, say)."""
    rows = weight.to(dtype).reshape(weight.shape[0], -1)
    return rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()


@dataclass
class LayerRecord:
    """What one layer's forward leaves for its backward."""

    bn1: Folded
    bn2: Folded
    bottleneck: Optional[Tensor]  # (M, 4k) with the keep policy, else recomputed
    seed: Optional[int]  # of the dropout mask


@dataclass
class Records:
    """What a stage's forward leaves for its backward: per layer, and the tail's BatchNorm."""

    keep: bool  # bottleneck outputs kept
    layers: list[LayerRecord] = dataclasses.field(default_factory=list)
    tail: Optional[Folded] = None

    def tensors(self) -> list[Tensor]:
        """Every tensor held, in the order :meth:`filled` takes them back."""
        out = []
        for r in self.layers:
            out += [r.bn1.coeffs, r.bn2.coeffs] + ([r.bottleneck] if self.keep else [])
        return out + ([self.tail.coeffs] if self.tail is not None else [])

    def filled(self, tensors: list[Optional[Tensor]]) -> "Records":
        """A copy holding ``tensors`` in place of the ones :meth:`tensors` listed
        (``None`` each: a copy that holds no tensor)."""
        it = iter(tensors)
        layers = [LayerRecord(dataclasses.replace(r.bn1, coeffs=next(it)), dataclasses.replace(r.bn2, coeffs=next(it)),
                              next(it) if self.keep else None, r.seed) for r in self.layers]
        tail = dataclasses.replace(self.tail, coeffs=next(it)) if self.tail is not None else None
        return Records(self.keep, layers, tail)

    def without_tensors(self) -> "Records":
        return self.filled([None] * len(self.tensors()))


class Stage:
    """One call of a stage: its layers and tail, and everything autograd does not
    track.  Built afresh for every call."""

    def __init__(self, layers: list[nn.Module], tail: "Tail", backend: Backend, keep: bool, arena: ScratchArena,
                 group, next_channels: Optional[int] = None) -> None:
        self.layers = [dense_layer_parts(layer) for layer in layers]
        self.tail = tail
        self.backend = backend
        self.keep = keep
        self.arena = arena
        self.group = group
        self.next_channels = next_channels
        self.growth = self.layers[0].conv2.out_channels if layers else 0
        self.width = self.layers[0].conv1.out_channels if layers else 0  # bottleneck channels, 4k
        self.drop_rate = self.layers[0].drop_rate if layers else 0.0
        self.channel_dropout = bool(layers) and self.layers[0].channel_dropout
        self.buffer: Optional[Tensor] = None  # (N, C_total, *spatial) channels-last; the input is [:, :C0]
        self.next_buffer: Optional[Tensor] = None  # the next block's, when the tail writes into it

    def channels(self, x: Tensor) -> int:
        """Channels of the buffer for stage input ``x``."""
        return x.shape[1] + len(self.layers) * self.growth

    def params(self) -> list[Tensor]:
        """The differentiable parameters, in the order the Function receives them."""
        out = []
        for layer in self.layers:
            out += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight,
                    layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
        return out + self.tail.params()

    def dropout_mask(self, seed: int, like: Tensor) -> Tensor:
        """The keep-mask for ``like (N, k, *spatial)`` scaled by ``1/(1-p)``,
        regenerated from ``seed``: of ``like``'s shape, or ``(N, k, 1, ...)`` where
        whole channels are dropped (it broadcasts)."""
        generator = torch.Generator(device=like.device).manual_seed(seed)
        keep = 1.0 - self.drop_rate
        shape = like.shape[:2] + (1,) * (like.dim() - 2) if self.channel_dropout else like.shape
        mask = torch.empty(shape, dtype=like.dtype, device=like.device)
        return mask.bernoulli_(keep, generator=generator).div_(keep)


# -- tails ------------------------------------------------------------------------------------------
class Tail:
    """What follows the layers; this base class is the empty tail: the output is
    the block's features, ``(N, C_total, *spatial)``, the buffer itself
    (:func:`stage_forward` copies it where backward will read it)."""

    bn: Optional[nn.Module] = None  # the tail's BatchNorm

    def params(self) -> list[Tensor]:
        return []

    def forward(self, stage: Stage, buffer: Tensor, folded: Optional[Folded], params: list[Tensor]) -> Tensor:
        return buffer

    def backward(self, stage: Stage, buffer: Tensor, folded: Optional[Folded], params: list[Tensor],
                 grad_out: Tensor, grad_buffer: Tensor) -> list[Tensor]:
        """Writes ``dL/dbuffer`` into ``grad_buffer``; returns the gradients of :meth:`params`."""
        grad_buffer.copy_(grad_out)
        return []

    def reference(self, features: Tensor, folded: Optional[Folded], params: list[Tensor]) -> Tensor:
        """The same computation in differentiable torch operations."""
        return features


NoTail = Tail


class TransitionTail(Tail):
    """BN-ReLU-AvgPool2-Conv1x1 of a transition (its ``norm`` and ``conv``):
    pooling by 2 along each of the 1, 2 or 3 spatial dimensions."""

    def __init__(self, transition: nn.Module) -> None:
        self.bn = transition.norm
        self.conv = transition.conv

    def params(self) -> list[Tensor]:
        return [self.bn.weight, self.bn.bias, self.conv.weight]

    def forward(self, stage, buffer, folded, params):
        k = self.conv.out_channels
        weight = gemm_weight(params[2], buffer.dtype)
        n, _, *spatial = buffer.shape
        pooled = tuple(size // 2 for size in spatial)
        if stage.next_channels is None:
            out = channels_last_empty(n, k, pooled, buffer)
        else:  # straight into the leading channels of the next block's buffer
            stage.next_buffer = channels_last_empty(n, stage.next_channels, pooled, buffer)
            out = leading_channels(stage.next_buffer, k)
        stage.backend.transition(pixels(buffer), folded.scale, folded.shift, weight, pixels(out))
        return out

    def backward(self, stage, buffer, folded, params, grad_out, grad_buffer):
        weight = gemm_weight(params[2], buffer.dtype)
        grad_weight, grad_gamma, grad_beta = stage.backend.transition_backward(
            pixels(buffer), folded.scale, folded.shift, folded.mean, folded.rstd, weight,
            pixels(grad_out.to(buffer.dtype)).contiguous(), pixels(grad_buffer), folded.batch_mean)
        if any(size % 2 for size in buffer.shape[2:]):
            grad_weight = grad_weight.masked_fill(dropped_activation_not_finite(buffer, folded), math.nan)
        return [grad_gamma, grad_beta, grad_weight.view_as(params[2])]

    def reference(self, features, folded, params):
        z = F.relu(reference.batch_norm(features, folded, params[0], params[1]))
        return reference.avg_pool2(reference.convolution(z, params[2], padding=0))


def dropped_activation_not_finite(buffer: Tensor, folded: Folded) -> Tensor:
    """``(C,)``: whether a pixel that pooling by 2 drops (the last of an odd
    side) has a channel's activation ``relu(x scale + shift)`` Inf or NaN.  The
    transition pools before its convolution, so those pixels never reach its
    weight gradient; torch convolves them and multiplies their zero gradient by
    the activation, which makes that channel's weight gradient NaN."""
    shape = (1, -1) + (1,) * (buffer.dim() - 2)
    bad = torch.zeros(buffer.shape[1], dtype=torch.bool, device=buffer.device)
    for dim, size in enumerate(buffer.shape[2:], start=2):
        if size % 2:
            strip = buffer.narrow(dim, size - 1, 1).to(folded.scale.dtype)
            activation = F.relu(strip * folded.scale.view(shape) + folded.shift.view(shape))
            bad |= ~torch.isfinite(activation).all(dim=0).flatten(1).all(dim=1)
    return bad


class HeadTail(Tail):
    """The classifier's input: BN-ReLU of the final BatchNorm, then global
    average pooling, ``(N, C)``."""

    def __init__(self, bn: nn.Module) -> None:
        self.bn = bn

    def params(self) -> list[Tensor]:
        return [self.bn.weight, self.bn.bias]

    def forward(self, stage, buffer, folded, params):
        n, c = buffer.shape[:2]
        activated = stage.arena.get("head", (buffer[0, 0].numel() * n, c), buffer)
        stage.backend.bn_relu(rows(buffer), folded.scale, folded.shift, activated)
        return activated.view(n, -1, c).mean(1)

    def backward(self, stage, buffer, folded, params, grad_out, grad_buffer):
        n, c = buffer.shape[:2]
        pixels_per_image = buffer[0, 0].numel()
        grad_z = stage.arena.get("head", (n * pixels_per_image, c), buffer)
        grad_z.view(n, pixels_per_image, c).copy_((grad_out / pixels_per_image).unsqueeze(1))
        grad_gamma, grad_beta = stage.backend.bn_relu_backward(rows(buffer), folded.scale, folded.shift, folded.mean,
                                                               folded.rstd, grad_z, rows(grad_buffer), folded.batch_mean)
        return [grad_gamma, grad_beta]

    def reference(self, features, folded, params):
        return F.relu(reference.batch_norm(features, folded, params[0], params[1])).flatten(2).mean(2)


# -- forward and backward ---------------------------------------------------------------------------
class ChannelStatistics:
    """Per-channel batch ``(mean, var)`` of the buffer, each channel computed
    once, when it is written (merged over processes for synchronised BN)."""

    def __init__(self, stage: Stage, statistics: BatchStatistics, c_total: int) -> None:
        bns = [layer.norm1 for layer in stage.layers] + ([stage.tail.bn] if stage.tail.bn is not None else [])
        self.needed = any(uses_batch_stats(bn) for bn in bns)
        self.backend, self.statistics = stage.backend, statistics
        if self.needed:
            self.mean = torch.empty(c_total, dtype=stats_dtype(stage.buffer.dtype), device=stage.buffer.device)
            self.var = torch.empty_like(self.mean)

    def add(self, features: Tensor, start: int, stop: int) -> None:
        """Channels ``[start, stop)`` of ``features (M, C_total)`` were written."""
        if self.needed:
            stats = self.statistics.merge(self.backend.channel_stats(features[:, start:stop]))
            self.mean[start:stop], self.var[start:stop] = stats

    def of_first(self, channels: int) -> Optional[tuple[Tensor, Tensor]]:
        return (self.mean[:channels], self.var[:channels]) if self.needed else None


class CoefficientStore:
    """One tensor for every folded BatchNorm a stage's forward saves for backward
    (each layer's norm1 and norm2, the tail's), so that they are one allocation
    instead of two per layer: exact to account for, and no small blocks left on
    the C heap.  :meth:`take` hands out the next ``(4, C)`` block, in order."""

    def __init__(self, stage: Stage, c0: int, like: Tensor) -> None:
        channels = sum(c0 + i * stage.growth + stage.width for i in range(len(stage.layers)))
        channels += c0 + len(stage.layers) * stage.growth if stage.tail.bn is not None else 0
        self.values = torch.empty(4 * channels, dtype=stats_dtype(like.dtype), device=like.device)
        self.offset = 0

    def take(self, channels: int) -> Tensor:
        block = self.values[self.offset:self.offset + 4 * channels].view(4, channels)
        self.offset += 4 * channels
        return block


class GradientStore:
    """One tensor for the gradients of a stage's parameters, which its backward
    returns as views of it, each in its parameter's dtype and layout: one
    allocation per stage instead of six per layer, so that the gradients backward
    keeps leave no small blocks between its temporaries on the C heap.  Autograd
    keeps the views as the parameters' ``.grad``; the tensor is freed when the
    last of them is.  ``None`` in ``params`` (a frozen parameter) gets no room
    and no gradient."""

    def __init__(self, params: list[Optional[Tensor]]) -> None:
        wanted = [p for p in params if p is not None]
        self.values = torch.empty(sum(p.numel() for p in wanted), dtype=wanted[0].dtype, device=wanted[0].device)
        self.views, offset = [], 0
        for p in params:  # empty_like keeps a dense layout's strides (channels-last weights too)
            if p is None:
                self.views.append(None)
                continue
            stride = p.stride() if p.is_contiguous() else torch.empty_like(p, device="meta").stride()
            self.views.append(self.values.as_strided(p.shape, stride, offset))
            offset += p.numel()

    @staticmethod
    def usable(params: list[Optional[Tensor]]) -> bool:
        """Whether one tensor can hold them: at least one, of one dtype and device, and
        not while compiling (a compiled graph plans its own memory)."""
        kinds = {(p.dtype, p.device) for p in params if p is not None}
        return len(kinds) == 1 and not torch.compiler.is_compiling()

    def put(self, start: int, grads: list[Tensor]) -> list[Optional[Tensor]]:
        """``grads`` of parameters ``start, start + 1, ...`` copied into their views;
        returns the views (``None`` for a frozen parameter)."""
        views = self.views[start:start + len(grads)]
        pairs = [(view, grad) for view, grad in zip(views, grads) if view is not None]
        if pairs:  # none for a tail without parameters, or where all are frozen
            torch._foreach_copy_([view for view, _ in pairs], [grad for _, grad in pairs])
        return views


def kept_bottlenecks(stage: Stage, m: int, like: Tensor, one_tensor: bool) -> list[Tensor]:
    """Where each layer's bottleneck output goes with the ``keep`` policy, ``(M, 4k)``
    each: views of one ``(L, M, 4k)`` tensor (one allocation, as :class:`CoefficientStore`),
    or, with ``one_tensor`` false, one tensor each."""
    shape = (len(stage.layers), m, stage.width)
    if one_tensor:
        return list(torch.empty(shape, dtype=like.dtype, device=like.device).unbind(0))
    return [torch.empty(shape[1:], dtype=like.dtype, device=like.device) for _ in range(shape[0])]


def layer_forward(stage: Stage, i: int, params: list[Tensor], cache: ChannelStatistics,
                  kept: Optional[Tensor], store: Optional[CoefficientStore]) -> LayerRecord:
    """Dense layer ``i``: reads channels ``[0, C_i)`` of the buffer, writes its ``k`` new ones.
    ``kept``: ``(M, 4k)``, where its bottleneck output goes with the ``keep`` policy;
    ``store``: where its folded BatchNorms go when backward needs them."""
    backend, arena, buffer = stage.backend, stage.arena, stage.buffer
    layer, statistics = stage.layers[i], cache.statistics
    gamma1, beta1, w1, gamma2, beta2, w2 = params[i * PARAMS_PER_LAYER:(i + 1) * PARAMS_PER_LAYER]
    n, c_total, *spatial = buffer.shape
    k, width, m = stage.growth, stage.width, statistics.count
    c = c_total - (len(stage.layers) - i) * k
    features = rows(buffer)
    bn1 = fold(layer.norm1, gamma1, beta1, cache.of_first(c), statistics, buffer.dtype, (n, c, *spatial), backend,
               store.take(c) if store else None)
    bottleneck = kept if kept is not None else arena.get("bottleneck", (m, width), buffer)
    batch2 = uses_batch_stats(layer.norm2)
    local2 = backend.bn_relu_conv1x1(features[:, :c], bn1.scale, bn1.shift, gemm_weight(w1, buffer.dtype),
                                     bottleneck, with_stats=batch2)
    bn2 = fold(layer.norm2, gamma2, beta2, statistics.merge(local2) if batch2 else None, statistics, buffer.dtype,
               (n, width, *spatial), backend, store.take(width) if store else None)
    activated = arena.get("bn2_out", (n, *spatial, width), buffer)
    backend.bn_relu(bottleneck, bn2.scale, bn2.shift, activated.view(m, width))
    new = reference.convolution(activated.movedim(-1, 1), w2, padding=1)
    seed = None
    if stage.drop_rate > 0:
        seed = int(torch.randint(2**62, (1,)).item())
        new = new * stage.dropout_mask(seed, new)
    buffer[:, c:c + k].copy_(new)
    del new
    cache.add(features, c, c + k)
    return LayerRecord(bn1, bn2, kept, seed)


def stage_forward(stage: Stage, params: list[Tensor], for_backward: bool) -> tuple[Tensor, Records]:
    """The stage's output, and what its backward needs."""
    with stage.arena.scope():  # the pass's scratch, freed when it ends
        buffer = stage.buffer
        c_total = buffer.shape[1]
        c0 = c_total - len(stage.layers) * stage.growth
        statistics = BatchStatistics(stage.group, buffer.shape[0] * buffer[0, 0].numel())
        cache = ChannelStatistics(stage, statistics, c_total)
        cache.add(rows(buffer), 0, c0)
        records = Records(for_backward and stage.keep)
        # a compiled graph plans its own memory (and refuses saved views of one tensor made inside it)
        one_tensor = for_backward and not torch.compiler.is_compiling()
        store = CoefficientStore(stage, c0, buffer) if one_tensor else None
        kept = kept_bottlenecks(stage, statistics.count, buffer, one_tensor) if records.keep else None
        for i in range(len(stage.layers)):
            record = layer_forward(stage, i, params, cache, kept[i] if kept else None, store)
            if for_backward:
                records.layers.append(record)
        tail_params = params[len(stage.layers) * PARAMS_PER_LAYER:]
        if stage.tail.bn is not None:
            records.tail = fold(stage.tail.bn, tail_params[0], tail_params[1], cache.of_first(c_total), statistics,
                                buffer.dtype, tuple(buffer.shape), stage.backend,
                                store.take(c_total) if store else None)
        out = stage.tail.forward(stage, buffer, records.tail, tail_params)
        if for_backward and out is buffer:  # backward reads the buffer; the caller may change out in place
            out = buffer.clone()
        return out, records


def conv3x3_backward(grad_out: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dweight)`` of the 3x3 convolution (padding 1) of ``x (N, 4k,
    *spatial)`` for ``grad_out (N, k, *spatial)``.  torch 2.14.1's bfloat16 weight
    gradient of a 3-D convolution on the CPU (oneDNN's) reads memory it did not
    write where a spatial size is 2: NaN or any value (docs/engine.md, "A
    bfloat16 3-D weight gradient"); there it is made in float32."""
    d = x.dim() - 2
    args = (None, [1] * d, [1] * d, [1] * d, False, [0] * d, 1)
    if not bfloat16_weight_gradient_fails(x.device.type, x.dtype, tuple(x.shape[2:])):
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(grad_out, x, weight, *args, [True, True, False])
        return grad_x, grad_weight
    grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, *args, [True, False, False])[0]
    grad_weight = torch.ops.aten.convolution_backward(grad_out.float(), x.float(), weight.float(), *args,
                                                      [False, True, False])[1]
    return grad_x, grad_weight


def bfloat16_weight_gradient_fails(device_type: str, dtype: torch.dtype, spatial: tuple[int, ...]) -> bool:
    """Whether torch's 3x3 convolution weight gradient on that device, dtype and
    spatial size is the CPU's bfloat16 3-D one with a spatial size of 2
    (:func:`conv3x3_backward`)."""
    return device_type == "cpu" and dtype == torch.bfloat16 and len(spatial) == 3 and 2 in spatial


def layer_backward(stage: Stage, i: int, record: LayerRecord, buffer: Tensor, grad_buffer: Tensor,
                   params: list[Tensor]) -> list[Tensor]:
    """Backward of dense layer ``i``: its new channels' gradient in ``grad_buffer``
    is complete; adds ``dL/dX`` of its input channels into ``grad_buffer`` and
    returns the gradients of its six parameters."""
    backend, arena = stage.backend, stage.arena
    _, _, w1, _, _, w2 = params[i * PARAMS_PER_LAYER:(i + 1) * PARAMS_PER_LAYER]
    n, c_total, *spatial = buffer.shape
    k, width = stage.growth, stage.width
    m = n * math.prod(spatial)
    c = c_total - (len(stage.layers) - i) * k
    bn1, bn2 = record.bn1, record.bn2
    features = rows(buffer)
    w1_rows = gemm_weight(w1, buffer.dtype)
    grad_new = grad_buffer[:, c:c + k]
    if record.seed is not None:
        grad_new = grad_new * stage.dropout_mask(record.seed, grad_new)
    bottleneck = record.bottleneck
    if bottleneck is None:
        bottleneck = arena.get("bottleneck", (m, width), buffer)
        backend.bn_relu_conv1x1(features[:, :c], bn1.scale, bn1.shift, w1_rows, bottleneck, with_stats=False)
    activated = arena.get("bn2_out", (n, *spatial, width), buffer)
    backend.bn_relu(bottleneck, bn2.scale, bn2.shift, activated.view(m, width))
    grad_activated, grad_w2 = conv3x3_backward(channels_last_copy(grad_new), activated.movedim(-1, 1),
                                               w2.to(buffer.dtype))
    del grad_new
    # rows with channel stride 1: ATen's 1-D and 3-D im2col convolutions (slow_conv3d; batch 1, small
    # inputs) give it channels-first, which at batch 1 would otherwise view as (M, 4k) with strides (1, M)
    grad_bottleneck = grad_activated.movedim(1, -1).contiguous().view(m, width)
    del grad_activated
    grad_gamma2, grad_beta2 = backend.bn_relu_backward(bottleneck, bn2.scale, bn2.shift, bn2.mean, bn2.rstd,
                                                       grad_bottleneck, grad_bottleneck, bn2.batch_mean)
    grad_w1, grad_gamma1, grad_beta1 = backend.bn_relu_conv1x1_backward(
        features[:, :c], bn1.scale, bn1.shift, bn1.mean, bn1.rstd, w1_rows, grad_bottleneck.to(buffer.dtype),
        rows(grad_buffer)[:, :c], bn1.batch_mean)
    return [grad_gamma1, grad_beta1, grad_w1.view_as(w1), grad_gamma2, grad_beta2, grad_w2]


def stage_backward(stage: Stage, records: Records, buffer: Tensor, params: list[Tensor], grad_out: Tensor,
                   needs_grad: Sequence[bool]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """Returns ``(dL/dx (N, C0, *spatial), gradients of params)``, each gradient in
    its parameter's dtype (views of one :class:`GradientStore` where they can be),
    ``None`` where ``needs_grad`` (one per parameter) is false."""
    with stage.arena.scope():  # the pass's scratch, freed when it ends
        n, c_total, *spatial = buffer.shape
        if torch.compiler.is_compiling():
            # Inductor keeps the saved buffer in a layout of its choosing; the kernels need channels-last
            # (a plain channels-last copy would be planned away: the first contiguous() pins a layout).
            buffer = buffer.contiguous().movedim(1, -1).contiguous().movedim(-1, 1)
        grad_buffer = stage.arena.get("grad_buffer", (n, *spatial, c_total), buffer).movedim(-1, 1)
        layer_params = len(stage.layers) * PARAMS_PER_LAYER
        tail_grads = stage.tail.backward(stage, buffer, records.tail, params[layer_params:], grad_out, grad_buffer)
        # made once the tail's workspace (a transition's: its weight gradient's partials) is freed
        wanted = [p if needed else None for p, needed in zip(params, needs_grad)]
        store = GradientStore(wanted) if GradientStore.usable(wanted) else None

        def stored(start: int, grads: list[Tensor]) -> list[Optional[Tensor]]:  # in the store once they are made
            if store:
                return store.put(start, grads)
            return [None if p is None else g.to(p.dtype) for g, p in zip(grads, wanted[start:])]

        tail_grads = stored(layer_params, tail_grads)
        layer_grads = [stored(i * PARAMS_PER_LAYER,
                              layer_backward(stage, i, records.layers[i], buffer, grad_buffer, params))
                       for i in reversed(range(len(stage.layers)))]
        grads = [g for grads in reversed(layer_grads) for g in grads] + tail_grads
        c0 = c_total - len(stage.layers) * stage.growth
        return channels_last_copy(grad_buffer[:, :c0]), grads


class StageFunction(torch.autograd.Function):
    """``apply(x, stage, *params)``: the stage's output; ``x`` is ``stage.buffer[:, :C0]``."""

    @staticmethod
    def forward(ctx, x: Tensor, stage: Stage, *params: Tensor) -> Tensor:
        if stage.buffer is None:  # under torch.compile the buffer is made here, not passed in
            stage.buffer = into_buffer(x, stage.channels(x))[1]
        out, records = stage_forward(stage, list(params), for_backward=True)
        # x only serves double backward, which torch.compile does not support; there x is a view
        # of the buffer that this forward modified, which autograd would refuse to unpack
        saved_x = None if torch.compiler.is_compiling() else x
        ctx.save_for_backward(saved_x, stage.buffer, *params, *records.tensors())
        ctx.stage, ctx.records, ctx.num_params = stage, records.without_tensors(), len(params)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, buffer, *rest = ctx.saved_tensors
        params, records = rest[:ctx.num_params], ctx.records.filled(rest[ctx.num_params:])
        # backward() may be called inside autocast.  A compiled backward runs with autocast off already
        # (AOTAutograd), and dynamo traces this backward twice (the second time with contiguous
        # gradients), leaving an autocast context of the first trace entered: "Global autocast state
        # changed while dynamo tracing"
        with contextlib.nullcontext() if torch.compiler.is_compiling() else autocast_off(buffer.device.type):
            if differentiates_recomputation(grad_out):  # create_graph=True, or vmap around backward
                return reference.stage_gradients(ctx.stage, records, x, params, grad_out, ctx.needs_input_grad)
            del x  # (a saved-tensor hook may have given it back as a tensor of its own)
            if not torch.compiler.is_compiling() and not buffer.movedim(1, -1).is_contiguous():
                # a saved-tensor hook gave it back in another layout (save_on_cpu(pin_memory=True): contiguous);
                # the copy replaces it, so that backward holds two buffer-sized tensors, not three
                buffer = channels_last_copy(buffer)
            grad_x, grads = stage_backward(ctx.stage, records, buffer, params, grad_out, ctx.needs_input_grad[2:])
        return (grad_x.to(buffer.dtype), None, *grads)


def into_buffer(x: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """``(buffer[:, :C0], buffer)``: ``x (N, C0, *spatial)`` copied into the leading
    channels of a new channels-last buffer of ``channels`` channels."""
    buffer = channels_last_empty(x.shape[0], channels, tuple(x.shape[2:]), x)
    return leading_channels(buffer, x.shape[1]).copy_(x), buffer


class IntoBuffer(torch.autograd.Function):
    """``apply(x, channels, holder)``: :func:`into_buffer` as a Function (the buffer
    is appended to ``holder``); the gradient passes through, in ``x``'s layout."""

    @staticmethod
    def forward(ctx, x: Tensor, channels: int, holder: list) -> Tensor:
        ctx.channels_last = not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
        view, buffer = into_buffer(x, channels)
        holder.append(buffer)
        return view

    @staticmethod
    def backward(ctx, grad: Tensor):
        # (out of place: a batched gradient, is_grads_batched=True, cannot be copied into an unbatched tensor)
        grad = grad.movedim(1, -1).contiguous().movedim(-1, 1) if ctx.channels_last else grad.contiguous()
        return grad, None, None


@dataclass
class Settings:
    """What a model's blocks and transitions share: the backend choice (``None``:
    automatic), the scratch arena, the synchronisation group of batch statistics,
    where the model was built with layers the engine cannot run, why (then
    every block and transition runs its per-layer code; the model said so once),
    and whether the model plans its training steps under a memory budget."""

    backend: Optional[str] = None
    arena: ScratchArena = dataclasses.field(default_factory=ScratchArena)
    sync_group: object = None
    plain_reason: Optional[str] = None
    budgeted: bool = False

    def __deepcopy__(self, memo) -> "Settings":
        """A copy (a copied model's) that shares the synchronisation group: a
        handle on this process's place among the others, which cannot be copied
        (a model's copy, say its moving average, synchronises over the same
        processes)."""
        return Settings(**{field.name: getattr(self, field.name) if field.name == "sync_group"
                           else copy.deepcopy(getattr(self, field.name), memo) for field in dataclasses.fields(self)})

    def __getstate__(self) -> dict:
        if self.sync_group is not None:
            raise TypeError("a model that synchronises batch statistics cannot be pickled (its process group "
                            "belongs to this process): call set_sync_group(None) first, and set_sync_group again "
                            "after loading it")
        return self.__dict__


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off for ``device_type``: a stage casts its input to the
    compute dtype itself, and autocast would turn the float32 products that the
    CPU backends make on purpose (``torch_backend.mm``) back into float16/bfloat16."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast exists for ``device_type`` and is on."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the stage computes in: autocast's for ``x``'s device when
    enabled, unless ``x`` is float64, which autocast leaves alone."""
    if x.dtype != torch.float64 and autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def is_leading_channels(x: Tensor, buffer: Optional[Tensor], channels: int) -> bool:
    """Whether ``x`` is exactly ``buffer[:, :C0]`` of a ``channels``-channel buffer."""
    return (buffer is not None and not torch.compiler.is_compiling() and buffer.shape[1] == channels and x.shape[0] == buffer.shape[0]
            and x.shape[2:] == buffer.shape[2:] and x.dtype == buffer.dtype and x.data_ptr() == buffer.data_ptr()
            and x.stride() == buffer.stride())


def run_stage(layers: list[nn.Module], tail: Tail, x: Tensor, settings: Settings, keep: bool,
              buffer: Optional[Tensor] = None, next_channels: Optional[int] = None
              ) -> tuple[Tensor, Optional[Tensor]]:
    """Run ``layers`` and ``tail`` on ``x (N, C0, *spatial)``; returns ``(output,
    next block's buffer or None)``.  ``buffer``: the one ``x`` already lives in,
    if any; ``next_channels``: make a transition write into a new buffer of that
    many channels (the next block's).  Under ``torch.compile``, a stage it cannot
    trace (:func:`untraceable`) runs eagerly between graphs."""
    reason = untraceable(layers, tail) if torch.compiler.is_compiling() else None
    if reason is not None:
        return _eager_stage(reason, layers, tail, x, settings, keep, buffer, next_channels)
    return _stage(layers, tail, x, settings, keep, buffer, next_channels)


def untraceable(layers: list[nn.Module], tail: Tail) -> Optional[str]:
    """Why ``torch.compile`` cannot trace this stage into its graph, or
    ``None``: before torch 2.14 (its dynamo fails on :class:`StageFunction`:
    on 2.11 an AssertionError on the shape integers a stage keeps, on 2.13 an
    InternalTorchDynamoError on the next block's buffer, made inside the
    Function's subgraph, aliasing its output), and where the
    stage's forward reads a Python number from a tensor: a
    dropout seed, or the cumulative factor of a BatchNorm with
    ``momentum=None`` (dynamo then fails at a graph break inside the Function)."""
    if not COMPILE_TRACES_STAGES:
        return "torch before 2.14"
    parts = [dense_layer_parts(layer) for layer in layers]
    if any(p.drop_rate > 0 for p in parts):
        return "dropout (its seed)"
    norms = [bn for p in parts for bn in (p.norm1, p.norm2)] + ([tail.bn] if tail.bn is not None else [])
    if any(bn.training and bn.track_running_stats and bn.momentum is None for bn in norms):
        return "a BatchNorm with momentum=None (its cumulative factor)"
    return None


@torch.compiler.disable
def _eager_stage(reason: str, layers: list[nn.Module], tail: Tail, x: Tensor, settings: Settings, keep: bool,
                 buffer: Optional[Tensor], next_channels: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`_stage` outside ``torch.compile``'s graph, said once per ``reason``."""
    if reason not in _said_eager:
        _said_eager.add(reason)
        warnings.warn(f"densenet_fast: under torch.compile, dense stages with {reason} run eagerly between "
                      f"graphs", RuntimeWarning, stacklevel=2)
    return _stage(layers, tail, x, settings, keep, buffer, next_channels)


def _stage(layers: list[nn.Module], tail: Tail, x: Tensor, settings: Settings, keep: bool,
           buffer: Optional[Tensor], next_channels: Optional[int]) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`run_stage`."""
    dtype = compute_dtype(x)
    backend = get_backend(settings.backend, x.device)
    device_type = x.device.type
    with autocast_off(device_type):
        x = x.to(dtype)
        stage = Stage(layers, tail, backend, keep, settings.arena, settings.sync_group, next_channels)
        params = stage.params()
        with_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if not layers:  # a lone tail: its input is the buffer
            stage.buffer = x = x if x.movedim(1, -1).is_contiguous() else channels_last_copy(x)
        elif is_leading_channels(x, buffer, stage.channels(x)):
            stage.buffer = buffer
        elif with_grad and not torch.compiler.is_compiling():
            # the input goes into the buffer outside the stage Function, so that the Function's
            # saved input (for double backward) is part of the buffer, not a copy kept alive
            holder: list[Tensor] = []
            x = IntoBuffer.apply(x, stage.channels(x), holder)
            stage.buffer = holder[0]
        if with_grad:
            out = StageFunction.apply(x, stage, *params)
        else:
            if stage.buffer is None:
                stage.buffer = into_buffer(x, stage.channels(x))[1]
            with torch.no_grad():
                out = stage_forward(stage, [p.detach() for p in params], for_backward=False)[0]
        next_buffer = stage.next_buffer
        stage.buffer = stage.next_buffer = None  # autograd holds what backward needs
        return out, next_buffer
