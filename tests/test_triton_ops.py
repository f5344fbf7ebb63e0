"""The Triton backend's kernels against the torch backend and against float64
autograd references, at awkward shapes (rows not a multiple of the tile,
channel counts not multiples of 16, strided channel-range views), with every
configuration a GPU may launch, and NaN/Inf inputs.

Without a GPU they run under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton), which runs programs one
after another and only the configuration it is given; on a GPU the ``gpu`` runs
add bf16.  Every test runs with deterministic algorithms on, so that fresh
``torch.empty`` memory is NaN and a kernel that reads memory nobody wrote fails.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import triton
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from densenet_fast import DenseNet

from densenet_fast.backends.interface import RunningUpdate, stats_dtype
from densenet_fast.backends.torch_backend import TorchBackend
from densenet_fast.backends.triton_backend import TritonBackend
from densenet_fast.ops import bn_relu, bn_relu_conv, channel_stats, common
from densenet_fast.ops.common import GpuLimits, dot_precision

EPS = 1e-5
TRITON = TritonBackend()
TORCH = TorchBackend()
# max-relative tolerance: (against the torch backend, against float64)
TOLERANCE = {torch.float32: (2e-5, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """The interpreter on the CPU; a GPU when there is one."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    return request.param


@pytest.fixture(params=[torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
                ids=["fp32", "fp16", "bf16"])
def dtype(request, device) -> torch.dtype:
    if request.param == torch.bfloat16 and device != "cuda":
        pytest.skip("bf16 is broken in the Triton interpreter; tested on the GPU")
    return request.param


@pytest.fixture(autouse=True)
def nan_filled_fresh_memory():
    """Deterministic algorithms on: torch then fills every fresh ``torch.empty``
    with NaN, on the CPU too (warn only: some torchvision ops on CUDA lack a
    deterministic implementation)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory and torch.empty(4).isnan().all()
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 GEMMs on the GPU, so that fp32 tolerances can be tight."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = max_relative_error(actual, expected)
    assert error <= tol, f"{what}: max relative error {error:.3g} > {tol:g}"


def channel_view(shape: tuple[int, ...], c0: int, c: int, extra: int, dtype, device, generator) -> Tensor:
    """A channel range ``[c0, c0 + c)`` of a bigger channels-last buffer, filled with random data."""
    buffer = torch.randn(*shape, c0 + c + extra, generator=generator, dtype=torch.float64) * 2 + 1
    return buffer.to(device=device, dtype=dtype)[..., c0:c0 + c]


@dataclass
class BN:
    """Folded BatchNorm for ``x``: kernel inputs (fp32) and the float64 truth."""
    gamma: Tensor
    beta: Tensor
    mean: Tensor
    rstd: Tensor
    scale: Tensor
    shift: Tensor
    batch_stats: bool
    count: int

    def coefficients(self, dtype: torch.dtype) -> list[Tensor]:
        """``[scale, shift, mean, rstd]`` in the statistics dtype for ``dtype`` data (fp32, or fp64)."""
        return [t.to(stats_dtype(dtype)) for t in (self.scale, self.shift, self.mean, self.rstd)]

    def batch_mean(self):
        return (lambda sums: sums / self.count) if self.batch_stats else None

    def reference(self, x64: Tensor) -> Tensor:
        """``relu(bn(x))`` in float64 with autograd through the batch statistics."""
        if self.batch_stats:
            var, mean = torch.var_mean(x64.reshape(-1, x64.shape[-1]), dim=0, correction=0)
            rstd = (var + EPS).rsqrt()
        else:
            mean, rstd = self.mean.double(), self.rstd.double()
        return torch.relu((x64 - mean) * rstd * self.gamma + self.beta)


def make_bn(x: Tensor, batch_stats: bool, generator) -> BN:
    c = x.shape[-1]
    flat = x.reshape(-1, c).double().cpu()
    var, mean = torch.var_mean(flat, dim=0, correction=0)
    if not batch_stats:  # running statistics: near, but not equal to, the batch's
        mean = mean + 0.3 * torch.randn(c, generator=generator, dtype=torch.float64)
        var = var * (0.5 + torch.rand(c, generator=generator, dtype=torch.float64))
    rstd = (var + EPS).rsqrt()
    gamma = 0.5 + torch.rand(c, generator=generator, dtype=torch.float64)
    beta = 0.5 * torch.randn(c, generator=generator, dtype=torch.float64)
    scale, shift = gamma * rstd, beta - mean * gamma * rstd
    f32 = lambda t: t.float().to(x.device)  # noqa: E731
    return BN(gamma.requires_grad_(), beta.requires_grad_(), f32(mean), f32(rstd), f32(scale), f32(shift),
              batch_stats, flat.shape[0])


def float64_backward(output: Tensor, grad_out: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(output, inputs, grad_out.double().cpu())


# -- BatchNorm folding ------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fold_batchnorm_matches_torch(device, momentum, affine, running_dtype):
    """Coefficients and the running statistics' update (momentum or
    cumulative average; 600 channels: three programs of 256), against the
    torch backend, twice in a row (num_batches_tracked counts)."""
    g = torch.Generator().manual_seed(3)
    c = 600
    mean, var = torch.randn(c, generator=g).to(device), (torch.rand(c, generator=g) + 0.1).to(device)
    weight, bias = (torch.randn(c, generator=g).to(device) for _ in range(2)) if affine else (None, None)
    running = [torch.randn(c, generator=g).to(device, running_dtype), torch.rand(c, generator=g).to(device, running_dtype),
               torch.tensor(5, device=device)]

    def fold(backend):
        buffers = [t.clone() for t in running]
        update = RunningUpdate(*buffers, momentum, 37)
        coeffs = [backend.fold_batchnorm(mean, var, weight, bias, 1e-5, update) for _ in range(2)]
        return [*coeffs, *buffers, backend.fold_batchnorm(mean, var, weight, bias, 1e-3, None)]

    for i, (ours, theirs) in enumerate(zip(fold(TRITON), fold(TORCH))):
        assert ours.dtype == theirs.dtype, i
        # fp16 buffers: torch rounds after its multiply and after its add, the kernel once
        assert_close(ours, theirs, 2e-6 if ours.dtype == torch.float32 else 4e-3, f"output {i}")


# -- channel statistics -----------------------------------------------------------------

@pytest.mark.parametrize("m, c", [(203, 40), (50, 17), (8300, 17)])
def test_channel_stats_are_stable(device, dtype, m, c):
    """A large common offset (|mean| >> std) is where E[x^2] - E[x]^2 fails;
    a trend along the rows makes the merged partial means differ (8300 rows:
    65 row tiles of 128, so the merge combines two groups of 64)."""
    g = torch.Generator().manual_seed(0)
    trend = torch.linspace(0, 6, m, dtype=torch.float64)[:, None]
    buffer = torch.randn(m, c + 8, generator=g, dtype=torch.float64) * 2 + 300 + trend
    x = buffer.to(device=device, dtype=dtype)[:, 3:3 + c]
    mean, var = TRITON.channel_stats(x)
    var64, mean64 = torch.var_mean(x.double().cpu(), dim=0, correction=0)
    assert mean.dtype == var.dtype == torch.float32
    assert_close(mean, mean64, 1e-6, "mean")
    assert_close(var, var64, 1e-4, "var")


# -- fused BN-ReLU-Conv1x1 --------------------------------------------------------------

def test_forward_statistics_over_many_tiles(device):
    """The forward's output statistics, merged by the kernel itself in two
    levels: 8300 rows are 65 row tiles of 128 (two groups of 64), and an
    offset with a trend along the rows makes the tiles' means differ."""
    g = torch.Generator().manual_seed(9)
    m, c, k = 8300, 17, 20
    x = channel_view((m,), 1, c, 2, torch.float32, device, g).add_(torch.linspace(0, 20, m, device=device)[:, None])
    bn = make_bn(x, True, g)
    weight = (torch.randn(k, c, generator=g) * 0.1).to(device)
    out = torch.empty(m, k, device=device)
    mean, var = TRITON.bn_relu_conv1x1(x, bn.scale, bn.shift + 300, weight, out, with_stats=True)
    var64, mean64 = torch.var_mean(out.double().cpu(), dim=0, correction=0)
    assert_close(mean, mean64, 1e-6, "mean")
    assert_close(var, var64, 1e-4, "var")


SHAPES = [(203, 40, 48), (77, 17, 16)]  # (M, C, K)


@pytest.mark.parametrize("m, c, k", SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1_forward(device, dtype, m, c, k, batch_stats):
    g = torch.Generator().manual_seed(1)
    x = channel_view((m,), 5, c, 7, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)
    out_buffer = torch.full((m, k + 9), 7.0, device=device, dtype=dtype)
    out = out_buffer[:, 4:4 + k]
    stats = TRITON.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, out, with_stats=batch_stats)
    expected = torch.empty(m, k, device=device, dtype=dtype)
    expected_stats = TORCH.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, expected, with_stats=batch_stats)

    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(out, expected, vs_torch, "out vs torch backend")
    truth = bn.reference(x.double().cpu()) @ weight.double().cpu().t()
    assert_close(out, truth, vs_float64, "out vs float64")
    assert (out_buffer[:, :4] == 7).all() and (out_buffer[:, 4 + k:] == 7).all(), "wrote outside its channels"
    if batch_stats:
        var64, mean64 = torch.var_mean(out.double().cpu(), dim=0, correction=0)  # stats of the stored output
        assert_close(stats[0], mean64, 1e-5, "output mean")
        assert_close(stats[1], var64, 1e-4, "output var")
        assert_close(stats[1], expected_stats[1], 1e-4, "output var vs torch backend")
    else:
        assert stats is None


@pytest.mark.parametrize("m, c, k", SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1_backward(device, dtype, m, c, k, batch_stats):
    g = torch.Generator().manual_seed(2)
    x = channel_view((m,), 5, c, 7, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)
    grad_out = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    grad_buffer = torch.randn(m, c + 12, generator=g).to(device=device, dtype=dtype)  # pre-existing content
    before = grad_buffer.clone()
    grad_x = grad_buffer[:, 5:5 + c]
    grads = TRITON.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                            bn.batch_mean())
    expected_grad_x = before[:, 5:5 + c].clone()
    expected = TORCH.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                              expected_grad_x, bn.batch_mean())

    x64 = x.double().cpu().requires_grad_()
    w64 = weight.double().cpu().requires_grad_()
    truth = float64_backward(bn.reference(x64) @ w64.t(), grad_out, x64, w64, bn.gamma, bn.beta)
    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(grad_x, expected_grad_x, vs_torch, "grad_x vs torch backend")
    assert_close(grad_x.double().cpu() - before[:, 5:5 + c].double().cpu(), truth[0], vs_float64,
                 "grad_x increment vs float64")
    assert torch.equal(grad_buffer[:, :5], before[:, :5]) and torch.equal(grad_buffer[:, 5 + c:], before[:, 5 + c:])
    for name, actual, reference, exact in zip(("grad_weight", "grad_gamma", "grad_beta"), grads, expected, truth[1:]):
        assert_close(actual, reference, vs_torch, f"{name} vs torch backend")
        assert_close(actual, exact, vs_float64, f"{name} vs float64")
    # fp32 throughout: dW is not rounded to the data dtype before the engine casts it to the parameter's
    assert grads[0].dtype == grads[1].dtype == grads[2].dtype == torch.float32


# -- BN-ReLU apply ----------------------------------------------------------------------

@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_forward_and_backward(device, dtype, batch_stats):
    m, c = 141, 40
    g = torch.Generator().manual_seed(3)
    x = channel_view((m,), 2, c, 3, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    out = torch.empty(m, c + 4, device=device, dtype=dtype)[:, 1:1 + c]
    TRITON.bn_relu(x, bn.scale, bn.shift, out)
    x64 = x.double().cpu().requires_grad_()
    z64 = bn.reference(x64)
    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(out, z64, vs_float64, "bn_relu vs float64")

    grad_z = torch.randn(m, c, generator=g).to(device=device, dtype=dtype)
    truth = float64_backward(z64, grad_z, x64, bn.gamma, bn.beta)
    expected_grad_x = torch.empty_like(grad_z)
    expected = TORCH.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z.clone(), expected_grad_x,
                                      bn.batch_mean())
    grads = TRITON.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_z, bn.batch_mean())
    assert_close(grad_z, expected_grad_x, vs_torch, "grad_x (in place of grad_z) vs torch backend")
    assert_close(grad_z, truth[0], vs_float64, "grad_x vs float64")
    for name, actual, reference, exact in zip(("grad_gamma", "grad_beta"), grads, expected, truth[1:]):
        assert_close(actual, reference, vs_torch, f"{name} vs torch backend")
        assert_close(actual, exact, vs_float64, f"{name} vs float64")


# -- transition -------------------------------------------------------------------------

@pytest.mark.parametrize("n, h, w, c, k", [(2, 7, 9, 40, 20), (1, 6, 5, 17, 33)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_transition(device, dtype, n, h, w, c, k, batch_stats):
    """Odd sizes: avg-pool floors, and the dropped pixels still get the
    statistics terms of the BN gradient."""
    g = torch.Generator().manual_seed(4)
    x = channel_view((n, h, w), 3, c, 6, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)
    out_buffer = torch.full((n, h // 2, w // 2, k + 8), 7.0, device=device, dtype=dtype)  # the next block's buffer
    out = out_buffer[..., :k]
    TRITON.transition(x, bn.scale, bn.shift, weight, out)

    x64 = x.double().cpu().requires_grad_()
    w64 = weight.double().cpu().requires_grad_()
    pooled = F.avg_pool2d(bn.reference(x64).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    out64 = pooled @ w64.t()
    expected = torch.empty(n, h // 2, w // 2, k, device=device, dtype=dtype)
    TORCH.transition(x, bn.scale, bn.shift, weight, expected)
    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(out, expected, vs_torch, "transition vs torch backend")
    assert_close(out, out64, vs_float64, "transition vs float64")
    assert (out_buffer[..., k:] == 7).all(), "wrote outside its channels"

    grad_out = torch.randn(n, h // 2, w // 2, k, generator=g).to(device=device, dtype=dtype)
    grad_buffer = torch.full((n, h, w, c + 5), 7.0, device=device, dtype=dtype)
    grad_x = grad_buffer[..., 5:]
    grads = TRITON.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                       bn.batch_mean())
    expected_grad_x = torch.empty(n, h, w, c, device=device, dtype=dtype)
    expected = TORCH.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                         expected_grad_x, bn.batch_mean())
    truth = float64_backward(out64, grad_out, x64, w64, bn.gamma, bn.beta)
    assert_close(grad_x, expected_grad_x, vs_torch, "grad_x vs torch backend")
    assert_close(grad_x, truth[0], vs_float64, "grad_x vs float64 (written, not added)")
    assert (grad_buffer[..., :5] == 7).all()
    for name, actual, reference, exact in zip(("grad_weight", "grad_gamma", "grad_beta"), grads, expected, truth[1:]):
        assert_close(actual, reference, vs_torch, f"{name} vs torch backend")
        assert_close(actual, exact, vs_float64, f"{name} vs float64")


# -- every configuration a GPU may launch -----------------------------------------------

def config_id(config: triton.Config) -> str:
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_C']}-w{config.num_warps}-s{config.num_stages}"


def fitting_dtype(device: str, meta: dict, *configs: tuple[common.SharedMemory, triton.Config]) -> torch.dtype:
    """fp32 if each ``(shared memory estimate, configuration)`` fits the
    device's shared memory in fp32 (an H200's under the interpreter), else
    fp16 (the only data a GPU launches them for)."""
    limit = common.gpu_limits(torch.device(device)).shared_memory
    fits = all(shared_memory({**meta, **c.kwargs}, c.num_stages, 4) <= limit for shared_memory, c in configs)
    return torch.float32 if fits else torch.float16


def force(monkeypatch, launcher: common.Launcher, config: triton.Config) -> None:
    """Make ``launcher`` run ``config`` (the interpreter runs only the configuration it is given)."""
    monkeypatch.setattr(launcher, "usable", lambda grid, data, meta: [config])


def image_batch(cells: int) -> tuple[int, int, int]:
    """``(N, 9, 11)``: odd sizes (4 x 5 cells per image for the transition) with at least ``cells`` cells."""
    return triton.cdiv(cells, 20), 9, 11


def assert_matches_torch(actual: list[Tensor], run_torch, dtype: torch.dtype, what: str) -> None:
    """``actual`` against the torch backend in ``dtype`` and in float64 (``run_torch(dtype)`` -> list)."""
    vs_torch, vs_float64 = TOLERANCE[dtype]
    for i, (result, same, exact) in enumerate(zip(actual, run_torch(dtype), run_torch(torch.float64))):
        assert_close(result, same, vs_torch, f"{what} output {i} vs torch backend")
        assert_close(result, exact, vs_float64, f"{what} output {i} vs float64")


@pytest.mark.parametrize("pool, config", [pytest.param(pool, config, id=f"pool{pool}-{config_id(config)}")
                                          for pool, configs in bn_relu_conv.FORWARD_CONFIGS.items()
                                          for config in configs])
def test_forward_with_every_configuration(monkeypatch, device, pool, config):
    """Cells just past two row tiles (pool 1) or one (pool 2), input channels
    just past one channel block, K = 136: two output-channel blocks."""
    force(monkeypatch, bn_relu_conv._forward[pool], config)
    block_m, block_c = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_C"]
    c, k = block_c + 7, 136
    dtype = fitting_dtype(device, dict(POOL=pool, BLOCK_K=128), (bn_relu_conv.FORWARD_SHARED_MEMORY, config))
    g = torch.Generator().manual_seed(7)
    shape = (2 * block_m + 5,) if pool == 1 else image_batch(block_m + 3)
    x = channel_view(shape, 3, c, 2, dtype, device, g)
    bn = make_bn(x, True, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)

    def run(backend, dtype):
        args = [t.to(dtype) for t in (x, weight)]
        if pool == 1:
            out = torch.empty(x.shape[0], k, device=device, dtype=dtype)
            return [out, *backend.bn_relu_conv1x1(args[0], *bn.coefficients(dtype)[:2], args[1], out,
                                                  with_stats=True)]
        out = torch.empty(shape[0], shape[1] // 2, shape[2] // 2, k, device=device, dtype=dtype)
        backend.transition(args[0], *bn.coefficients(dtype)[:2], args[1], out)
        return [out]

    result = run(TRITON, dtype)
    assert_matches_torch(result[:1], lambda d: run(TORCH, d)[:1], dtype, "forward")
    if pool == 1:  # statistics of the stored output
        var64, mean64 = torch.var_mean(result[0].double().cpu(), dim=0, correction=0)
        assert_close(result[1], mean64, 1e-5, "output mean")
        assert_close(result[2], var64, 1e-4, "output var")


# (pool, K): with the GEMM, K = 120 (one K block: dOut and W tiles loaded once per tile and program) and
# K = 136 (two blocks of dW, two steps of the dZ loop); without it (BN-ReLU), K is C
BACKWARD_CASES = [(pool, k, index) for pool, k in ((1, 120), (1, 136), (1, None), (2, 120), (2, 136))
                  for index in range(max(len(bn_relu_conv.REDUCE_CONFIGS[pool]), len(bn_relu_conv.DX_CONFIGS[pool])))]


@pytest.mark.parametrize("pool, k, index", [
    pytest.param(pool, k, index, id=f"pool{pool}-{f'k{k}' if k else 'bn_relu'}-"
                 f"{config_id(bn_relu_conv.REDUCE_CONFIGS[pool][index % len(bn_relu_conv.REDUCE_CONFIGS[pool])])}-"
                 f"{config_id(bn_relu_conv.DX_CONFIGS[pool][index % len(bn_relu_conv.DX_CONFIGS[pool])])}")
    for pool, k, index in BACKWARD_CASES])
def test_backward_with_every_configuration(monkeypatch, device, pool, k, index):
    """Both passes, each with its ``index``-th configuration (cycling through
    the shorter list), batch statistics, at shapes just past the tiles."""
    configs = [launchers[pool][index % len(launchers[pool])]
               for launchers in (bn_relu_conv.REDUCE_CONFIGS, bn_relu_conv.DX_CONFIGS)]
    force(monkeypatch, bn_relu_conv._reduce[pool], configs[0])
    force(monkeypatch, bn_relu_conv._dx[pool], configs[1])
    block_m = max(config.kwargs["BLOCK_M"] for config in configs)
    c = max(config.kwargs["BLOCK_C"] for config in configs) + 7
    has_gemm = k is not None
    k = k or c
    one_k = bn_relu_conv.one_k_block(has_gemm, k, torch.float32, torch.device(device))
    dtype = fitting_dtype(device, dict(HAS_GEMM=has_gemm, ONE_K_BLOCK=one_k, BLOCK_K=128),
                          (bn_relu_conv.REDUCE_SHARED_MEMORY, configs[0]), (bn_relu_conv.DX_SHARED_MEMORY, configs[1]))
    g = torch.Generator().manual_seed(8)
    shape = (2 * block_m + 5,) if pool == 1 else image_batch(block_m + 3)
    x = channel_view(shape, 3, c, 2, dtype, device, g)
    bn = make_bn(x, True, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)
    out_shape = shape if pool == 1 else (shape[0], shape[1] // 2, shape[2] // 2)
    grad_out = torch.randn(*out_shape, k, generator=g).to(device=device, dtype=dtype)
    grad_x_before = torch.randn(*shape, c, generator=g).to(device=device, dtype=dtype)  # the dense layer adds to it

    def run(backend, dtype):
        x_, w_, g_ = (t.to(dtype) for t in (x, weight, grad_out))
        bn_args = bn.coefficients(dtype)
        grad_x = grad_x_before.to(dtype, copy=True) if pool == 1 and has_gemm else torch.empty_like(x_)
        if pool == 2:
            grads = backend.transition_backward(x_, *bn_args, w_, g_, grad_x, bn.batch_mean())
        elif has_gemm:
            grads = backend.bn_relu_conv1x1_backward(x_, *bn_args, w_, g_, grad_x, bn.batch_mean())
        else:
            grads = backend.bn_relu_backward(x_, *bn_args, g_.clone(), grad_x, bn.batch_mean())
        return [grad_x, *grads]

    assert_matches_torch(run(TRITON, dtype), lambda d: run(TORCH, d), dtype, "backward")


@pytest.mark.parametrize("pool", [1, 2])
def test_backward_k_loop_when_k_fits_one_block(monkeypatch, device, pool):
    """Exact fp32 on a GPU (``one_k_block`` off) takes the K loop even where K
    fits one block, with the unpipelined reduce configuration on small-shared-memory
    parts: that path, forced, at K = 120."""
    calls = []
    monkeypatch.setattr(bn_relu_conv, "one_k_block", lambda has_gemm, k, dtype, device: calls.append(k) or not has_gemm)
    unpipelined = len(bn_relu_conv.REDUCE_CONFIGS[pool]) - 1
    assert bn_relu_conv.REDUCE_CONFIGS[pool][unpipelined].num_stages == 1
    test_backward_with_every_configuration(monkeypatch, device, pool, 120, unpipelined)
    assert 120 in calls


# -- NaN and Inf ------------------------------------------------------------------------

def assert_same_values(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """NaN and +-Inf exactly where ``expected`` has them, finite values within ``tol`` (max-relative)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN elsewhere than torch's"
    infinite = expected.isinf()
    assert torch.equal(actual.isinf(), infinite) and torch.equal(actual[infinite], expected[infinite]), \
        f"{what}: Inf elsewhere than torch's"
    finite = expected.isfinite()
    if finite.any():
        assert_close(actual[finite], expected[finite], tol, what)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_nan_and_inf_propagate_as_in_torch(device, batch_stats):
    """A NaN, a +Inf and a -Inf in three channels of the input: every primitive
    gives NaN and Inf exactly where the torch backend does: relu(NaN) = NaN,
    and the gradient passes where ``a <= 0`` is false, NaN included (torch's
    ``threshold_backward``); the -Inf sits in a row the transition's pooling drops."""
    g = torch.Generator().manual_seed(9)
    n, h, w, c, k = 2, 5, 7, 20, 24
    x = channel_view((n, h, w), 1, c, 2, torch.float32, device, g)
    bn = make_bn(x, batch_stats, g)  # finite coefficients from the clean data
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 3, 5] = float("inf")
    x[0, 4, 6, 7] = float("-inf")
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device)
    rows = x.reshape(-1, c)
    grad_out = torch.randn(n * h * w, k, generator=g).to(device)
    grad_pooled = torch.randn(n, h // 2, w // 2, k, generator=g).to(device)

    def run(backend) -> dict[str, Tensor]:
        coefficients = (bn.scale, bn.shift)
        statistics = (bn.mean, bn.rstd)
        out = torch.empty(n * h * w, k, device=device)
        stats = backend.bn_relu_conv1x1(rows, *coefficients, weight, out, with_stats=True)
        grad_rows = torch.zeros_like(rows)
        conv_grads = backend.bn_relu_conv1x1_backward(rows, *coefficients, *statistics, weight, grad_out, grad_rows,
                                                      bn.batch_mean())
        z = torch.empty_like(rows)
        backend.bn_relu(rows, *coefficients, z)
        grad_z = torch.empty_like(rows)
        bn_relu_grads = backend.bn_relu_backward(rows, *coefficients, *statistics, out[:, :c].clone(), grad_z,
                                                 bn.batch_mean())
        pooled = torch.empty(n, h // 2, w // 2, k, device=device)
        backend.transition(x, *coefficients, weight, pooled)
        grad_x = torch.empty_like(x)
        transition_grads = backend.transition_backward(x, *coefficients, *statistics, weight, grad_pooled, grad_x,
                                                       bn.batch_mean())
        results = dict(zip(("channel mean", "channel var"), backend.channel_stats(rows)))
        results.update(zip(("conv out", "out mean", "out var", "conv grad_x", "conv grad_weight", "conv grad_gamma",
                            "conv grad_beta"), (out, *stats, grad_rows, *conv_grads)))
        results.update(zip(("bn_relu", "bn_relu grad_x", "bn_relu grad_gamma", "bn_relu grad_beta"),
                           (z, grad_z, *bn_relu_grads)))
        results.update(zip(("transition", "transition grad_x", "transition grad_weight", "transition grad_gamma",
                            "transition grad_beta"), (pooled, grad_x, *transition_grads)))
        return results

    ours, expected = run(TRITON), run(TORCH)
    assert ours["bn_relu"].isnan().any() and ours["conv out"].isinf().any()
    for name in expected:
        assert_same_values(ours[name], expected[name], TOLERANCE[torch.float32][0], name)


# -- choosing configurations ------------------------------------------------------------

H200 = GpuLimits(shared_memory=232448, multiprocessors=132)
A100 = GpuLimits(shared_memory=166912, multiprocessors=108)
RTX_4090 = GpuLimits(shared_memory=101376, multiprocessors=128)  # sm_89: the least shared memory of sm_8x/sm_90
GEMM_LAUNCHERS = {"forward": (bn_relu_conv._forward, bn_relu_conv.FORWARD_SHARED_MEMORY),
                  "reduce": (bn_relu_conv._reduce, bn_relu_conv.REDUCE_SHARED_MEMORY),
                  "dx": (bn_relu_conv._dx, bn_relu_conv.DX_SHARED_MEMORY)}


@pytest.mark.parametrize("limits", [H200, A100, RTX_4090], ids=["H200", "A100", "RTX4090"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_candidates_are_pruned_by_shared_memory(monkeypatch, limits, dtype):
    """Only configurations whose shared memory (an upper bound, checked against
    compiled kernels by benchmarks/triton_compile_check.py) fits the device are
    ever launched or autotuned, and every kernel keeps at least one."""
    monkeypatch.setattr(common, "INTERPRETER_LIMITS", limits)
    data = torch.empty(0, dtype=dtype)
    for name, (launchers, shared_memory) in GEMM_LAUNCHERS.items():
        for pool, launcher in launchers.items():
            for has_gemm, one_k_block in ((True, True), (True, False), (False, True)):
                meta = dict(POOL=pool, HAS_GEMM=has_gemm, ONE_K_BLOCK=one_k_block, BLOCK_K=128)
                fitting = launcher.fitting(data, meta)
                assert fitting, (name, pool)
                for config in fitting:
                    need = shared_memory({**meta, **config.kwargs}, config.num_stages, data.element_size())
                    assert need <= limits.shared_memory, (name, pool, config)
    # the fp32 forward's first candidate needs more than any of these GPUs offers (it compiles to 225 KiB on sm_90)
    first = bn_relu_conv.FORWARD_CONFIGS[1][0]
    assert (first in bn_relu_conv._forward[1].fitting(data, dict(POOL=1, BLOCK_K=128))) == (dtype != torch.float32
                                                                                             and limits != RTX_4090)


def test_configuration_follows_the_shapes(monkeypatch):
    """Without timing anything: the first fitting candidate while its grid
    gives every multiprocessor a program, else the one with the most programs;
    autotuning (opt-in) considers every fitting candidate, never in deterministic mode."""
    monkeypatch.setattr(common, "INTERPRETER_LIMITS", H200)
    launcher = bn_relu_conv._forward[1]
    meta = dict(POOL=1, BLOCK_K=128)
    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)

    def block_m(data: Tensor, rows: int) -> list[int]:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), 1)  # noqa: E731
        return [config.kwargs["BLOCK_M"] for config in launcher.usable(grid, data, meta)]

    assert block_m(bf16, 256 * 14 * 14) == [128]  # DenseNet-121 block 3, batch 256: 392 programs
    assert block_m(bf16, 256 * 7 * 7) == [64]  # block 4: 98 programs of 128 rows would leave SMs idle
    assert block_m(bf16, 100) == [64]  # too few rows for any: the most programs
    assert block_m(fp32, 256 * 14 * 14) == [64]  # the 128-row candidate does not fit in fp32
    monkeypatch.setenv(common.AUTOTUNE_ENV_VAR, "1")
    assert block_m(bf16, 256 * 14 * 14) == [128]  # deterministic mode (this file's fixture): no autotuning
    torch.use_deterministic_algorithms(False)
    assert len(block_m(bf16, 256 * 14 * 14)) == len(launcher.fitting(bf16, meta)) > 1


# -- launches per layer ------------------------------------------------------------------

GEMMS = {"convolution", "convolution_backward", "mm", "addmm"}  # the 3x3 convolutions, the stem and classifier
NOT_KERNELS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "detach",
               "lift_fresh", "_unsafe_view", "_record_function_enter_new", "_record_function_exit"}


class LaunchCounter(TorchDispatchMode):
    """While active, counts the Triton launches (per kernel) and the torch ops
    that launch a GPU kernel: ``small`` (elementwise, reductions, copies) and
    ``gemm`` (convolutions and matrix products); views and allocations launch none."""

    def __init__(self) -> None:
        super().__init__()
        self.triton: Counter[str] = Counter()
        self.small: Counter[str] = Counter()
        self.gemm: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_KERNELS:
            (self.gemm if name in GEMMS else self.small)[name] += 1
        return func(*args, **(kwargs or {}))

    def totals(self) -> Counter[str]:
        return Counter(triton=sum(self.triton.values()), small=sum(self.small.values()),
                       gemm=sum(self.gemm.values()))


def count_launches(block_config: tuple[int, ...]) -> LaunchCounter:
    """The launches of one training step's forward and backward (the second
    step, after the first compiled and allocated) of a tiny DenseNet (ImageNet
    stem, 32x32 input, batch 2) on the triton backend."""
    counter = LaunchCounter()
    launch_item = common.Launcher.__getitem__

    def counted(launcher, grid):
        launch = launch_item(launcher, grid)

        def run(*args, **meta):
            counter.triton[launcher.fn.__name__] += 1
            with _disable_current_modes():  # the interpreter's own copies are no GPU kernels
                launch(*args, **meta)
        return run

    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=block_config, num_init_features=8, num_classes=5, backend="triton")
    x, target = torch.randn(2, 3, 32, 32), torch.randint(5, (2,))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):  # as a GPU step runs in bf16 (weights cast per use)
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()

    step()
    with mock.patch.object(common.Launcher, "__getitem__", counted), counter:
        step()
    return counter


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts on the CPU, in Triton's interpreter")
def test_launches_per_layer():
    """Triton launches and small torch kernels per dense layer and per
    transition of a training step (forward and backward; the optimiser's step
    is the caller's), by difference between models one layer or one transition
    apart, and extrapolated to DenseNet-121 (58 layers, 3 transitions); the
    numbers are in docs/performance.md.  Upper bounds: a change that launches
    more fails here."""
    torch.use_deterministic_algorithms(False)  # NaN-filling fresh memory would count as kernels
    counts = {config: count_launches(config).totals() for config in [(2, 2), (3, 2), (4,)]}
    layer = counts[(3, 2)] - counts[(2, 2)]
    transition = counts[(2, 2)] - counts[(4,)]
    rest = counts[(4,)] - Counter({kind: 4 * n for kind, n in layer.items()})
    densenet121 = {kind: rest[kind] + 58 * layer[kind] + 3 * transition[kind] for kind in ("triton", "small", "gemm")}
    print(f"per layer {dict(layer)}, per transition {dict(transition)}, DenseNet-121 {densenet121}")
    assert layer["gemm"] == 2  # the 3x3 convolution, forward and backward
    assert layer["triton"] <= 10 and layer["small"] <= 12, layer
    assert transition["triton"] <= 5 and transition["small"] <= 6, transition


# -- modes and refusals -----------------------------------------------------------------

def test_deterministic_mode_is_bitwise_reproducible(device):
    m, c, k = 203, 40, 48
    g = torch.Generator().manual_seed(5)
    x = channel_view((m,), 0, c, 8, torch.float32, device, g)
    bn = make_bn(x, True, g)
    weight = torch.randn(k, c, generator=g).to(device)
    grad_out = torch.randn(m, k, generator=g).to(device)

    def run() -> list[Tensor]:
        out = torch.empty(m, k, device=device)
        stats = TRITON.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, out, with_stats=True)
        grad_x = torch.zeros(m, c, device=device)
        grads = TRITON.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                                bn.batch_mean())
        return [out, *stats, grad_x, *grads]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_float64_runs_the_torch_backend(device):
    """The kernels take fp32/fp16/bf16 only; fp64 (automatic backend choice puts
    it on triton on CUDA) runs the torch backend's primitives; the ops refuse it."""
    g = torch.Generator().manual_seed(6)
    x = channel_view((3, 5, 7), 2, 20, 3, torch.float64, device, g)
    bn = make_bn(x, True, g)
    scale, shift, mean, rstd = (t.double() for t in (bn.scale, bn.shift, bn.mean, bn.rstd))
    weight = torch.randn(18, 20, generator=g, dtype=torch.float64).to(device)
    rows = x.reshape(-1, 20)
    results = []
    for backend in (TRITON, TORCH):
        out = torch.empty(rows.shape[0], 18, device=device, dtype=torch.float64)
        stats = backend.bn_relu_conv1x1(rows, scale, shift, weight, out, with_stats=True)
        grad_x = torch.zeros_like(rows)
        grads = backend.bn_relu_conv1x1_backward(rows, scale, shift, mean, rstd, weight, out, grad_x, bn.batch_mean())
        pooled = torch.empty(3, 2, 3, 18, device=device, dtype=torch.float64)
        backend.transition(x, scale, shift, weight, pooled)
        results.append([out, *stats, grad_x, *grads, pooled, *backend.channel_stats(rows)])
    for actual, expected in zip(*results):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    with pytest.raises(TypeError, match="backend='torch'"):
        channel_stats.channel_stats(rows)


def test_fp32_dot_precision_follows_torch_tf32_switch_for_convolutions():
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        torch.backends.cudnn.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "ieee"


# -- the whole model --------------------------------------------------------------------

@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_model_on_triton_matches_torchvision(device, recompute):
    """A tiny DenseNet-BC on the triton backend against torchvision with the same
    weights (DESIGN.md §5): two training steps (outputs and running statistics
    to 1e-4, gradients as close to float64 as torchvision fp32's own), then eval.
    Odd spatial sizes exercise the transition's floor pooling; channel counts
    (12, 16, 20, 24) and the bottleneck (16) are below or near one 16-wide tile."""
    pytest.importorskip("torchvision")
    from helpers import FP32_RTOL, check_training_fp32, forward_backward, make_pair, random_batch

    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=16, num_classes=5, stem="cifar")
    ours, _ = make_pair(dtype=torch.float32, device=device, backend="triton", recompute=recompute, **config)
    check_training_fp32(ours, (2, 9, 7), steps=2)
    ours_torch, tv = make_pair(dtype=torch.float32, device=device, backend="torch", **config)
    ours_torch.load_state_dict(ours.state_dict())
    tv.load_state_dict(ours.state_dict())
    x, target = random_batch(ours, 2, 9, 7, seed=7)
    for model in (ours, ours_torch, tv):
        model.eval()
    result = forward_backward(ours, x, target)
    assert max_relative_error(result.output, forward_backward(tv, x, target).output) <= FP32_RTOL
    assert max_relative_error(result.output, forward_backward(ours_torch, x, target).output) <= FP32_RTOL


ALL_LAUNCHERS = [*bn_relu_conv._forward.values(), *bn_relu_conv._reduce.values(), *bn_relu_conv._dx.values(),
                 channel_stats._tile_stats, bn_relu._bn_relu]


def test_model_with_every_kernels_first_configuration(monkeypatch, device):
    """The tiny model with the first candidate of every kernel (the largest row
    tiles; what a GPU runs for 16-bit data) and NaN-filled fresh memory,
    against the torch backend in fp32: output, every gradient and running
    statistic after a training step."""
    from helpers import assert_results_equal, forward_backward, make_model, random_batch

    for launcher in ALL_LAUNCHERS:
        force(monkeypatch, launcher, launcher.candidates[0])
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=16, num_classes=5, stem="cifar")
    ours = make_model(dtype=torch.float32, device=device, backend="triton", **config)
    reference = make_model(dtype=torch.float32, device=device, backend="torch", **config)
    reference.load_state_dict(ours.state_dict())
    x, target = random_batch(ours, 2, 9, 7, seed=7)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(reference, x, target), 1e-4)


# -- GPU only ---------------------------------------------------------------------------

def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def layer_and_transition(device: str) -> list[Tensor]:
    """A dense layer's forward (with statistics) and backward (accumulating)
    and a transition's forward and backward, on the triton and the torch
    backend: ``(ours, torch's)``."""
    g = torch.Generator().manual_seed(10)
    x = channel_view((2, 6, 5), 0, 40, 0, torch.float32, device, g)
    bn = make_bn(x, True, g)
    weight = torch.randn(20, 40, generator=g).to(device)
    grad_out = torch.randn(60, 20, generator=g).to(device)
    grad_pooled = torch.randn(2, 3, 2, 20, generator=g).to(device)
    rows = x.reshape(-1, 40)

    def run(backend) -> list[Tensor]:
        out = torch.empty(60, 20, device=device)
        stats = backend.bn_relu_conv1x1(rows, bn.scale, bn.shift, weight, out, with_stats=True)
        grad_rows = torch.ones_like(rows)
        grads = backend.bn_relu_conv1x1_backward(rows, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                                 grad_rows, bn.batch_mean())
        pooled = torch.empty(2, 3, 2, 20, device=device)
        backend.transition(x, bn.scale, bn.shift, weight, pooled)
        grad_x = torch.empty_like(x)
        transition_grads = backend.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_pooled,
                                                       grad_x, bn.batch_mean())
        return [out, *stats, grad_rows, *grads, pooled, grad_x, *transition_grads, *backend.channel_stats(rows)]

    return run(TRITON), run(TORCH)


@needs_gpu
def test_kernels_launch_on_their_tensors_device():
    """Tensors on ``cuda:1`` while ``cuda:0`` is current: every launch goes to the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with torch.cuda.device(0):
        ours, expected = layer_and_transition("cuda:1")
    for i, (actual, reference) in enumerate(zip(ours, expected)):
        assert actual.device == torch.device("cuda:1")
        assert_close(actual, reference, 1e-4, f"output {i}")


@needs_gpu
def test_opt_in_autotuning(monkeypatch):
    """DENSENET_FAST_AUTOTUNE=1 outside deterministic mode: triton.autotune over
    the candidates that fit, with the statistics counts reset and the
    accumulated gradient restored between candidates."""
    monkeypatch.setenv(common.AUTOTUNE_ENV_VAR, "1")
    torch.use_deterministic_algorithms(False)
    ours, expected = layer_and_transition("cuda")
    for i, (actual, reference) in enumerate(zip(ours, expected)):
        assert_close(actual, reference, 1e-4, f"output {i}")


@needs_gpu
def test_float64_model_on_cuda_with_automatic_backend():
    """Automatic choice puts CUDA tensors on the triton backend, whose kernels
    lack fp64: fp64 runs the torch backend's primitives instead of raising."""
    from helpers import assert_results_equal, forward_backward, make_model, random_batch

    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=16, num_classes=5, stem="cifar")
    ours = make_model(dtype=torch.float64, device="cuda", backend=None, **config)
    reference = make_model(dtype=torch.float64, device="cuda", backend="torch", **config)
    x, target = random_batch(ours, 2, 9, 7, seed=7)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(reference, x, target), 1e-10)
