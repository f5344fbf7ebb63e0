"""The C++ CPU backend's fused ops (torch.ops.densenet_fast.*, through
CppBackend) against the torch backend and against float64 autograd through
F.batch_norm, at awkward shapes: rows not a multiple of the tile, C = 17,
strided channel ranges of wider buffers, grad_x accumulated into a view with
content, odd sizes for the transition (1, 2 and 3 spatial dimensions), running
(eval) and batch statistics.
Then the whole model on backend='cpp' against torchvision, and torch.compile."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_fast import _extension

if _extension.load() is None:
    pytest.fail(f"the C++ extension is not built: {_extension.load_error()} (run `make build`)", pytrace=False)

from densenet_fast import densenet_bc  # noqa: E402
from densenet_fast.backends.cpp_backend import CppBackend  # noqa: E402
from densenet_fast.backends.torch_backend import TorchBackend  # noqa: E402
from helpers import (FP32_RTOL, check_eval_float64, check_training_float64, check_training_fp32,  # noqa: E402
                     forward_backward, make_pair, max_relative_error, random_batch)
from helpers import one_thread  # noqa: E402, F401  (fixture)

CPP, TORCH = CppBackend(), TorchBackend()
EPS = 1e-5
# max-relative tolerance: (against the torch backend, against float64 autograd)
TOLERANCE = {torch.float32: (5e-5, 2e-4), torch.float64: (1e-11, 1e-10), torch.bfloat16: (2e-2, 4e-2)}
SENTINEL = 7.0
# (M, C, K): one partial tile; several tiles and chunks with C = 17; rows of 1 and 2 channels.
ROW_SHAPES = [(1031, 17, 23), (9001, 40, 48), (3, 2, 1)]


@pytest.fixture(params=[torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def dtype(request) -> torch.dtype:
    return request.param


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = max_relative_error(actual, expected)
    assert error <= tol, f"{what}: max relative error {error:.3g} > {tol:g}"


def random_buffer(shape: tuple[int, ...], channels: int, dtype, generator) -> Tensor:
    return (torch.randn(*shape, channels, generator=generator, dtype=torch.float64) * 2 + 1).to(dtype)


def channel_range(shape: tuple[int, ...], c: int, dtype, generator, left: int = 3, right: int = 5) -> Tensor:
    """Random data as channels ``[left, left + c)`` of a wider channels-last buffer."""
    return random_buffer(shape, left + c + right, dtype, generator)[..., left:left + c]


def sentinel_range(shape: tuple[int, ...], c: int, dtype, left: int = 4, right: int = 9) -> tuple[Tensor, Tensor]:
    """``(buffer, view)``: channels ``[left, left + c)`` of a buffer filled with SENTINEL."""
    buffer = torch.full((*shape, left + c + right), SENTINEL, dtype=dtype)
    return buffer, buffer[..., left:left + c]


def assert_untouched(buffer: Tensor, view_channels: slice, before: Tensor) -> None:
    outside = torch.ones(buffer.shape[-1], dtype=torch.bool)
    outside[view_channels] = False
    assert torch.equal(buffer[..., outside], before[..., outside]), "wrote outside its channel range"


@dataclass
class BN:
    """A BatchNorm for data ``x``: float64 parameters (leaves for autograd), and
    the folded coefficients the primitives take, in the statistics dtype."""

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
        """``relu(batch_norm(x64))`` over the last dimension in float64 (plain torch)."""
        rows = x64.reshape(-1, x64.shape[-1])
        normed = F.batch_norm(rows, self.running_mean, self.running_var, self.gamma, self.beta,
                              training=self.batch_stats, momentum=0.0, eps=EPS)
        return normed.relu().view(x64.shape)


def make_bn(x: Tensor, batch_stats: bool, generator) -> BN:
    c = x.shape[-1]
    var, mean = torch.var_mean(x.reshape(-1, c).double(), dim=0, correction=0)
    running_mean = mean + 0.3 * torch.randn(c, generator=generator, dtype=torch.float64)
    running_var = var * (0.5 + torch.rand(c, generator=generator, dtype=torch.float64))
    gamma = (0.5 + torch.rand(c, generator=generator, dtype=torch.float64)).requires_grad_()
    beta = (0.5 * torch.randn(c, generator=generator, dtype=torch.float64)).requires_grad_()
    if not batch_stats:
        mean, var = running_mean, running_var
    rstd = (var + EPS).rsqrt()
    scale = gamma.detach() * rstd
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    folded = [t.to(stats_dtype) for t in (scale, beta.detach() - mean * scale, mean, rstd)]
    return BN(gamma, beta, running_mean, running_var, batch_stats, *folded, x.reshape(-1, c).shape[0])


def float64_grads(output: Tensor, grad_out: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(output, inputs, grad_out.double())


def check_grads(actual, expected, truth, dtype, names) -> None:
    vs_torch, vs_float64 = TOLERANCE[dtype]
    for name, got, reference, exact in zip(names, actual, expected, truth):
        assert_close(got, reference, vs_torch, f"{name} vs torch backend")
        assert_close(got, exact, vs_float64, f"{name} vs float64")


# -- fused BN-ReLU-Conv1x1 -----------------------------------------------------------------

@pytest.mark.parametrize("m, c, k", ROW_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1_forward(dtype, m, c, k, batch_stats):
    g = torch.Generator().manual_seed(1)
    x = channel_range((m,), c, dtype, g)
    bn = make_bn(x, batch_stats, g)
    weight = (0.3 * torch.randn(k, c, generator=g, dtype=torch.float64)).to(dtype)
    out_buffer, out = sentinel_range((m,), k, dtype)
    before = out_buffer.clone()
    stats = CPP.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, out, with_stats=batch_stats)
    expected = torch.empty(m, k, dtype=dtype)
    TORCH.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, expected, with_stats=False)

    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(out, expected, vs_torch, "out vs torch backend")
    assert_close(out, bn.relu_bn64(x.double()) @ weight.double().t(), vs_float64, "out vs float64")
    assert_untouched(out_buffer, slice(4, 4 + k), before)
    if batch_stats:
        var64, mean64 = torch.var_mean(out.double(), dim=0, correction=0)  # of the stored output
        assert stats[0].dtype == stats[1].dtype == bn.scale.dtype
        assert_close(stats[0], mean64, vs_torch, "output mean")
        assert_close(stats[1], var64, vs_torch, "output var")
    else:
        assert stats is None


@pytest.mark.parametrize("m, c, k", ROW_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1_backward_accumulates(dtype, m, c, k, batch_stats):
    g = torch.Generator().manual_seed(2)
    x = channel_range((m,), c, dtype, g)
    bn = make_bn(x, batch_stats, g)
    weight = (0.3 * torch.randn(k, c, generator=g, dtype=torch.float64)).to(dtype)
    grad_out = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    grad_buffer = random_buffer((m,), 5 + c + 2, dtype, g)  # existing content everywhere
    before = grad_buffer.clone()
    grad_x = grad_buffer[:, 5:5 + c]
    grads = CPP.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                         bn.batch_mean())
    expected_grad_x = before[:, 5:5 + c].clone()
    expected = TORCH.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                              expected_grad_x, bn.batch_mean())

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    truth = float64_grads(bn.relu_bn64(x64) @ w64.t(), grad_out, x64, w64, bn.gamma, bn.beta)
    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(grad_x, expected_grad_x, vs_torch, "grad_x vs torch backend")
    if dtype == torch.bfloat16:  # the stored sum is rounded to bf16: judge it, not the (maybe tiny) increment
        assert_close(grad_x, before[:, 5:5 + c].double() + truth[0], vs_float64, "grad_x vs float64")
    else:
        assert_close(grad_x.double() - before[:, 5:5 + c].double(), truth[0], vs_float64,
                     "grad_x increment vs float64")
    assert_untouched(grad_buffer, slice(5, 5 + c), before)
    check_grads(grads, expected, truth[1:], dtype, ["grad_weight", "grad_gamma", "grad_beta"])
    assert grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == bn.scale.dtype


# -- BN-ReLU apply -------------------------------------------------------------------------

@pytest.mark.parametrize("m, c", [(1031, 17), (3, 2)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("in_place", [True, False], ids=["grad_x_is_grad_z", "separate"])
def test_bn_relu_forward_and_backward(dtype, m, c, batch_stats, in_place):
    g = torch.Generator().manual_seed(3)
    x = channel_range((m,), c, dtype, g)
    bn = make_bn(x, batch_stats, g)
    out_buffer, out = sentinel_range((m,), c, dtype)
    before = out_buffer.clone()
    CPP.bn_relu(x, bn.scale, bn.shift, out)
    x64 = x.detach().double().requires_grad_()
    z64 = bn.relu_bn64(x64)
    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(out, z64, vs_float64, "bn_relu vs float64")
    assert_untouched(out_buffer, slice(4, 4 + c), before)

    grad_z_buffer = random_buffer((m,), 1 + c + 1, dtype, g)
    grad_z = grad_z_buffer[:, 1:1 + c]
    expected_grad_x = torch.empty(m, c, dtype=dtype)
    expected = TORCH.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z.clone(), expected_grad_x,
                                      bn.batch_mean())
    truth = float64_grads(z64, grad_z, x64, bn.gamma, bn.beta)
    grad_buffer, grad_x = (grad_z_buffer, grad_z) if in_place else sentinel_range((m,), c, dtype)
    before = grad_buffer.clone()
    grads = CPP.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_x, bn.batch_mean())
    check_grads([grad_x, *grads], [expected_grad_x, *expected], truth, dtype, ["grad_x", "grad_gamma", "grad_beta"])
    assert_untouched(grad_buffer, slice(1, 1 + c) if in_place else slice(4, 4 + c), before)


# -- transition ----------------------------------------------------------------------------

def avg_pool64(z: Tensor) -> Tensor:
    """Average pooling by 2 of ``z (N, *spatial, C)`` with torch's pooling of its dimension."""
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[z.dim() - 3]
    return pool(z.movedim(-1, 1), 2).movedim(1, -1)


TRANSITION_SHAPES = {  # (N, spatial, C, K)
    "2d_odd": (2, (7, 9), 17, 20), "2d_even": (3, (16, 12), 40, 33), "2d_tiny": (1, (3, 2), 5, 3),
    "1d_odd": (3, (11,), 17, 20), "3d_odd": (2, (5, 6, 7), 17, 20), "3d_tiny": (1, (4, 3, 2), 5, 3),
}


@pytest.mark.parametrize("n, spatial, c, k", TRANSITION_SHAPES.values(), ids=TRANSITION_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_transition(dtype, n, spatial, c, k, batch_stats):
    """Odd sizes: pooling floors, and the dropped pixels still get the
    statistics terms of the BN gradient (and are written, not left alone)."""
    g = torch.Generator().manual_seed(4)
    pooled = tuple(size // 2 for size in spatial)
    x = channel_range((n, *spatial), c, dtype, g)
    bn = make_bn(x, batch_stats, g)
    weight = (0.3 * torch.randn(k, c, generator=g, dtype=torch.float64)).to(dtype)
    out_buffer, out = sentinel_range((n, *pooled), k, dtype, left=0)  # like the next block's buffer
    before = out_buffer.clone()
    CPP.transition(x, bn.scale, bn.shift, weight, out)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    out64 = avg_pool64(bn.relu_bn64(x64)) @ w64.t()
    expected = torch.empty(n, *pooled, k, dtype=dtype)
    TORCH.transition(x, bn.scale, bn.shift, weight, expected)
    vs_torch, vs_float64 = TOLERANCE[dtype]
    assert_close(out, expected, vs_torch, "transition vs torch backend")
    assert_close(out, out64, vs_float64, "transition vs float64")
    assert_untouched(out_buffer, slice(0, k), before)

    grad_out = torch.randn(n, *pooled, k, generator=g, dtype=torch.float64).to(dtype)
    grad_buffer, grad_x = sentinel_range((n, *spatial), c, dtype)
    before = grad_buffer.clone()
    grads = CPP.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                    bn.batch_mean())
    expected_grad_x = torch.empty(n, *spatial, c, dtype=dtype)
    expected = TORCH.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, expected_grad_x,
                                         bn.batch_mean())
    truth = float64_grads(out64, grad_out, x64, w64, bn.gamma, bn.beta)
    check_grads([grad_x, *grads], [expected_grad_x, *expected], truth, dtype,
                ["grad_x", "grad_weight", "grad_gamma", "grad_beta"])
    assert_untouched(grad_buffer, slice(4, 4 + c), before)


# -- NaN and Inf ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def poison(x: Tensor) -> None:
    """NaN, +Inf and -Inf at a few pixels of channels 0-2 of ``x`` (in place):
    the first pixel, whose value is the channel statistics' shift, and the last,
    which pooling drops at odd H and W; the other channels stay finite."""
    rows = x.view(-1, x.shape[-1])
    m, c = rows.shape
    for row, channel, value in [(0, 0, INF), (m // 5, 0, NAN), (m // 2, 1, NAN), (m // 3, 2, -INF), (m - 1, 2, NAN)]:
        rows[row, channel % c] = value


def poisoned_bn(x: Tensor, batch_stats: bool, generator) -> BN:
    """Poisons ``x``; returns a BN whose batch statistics are those of the poisoned
    ``x`` (NaN coefficients in channels 0-2, as in training), or finite running
    statistics (non-finite values then reach the kernels pixel by pixel)."""
    if batch_stats:
        poison(x)
        return make_bn(x, True, generator)
    bn = make_bn(x, False, generator)
    poison(x)
    return bn


def assert_same_numbers(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """NaN and +-Inf at the same positions; finite values within ``tol`` relative
    to the largest finite ``|expected|``."""
    expected = expected.double()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tol * scale, equal_nan=True,
                               msg=lambda message: f"{what}: {message}")


def assert_all_same_numbers(actual, expected, dtype, names) -> None:
    for name, got, reference in zip(names, actual, expected):
        assert_same_numbers(got, reference, TOLERANCE[dtype][0], f"{name} vs torch backend")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1_nan_and_inf_as_torch(dtype, batch_stats):
    m, c, k = 1031, 17, 23
    g = torch.Generator().manual_seed(10)
    x = channel_range((m,), c, dtype, g)
    bn = poisoned_bn(x, batch_stats, g)
    weight = (0.3 * torch.randn(k, c, generator=g, dtype=torch.float64)).to(dtype)
    out, expected_out = torch.empty(m, k, dtype=dtype), torch.empty(m, k, dtype=dtype)
    stats = CPP.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, out, with_stats=True)
    expected_stats = TORCH.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, expected_out, with_stats=True)
    assert_all_same_numbers([out, *stats], [expected_out, *expected_stats], dtype, ["out", "mean", "var"])

    grad_out = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    grad_x = random_buffer((m,), c, dtype, g)
    expected_grad_x = grad_x.clone()
    grads = CPP.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                         bn.batch_mean())
    expected = TORCH.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                              expected_grad_x, bn.batch_mean())
    assert_all_same_numbers([grad_x, *grads], [expected_grad_x, *expected], dtype,
                            ["grad_x", "grad_weight", "grad_gamma", "grad_beta"])


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_nan_and_inf_as_torch(dtype, batch_stats):
    m, c = 1031, 17
    g = torch.Generator().manual_seed(11)
    x = channel_range((m,), c, dtype, g)
    bn = poisoned_bn(x, batch_stats, g)
    out, expected_out = torch.empty(m, c, dtype=dtype), torch.empty(m, c, dtype=dtype)
    CPP.bn_relu(x, bn.scale, bn.shift, out)
    TORCH.bn_relu(x, bn.scale, bn.shift, expected_out)
    assert_all_same_numbers([out], [expected_out], dtype, ["out"])

    grad_z = random_buffer((m,), c, dtype, g)
    expected_grad_x = torch.empty(m, c, dtype=dtype)
    expected = TORCH.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z.clone(), expected_grad_x,
                                      bn.batch_mean())
    grads = CPP.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_z, bn.batch_mean())
    assert_all_same_numbers([grad_z, *grads], [expected_grad_x, *expected], dtype,
                            ["grad_x", "grad_gamma", "grad_beta"])


@pytest.mark.parametrize("spatial", [(7, 9), (5, 6, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_transition_nan_and_inf_as_torch(dtype, spatial, batch_stats):
    """Odd sizes: the last pixel, a NaN, is dropped by pooling and still makes
    grad_gamma NaN (0 * NaN in the BN backward's sums), as in torch."""
    n, c, k = 2, 17, 20
    pooled = tuple(size // 2 for size in spatial)
    g = torch.Generator().manual_seed(12)
    x = channel_range((n, *spatial), c, dtype, g)
    bn = poisoned_bn(x, batch_stats, g)
    weight = (0.3 * torch.randn(k, c, generator=g, dtype=torch.float64)).to(dtype)
    out, expected_out = (torch.empty(n, *pooled, k, dtype=dtype) for _ in range(2))
    CPP.transition(x, bn.scale, bn.shift, weight, out)
    TORCH.transition(x, bn.scale, bn.shift, weight, expected_out)
    assert_all_same_numbers([out], [expected_out], dtype, ["out"])

    grad_out = torch.randn(n, *pooled, k, generator=g, dtype=torch.float64).to(dtype)
    grad_x, expected_grad_x = (torch.empty(n, *spatial, c, dtype=dtype) for _ in range(2))
    grads = CPP.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                    bn.batch_mean())
    expected = TORCH.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, expected_grad_x,
                                         bn.batch_mean())
    assert_all_same_numbers([grad_x, *grads], [expected_grad_x, *expected], dtype,
                            ["grad_x", "grad_weight", "grad_gamma", "grad_beta"])


def test_bn_backward_finish_nan_and_inf_as_torch(dtype):
    """Pass 2 alone, finite coefficients and batch means: non-finite x gives
    non-finite grad_x at its own pixels only, as the plain formula in torch."""
    m, c = 1031, 17
    g = torch.Generator().manual_seed(13)
    x = channel_range((m,), c, dtype, g)
    bn = poisoned_bn(x, False, g)
    batch_means = torch.randn(2, c, generator=g, dtype=torch.float64).to(bn.scale.dtype)
    grad_x = random_buffer((m,), c, dtype, g)
    centered = x.to(bn.mean.dtype) - bn.mean
    expected = (grad_x.to(bn.scale.dtype) + centered * (-bn.scale * bn.rstd * batch_means[1])
                - bn.scale * batch_means[0]).to(dtype)
    torch.ops.densenet_fast.bn_backward_finish(x, bn.scale, bn.mean, bn.rstd, batch_means, grad_x)
    assert_same_numbers(grad_x, expected, TOLERANCE[dtype][0], "grad_x")


# -- op contracts --------------------------------------------------------------------------

def op_arguments(dtype=torch.float32, spatial: tuple[int, ...] = (5, 3)) -> dict[str, tuple]:
    """Small valid arguments of every fused op (channel-range views, odd sizes;
    ``spatial``: of the transition's input), the same on every call."""
    g = torch.Generator().manual_seed(5)
    m, c, k = 37, 5, 3
    pooled = tuple(size // 2 for size in spatial)
    x = channel_range((m,), c, dtype, g)
    x4 = channel_range((2, *spatial), c, dtype, g)
    bn = make_bn(x, True, g)
    coefficients = (bn.scale, bn.shift, bn.mean, bn.rstd)
    weight = random_buffer((k,), c, dtype, g)
    rows = lambda channels: random_buffer((m,), channels, dtype, g)  # noqa: E731
    return {
        "bn_relu_conv1x1": (x, bn.scale, bn.shift, weight, rows(k + 2)[:, 1:1 + k], True),
        "bn_relu_conv1x1_backward_sums": (x, *coefficients, weight, rows(k), rows(c)),
        "bn_relu": (x, bn.scale, bn.shift, rows(c)),
        "bn_relu_backward_sums": (x, *coefficients, rows(c), rows(c)),
        "transition": (x4, bn.scale, bn.shift, weight, random_buffer((2, *pooled), k, dtype, g)),
        "transition_backward_sums": (x4, *coefficients, weight, random_buffer((2, *pooled), k, dtype, g),
                                     random_buffer((2, *spatial), c, dtype, g)),
        "bn_backward_finish": (x, bn.scale, bn.mean, bn.rstd, random_buffer((2,), c, bn.scale.dtype, g), rows(c)),
    }


@pytest.mark.parametrize("op", list(op_arguments()))
def test_op_passes_opcheck(op):
    """Schema (mutated arguments), Meta/fake kernel and dispatch agree, as torch.compile needs."""
    torch.library.opcheck(getattr(torch.ops.densenet_fast, op), op_arguments()[op])


@pytest.mark.parametrize("op", ["transition", "transition_backward_sums"])
@pytest.mark.parametrize("spatial", [(7,), (3, 5, 2)], ids=["1d", "3d"])
def test_transition_passes_opcheck_in_1d_and_3d(op, spatial):
    torch.library.opcheck(getattr(torch.ops.densenet_fast, op), op_arguments(spatial=spatial)[op])


def test_results_do_not_depend_on_the_thread_count():
    """Fixed chunks, partial sums added in chunk order: bitwise equal on 1 and 2 threads."""
    def run() -> list[Tensor]:
        results = []
        for name, args in op_arguments().items():
            args = [a.clone() if isinstance(a, Tensor) else a for a in args]
            out = getattr(torch.ops.densenet_fast, name)(*args)
            outputs = out if isinstance(out, tuple) else () if out is None else (out,)
            results += [a for a in args if isinstance(a, Tensor)] + list(outputs)
        return results

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = run()
        torch.set_num_threads(2)
        second = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("op, position, bad, message", [
    ("bn_relu_conv1x1", 0, torch.zeros(5, 37).t(), "channel stride 1"),
    ("bn_relu_conv1x1", 3, torch.zeros(3, 4), r"weight must be \(K, 5\)"),
    ("bn_relu_conv1x1", 4, torch.zeros(36, 3), r"out must have shape \[37, 3\]"),
    ("bn_relu_conv1x1", 1, torch.zeros(5, dtype=torch.float64), "BN coefficients must be"),
    ("bn_relu", 0, torch.zeros(37, 5, dtype=torch.int32), "unsupported dtype"),
    ("bn_relu_backward_sums", 6, torch.zeros(37, 5, dtype=torch.float64), "grad_x must be Float"),
    ("transition", 4, torch.zeros(2, 3, 1, 3), r"out must have shape \[2, 2, 1, 3\]"),
    ("transition_backward_sums", 6, torch.zeros(2, 3, 1, 3)[:, :2], "rows of one stride"),
    ("transition", 0, torch.zeros(2, 5, 3, 2, 1, 5), "1 to 3 spatial dimensions"),
    ("transition_backward_sums", 7, torch.zeros(2, 5, 3, 1, 5), "as many spatial dimensions as x"),
    ("bn_backward_finish", 4, torch.zeros(3, 5), r"batch_means must have shape \[2, 5\]"),
])
def test_ops_reject_bad_arguments(op, position, bad, message):
    args = list(op_arguments()[op])
    args[position] = bad
    meta = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta") if isinstance(a, Tensor) else a
            for a in args]  # same strides (Tensor.to would make the views contiguous)
    for arguments in (args, meta):
        with pytest.raises(RuntimeError, match=message):
            getattr(torch.ops.densenet_fast, op)(*arguments)


def test_other_dtypes_use_the_torch_implementation():
    g = torch.Generator().manual_seed(6)
    x = channel_range((50,), 6, torch.float16, g)
    bn = make_bn(x, True, g)
    out, expected = torch.empty(50, 6, dtype=torch.float16), torch.empty(50, 6, dtype=torch.float16)
    CPP.bn_relu(x, bn.scale, bn.shift, out)
    TORCH.bn_relu(x, bn.scale, bn.shift, expected)
    assert torch.equal(out, expected)


# -- the whole model -----------------------------------------------------------------------

CONFIG = dict(growth_rate=6, block_config=(3, 2, 3), num_init_features=12, num_classes=5, stem="cifar")
SHAPE = (3, 13, 11)  # (N, H, W): odd sizes for the transitions' floor pooling


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_model_on_cpp_equals_torchvision_float64(recompute):
    """Three SGD steps in training mode, then eval: every output, gradient,
    running statistic and updated parameter equal to 1e-8."""
    ours, tv = make_pair(recompute=recompute, backend="cpp", **CONFIG)
    check_training_float64(ours, tv, SHAPE, steps=3)
    check_eval_float64(ours, tv, SHAPE)


@pytest.mark.usefixtures("one_thread")
def test_model_on_cpp_equals_torchvision_fp32():
    ours, _ = make_pair(dtype=torch.float32, backend="cpp", **CONFIG)
    check_training_fp32(ours, SHAPE, steps=3)


def test_torch_compile_matches_eager():
    """torch.compile(fullgraph=True) of a tiny DenseNet-BC on backend='cpp'
    (training mode: no graph break; outputs, input and parameter gradients,
    running statistics equal to eager)."""
    torch.manual_seed(0)
    model = densenet_bc(depth=10, growth_rate=4, num_classes=3, backend="cpp")
    twin = densenet_bc(depth=10, growth_rate=4, num_classes=3, backend="cpp")
    x, target = random_batch(model, 2, 9, 8, seed=0)
    explanation = torch._dynamo.explain(twin)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
    twin.load_state_dict(model.state_dict())  # explain ran a training forward
    eager = forward_backward(model, x, target)
    start = time.perf_counter()
    compiled = forward_backward(torch.compile(twin, fullgraph=True), x, target)
    print(f"torch.compile forward+backward: {time.perf_counter() - start:.1f} s")
    compiled.grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled.grads.items()}
    compiled.buffers = {name.removeprefix("_orig_mod."): b for name, b in compiled.buffers.items()}
    for what in ("output", "input_grad"):
        assert max_relative_error(getattr(compiled, what), getattr(eager, what)) <= FP32_RTOL, what
    for name in eager.grads:
        assert max_relative_error(compiled.grads[name], eager.grads[name]) <= 1e-4, name
    for name in eager.buffers:
        assert max_relative_error(compiled.buffers[name], eager.buffers[name]) <= FP32_RTOL, name


# -- CUDA kernels --------------------------------------------------------------------------

def skip_without_cuda_kernels() -> None:
    if not torch.cuda.is_available() or not _extension.has_cuda():
        pytest.skip("needs a CUDA device and the extension's CUDA kernels")


def cpu_and_cuda_range(m: int, c: int, left: int, dtype, generator) -> tuple[Tensor, Tensor]:
    """The same random ``(m, c)`` channel range, at channel ``left`` of rows whose
    width is a multiple of 8 channels, on the CPU and on CUDA.  At ``left = 8``
    every row is aligned for the CUDA kernels' vector accesses; at 3 it is not."""
    width = left + c + 5
    buffer = random_buffer((m,), width + -width % 8, dtype, generator)
    return buffer[:, left:left + c], buffer.cuda()[:, left:left + c]


@pytest.mark.gpu
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("m, c", [(1031, 17), (70_001, 45), (3, 2)])
@pytest.mark.parametrize("left", [3, 8], ids=["unaligned", "aligned"])
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nan_inf"])
def test_cuda_bn_relu_and_backward_match_cpu(dtype, m, c, batch_stats, left, nonfinite):
    """The CUDA backend's BN-ReLU ops against the cpp backend's (tested above
    against float64 and the torch backend), grad_x in place of grad_z, NaN and
    Inf in the same places."""
    skip_without_cuda_kernels()
    from densenet_fast.backends.cpp_backend import CudaBackend

    cuda = CudaBackend()
    g = torch.Generator().manual_seed(7)
    x, x_gpu = cpu_and_cuda_range(m, c, left, dtype, g)
    bn = poisoned_bn(x, batch_stats, g) if nonfinite else make_bn(x, batch_stats, g)
    x_gpu.copy_(x)
    coefficients = [t.cuda() for t in (bn.scale, bn.shift, bn.mean, bn.rstd)]
    tol = TOLERANCE[dtype][0]
    out, out_gpu = cpu_and_cuda_range(m, c, left, dtype, g)
    CPP.bn_relu(x, bn.scale, bn.shift, out)
    cuda.bn_relu(x_gpu, coefficients[0], coefficients[1], out_gpu)
    assert_same_numbers(out_gpu, out, tol, "bn_relu")

    grad_z, grad_gpu = cpu_and_cuda_range(m, c, left, dtype, g)
    expected = CPP.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_z, bn.batch_mean())
    grads = cuda.bn_relu_backward(x_gpu, *coefficients, grad_gpu, grad_gpu, bn.batch_mean())
    for name, actual, reference in zip(("grad_x", "grad_gamma", "grad_beta"), (grad_gpu, *grads),
                                       (grad_z, *expected)):
        assert_same_numbers(actual, reference, tol, f"{name} vs cpp backend")


@pytest.mark.gpu
@pytest.mark.parametrize("left", [3, 8], ids=["unaligned", "aligned"])
def test_cuda_bn_relu_backward_is_deterministic(dtype, left):
    """Per-block partial sums added in a fixed order, no atomics: bitwise the same
    on every call, and allowed under torch.use_deterministic_algorithms."""
    skip_without_cuda_kernels()
    from densenet_fast.backends.cpp_backend import CudaBackend

    g = torch.Generator().manual_seed(8)
    x, x_gpu = cpu_and_cuda_range(300_001, 45, left, dtype, g)
    bn = make_bn(x, True, g)
    coefficients = [t.cuda() for t in (bn.scale, bn.shift, bn.mean, bn.rstd)]
    grad_z, grad_x = (cpu_and_cuda_range(300_001, 45, left, dtype, g)[1] for _ in range(2))

    def backward() -> list[Tensor]:  # overwrites grad_x
        grads = CudaBackend().bn_relu_backward(x_gpu, *coefficients, grad_z, grad_x, bn.batch_mean())
        return [grad_x.clone(), *grads]

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = backward()
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(backward(), first))
    finally:
        torch.use_deterministic_algorithms(deterministic)
