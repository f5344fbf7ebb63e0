"""Triton kernel benchmark at DenseNet-121 shapes (block 3, transition 3, then block 1).

    python benchmarks/triton_kernels.py OUTDIR [--tiny]

For each input width ``C`` of a block-3 dense layer (batch 256, 14x14,
bottleneck ``K = 4k = 128``, bf16), transition 3 (``C = 1024 -> 512``,
14x14 -> 7x7), a block-1 layer (``C = 128``, 56x56) and transition 1
(``C = 256 -> 128``, 56x56 -> 28x28): the fused Triton forward and backward
against torch's unfused BatchNorm + ReLU + Conv1x1 (cuDNN, channels-last, on
the same input) and against a measured device-to-device copy bandwidth, and
each result against float32 torch autograd on the same data (``max_rel_error``,
so that the benchmark is evidence of correctness even where pytest is
missing).  ``bytes_min`` is the traffic a single-pass kernel cannot avoid
(inputs read once, outputs written once, ``grad_x`` read and written); the
backward's two passes read ``x`` and ``grad_out`` twice (``bytes_two_pass``).
``OUTDIR/triton_kernels.json`` is rewritten after every case, and a case that
fails is recorded with its error while the others run.  With
``DENSENET_FAST_CONFIG_LOG=<file>`` every kernel configuration chosen is
logged there.

``--tiny`` runs small fp32 shapes, on the CPU through the Triton interpreter
when there is no GPU: a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast.backends.triton_backend import TritonBackend  # noqa: E402
from densenet_fast.bench.common import (environment, finish_environment, format_table, summarize,  # noqa: E402
                                        time_function, write_json)

EPS = 1e-5
TRITON = TritonBackend()
# cases: ("layer", image size, block buffer width, input width C) or ("transition", image size, C)
FULL = dict(batch=256, bottleneck=128, dtype=torch.bfloat16, copy_bytes=1 << 30, warmup=5, repeats=20,
            cases=[("layer", 14, 1024, 256), ("layer", 14, 1024, 512), ("layer", 14, 1024, 768),
                   ("layer", 14, 1024, 1024), ("transition", 14, 1024), ("layer", 56, 256, 128),
                   ("transition", 56, 256)])
TINY = dict(batch=2, bottleneck=16, dtype=torch.float32, copy_bytes=1 << 20, warmup=1, repeats=2,
            cases=[("layer", 5, 40, 24), ("layer", 5, 40, 40), ("transition", 5, 40)])
# max relative error against float32 torch autograd on the same (rounded) data
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 4e-2}


def copy_bandwidth(nbytes: int, device: str, warmup: int, repeats: int) -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = summarize(time_function(lambda: dst.copy_(src), device, warmup, repeats))["median"]
    return 2 * nbytes / seconds


def batch_norm_inputs(x: torch.Tensor, generator: torch.Generator) -> dict:
    """Batch statistics of ``x`` (..., C) and random affine parameters, folded."""
    c = x.shape[-1]
    var, mean = torch.var_mean(x.reshape(-1, c).float(), dim=0, correction=0)
    gamma = (0.5 + torch.rand(c, generator=generator)).to(x.device)
    beta = torch.randn(c, generator=generator).to(x.device)
    rstd = (var + EPS).rsqrt()
    scale = gamma * rstd
    return dict(gamma=gamma, beta=beta, mean=mean, rstd=rstd, scale=scale, shift=beta - mean * scale)


def torch_unfused(x_nchw: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor, pool: bool):
    """torchvision's order: BatchNorm (batch statistics), ReLU, 1x1 conv[, 2x2 avg-pool]."""
    y = F.conv2d(F.relu(F.batch_norm(x_nchw, None, None, gamma, beta, training=True, eps=EPS)),
                 weight[:, :, None, None])
    return F.avg_pool2d(y, 2) if pool else y


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def float32_reference(torch_inputs: list, grad_y: torch.Tensor, pool: bool) -> list:
    """float32 autograd on the benchmark's data: ``[y (N, K, h, w), grad_x (N, C, H, W), grad_gamma,
    grad_beta, grad_weight]``."""
    inputs = [t.detach().float().requires_grad_() for t in torch_inputs]
    y = torch_unfused(*inputs, pool)
    return [y.detach(), *torch.autograd.grad(y, inputs, grad_y.float())]


def measure(name: str, triton_forward, triton_backward, check, torch_inputs, torch_args, grad_y, bytes_forward: dict,
            bytes_backward: dict, copy_bw: float, settings: dict, device: str) -> dict:
    """Errors of one Triton forward and backward (``check() -> {output: (ours, reference)}``), then the
    times of the Triton and torch forward and backward and the bandwidth they reach."""
    errors = {output: max_relative_error(ours, reference) for output, (ours, reference) in check().items()}
    time = lambda fn: summarize(time_function(fn, device, settings["warmup"], settings["repeats"]))  # noqa: E731
    y = torch_unfused(*torch_args)
    times = {
        "triton_forward": time(triton_forward),
        "triton_backward": time(triton_backward),
        "torch_forward": time(lambda: torch_unfused(*torch_args)),
        "torch_backward": time(lambda: torch.autograd.grad(y, torch_inputs, grad_y, retain_graph=True)),
    }
    row = {"case": name, **{f"{k}_ms": v["median"] * 1e3 for k, v in times.items()}}
    for direction, nbytes in (("forward", bytes_forward), ("backward", bytes_backward)):
        seconds = times[f"triton_{direction}"]["median"]
        row[f"{direction}_copy_fraction"] = nbytes["bytes_min"] / seconds / copy_bw
        row[f"{direction}_speedup_vs_torch"] = times[f"torch_{direction}"]["median"] / seconds
    row["max_rel_error"] = max(errors.values())
    row["correct"] = row["max_rel_error"] <= TOLERANCE[settings["dtype"]]
    return {"row": row, "times": times, "max_rel_errors": errors, "bytes_forward": bytes_forward,
            "bytes_backward": bytes_backward}


def random_buffer(size: int, c_total: int, settings: dict, generator, device: str) -> torch.Tensor:
    """A block buffer ``(N, size, size, c_total)`` of positive-mean random data."""
    shape = (settings["batch"], size, size, c_total)
    return (torch.randn(*shape, generator=generator) + 0.5).to(device=device, dtype=settings["dtype"])


def dense_layer(size: int, c_total: int, c: int, settings: dict, copy_bw: float, generator, device: str) -> dict:
    """BN1-ReLU-Conv1x1 of a dense layer reading channels ``[0, c)`` of a ``c_total``-channel block buffer."""
    buffer = random_buffer(size, c_total, settings, generator, device)
    n, h, w, _ = buffer.shape
    m, k, dtype = n * h * w, settings["bottleneck"], settings["dtype"]
    element = buffer.element_size()
    x = buffer.view(m, c_total)[:, :c]
    bn = batch_norm_inputs(x, generator)
    weight = (torch.randn(k, c, generator=generator) / c ** 0.5).to(device=device, dtype=dtype)
    out = torch.empty(m, k, device=device, dtype=dtype)
    grad_out = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    grad_buffer = torch.zeros(m, c_total, device=device, dtype=dtype)

    def forward():
        TRITON.bn_relu_conv1x1(x, bn["scale"], bn["shift"], weight, out, with_stats=True)

    def backward():
        return TRITON.bn_relu_conv1x1_backward(x, bn["scale"], bn["shift"], bn["mean"], bn["rstd"], weight,
                                               grad_out, grad_buffer[:, :c], lambda sums: sums / m)

    # torch gets what torchvision's concatenation hands it: a contiguous channels-last tensor
    x_nchw = x.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    inputs = [x_nchw.requires_grad_(), bn["gamma"].requires_grad_(), bn["beta"].requires_grad_(),
              weight.clone().requires_grad_()]
    grad_y = grad_out.view(n, h, w, k).permute(0, 3, 1, 2)

    def check() -> dict:
        y, grad_x, grad_gamma, grad_beta, grad_weight = float32_reference(inputs, grad_y, pool=False)
        forward()
        grad_buffer.zero_()
        grads = backward()
        return {"out": (out, y.permute(0, 2, 3, 1).reshape(m, k)),
                "grad_x": (grad_buffer[:, :c], grad_x.permute(0, 2, 3, 1).reshape(m, c)),
                "grad_weight": (grads[0], grad_weight), "grad_gamma": (grads[1], grad_gamma),
                "grad_beta": (grads[2], grad_beta)}

    once = (m * c + m * k + k * c) * element
    bytes_forward = {"bytes_min": once}
    # grad_x is read and written (accumulated)
    bytes_backward = {"bytes_min": once + 2 * m * c * element,
                      "bytes_two_pass": once + (3 * m * c + m * k) * element}
    return measure(f"layer {h}x{w} C={c} K={k}", forward, backward, check, inputs, (*inputs, False),
                   grad_y, bytes_forward, bytes_backward, copy_bw, settings, device) | {"C": c, "K": k, "M": m}


def transition(size: int, c: int, settings: dict, copy_bw: float, generator, device: str) -> dict:
    """A transition: BN-ReLU, 2x2 avg-pool, Conv1x1 over the whole ``c``-channel block buffer."""
    buffer = random_buffer(size, c, settings, generator, device)
    n, h, w, _ = buffer.shape
    k, dtype, element = c // 2, settings["dtype"], buffer.element_size()
    bn = batch_norm_inputs(buffer, generator)
    weight = (torch.randn(k, c, generator=generator) / c ** 0.5).to(device=device, dtype=dtype)
    out = torch.empty(n, h // 2, w // 2, k, device=device, dtype=dtype)
    grad_out = torch.randn(n, h // 2, w // 2, k, generator=generator).to(device=device, dtype=dtype)
    grad_x = torch.empty_like(buffer)

    def forward():
        TRITON.transition(buffer, bn["scale"], bn["shift"], weight, out)

    def backward():
        return TRITON.transition_backward(buffer, bn["scale"], bn["shift"], bn["mean"], bn["rstd"], weight,
                                          grad_out, grad_x, lambda sums: sums / (n * h * w))

    x_nchw = buffer.permute(0, 3, 1, 2).clone().requires_grad_()  # channels-last already
    inputs = [x_nchw, bn["gamma"].requires_grad_(), bn["beta"].requires_grad_(), weight.clone().requires_grad_()]
    grad_y = grad_out.permute(0, 3, 1, 2)

    def check() -> dict:
        y, grad_x_ref, grad_gamma, grad_beta, grad_weight = float32_reference(inputs, grad_y, pool=True)
        forward()
        grads = backward()
        return {"out": (out, y.permute(0, 2, 3, 1)), "grad_x": (grad_x, grad_x_ref.permute(0, 2, 3, 1)),
                "grad_weight": (grads[0], grad_weight), "grad_gamma": (grads[1], grad_gamma),
                "grad_beta": (grads[2], grad_beta)}

    pixels, pooled = n * h * w, n * (h // 2) * (w // 2)
    once = (pixels * c + pooled * k + k * c) * element
    bytes_forward = {"bytes_min": once}
    # grad_x is written
    bytes_backward = {"bytes_min": once + pixels * c * element,
                      "bytes_two_pass": once + (2 * pixels * c + pooled * k) * element}
    return measure(f"transition {h}x{w} C={c} K={k}", forward, backward, check, inputs, (*inputs, True), grad_y,
                   bytes_forward, bytes_backward, copy_bw, settings, device) | {"C": c, "K": k}


def run_case(case: tuple, settings: dict, copy_bw: float, generator, device: str) -> dict:
    """One case; an error is recorded (with its traceback) instead of raised."""
    kind, *sizes = case
    try:
        if kind == "layer":
            return dense_layer(*sizes, settings, copy_bw, generator, device)
        return transition(*sizes, settings, copy_bw, generator, device)
    except Exception as exc:  # one case failing (a kernel that does not compile, say) must not stop the others
        traceback.print_exc()
        return {"row": {"case": f"{kind} {sizes}", "error": repr(exc)[-300:]}, "traceback": traceback.format_exc()}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="small fp32 shapes (CPU smoke test)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("no GPU: only --tiny runs here (through the Triton interpreter)")
    settings = TINY if args.tiny else FULL
    torch.backends.cudnn.allow_tf32 = False  # fp32 (tiny) runs exact; bf16 unaffected
    generator = torch.Generator().manual_seed(0)
    env = environment(device, {k: str(v) for k, v in settings.items()} | {"tiny": args.tiny})
    copy_bw = copy_bandwidth(settings["copy_bytes"], device, settings["warmup"], settings["repeats"])
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s", flush=True)
    result = {"environment": env, "copy_bandwidth_bytes_per_s": copy_bw, "rows": [], "cases": [],
              "targets": {"forward_copy_fraction": 0.75, "backward_copy_fraction": 0.5, "speedup_vs_torch": 3.0}}
    out = args.outdir / "triton_kernels.json"
    for case in settings["cases"]:
        measured = run_case(case, settings, copy_bw, generator, device)
        result["rows"].append(measured.pop("row"))
        result["cases"].append(measured)
        print(format_table(result["rows"][-1:], list(result["rows"][-1])), flush=True)
        write_json(result, out)  # after every case: a run stopped by its time limit keeps what it measured
    finish_environment(env)
    print("wrote", write_json(result, out))
    return result


if __name__ == "__main__":
    main()
