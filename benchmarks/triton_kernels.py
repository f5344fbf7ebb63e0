"""Triton kernel benchmark at DenseNet-121 block-3 shapes (issue 4 targets).

    python benchmarks/triton_kernels.py OUTDIR [--tiny]

For each input width ``C`` of a dense layer (batch 256, 14x14, bottleneck
``K = 4k = 128``, bf16) and for transition 3 (``C = 1024 -> 512``, 14x14 -> 7x7):
the fused Triton forward and backward against torch's unfused
BatchNorm + ReLU + Conv1x1 (cuDNN, channels-last, on the same input) and
against a measured device-to-device copy bandwidth.  ``bytes_min`` is the
traffic a single-pass kernel cannot avoid (inputs read once, outputs written
once, ``grad_x`` read and written); the backward's two passes read ``x`` and
``grad_out`` twice (``bytes_two_pass``).  Writes ``OUTDIR/triton_kernels.json``.

``--tiny`` runs small fp32 shapes, on the CPU through the Triton interpreter
when there is no GPU: a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
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
FULL = dict(batch=256, size=14, widths=(256, 512, 768, 1024), bottleneck=128, dtype=torch.bfloat16,
            copy_bytes=1 << 30, warmup=5, repeats=20)
TINY = dict(batch=2, size=5, widths=(24, 40), bottleneck=16, dtype=torch.float32, copy_bytes=1 << 20, warmup=1,
            repeats=2)


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


def measure(name: str, triton_forward, triton_backward, torch_inputs, torch_args, grad_y, bytes_forward: dict,
            bytes_backward: dict, copy_bw: float, settings: dict, device: str) -> dict:
    """Times of the Triton and torch forward and backward, and the bandwidth they reach."""
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
    return {"row": row, "times": times, "bytes_forward": bytes_forward, "bytes_backward": bytes_backward}


def dense_layer(c: int, buffer: torch.Tensor, settings: dict, copy_bw: float, generator, device: str) -> dict:
    """BN1-ReLU-Conv1x1 of a dense layer reading channels ``[0, c)`` of the block buffer."""
    n, h, w, c_total = buffer.shape
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
        TRITON.bn_relu_conv1x1_backward(x, bn["scale"], bn["shift"], bn["mean"], bn["rstd"], weight, grad_out,
                                        grad_buffer[:, :c], lambda sums: sums / m)

    # torch gets what torchvision's concatenation hands it: a contiguous channels-last tensor
    x_nchw = x.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    inputs = [x_nchw.requires_grad_(), bn["gamma"].requires_grad_(), bn["beta"].requires_grad_(),
              weight.clone().requires_grad_()]
    grad_y = grad_out.view(n, h, w, k).permute(0, 3, 1, 2)
    once = (m * c + m * k + k * c) * element
    bytes_forward = {"bytes_min": once}
    # grad_x is read and written (accumulated)
    bytes_backward = {"bytes_min": once + 2 * m * c * element,
                      "bytes_two_pass": once + (3 * m * c + m * k) * element}
    return measure(f"layer C={c} K={k}", forward, backward, inputs, (*inputs, False),
                   grad_y, bytes_forward, bytes_backward, copy_bw, settings, device) | {"C": c, "K": k, "M": m}


def transition(buffer: torch.Tensor, settings: dict, copy_bw: float, generator, device: str) -> dict:
    """Transition 3: BN-ReLU, 2x2 avg-pool, Conv1x1 over the whole block buffer."""
    n, h, w, c = buffer.shape
    k, dtype, element = c // 2, settings["dtype"], buffer.element_size()
    bn = batch_norm_inputs(buffer, generator)
    weight = (torch.randn(k, c, generator=generator) / c ** 0.5).to(device=device, dtype=dtype)
    out = torch.empty(n, h // 2, w // 2, k, device=device, dtype=dtype)
    grad_out = torch.randn(n, h // 2, w // 2, k, generator=generator).to(device=device, dtype=dtype)
    grad_x = torch.empty_like(buffer)

    def forward():
        TRITON.transition(buffer, bn["scale"], bn["shift"], weight, out)

    def backward():
        TRITON.transition_backward(buffer, bn["scale"], bn["shift"], bn["mean"], bn["rstd"], weight, grad_out,
                                   grad_x, lambda sums: sums / (n * h * w))

    x_nchw = buffer.permute(0, 3, 1, 2).clone().requires_grad_()  # channels-last already
    inputs = [x_nchw, bn["gamma"].requires_grad_(), bn["beta"].requires_grad_(), weight.clone().requires_grad_()]
    grad_y = grad_out.permute(0, 3, 1, 2)
    pixels, pooled = n * h * w, n * (h // 2) * (w // 2)
    once = (pixels * c + pooled * k + k * c) * element
    bytes_forward = {"bytes_min": once}
    # grad_x is written
    bytes_backward = {"bytes_min": once + pixels * c * element,
                      "bytes_two_pass": once + (2 * pixels * c + pooled * k) * element}
    return measure(f"transition C={c} K={k}", forward, backward, inputs, (*inputs, True), grad_y,
                   bytes_forward, bytes_backward, copy_bw, settings, device) | {"C": c, "K": k}


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
    n, size, c_total = settings["batch"], settings["size"], max(settings["widths"])
    buffer = (torch.randn(n, size, size, c_total, generator=generator) + 0.5).to(device=device,
                                                                                   dtype=settings["dtype"])
    env = environment(device, {k: str(v) for k, v in settings.items()} | {"tiny": args.tiny})
    copy_bw = copy_bandwidth(settings["copy_bytes"], device, settings["warmup"], settings["repeats"])
    cases = [dense_layer(c, buffer, settings, copy_bw, generator, device) for c in settings["widths"]]
    cases.append(transition(buffer, settings, copy_bw, generator, device))
    rows = [case.pop("row") for case in cases]
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s")
    print(format_table(rows, list(rows[0])))
    result = {"environment": finish_environment(env), "copy_bandwidth_bytes_per_s": copy_bw, "rows": rows,
              "cases": cases,
              "targets": {"forward_copy_fraction": 0.75, "backward_copy_fraction": 0.5, "speedup_vs_torch": 3.0}}
    print("wrote", write_json(result, args.outdir / "triton_kernels.json"))
    return result


if __name__ == "__main__":
    main()
