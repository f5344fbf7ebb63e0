"""``bench kernels``: every primitive on every backend against torch's unfused ops.

The primitives of :mod:`densenet_fast.backends.interface`, on every available
backend, against torch's unfused equivalent (what torchvision runs:
``torch.cat`` of the features, ``BatchNorm2d`` in training mode, ReLU, 1x1
convolution, on NCHW tensors), over DenseNet-121 and DenseNet-BC layer shapes.

Reported per (primitive, shape, implementation): median time, GB/s (the bytes
that must move, below, over the time) and the fraction of the roofline
``max(bytes / copy bandwidth, FLOPs / matmul rate) / time``, with the copy
bandwidth and matmul rate measured at the start of the run.  Bytes that must
move, for ``x (M, C)``, bottleneck ``K`` channels, element size ``e``:

- channel_stats: read x: ``M C e``
- bn_relu_conv1x1: read x, write out: ``(M C + M K) e``; FLOPs ``2 M C K``
- bn_relu_conv1x1_backward: read x and grad_out, read and write grad_x:
  ``(3 M C + M K) e``; FLOPs ``4 M C K``
- bn_relu (on the bottleneck, ``M x K``): ``2 M K e``; backward ``3 M K e``
- transition (``x (N, H, W, C)`` -> ``(N, H/2, W/2, K)``): ``(M C + M K / 4) e``;
  FLOPs ``2 (M/4) C K``; backward ``(2 M C + M K / 4) e``, FLOPs ``4 (M/4) C K``
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import common
from .worker import DTYPES

PRIMITIVES = ("channel_stats", "bn_relu_conv1x1", "bn_relu_conv1x1_backward", "bn_relu", "bn_relu_backward",
              "transition", "transition_backward")
BASELINE = "torch-unfused"


@dataclass(frozen=True)
class LayerShape:
    """A dense layer (or transition) reading ``c0 + layers * k`` channels of an
    ``n x h x w`` block buffer; ``bottleneck`` is 4k, ``out`` the transition's width."""

    name: str
    n: int
    h: int
    w: int
    c0: int
    layers: int
    k: int

    @property
    def channels(self) -> int:
        return self.c0 + self.layers * self.k

    @property
    def rows(self) -> int:
        return self.n * self.h * self.w

    @property
    def bottleneck(self) -> int:
        return 4 * self.k

    @property
    def transition_out(self) -> int:
        return self.channels // 2


def layer_shapes(batch_121: int, batch_bc: int) -> list[LayerShape]:
    """The full widths of DenseNet-121's blocks 1 and 3 (224x224 input) and of
    DenseNet-BC-100's blocks 1 and 3 (32x32 input, k=12): ``C`` is the
    transition's input, ``k`` more channels than the block's last layer reads."""
    return [LayerShape("121-block1", batch_121, 56, 56, 64, 7, 32),
            LayerShape("121-block3", batch_121, 14, 14, 256, 24, 32),
            LayerShape("bc100-block1", batch_bc, 32, 32, 24, 16, 12),
            LayerShape("bc100-block3", batch_bc, 8, 8, 150, 16, 12)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--batch", type=int, default=4, help="batch of the DenseNet-121 shapes")
    parser.add_argument("--batch-bc", type=int, default=16, help="batch of the DenseNet-BC shapes")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs on the device")
    parser.add_argument("--primitives", nargs="+", default=list(PRIMITIVES), choices=PRIMITIVES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


# -- the machine's roofline ------------------------------------------------------------------
def machine_rates(device: str, dtype: torch.dtype, repeats: int = 5) -> dict:
    """Measured copy bandwidth (bytes/s, read + write) and matmul rate (FLOP/s),
    from the fastest of ``repeats`` runs (what the hardware can do)."""
    elements = (256 if device.startswith("cuda") else 32) * common.MIB // 4
    src = torch.randn(elements, device=device).to(dtype)
    dst = torch.empty_like(src)
    copy_s = min(common.time_function(lambda: dst.copy_(src), device, 2, repeats))
    n = 8192 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    mm_s = min(common.time_function(lambda: torch.mm(a, b), device, 2, repeats))
    return {"copy_bytes_per_s": 2 * src.numel() * src.element_size() / copy_s, "copy_tensor_bytes": src.numel() * src.element_size(),
            "matmul_flops_per_s": 2 * n**3 / mm_s, "matmul_n": n}


def cost(primitive: str, s: LayerShape, element_size: int) -> tuple[float, float]:
    """(bytes that must move, FLOPs that must be done) of one call (see module docstring)."""
    m, c, k = s.rows, s.channels, s.bottleneck
    t = s.transition_out
    return {
        "channel_stats": (m * c * element_size, 0.0),
        "bn_relu_conv1x1": ((m * c + m * k) * element_size, 2.0 * m * c * k),
        "bn_relu_conv1x1_backward": ((3 * m * c + m * k) * element_size, 4.0 * m * c * k),
        "bn_relu": (2 * m * k * element_size, 0.0),
        "bn_relu_backward": (3 * m * k * element_size, 0.0),
        "transition": ((m * c + m * t / 4) * element_size, 2.0 * (m / 4) * c * t),
        "transition_backward": ((2 * m * c + m * t / 4) * element_size, 4.0 * (m / 4) * c * t),
    }[primitive]


# -- the calls -----------------------------------------------------------------------------
class Operands:
    """Random operands of one shape: the block buffer (rows ``M x C_total``,
    channels-last), folded BN coefficients, weights and output gradients."""

    def __init__(self, s: LayerShape, device: str, dtype: torch.dtype) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        stat = lambda n: torch.rand(n, generator=g).add_(0.5).to(device)  # noqa: E731  fp32, positive
        m, c, k, t = s.rows, s.channels, s.bottleneck, s.transition_out
        self.shape = s
        self.buffer = rand(s.n, s.h, s.w, c + s.k)  # one more layer's channels: a channel range, as in the engine
        self.x = self.buffer.view(m, c + s.k)[:, :c]
        self.full = self.buffer[..., :c]
        self.scale, self.shift, self.mean, self.rstd = stat(c), stat(c) - 1, stat(c) - 1, stat(c)
        self.scale_b, self.shift_b, self.mean_b, self.rstd_b = stat(k), stat(k) - 1, stat(k) - 1, stat(k)
        self.weight, self.weight_t = rand(k, c) / c**0.5, rand(t, c) / c**0.5
        self.out, self.grad_out = torch.empty(m, k, device=device, dtype=dtype), rand(m, k)
        self.bottleneck = rand(m, k)
        self.grad_x = torch.zeros(m, c, device=device, dtype=dtype)
        self.grad_full = torch.zeros(s.n, s.h, s.w, c, device=device, dtype=dtype)
        self.out_t = torch.empty(s.n, s.h // 2, s.w // 2, t, device=device, dtype=dtype)
        self.grad_out_t = rand(s.n, s.h // 2, s.w // 2, t)
        self.batch_mean = lambda sums: sums / m

    def backend_call(self, backend, primitive: str):
        """A no-argument call of ``backend``'s ``primitive`` on these operands."""
        o = self
        return {
            "channel_stats": lambda: backend.channel_stats(o.x),
            "bn_relu_conv1x1": lambda: backend.bn_relu_conv1x1(o.x, o.scale, o.shift, o.weight, o.out, True),
            "bn_relu_conv1x1_backward": lambda: backend.bn_relu_conv1x1_backward(
                o.x, o.scale, o.shift, o.mean, o.rstd, o.weight, o.grad_out, o.grad_x, o.batch_mean),
            "bn_relu": lambda: backend.bn_relu(o.bottleneck, o.scale_b, o.shift_b, o.out),
            "bn_relu_backward": lambda: backend.bn_relu_backward(
                o.bottleneck, o.scale_b, o.shift_b, o.mean_b, o.rstd_b, o.grad_out, o.out, o.batch_mean),
            "transition": lambda: backend.transition(o.full, o.scale, o.shift, o.weight_t, o.out_t),
            "transition_backward": lambda: backend.transition_backward(
                o.full, o.scale, o.shift, o.mean, o.rstd, o.weight_t, o.grad_out_t, o.grad_full, o.batch_mean),
        }[primitive]

    def unfused_call(self, primitive: str):
        """torchvision's way (NCHW, torch.cat, BatchNorm2d in training mode, ReLU, conv)."""
        s, o = self.shape, self
        features = [o.x[:, :s.c0]] + [o.x[:, s.c0 + i * s.k:s.c0 + (i + 1) * s.k] for i in range(s.layers)]
        features = [f.reshape(s.n, s.h, s.w, -1).permute(0, 3, 1, 2).contiguous().requires_grad_() for f in features]
        gamma, beta = o.scale.clone().requires_grad_(), o.shift.clone().requires_grad_()
        weight = o.weight.view(*o.weight.shape, 1, 1).clone().requires_grad_()
        weight_t = o.weight_t.view(*o.weight_t.shape, 1, 1).clone().requires_grad_()
        gamma_b, beta_b = o.scale_b.clone().requires_grad_(), o.shift_b.clone().requires_grad_()
        nchw = lambda rows, c: rows.reshape(s.n, s.h, s.w, c).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        bottleneck = nchw(o.bottleneck, s.bottleneck).requires_grad_()
        block = torch.cat(features, 1).detach().requires_grad_()

        def layer():
            z = F.relu(F.batch_norm(torch.cat(features, 1), None, None, gamma, beta, training=True))
            return F.conv2d(z, weight)

        def bn_relu():
            return F.relu(F.batch_norm(bottleneck, None, None, gamma_b, beta_b, training=True))

        def transition():
            z = F.relu(F.batch_norm(block, None, None, gamma, beta, training=True))
            return F.avg_pool2d(F.conv2d(z, weight_t), 2)

        def backward_of(forward, grad):
            out = forward()
            return lambda: torch.autograd.backward(out, grad, retain_graph=True)

        if primitive == "channel_stats":
            return lambda: torch.var_mean(block.detach(), dim=(0, 2, 3), correction=0)
        grad_layer = nchw(o.grad_out, s.bottleneck)
        forwards = {"bn_relu_conv1x1": (layer, grad_layer), "bn_relu": (bn_relu, grad_layer),
                    "transition": (transition, o.grad_out_t.permute(0, 3, 1, 2).contiguous())}
        if primitive.endswith("_backward"):
            return backward_of(*forwards[primitive[:-len("_backward")]])
        return torch.no_grad()(forwards[primitive][0])


def run(args: argparse.Namespace) -> dict:
    from ..backends import BackendUnavailableError, available_backends, get_backend
    dtype = DTYPES[args.dtype]
    device = args.device
    backends = {}
    for name in args.backends or available_backends():
        try:
            backends[name] = get_backend(name, torch.device(device))
        except BackendUnavailableError:
            if args.backends:
                raise
    settings = common.settings_of(args)
    shapes = layer_shapes(args.batch, args.batch_bc)
    settings.update({"backends": list(backends), "shapes": [asdict(s) for s in shapes]})
    env = common.environment(device, settings)
    rates = machine_rates(device, dtype)
    element_size = torch.tensor([], dtype=dtype).element_size()
    rows = []
    jobs = [(p, s) for s in shapes for p in args.primitives]
    for primitive, shape in common.progress(jobs, desc="kernels", enabled=not args.no_progress):
        operands = Operands(shape, device, dtype)
        calls = {BASELINE: operands.unfused_call(primitive)}
        calls.update({name: operands.backend_call(b, primitive) for name, b in backends.items()})
        for call in calls.values():
            for _ in range(args.warmup):
                call()
        common.synchronize(device)
        seconds = {name: [] for name in calls}
        for _ in range(args.repeats):  # round-robin: load changes hit every implementation alike
            for name, call in calls.items():
                seconds[name].append(common.time_once(call, device))
        nbytes, flops = cost(primitive, shape, element_size)
        roofline_s = max(nbytes / rates["copy_bytes_per_s"], flops / rates["matmul_flops_per_s"])
        for name, values in seconds.items():
            t = common.summarize(values)
            rows.append({"primitive": primitive, "shape": shape.name, "impl": name, "M": shape.rows,
                         "C": shape.channels, "median_ms": 1e3 * t["median"], "min_ms": 1e3 * t["min"],
                         "max_ms": 1e3 * t["max"], "GB_per_s": nbytes / t["median"] / 1e9,
                         "GFLOP_per_s": flops / t["median"] / 1e9, "roofline_fraction": roofline_s / t["median"],
                         "bound": "compute" if flops / rates["matmul_flops_per_s"] > nbytes / rates["copy_bytes_per_s"]
                         else "memory", "speedup_vs_unfused": None, "bytes": nbytes, "flops": flops})
        base = rows[-len(seconds)]["median_ms"]
        for row in rows[-len(seconds):]:
            row["speedup_vs_unfused"] = base / row["median_ms"]
    result = {"benchmark": "kernels", "environment": common.finish_environment(env), "machine": rates,
              "dtype": args.dtype, "rows": rows}
    print(f"{env['device_name']}: copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"matmul {rates['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({args.dtype})")
    print(common.format_table(rows, ["primitive", "shape", "impl", "median_ms", "GB_per_s", "GFLOP_per_s",
                                     "roofline_fraction", "bound", "speedup_vs_unfused"]))
    out = args.out or common.RESULTS_DIR / f"kernels_{device.split(':')[0]}_{args.dtype}.json"
    common.save_result(result, out, None if args.no_plot else "plot_kernels")
    return result


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
