"""The C++ CPU backend on DenseNet-BC (k=12, depth 100), batch 64, 32x32 images.

    python benchmarks/cpp_cpu.py step [--threads 1] [--repeats 3]   # training step, side by side
    python benchmarks/cpp_cpu.py memory [--threads 1]                # peak RSS, a fresh process each
    python benchmarks/cpp_cpu.py primitives                          # each primitive vs its roofline bound

``step`` times torchvision eager, densenet_fast on the torch backend and on the
cpp backend round-robin in one process, on the same weights and inputs
(median of ``--repeats`` after one warm-up step).  ``primitives`` runs one
thread at block-1 shapes and prints a markdown table (docs/cpp.md).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import torchvision_twin  # noqa: E402

from densenet_fast import densenet_bc  # noqa: E402
from densenet_fast.backends.cpp_backend import CppBackend  # noqa: E402
from densenet_fast.backends.torch_backend import TorchBackend  # noqa: E402

IMPLS = ("torchvision", "torch", "cpp")
BATCH, SIZE = 64, 32


def build(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = densenet_bc(depth=100, growth_rate=12, num_classes=10, backend="torch" if impl == "torchvision" else impl)
    return torchvision_twin(model) if impl == "torchvision" else model


def train_step(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def step(args) -> None:
    models = {impl: build(impl) for impl in IMPLS}
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(10, (BATCH,))
    times = {impl: [] for impl in IMPLS}
    for model in models.values():
        train_step(model, x, y)
    for _ in range(args.repeats):
        for impl, model in models.items():
            start = time.perf_counter()
            train_step(model, x, y)
            times[impl].append(time.perf_counter() - start)
    base = statistics.median(times["torchvision"])
    for impl, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{impl:12s} threads={args.threads}  {median:.2f} s/step  {BATCH / median:6.1f} images/s  "
              f"x{base / median:.2f} vs torchvision   (steps: {', '.join(f'{s:.2f}' for s in seconds)})")


def memory(args) -> None:
    if args.impl is not None:  # the worker: two steps, then the peak RSS
        model = build(args.impl)
        x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(10, (BATCH,))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(2):
            train_step(model, x, y)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{args.impl:12s} peak RSS {peak / 1024:.0f} MiB (the two steps add {(peak - before) / 1024:.0f} MiB)")
        return
    for impl in IMPLS:
        subprocess.run([sys.executable, __file__, "memory", "--impl", impl, "--threads", str(args.threads)], check=True)


def primitives(args) -> None:
    torch.set_num_threads(1)
    m, c, k, c_total, k_transition = BATCH * SIZE * SIZE, 120, 48, 216, 108
    a, b = torch.randn(m, c), torch.randn(c, k)
    gemm_rate = 2 * m * c * k / best_seconds(lambda: torch.mm(a, b))
    src = torch.randn(2**25)  # 128 MiB: beyond the caches
    dst = torch.empty_like(src)
    copy_rate = 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src))
    print(f"one core: GEMM {gemm_rate / 1e9:.1f} GFLOP/s ({m}x{c}x{k}), copy {copy_rate / 1e9:.1f} GB/s "
          f"(bytes read + written)\n")

    def bn(channels):  # scale, shift, mean, rstd
        return (torch.rand(channels) + 0.5, torch.randn(channels), 0.1 * torch.randn(channels),
                torch.rand(channels) + 0.5)

    buffer = torch.randn(m, c_total)
    x, x4 = buffer[:, :c], buffer.view(BATCH, SIZE, SIZE, c_total)
    bn1, bn2, bn_t = bn(c), bn(k), bn(c_total)
    w, w_t = 0.1 * torch.randn(k, c), 0.1 * torch.randn(k_transition, c_total)
    out, grad_out, grad_buffer = torch.empty(m, k), torch.randn(m, k), torch.zeros(m, c_total)
    pooled = (BATCH, SIZE // 2, SIZE // 2, k_transition)
    t_out, t_grad, grad4 = torch.empty(pooled), torch.randn(pooled), torch.empty(BATCH, SIZE, SIZE, c_total)
    p, f = m // 4, 4  # pooled pixels, bytes per value
    batch_mean = lambda sums: sums / m  # noqa: E731
    rows = [  # (primitive, bytes that must move, FLOPs, call)
        (f"bn_relu_conv1x1 (C={c}, K={k}) + output stats", (m * c + m * k) * f, 2 * m * c * k,
         lambda be: be.bn_relu_conv1x1(x, bn1[0], bn1[1], w, out, True)),
        ("  its backward, both passes", (m * (3 * c + k) + 3 * m * c) * f, 4 * m * c * k,
         lambda be: be.bn_relu_conv1x1_backward(x, *bn1, w, grad_out, grad_buffer[:, :c], batch_mean)),
        (f"bn_relu (C={k})", 2 * m * k * f, 0, lambda be: be.bn_relu(out, bn2[0], bn2[1], grad_out)),
        ("  its backward in place, both passes", 6 * m * k * f, 0,
         lambda be: be.bn_relu_backward(out, *bn2, grad_out, grad_out, batch_mean)),
        (f"transition (C={c_total}, K={k_transition})", (m * c_total + p * k_transition) * f,
         2 * p * c_total * k_transition, lambda be: be.transition(x4, bn_t[0], bn_t[1], w_t, t_out)),
        ("  its backward, both passes", (5 * m * c_total + p * k_transition) * f, 4 * p * c_total * k_transition,
         lambda be: be.transition_backward(x4, *bn_t, w_t, t_grad, grad4, batch_mean)),
        ("channel_stats (k=12 new channels)", m * 12 * f, 0, lambda be: be.channel_stats(buffer[:, 100:112])),
    ]
    print("| primitive | MB that must move | GFLOP | bound (ms) | cpp (ms) | torch backend (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, nbytes, flops, call in rows:
        bound = max(nbytes / copy_rate, flops / gemm_rate) * 1e3
        cpp, reference = (best_seconds(lambda: call(be)) * 1e3 for be in (CppBackend(), TorchBackend()))
        print(f"| {name} | {nbytes / 1e6:.0f} | {flops / 1e9:.2f} | {bound:.1f} | {cpp:.1f} | {reference:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["step", "memory", "primitives"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"step": step, "memory": memory, "primitives": primitives}[args.mode](args)


if __name__ == "__main__":
    main()
