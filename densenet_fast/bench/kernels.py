"""``bench kernels``: every primitive on every backend against torch's unfused ops.

The primitives of :mod:`densenet_fast.backends.interface`, on every available
backend, against torch's unfused equivalent (what torchvision runs:
``torch.cat`` of the features, ``BatchNorm2d`` in training mode, ReLU, 1x1
convolution, on NCHW tensors, or channels-last ones with ``--channels-last``),
over DenseNet-121 and DenseNet-BC layer shapes (``--shapes``, :func:`layer_shapes`).

Every implementation computes one function on the same data: a layer's input
``x`` is the first ``C`` channels of a channels-last block buffer, and its
BatchNorm is folded (by the torch backend) from ``x``'s batch statistics.
With ``--check`` each backend's outputs (with ``--cuda-graphs``, its graph's
replay's: what is timed) are compared with float32 autograd
(float64 for float64 data) of the unfused ops on that data (``max_rel_error``; ``correct`` if within
``TOLERANCE`` of the dtype, which for fp32 assumes exact dots: TF32 off), so a
run is evidence of correctness where pytest is missing.  The JSON is rewritten
after every (primitive, shape), and a case that raises is recorded with its
``error`` while the others run: a run stopped by a time limit keeps what it
measured.

Reported per (primitive, shape, implementation): median time, GB/s (the bytes
that must move, below, over the time) and the fraction of the roofline
``max(bytes / copy bandwidth, FLOPs / matmul rate) / time``, with the copy
bandwidth and matmul rate measured at the start of the run (the matmul rate in
the data's dtype, or in float32 where that is faster: 16-bit matrix products
on a CPU without 16-bit units).  A fraction above 1 means the bound was
beaten: the operands stayed in cache (memory-bound rows) or the backend's
products ran faster than ``torch.mm`` (compute-bound rows).  Bytes that must
move, for ``x (M, C)``, bottleneck ``K`` channels, element size ``e``, the
weight ``(K, C)`` and its gradient in the statistics' dtype (element size
``g``: float32 for 16-bit data); the per-channel vectors are left out:

- channel_stats: read x: ``M C e``
- bn_relu_conv1x1: read x and the weight, write out: ``(M C + K C + M K) e``;
  FLOPs ``2 M C K``
- bn_relu_conv1x1_backward: read x, the weight and grad_out, read and write
  grad_x: ``(3 M C + K C + M K) e``, write the weight's gradient: ``K C g``;
  FLOPs ``4 M C K``
- bn_relu (on the bottleneck, ``M x K``): ``2 M K e``; backward ``3 M K e``
- transition (``x (N, H, W, C)`` -> ``(N, H//2, W//2, K)``, ``P`` pooled
  pixels, ``4 P`` of x's pixels pooled, all of them where ``H`` and ``W`` are
  even): ``(4 P C + K C + P K) e``; FLOPs ``2 P C K``; backward (grad_x is
  written, zero where a pixel is not pooled) ``(4 P C + M C + K C + P K) e
  + K C g``, FLOPs ``4 P C K``

Times are of one call each between CUDA events on a GPU (after the GPU has
finished the previous call: a call whose launches take longer on the host than
its kernels on the GPU is timed at the host's speed; ``--cuda-graphs`` times
the replay of each call captured in a CUDA graph instead, the GPU's time) or
of the wall clock on a CPU, without flushing the caches between calls; the
implementations take turns, so that a change in load hits all of them.
float32 is computed as float32 throughout (TF32 off, as the matmul rate and
``--check``'s tolerance assume).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.interface import stats_dtype
from ..backends.torch_backend import TorchBackend
from . import common
from .worker import DTYPES

PRIMITIVES = ("channel_stats", "bn_relu_conv1x1", "bn_relu_conv1x1_backward", "bn_relu", "bn_relu_backward",
              "transition", "transition_backward")
BASELINE = "torch-unfused"
EPS = 1e-5  # the BatchNorms' (torch's default)
# --check: max relative error against float32 (float64) autograd on the same (rounded) data
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class LayerShape:
    """A dense layer (or transition) reading ``c0 + layers * k`` channels of an
    ``n x h x w`` block buffer of ``total`` channels (0: ``k`` more than it
    reads); ``bottleneck`` is 4k, ``transition_out`` the transition's width."""

    name: str
    n: int
    h: int
    w: int
    c0: int
    layers: int
    k: int
    total: int = 0

    @property
    def channels(self) -> int:
        return self.c0 + self.layers * self.k

    @property
    def buffer_channels(self) -> int:
        return self.total or self.channels + self.k

    @property
    def rows(self) -> int:
        return self.n * self.h * self.w

    @property
    def bottleneck(self) -> int:
        return 4 * self.k

    @property
    def transition_out(self) -> int:
        return self.channels // 2

    @property
    def pooled_rows(self) -> int:
        """Pixels of the transition's output (average pooling by 2, odd sides floored)."""
        return self.n * (self.h // 2) * (self.w // 2)


def layer_shapes(batch_121: int, batch_bc: int) -> dict[str, LayerShape]:
    """The shapes ``--shapes`` names: the full widths of DenseNet-121's blocks 1
    and 3 (224x224 input) and of DenseNet-BC-100's blocks 1 and 3 (32x32 input,
    k=12; ``C`` is the transition's input, ``k`` more channels than the block's
    last layer reads; the default), single DenseNet-121 layers reading ``C``
    channels of their block's full buffer (``121-block3-C<C>``,
    ``121-block1-C<C>``; the widest is the transition's input), block 2 of
    DenseNet-BC-1402 (``bc1402-block2``: 32x32 input, k=12, 1410 + 233 x 12 =
    4206 channels, the 2 GiB depth benchmark's deep transition), and, for smoke
    tests, ``tiny-C24`` and ``tiny-C40`` (batch 2, 5x5, a 40-channel buffer, k=4)."""
    shapes = [LayerShape("121-block1", batch_121, 56, 56, 64, 6, 32),
              LayerShape("121-block3", batch_121, 14, 14, 256, 24, 32),
              LayerShape("bc100-block1", batch_bc, 32, 32, 24, 16, 12),
              LayerShape("bc100-block3", batch_bc, 8, 8, 150, 16, 12),
              LayerShape("bc1402-block2", batch_bc, 16, 16, 1410, 233, 12),
              *(LayerShape(f"121-block3-C{256 + 32 * i}", batch_121, 14, 14, 256, i, 32, total=1024)
                for i in (0, 8, 16, 24)),
              *(LayerShape(f"121-block1-C{64 + 32 * i}", batch_121, 56, 56, 64, i, 32, total=256) for i in (2, 6)),
              *(LayerShape(f"tiny-C{24 + 4 * i}", 2, 5, 5, 24, i, 4, total=40) for i in (0, 4))]
    return {shape.name: shape for shape in shapes}


DEFAULT_SHAPES = ["121-block1", "121-block3", "bc100-block1", "bc100-block3"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", type=common.device_type)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--batch", type=common.at_least(1), default=4, help="batch of the DenseNet-121 shapes")
    parser.add_argument("--batch-bc", type=common.at_least(1), default=16, help="batch of the DenseNet-BC shapes")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs on the device")
    parser.add_argument("--primitives", nargs="+", default=list(PRIMITIVES), choices=PRIMITIVES)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(layer_shapes(1, 1)))
    parser.add_argument("--channels-last", action="store_true", help="the unfused ops on channels-last tensors")
    parser.add_argument("--check", action="store_true",
                        help="compare every backend's outputs with float32 autograd of the unfused ops")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each call captured in a CUDA graph (the GPU's time without the host's launches)")
    parser.add_argument("--threads", type=common.at_least(1), default=None,
                        help="torch threads on the CPU (default: torch's; each thread adds to the noise of a loaded "
                             "machine)")
    parser.add_argument("--warmup", type=common.at_least(0), default=2)
    parser.add_argument("--repeats", type=common.at_least(1), default=7)
    parser.add_argument("--out", type=common.output_file, default=None)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


# -- the machine's roofline ------------------------------------------------------------------
def machine_rates(device: str, dtype: torch.dtype, repeats: int = 5) -> dict:
    """Measured copy bandwidth (bytes/s, read + write, of a tensor of 32 MiB on
    a CPU, 256 MiB on a GPU, in any dtype) and matmul rate (FLOP/s, in
    ``dtype`` or float32, the faster), from the fastest of ``repeats`` runs
    (what the hardware can do)."""
    tensor_bytes = (256 if device.startswith("cuda") else 32) * common.MIB
    src = torch.randn(tensor_bytes // dtype.itemsize, device=device).to(dtype)
    dst = torch.empty_like(src)
    copy_s = min(common.time_function(lambda: dst.copy_(src), device, 2, repeats))
    n = 8192 if device.startswith("cuda") else 1024
    products = {str(d).removeprefix("torch."): functools.partial(torch.mm, *(torch.randn(n, n, device=device).to(d)
                                                                           for _ in range(2)))
                for d in dict.fromkeys([dtype, torch.promote_types(dtype, torch.float32)])}
    # each dtype timed once (a float16 product on a CPU without 16-bit units takes seconds), the faster fully
    matmul = {name: 2 * n**3 / min(common.time_function(mm, device, 1, 1)) for name, mm in products.items()}
    fastest = max(matmul, key=matmul.get)
    matmul[fastest] = 2 * n**3 / min(common.time_function(products[fastest], device, 2, repeats))
    return {"copy_bytes_per_s": 2 * tensor_bytes / copy_s, "copy_tensor_bytes": tensor_bytes,
            "matmul_flops_per_s": matmul[fastest], "matmul_dtype": fastest, "matmul_flops_per_s_by_dtype": matmul,
            "matmul_n": n}


def cost(primitive: str, s: LayerShape, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes that must move, FLOPs that must be done) of one call on ``dtype``
    data (see the module docstring)."""
    m, c, k, t, p = s.rows, s.channels, s.bottleneck, s.transition_out, s.pooled_rows
    e, g = dtype.itemsize, stats_dtype(dtype).itemsize
    return {
        "channel_stats": (m * c * e, 0.0),
        "bn_relu_conv1x1": ((m * c + k * c + m * k) * e, 2.0 * m * c * k),
        "bn_relu_conv1x1_backward": ((3 * m * c + k * c + m * k) * e + k * c * g, 4.0 * m * c * k),
        "bn_relu": (2 * m * k * e, 0.0),
        "bn_relu_backward": (3 * m * k * e, 0.0),
        "transition": ((4 * p * c + t * c + p * t) * e, 2.0 * p * c * t),
        "transition_backward": ((4 * p * c + m * c + t * c + p * t) * e + t * c * g, 4.0 * p * c * t),
    }[primitive]


# -- the calls -----------------------------------------------------------------------------
TORCH = TorchBackend()


class BatchNorm(NamedTuple):
    """Affine parameters and the BatchNorm folded with them (statistics dtype)."""

    gamma: Tensor
    beta: Tensor
    scale: Tensor
    shift: Tensor
    mean: Tensor
    rstd: Tensor


def batch_norm(x: Tensor, generator: torch.Generator) -> BatchNorm:
    """Random ``gamma, beta`` and the BatchNorm that normalises ``x (M, C)`` with
    its batch statistics, folded by the torch backend."""
    c, dtype = x.shape[1], stats_dtype(x.dtype)
    gamma = (0.5 + torch.rand(c, generator=generator, dtype=torch.float64)).to(x.device, dtype)
    beta = torch.randn(c, generator=generator, dtype=torch.float64).to(x.device, dtype)
    return BatchNorm(gamma, beta, *TORCH.fold_batchnorm(*TORCH.channel_stats(x), gamma, beta, EPS, None))


def bn_relu_unfused(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return F.relu(F.batch_norm(x, None, None, gamma, beta, training=True, eps=EPS))


def layer_unfused(x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(bn_relu_unfused(x, gamma, beta), weight)


def transition_unfused(x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor) -> Tensor:
    return F.avg_pool2d(layer_unfused(x, gamma, beta, weight), 2)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


class Operands:
    """Random operands of one shape: the block buffer (``N x H x W x total``,
    channels-last; ``x`` its first ``C`` channels as rows), the BatchNorms of
    ``x`` and of a bottleneck ``(M, 4k)`` (batch statistics), weights and
    output gradients; ``channels_last``: the unfused ops' layout."""

    def __init__(self, s: LayerShape, device: str, dtype: torch.dtype, channels_last: bool = False) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        m, c, k, t = s.rows, s.channels, s.bottleneck, s.transition_out
        self.shape, self.layout = s, torch.channels_last if channels_last else torch.contiguous_format
        self.buffer = rand(s.n, s.h, s.w, s.buffer_channels)
        self.x = self.buffer.view(m, s.buffer_channels)[:, :c]
        self.full = self.buffer[..., :c]
        self.bottleneck = rand(m, k)
        self.bn, self.bn_b = batch_norm(self.x, g), batch_norm(self.bottleneck, g)
        self.weight, self.weight_t = rand(k, c) / c**0.5, rand(t, c) / c**0.5
        self.out, self.grad_out = torch.empty(m, k, device=device, dtype=dtype), rand(m, k)
        # a channel range of the block's gradient buffer, as the engine passes it
        self.grad_x = torch.zeros(m, s.buffer_channels, device=device, dtype=dtype)[:, :c]
        self.grad_full = torch.zeros(s.n, s.h, s.w, c, device=device, dtype=dtype)
        self.out_t = torch.empty(s.n, s.h // 2, s.w // 2, t, device=device, dtype=dtype)
        self.grad_out_t = rand(s.n, s.h // 2, s.w // 2, t)
        self.batch_mean = lambda sums: sums / m

    def image(self, rows: Tensor) -> Tensor:
        """Rows ``(M, c)`` as an ``(N, c, H, W)`` view."""
        s = self.shape
        return rows.reshape(s.n, s.h, s.w, -1).permute(0, 3, 1, 2)

    def backend_call(self, backend, primitive: str):
        """A no-argument call of ``backend``'s ``primitive`` on these operands."""
        o, bn, bn_b = self, self.bn, self.bn_b
        return {
            "channel_stats": lambda: backend.channel_stats(o.x),
            "bn_relu_conv1x1": lambda: backend.bn_relu_conv1x1(o.x, bn.scale, bn.shift, o.weight, o.out, True),
            "bn_relu_conv1x1_backward": lambda: backend.bn_relu_conv1x1_backward(
                o.x, *bn[2:], o.weight, o.grad_out, o.grad_x, o.batch_mean),
            "bn_relu": lambda: backend.bn_relu(o.bottleneck, bn_b.scale, bn_b.shift, o.out),
            "bn_relu_backward": lambda: backend.bn_relu_backward(
                o.bottleneck, *bn_b[2:], o.grad_out, o.out, o.batch_mean),
            "transition": lambda: backend.transition(o.full, bn.scale, bn.shift, o.weight_t, o.out_t),
            "transition_backward": lambda: backend.transition_backward(
                o.full, *bn[2:], o.weight_t, o.grad_out_t, o.grad_full, o.batch_mean),
        }[primitive]

    def unfused_call(self, primitive: str):
        """torchvision's way (``torch.cat``, BatchNorm2d in training mode, ReLU, conv)."""
        s, o = self.shape, self
        nchw = lambda rows: o.image(rows).contiguous(memory_format=o.layout)  # noqa: E731
        features = [o.x[:, :s.c0]] + [o.x[:, s.c0 + i * s.k:s.c0 + (i + 1) * s.k] for i in range(s.layers)]
        features = [nchw(f).requires_grad_() for f in features]
        leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
        gamma, beta, gamma_b, beta_b = (leaf(t) for t in (o.bn.gamma, o.bn.beta, o.bn_b.gamma, o.bn_b.beta))
        weight, weight_t = leaf(o.weight[:, :, None, None]), leaf(o.weight_t[:, :, None, None])
        bottleneck = nchw(o.bottleneck).requires_grad_()
        block = torch.cat(features, 1).detach().requires_grad_()
        if primitive == "channel_stats":
            return lambda: torch.var_mean(block.detach(), dim=(0, 2, 3), correction=0)
        forwards = {"bn_relu_conv1x1": (lambda: layer_unfused(torch.cat(features, 1), gamma, beta, weight),
                                        nchw(o.grad_out)),
                    "bn_relu": (lambda: bn_relu_unfused(bottleneck, gamma_b, beta_b), nchw(o.grad_out)),
                    "transition": (lambda: transition_unfused(block, gamma, beta, weight_t),
                                   o.grad_out_t.permute(0, 3, 1, 2).contiguous(memory_format=o.layout))}
        if primitive.endswith("_backward"):
            forward, grad = forwards[primitive[:-len("_backward")]]
            out = forward()
            return lambda: torch.autograd.backward(out, grad, retain_graph=True)
        return torch.no_grad()(forwards[primitive][0])

    def reference(self, primitive: str) -> dict[str, Tensor]:
        """``primitive``'s outputs by name, from float32 autograd (float64 for
        float64 data) of the unfused ops on these operands."""
        o = self
        precision = torch.promote_types(o.x.dtype, torch.float32)
        leaf = lambda t: t.detach().to(precision).requires_grad_()  # noqa: E731
        if primitive == "channel_stats":
            var, mean = torch.var_mean(o.x.to(precision), dim=0, correction=0)
            return {"mean": mean, "var": var}
        rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
        if primitive.startswith("bn_relu_conv1x1"):
            inputs = [leaf(o.image(o.x)), leaf(o.bn.gamma), leaf(o.bn.beta), leaf(o.weight[:, :, None, None])]
            y, grad_y, as_x = layer_unfused(*inputs), o.image(o.grad_out), rows
        elif primitive.startswith("bn_relu"):
            inputs = [leaf(o.image(o.bottleneck)), leaf(o.bn_b.gamma), leaf(o.bn_b.beta)]
            y, grad_y, as_x = bn_relu_unfused(*inputs), o.image(o.grad_out), rows
        else:
            inputs = [leaf(o.full.permute(0, 3, 1, 2)), leaf(o.bn.gamma), leaf(o.bn.beta),
                      leaf(o.weight_t[:, :, None, None])]
            y, grad_y = transition_unfused(*inputs), o.grad_out_t.permute(0, 3, 1, 2)
            as_x = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
        if not primitive.endswith("_backward"):
            expected = {"out": as_x(y.detach())}
            if primitive == "bn_relu_conv1x1":  # the statistics of the output
                var, mean = torch.var_mean(expected["out"], dim=0, correction=0)
                expected.update(mean=mean, var=var)
            return expected
        grads = torch.autograd.grad(y, inputs, grad_y.to(precision))
        expected = {"grad_x": as_x(grads[0]), "grad_gamma": grads[1], "grad_beta": grads[2]}
        return expected | ({"grad_weight": grads[3].flatten(1)} if len(grads) == 4 else {})

    def outputs(self, primitive: str, returned) -> dict[str, Tensor]:
        """``primitive``'s outputs by name (as :meth:`reference` names them)
        after a call of it on these operands that ``returned``."""
        if primitive == "channel_stats":
            return dict(zip(("mean", "var"), returned))
        if not primitive.endswith("_backward"):
            stats = dict(zip(("mean", "var"), returned)) if primitive == "bn_relu_conv1x1" else {}
            return {"out": self.out_t if primitive == "transition" else self.out, **stats}
        grad_x = {"bn_relu_conv1x1_backward": self.grad_x, "bn_relu_backward": self.out,
                  "transition_backward": self.grad_full}[primitive]
        names = ("grad_gamma", "grad_beta") if primitive == "bn_relu_backward" else \
            ("grad_weight", "grad_gamma", "grad_beta")
        return {"grad_x": grad_x, **dict(zip(names, returned))}

    def max_error(self, primitive: str, call: Callable[[], object]) -> float:
        """The largest relative error of the outputs of ``call``, a call of a
        backend's ``primitive`` on these operands that returns what the
        primitive returns, against :meth:`reference`."""
        expected = self.reference(primitive)  # first: a backward may consume grad_out
        self.grad_x.zero_()  # the dense layer's backward adds into it
        actual = self.outputs(primitive, call())
        return max(relative_error(actual[name], expected[name]) for name in expected)


def measure(primitive: str, shape: LayerShape, backends: dict, args: argparse.Namespace, rates: dict) -> list[dict]:
    """One row per implementation of ``primitive`` at ``shape``: times (the
    implementations in turn, so that load changes hit every one alike), and
    with ``--check`` each backend's error.  An implementation that raises gets a
    row with its ``error`` (its traceback printed) and the others are measured."""
    dtype = DTYPES[args.dtype]
    seconds, failed, errors = time_implementations(primitive, shape, backends, args)
    nbytes, flops = cost(primitive, shape, dtype)
    roofline_s = max(nbytes / rates["copy_bytes_per_s"], flops / rates["matmul_flops_per_s"])
    base = common.summarize(seconds[BASELINE])["median"] if BASELINE not in failed else None
    rows = []
    for name in [BASELINE, *backends]:
        row = {"primitive": primitive, "shape": shape.name, "impl": name, "M": shape.rows, "C": shape.channels}
        if name in failed:
            rows.append(row | failed[name])
            continue
        t = common.summarize(seconds[name])
        row.update({f"{stat}_ms": 1e3 * t[stat] for stat in ("median", "q1", "q3", "min", "max")})
        row.update(GB_per_s=nbytes / t["median"] / 1e9, GFLOP_per_s=flops / t["median"] / 1e9,
                   roofline_fraction=roofline_s / t["median"],
                   bound="compute" if flops / rates["matmul_flops_per_s"] > nbytes / rates["copy_bytes_per_s"]
                   else "memory", speedup_vs_unfused=None if base is None else base / t["median"], bytes=nbytes,
                   flops=flops)
        if name in errors:
            row.update(max_rel_error=errors[name], correct=errors[name] <= TOLERANCE[dtype])
        rows.append(row)
    return rows


# the GPU kept busy this many cycles (about 130 us at 2 GHz) before each timed graph replay, so that its start
# event is stamped after the host has enqueued the replay and the end event (the time is the GPU's alone)
GRAPH_LEAD_CYCLES = 2**18


def time_implementations(primitive: str, shape: LayerShape, backends: dict, args: argparse.Namespace
                         ) -> tuple[dict, dict, dict]:
    """``(seconds per call by implementation, {implementation: its error and
    traceback} for those that raised, --check's errors)``.  With --cuda-graphs
    everything runs on one side stream (operands, the unfused forward whose
    backward is captured, warm-up, capture, replay, events): autograd runs a
    backward on its forward's stream, which must be the capturing one."""
    side = torch.cuda.Stream() if args.cuda_graphs else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    failed, errors = {}, {}

    def attempt(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # a kernel that does not compile, say
            traceback.print_exc()
            failed[name] = {"error": repr(exc)[-300:], "traceback": traceback.format_exc()}

    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        operands = Operands(shape, args.device, DTYPES[args.dtype], args.channels_last)
        calls = {BASELINE: operands.unfused_call(primitive)}
        calls.update({name: operands.backend_call(b, primitive) for name, b in backends.items()})
        for name in calls:
            if args.cuda_graphs:
                attempt(name, lambda: calls.update({name: graph_replay(calls[name])}))
            if args.check and name != BASELINE and name not in failed:  # what is timed: a graph's replay, say
                attempt(name, lambda: errors.update({name: operands.max_error(primitive, calls[name])}))
            for _ in range(args.warmup):
                if name in failed:  # (once is enough)
                    break
                attempt(name, calls[name])
        common.synchronize(args.device)
        seconds = {name: [] for name in calls if name not in failed}
        lead = GRAPH_LEAD_CYCLES if args.cuda_graphs else 0
        for _ in range(args.repeats):
            for name in [n for n in seconds if n not in failed]:
                attempt(name, lambda: seconds[name].append(common.time_once(calls[name], args.device, lead)))
        common.synchronize(args.device)
    return seconds, failed, errors


FAILED_CAPTURES: list[str] = []  # (this process's; see graph_replay)


def graph_replay(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` captured in a CUDA graph on the current (side) stream, after
    three runs there (as torch's CUDA-graph notes ask: lazy initialisation,
    kernel selection, per-stream workspaces); the graph's replay, which
    launches its kernels without the host's work, returns what ``call``
    returned at its capture (tensors the replay rewrites) and keeps ``call``
    (and the tensors only it holds, which the graph reads) alive."""
    stream = torch.cuda.current_stream()
    if stream == torch.cuda.default_stream():
        raise RuntimeError("graph_replay captures on a side stream (time_implementations makes one)")
    if FAILED_CAPTURES:
        raise RuntimeError(f"not captured: an earlier capture failed ({FAILED_CAPTURES[0]}), and torch before 2.12 "
                           f"leaves its allocator mid-capture then")
    for _ in range(3):
        call()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            returned = call()
    except Exception as exc:
        cause = repr(exc.__context__ or exc)  # the first error of a capture, not the one ending it
        FAILED_CAPTURES.append(cause[:200])
        raise RuntimeError(f"CUDA graph capture failed: {cause}") from exc

    def replay() -> object:
        graph.replay()
        return returned
    replay.keep = call
    return replay


@contextlib.contextmanager
def exact_float32():
    """float32 products computed in float32 inside (TF32 off for cuDNN, cuBLAS
    and the Triton kernels, which follow cuDNN's switch), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run(args: argparse.Namespace) -> dict:
    """Every (primitive, shape) measured, with --threads and TF32 off; the result."""
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)  # (before the environment records them)
        with exact_float32():
            return run_cases(args)
    finally:
        torch.set_num_threads(threads)


def run_cases(args: argparse.Namespace) -> dict:
    """The cases of :func:`run`, its settings made."""
    from ..backends import BackendUnavailableError, available_backends, get_backend
    device = args.device
    if args.cuda_graphs and not device.startswith("cuda"):
        raise ValueError("--cuda-graphs times CUDA graphs: give --device cuda")
    backends = {}
    for name in args.backends or available_backends():
        try:
            backends[name] = get_backend(name, torch.device(device))
        except BackendUnavailableError:
            if args.backends:
                raise
    settings = common.settings_of(args)
    shapes = [layer_shapes(args.batch, args.batch_bc)[name] for name in args.shapes]
    settings.update({"backends": list(backends), "shapes": [asdict(s) for s in shapes]})
    env = common.environment(device, settings)
    rates = machine_rates(device, DTYPES[args.dtype])
    print(f"{env['device_name']}: copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({rates['matmul_dtype']})", flush=True)
    rows = []
    result = {"benchmark": "kernels", "partial": True, "environment": env, "machine": rates, "dtype": args.dtype,
              "rows": rows}
    out = args.out or common.new_result_path(f"kernels_{device.split(':')[0]}_{args.dtype}.json")
    jobs = [(p, s) for s in shapes for p in args.primitives]
    for primitive, shape in common.progress(jobs, desc="kernels", enabled=not args.no_progress):
        try:
            rows += measure(primitive, shape, backends, args, rates)
        except Exception as exc:  # one case failing (a kernel that does not compile, say) must not stop the others
            traceback.print_exc()
            rows.append({"primitive": primitive, "shape": shape.name, "error": repr(exc)[-300:],
                         "traceback": traceback.format_exc()})
        finally:
            if device.startswith("cuda"):
                with contextlib.suppress(RuntimeError):  # (after a failed capture, torch < 2.12 asserts here)
                    torch.cuda.empty_cache()
        common.write_json(result, out)  # after every case: a run stopped by its time limit keeps what it measured
    common.finish_environment(env)
    del result["partial"]  # (written after every case: a run stopped early says so)
    for row in rows:
        common.outcomes["raised" if "error" in row else "wrong" if row.get("correct") is False else "measured"] += 1
    columns = ["primitive", "shape", "impl", "median_ms", "GB_per_s", "GFLOP_per_s", "roofline_fraction", "bound",
               "speedup_vs_unfused"] + (["max_rel_error", "correct"] if args.check else [])
    print(common.format_table(rows, columns + (["error"] if any("error" in r for r in rows) else [])))
    common.save_result(result, out, None if args.no_plot else "plot_kernels")
    return result


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
