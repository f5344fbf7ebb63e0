"""The Triton backend's kernels against the torch backend and against float64
autograd references, at awkward shapes (rows not a multiple of the tile,
channel counts not multiples of 16, strided channel-range views).

Without a GPU they run under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton); on a GPU the ``gpu``
runs add bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_fast.backends.torch_backend import TorchBackend
from densenet_fast.backends.triton_backend import TritonBackend
from densenet_fast.ops.common import dot_precision

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


# -- channel statistics -----------------------------------------------------------------

@pytest.mark.parametrize("m, c", [(203, 40), (50, 17), (2600, 17)])
def test_channel_stats_are_stable(device, dtype, m, c):
    """A large common offset (|mean| >> std) is where E[x^2] - E[x]^2 fails;
    a trend along the rows makes the merged partial means differ."""
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
    assert grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32


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


def test_float64_is_refused_clearly(device):
    x = torch.randn(20, 16, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch'"):
        TRITON.channel_stats(x)
    with pytest.raises(TypeError, match="backend='torch'"):
        TRITON.bn_relu_conv1x1(x, x[0], x[0], x, torch.empty_like(x), with_stats=False)


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
