"""Test data for the primitives of densenet_fast/backends/interface.py, shared by
the conformance suite (test_backends.py) and the backend-specific files.

Inputs are channel ranges of wider channels-last buffers (row stride > C); BN
coefficients come from float64 parameters that stay autograd leaves, so the
float64 reference is plain torch (F.batch_norm, ReLU, pooling, autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_fast.backends.interface import stats_dtype

EPS = 1e-5
SENTINEL = 7.0
NAN, INF = float("nan"), float("inf")


def random_rows(shape: tuple[int, ...], dtype, device, generator) -> Tensor:
    """``randn(*shape)`` drawn in float64 from ``generator``, then cast and moved."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def random_buffer(shape: tuple[int, ...], channels: int, dtype, generator, device="cpu") -> Tensor:
    """Random data (mean 1, std 2) of shape ``(*shape, channels)``, drawn in float64."""
    buffer = torch.randn(*shape, channels, generator=generator, dtype=torch.float64) * 2 + 1
    return buffer.to(device=device, dtype=dtype)


def channel_range(shape: tuple[int, ...], c: int, dtype, generator, device="cpu", left: int = 3,
                  right: int = 5) -> Tensor:
    """Random data (mean 1, std 2) as channels ``[left, left + c)`` of a wider channels-last buffer."""
    return random_buffer(shape, left + c + right, dtype, generator, device)[..., left:left + c]


def random_weight(k: int, c: int, dtype, generator, device="cpu") -> Tensor:
    return (0.3 * torch.randn(k, c, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def output_range(shape: tuple[int, ...], c: int, dtype, device="cpu", left: int = 4, right: int = 9
                 ) -> tuple[Tensor, Tensor]:
    """``(buffer, view)``: NaN channels ``[left, left + c)`` between SENTINEL
    channels, of every row (image) of ``shape`` but the buffer's last, which is
    SENTINEL alone: a write past the last pixel (a cell or tile past the image)
    lands there instead of outside the allocation."""
    buffer = torch.full((shape[0] + 1, *shape[1:], left + c + right), SENTINEL, dtype=dtype, device=device)
    buffer[:-1, ..., left:left + c] = NAN
    return buffer, buffer[:-1, ..., left:left + c]


def assert_only_range_written(buffer: Tensor, channels: slice) -> None:
    """Nothing written outside ``channels`` of :func:`output_range`'s view, nor past its last row."""
    outside = torch.ones(buffer.shape[-1], dtype=torch.bool, device=buffer.device)
    outside[channels] = False
    assert (buffer[..., outside] == SENTINEL).all(), "wrote outside its channel range"
    assert (buffer[-1] == SENTINEL).all(), "wrote past its last row"


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
    """Random gamma, beta and running statistics near those of ``x``; with
    ``batch_stats`` the coefficients normalise by ``x``'s own statistics."""
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


def poison(x: Tensor) -> None:
    """NaN, +Inf and -Inf at a few pixels of channels 0-2 of ``x`` (in place):
    the first pixel, whose value is the channel statistics' shift, and the last,
    which pooling drops at odd sizes; the other channels stay finite."""
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


def float64_leaf(t: Tensor) -> Tensor:
    return t.detach().double().cpu().requires_grad_()


def float64_grads(output: Tensor, grad_out: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(output, inputs, grad_out.double().cpu())


def avg_pool64(z: Tensor) -> Tensor:
    """Average pooling by 2 of ``z (N, *spatial, C)`` with torch's pooling of its dimension."""
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[z.dim() - 3]
    return pool(z.movedim(-1, 1), 2).movedim(1, -1)


def assert_same_numbers(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """NaN and +-Inf at the same positions; finite values within ``tol`` relative
    to the largest finite ``|expected|``."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale, equal_nan=True,
                               msg=lambda message: f"{what}: {message}")
