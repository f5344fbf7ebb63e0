"""Backend conformance: the contract of every primitive (densenet_fast/backends/interface.py),
tested once for every backend that runs here and every dtype, against one float64
reference in plain torch ops (F.batch_norm, F.avg_pool*d and autograd).

Awkward shapes: rows not a multiple of any tile, C = 17, channel ranges of wider
buffers (row stride > C), grad_x accumulated into a view with content, odd
spatial sizes of 1, 2 and 3 dimensions for the transition; running (eval) and
batch statistics.  Outputs go into NaN-filled memory beside sentinel channels,
so an unwritten element or a write outside the range fails.

The backend-specific files keep what only one backend has: tests/test_cpp_ops.py
(opcheck, argument checks, threads, CUDA against CPU), tests/test_triton_ops.py
(every kernel configuration, autotuning, shared memory, determinism).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_fast.backends import BACKEND_NAMES, BackendUnavailableError, get_backend, resolve_backend_name
from densenet_fast.backends.interface import stats_dtype
from helpers import max_relative_error
from helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread", "nan_filled_fresh_memory", "no_tf32")

EPS = 1e-5
SENTINEL = 7.0
# max relative error against the float64 reference, per data dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
ROW_SHAPES = [(1031, 17, 23), (77, 40, 16), (3, 2, 1)]  # (M, C, K)
TRANSITION_SHAPES = {  # (N, spatial, C, K)
    "2d_odd": (2, (7, 9), 17, 20), "2d_tiny": (1, (3, 2), 5, 3),
    "1d_odd": (3, (11,), 17, 20), "3d_odd": (2, (5, 6, 3), 17, 20),
}


@pytest.fixture(params=[(name, device) for device in ("cpu", "cuda") for name in BACKEND_NAMES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request):
    """Every backend on every device it runs on here."""
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        resolve_backend_name(name)
        return get_backend(name, torch.device(device)), device
    except BackendUnavailableError as error:
        pytest.skip(str(error))


@pytest.fixture(params=DTYPES.values(), ids=DTYPES)
def dtype(request, backend) -> torch.dtype:
    if request.param == torch.bfloat16 and backend[0].name == "triton" and backend[1] == "cpu":
        pytest.skip("bf16 is broken in the Triton interpreter; tested on the GPU")
    return request.param


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = max_relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: max relative error {error:.3g} > {TOLERANCE[dtype]:g}"


def channel_range(shape: tuple[int, ...], c: int, dtype, device, generator, left: int = 3,
                  right: int = 5) -> Tensor:
    """Random data (mean 1, std 2) as channels ``[left, left + c)`` of a wider channels-last buffer."""
    buffer = torch.randn(*shape, left + c + right, generator=generator, dtype=torch.float64) * 2 + 1
    return buffer.to(device=device, dtype=dtype)[..., left:left + c]


def output_range(shape: tuple[int, ...], c: int, dtype, device, left: int = 4, right: int = 9
                 ) -> tuple[Tensor, Tensor]:
    """``(buffer, view)``: NaN channels ``[left, left + c)`` between sentinel channels."""
    buffer = torch.full((*shape, left + c + right), SENTINEL, dtype=dtype, device=device)
    buffer[..., left:left + c] = float("nan")
    return buffer, buffer[..., left:left + c]


def assert_only_range_written(buffer: Tensor, channels: slice) -> None:
    outside = torch.ones(buffer.shape[-1], dtype=torch.bool, device=buffer.device)
    outside[channels] = False
    assert (buffer[..., outside] == SENTINEL).all(), "wrote outside its channel range"


@dataclass
class BN:
    """A BatchNorm for data ``x``: float64 parameters (leaves for autograd) and the
    folded coefficients the primitives take, in the statistics dtype on x's device."""

    gamma: Tensor
    beta: Tensor
    running_mean: Tensor
    running_var: Tensor
    batch_stats: bool
    scale: Tensor
    shift: Tensor
    mean: Tensor
    rstd: Tensor
    count: int

    def batch_mean(self):
        return (lambda sums: sums / self.count) if self.batch_stats else None

    def relu_bn64(self, x64: Tensor) -> Tensor:
        """``relu(batch_norm(x64))`` over the last dimension, in float64 on the CPU."""
        rows = x64.reshape(-1, x64.shape[-1])
        normed = F.batch_norm(rows, self.running_mean, self.running_var, self.gamma, self.beta,
                              training=self.batch_stats, momentum=0.0, eps=EPS)
        return normed.relu().view(x64.shape)


def make_bn(x: Tensor, batch_stats: bool, generator) -> BN:
    c = x.shape[-1]
    var, mean = torch.var_mean(x.reshape(-1, c).double().cpu(), dim=0, correction=0)
    running_mean = mean + 0.3 * torch.randn(c, generator=generator, dtype=torch.float64)
    running_var = var * (0.5 + torch.rand(c, generator=generator, dtype=torch.float64))
    gamma = (0.5 + torch.rand(c, generator=generator, dtype=torch.float64)).requires_grad_()
    beta = (0.5 * torch.randn(c, generator=generator, dtype=torch.float64)).requires_grad_()
    if not batch_stats:
        mean, var = running_mean, running_var
    rstd = (var + EPS).rsqrt()
    scale = gamma.detach() * rstd
    folded = [t.to(device=x.device, dtype=stats_dtype(x.dtype))
              for t in (scale, beta.detach() - mean * scale, mean, rstd)]
    return BN(gamma, beta, running_mean, running_var, batch_stats, *folded, x.reshape(-1, c).shape[0])


def float64_leaf(t: Tensor) -> Tensor:
    return t.detach().double().cpu().requires_grad_()


def float64_grads(output: Tensor, grad_out: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(output, inputs, grad_out.double().cpu())


def random_like(shape: tuple[int, ...], dtype, device, generator) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def random_weight(k: int, c: int, dtype, device, generator) -> Tensor:
    return (0.3 * torch.randn(k, c, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def check_sums(grads, truth, bn: BN, dtype, names) -> None:
    for name, got, expected in zip(names, grads, truth):
        assert_close(got, expected, dtype, name)
    assert grads[-1].dtype == grads[-2].dtype == bn.scale.dtype, "grad_gamma and grad_beta in the statistics dtype"


# -- channel statistics -----------------------------------------------------------------------

@pytest.mark.parametrize("m, c", [(1031, 17), (203, 40), (3, 2)])
def test_channel_stats(backend, dtype, m, c):
    """A large common offset (|mean| >> std) with a trend along the rows: where
    E[x^2] - E[x]^2 and a careless merge of partial means fail."""
    backend, device = backend
    g = torch.Generator().manual_seed(0)
    trend = torch.linspace(0, 6, m, dtype=torch.float64)[:, None]
    buffer = torch.randn(m, c + 8, generator=g, dtype=torch.float64) * 2 + 300 + trend
    x = buffer.to(device=device, dtype=dtype)[:, 3:3 + c]
    mean, var = backend.channel_stats(x)
    var64, mean64 = torch.var_mean(x.double().cpu(), dim=0, correction=0)
    assert mean.dtype == var.dtype == stats_dtype(dtype)
    assert_close(mean, mean64, stats_dtype(dtype), "mean")
    assert_close(var, var64, stats_dtype(dtype), "var")


# -- fused BN-ReLU-Conv1x1 --------------------------------------------------------------------

@pytest.mark.parametrize("m, c, k", ROW_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1(backend, dtype, m, c, k, batch_stats):
    backend, device = backend
    g = torch.Generator().manual_seed(1)
    x = channel_range((m,), c, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    weight = random_weight(k, c, dtype, device, g)
    out_buffer, out = output_range((m,), k, dtype, device)
    stats = backend.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, out, with_stats=batch_stats)
    x64, w64 = float64_leaf(x), float64_leaf(weight)
    out64 = bn.relu_bn64(x64) @ w64.t()
    assert_close(out, out64, dtype, "out")
    assert_only_range_written(out_buffer, slice(4, 4 + k))
    if batch_stats:
        var64, mean64 = torch.var_mean(out.double().cpu(), dim=0, correction=0)  # of the stored output
        assert stats[0].dtype == stats[1].dtype == bn.scale.dtype
        assert_close(stats[0], mean64, stats_dtype(dtype), "output mean")
        assert_close(stats[1], var64, stats_dtype(dtype), "output var")
    else:
        assert stats is None

    # backward: grad_x accumulates into a view of a buffer with content
    grad_out = random_like((m, k), dtype, device, g)
    grad_buffer = torch.full((m, c + 2), SENTINEL, dtype=dtype, device=device)
    grad_x = grad_buffer[:, :c]
    grad_x.copy_(random_like((m, c), dtype, device, g))
    before = grad_x.clone()
    grads = backend.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                             bn.batch_mean())
    truth = float64_grads(out64, grad_out, x64, w64, bn.gamma, bn.beta)
    if dtype in (torch.float16, torch.bfloat16):  # the stored sum is rounded: judge it, not the increment
        assert_close(grad_x, before.double().cpu() + truth[0], dtype, "grad_x")
    else:
        assert_close(grad_x.double() - before.double(), truth[0], dtype, "grad_x increment")
    assert_only_range_written(grad_buffer, slice(0, c))
    assert grads[0].dtype == dtype, "grad_weight in the data dtype"
    check_sums(grads, truth[1:], bn, dtype, ["grad_weight", "grad_gamma", "grad_beta"])


# -- BN-ReLU ----------------------------------------------------------------------------------

@pytest.mark.parametrize("m, c", [(1031, 17), (3, 2)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("in_place", [True, False], ids=["grad_x_is_grad_z", "separate"])
def test_bn_relu(backend, dtype, m, c, batch_stats, in_place):
    backend, device = backend
    g = torch.Generator().manual_seed(3)
    x = channel_range((m,), c, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    out_buffer, out = output_range((m,), c, dtype, device)
    backend.bn_relu(x, bn.scale, bn.shift, out)
    x64 = float64_leaf(x)
    z64 = bn.relu_bn64(x64)
    assert_close(out, z64, dtype, "bn_relu")
    assert_only_range_written(out_buffer, slice(4, 4 + c))

    grad_z = channel_range((m,), c, dtype, device, g, left=1, right=1)
    truth = float64_grads(z64, grad_z, x64, bn.gamma, bn.beta)
    grad_buffer, grad_x = (None, grad_z) if in_place else output_range((m,), c, dtype, device)
    grads = backend.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_x, bn.batch_mean())
    assert_close(grad_x, truth[0], dtype, "grad_x")
    if grad_buffer is not None:
        assert_only_range_written(grad_buffer, slice(4, 4 + c))
    check_sums(grads, truth[1:], bn, dtype, ["grad_gamma", "grad_beta"])


# -- transition -------------------------------------------------------------------------------

def avg_pool64(z: Tensor) -> Tensor:
    """Average pooling by 2 of ``z (N, *spatial, C)`` with torch's pooling of its dimension."""
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[z.dim() - 3]
    return pool(z.movedim(-1, 1), 2).movedim(1, -1)


@pytest.mark.parametrize("n, spatial, c, k", TRANSITION_SHAPES.values(), ids=TRANSITION_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_transition(backend, dtype, n, spatial, c, k, batch_stats):
    """Odd sizes: pooling floors, and the dropped pixels still get the statistics
    terms of the BN gradient (written, not left alone)."""
    backend, device = backend
    g = torch.Generator().manual_seed(4)
    pooled = tuple(size // 2 for size in spatial)
    x = channel_range((n, *spatial), c, dtype, device, g)
    bn = make_bn(x, batch_stats, g)
    weight = random_weight(k, c, dtype, device, g)
    out_buffer, out = output_range((n, *pooled), k, dtype, device, left=0)  # like the next block's buffer
    backend.transition(x, bn.scale, bn.shift, weight, out)
    x64, w64 = float64_leaf(x), float64_leaf(weight)
    out64 = avg_pool64(bn.relu_bn64(x64)) @ w64.t()
    assert_close(out, out64, dtype, "transition")
    assert_only_range_written(out_buffer, slice(0, k))

    grad_out = random_like((n, *pooled, k), dtype, device, g)
    grad_buffer, grad_x = output_range((n, *spatial), c, dtype, device)
    grads = backend.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                        bn.batch_mean())
    truth = float64_grads(out64, grad_out, x64, w64, bn.gamma, bn.beta)
    assert_close(grad_x, truth[0], dtype, "grad_x")
    assert_only_range_written(grad_buffer, slice(4, 4 + c))
    assert grads[0].dtype == dtype, "grad_weight in the data dtype"
    check_sums(grads, truth[1:], bn, dtype, ["grad_weight", "grad_gamma", "grad_beta"])
