"""What only the Triton backend has (the primitives' contract on every backend is
tests/test_backends.py, the model on every backend tests/test_engine.py): its
ops (``torch.ops.densenet_fast_triton``) through opcheck, each primitive through
its ops, the backward's two ops with the ``batch_mean`` hook between them, every
configuration a GPU may launch against the torch backend at awkward shapes,
BatchNorm folding, statistics merged over many tiles and channel blocks,
choosing and pruning configurations, launches per layer, deterministic mode,
refusals and devices; and what the interpreter cannot show by values: the
precision each ``tl.dot`` is given, sums over more splits than it runs, and
which programs pass an arrival counter.

Without a GPU they run under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton), which runs programs one
after another and only the configuration it is given; on a GPU the ``gpu`` runs
add bf16.  Every test runs with deterministic algorithms on, so that fresh
``torch.empty`` memory is NaN and a kernel that reads memory nobody wrote fails.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from densenet_fast import DenseNet

from densenet_fast.backends.interface import Backend, RunningUpdate
from densenet_fast.backends.torch_backend import TorchBackend
from densenet_fast.backends.triton_backend import TritonBackend
from densenet_fast.backends.triton_kernels import bn_relu, bn_relu_conv, channel_stats, common
from densenet_fast.backends.triton_kernels.common import GpuLimits, arrive_last, dot_precision
from primitives import EPS, avg_pool64, channel_range, make_bn, random_weight

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


pytestmark = pytest.mark.usefixtures("nan_filled_fresh_memory", "no_tf32")  # fixtures of conftest.py



def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = max_relative_error(actual, expected)
    assert error <= tol, f"{what}: max relative error {error:.3g} > {tol:g}"


def test_bfloat16_is_refused_under_the_interpreter():
    """The interpreter's bfloat16 results are wrong (relative errors near 1), so
    CPU tensors of that dtype raise instead of computing silently."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="Triton interpreter .* wrong bfloat16 results"):
        TRITON.channel_stats(x)


# -- BatchNorm folding ------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fold_batchnorm_matches_torch(device, momentum, affine, running_dtype):
    """Coefficients and the running statistics' update (momentum or
    cumulative average; 600 channels: three programs of 256), against the
    torch backend, twice in a row (num_batches_tracked counts), and folded
    into a block of a wider tensor."""
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
        # into a block of a wider store (the engine's coefficient store), which it returns
        store = torch.full((4 * c + 8,), float("nan"), device=device)
        into = backend.fold_batchnorm(mean, var, weight, bias, 1e-3, None, out=store[4:4 + 4 * c].view(4, c))
        assert into.data_ptr() == store[4:].data_ptr() and store[:4].isnan().all() and store[-4:].isnan().all()
        return [*coeffs, *buffers, backend.fold_batchnorm(mean, var, weight, bias, 1e-3, None), into]

    for i, (ours, theirs) in enumerate(zip(fold(TRITON), fold(TORCH))):
        assert ours.dtype == theirs.dtype, i
        # fp16 buffers: torch rounds after its multiply and after its add, the kernel once
        assert_close(ours, theirs, 2e-6 if ours.dtype == torch.float32 else 4e-3, f"output {i}")


# -- fused BN-ReLU-Conv1x1 --------------------------------------------------------------

def test_forward_statistics_over_many_tiles(device):
    """The forward's output statistics, merged by the kernel itself in two
    levels: 8300 rows are 65 row tiles of 128 (two groups of 64), and an
    offset with a trend along the rows makes the tiles' means differ."""
    g = torch.Generator().manual_seed(9)
    m, c, k = 8300, 17, 20
    x = channel_range((m,), c, torch.float32, g, device, left=1, right=2).add_(torch.linspace(0, 20, m, device=device)[:, None])
    bn = make_bn(x, True, g)
    weight = (torch.randn(k, c, generator=g) * 0.1).to(device)
    out = torch.empty(m, k, device=device)
    mean, var = TRITON.bn_relu_conv1x1(x, bn.scale, bn.shift + 300, weight, out, with_stats=True)
    var64, mean64 = torch.var_mean(out.double().cpu(), dim=0, correction=0)
    assert_close(mean, mean64, 1e-6, "mean")
    assert_close(var, var64, 1e-4, "var")


def test_statistics_of_two_channel_blocks_over_two_tile_groups(device):
    """Each channel block has arrival counters of its own (one per group of 64
    tiles, one for the groups): ``channel_stats`` at C = 70 (two blocks of 64)
    over 66 tiles of 128 rows, and the forward's output statistics at K = 136
    (two blocks of 128) over 66 tiles of 64 rows, the two blocks' programs
    interleaved; against float64."""
    g = torch.Generator().manual_seed(13)
    m = 64 * 128 + 200
    trend = torch.linspace(0, 20, m, device=device)[:, None]
    x = channel_range((m,), 70, torch.float32, g, device, left=1, right=2).add_(trend)
    mean, var = TRITON.channel_stats(x)
    var64, mean64 = torch.var_mean(x.double().cpu(), dim=0, correction=0)
    assert_close(mean, mean64, 1e-6, "channel_stats mean")
    assert_close(var, var64, 1e-5, "channel_stats var")
    m = 64 * 64 + 100
    x = channel_range((m,), 5, torch.float32, g, device, left=1, right=2).add_(trend[:m])
    bn = make_bn(x, True, g)
    weight = (torch.randn(136, 5, generator=g) * 0.1).to(device)
    out = torch.empty(m, 136, device=device)
    mean, var = TRITON.bn_relu_conv1x1(x, bn.scale, bn.shift + 3, weight, out, with_stats=True)
    var64, mean64 = torch.var_mean(out.double().cpu(), dim=0, correction=0)
    assert_close(mean, mean64, 1e-6, "forward mean")
    assert_close(var, var64, 1e-4, "forward var")


def test_forward_accumulates_fp16_products_in_fp32(device):
    """fp16 outputs that fit fp16 (below 200) from running sums over the input
    channels that do not: z is about 256 in each of 640 channels, the weight
    about +1 on the first half and -1 on the second, so the sum passes 80000
    (fp16's largest is 65504) before it comes back; against float64 of the
    same fp16 values (x + 255 is exact in fp16: multiples of 1/4 near 1)."""
    g = torch.Generator().manual_seed(19)
    m, c, k = 37, 640, 8
    x = (1 + torch.randint(-12, 13, (m, c), generator=g) / 4).to(device, torch.float16)
    scale, shift = torch.ones(c, device=device), torch.full((c,), 255.0, device=device)
    sign = torch.where(torch.arange(c) < c // 2, 1.0, -1.0)
    weight = (sign * (1 + 0.01 * torch.rand(k, c, generator=g, dtype=torch.float64))).to(device, torch.float16)
    out = torch.empty(m, k, device=device, dtype=torch.float16)
    TRITON.bn_relu_conv1x1(x, scale, shift, weight, out, with_stats=False)
    expected = (x.double().cpu() + 255).relu() @ weight.double().cpu().t()
    assert expected.abs().max() < 200
    assert_close(out, expected, TOLERANCE[torch.float16][1], "out")


# -- the torch ops ----------------------------------------------------------------------

OPS = torch.ops.densenet_fast_triton
# the ops each primitive of the backend calls, in order (the BN backward: pass 1, batch_mean, pass 2;
# folding: into a new tensor, then into the engine's store, primitive_calls calls it both ways)
PRIMITIVE_OPS = {
    "fold_batchnorm": ["fold_batchnorm", "fold_batchnorm_into"],
    "channel_stats": ["channel_stats"],
    "bn_relu_conv1x1": ["bn_relu_conv1x1"],
    "bn_relu_conv1x1_backward": ["bn_relu_conv1x1_backward_sums", "bn_relu_conv1x1_backward_finish"],
    "bn_relu": ["bn_relu"],
    "bn_relu_backward": ["bn_relu_backward_sums", "bn_relu_backward_finish"],
    "transition": ["transition"],
    "transition_backward": ["transition_backward_sums", "transition_backward_finish"],
}
# opcheck cases: "<op>" or "<op>-<variant>"
OP_CASES = ["fold_batchnorm-momentum", "fold_batchnorm-cumulative", "fold_batchnorm-no_update",
            "fold_batchnorm_into-momentum", "fold_batchnorm_into-no_update", "channel_stats",
            "bn_relu_conv1x1-stats", "bn_relu_conv1x1-no_stats", "bn_relu_conv1x1_backward_sums",
            "bn_relu_conv1x1_backward_finish-batch", "bn_relu_conv1x1_backward_finish-running", "bn_relu",
            "bn_relu_backward_sums", "bn_relu_backward_finish-batch", "bn_relu_backward_finish-running",
            "transition", "transition_backward_sums", "transition_backward_finish-batch",
            "transition_backward_finish-running"]
SMALL = dict(m=37, c=5, k=3, image=(2, 5, 7), pooled=(2, 2, 3))  # odd sizes: the transition drops a row and column


def small_arguments(device: str, seed: int, batch_stats: bool):
    """``(x (M, C), x4 (N, H, W, C), bn, weight (K, C), data)`` of ``SMALL``'s
    sizes, fp32 channel ranges of wider buffers; ``data(shape, channels)``
    makes more of them."""
    g = torch.Generator().manual_seed(seed)
    m, c, k, image, _ = SMALL.values()
    data = lambda shape, channels: channel_range(shape, channels, torch.float32, g, device)  # noqa: E731
    x, x4 = data((m,), c), data(image, c)
    return x, x4, make_bn(x, batch_stats, g), random_weight(k, c, torch.float32, g, device), data


def op_arguments(device: str) -> dict[str, tuple]:
    """Small valid fp32 arguments of every op (channel ranges of wider
    buffers, odd sizes) by case of ``OP_CASES``; pass 2 of a backward gets pass
    1's outputs and the batch means (``sums / count``), or None (running
    statistics).  The same on every call."""
    m, c, k, image, pooled = SMALL.values()
    x, x4, bn, weight, data = small_arguments(device, seed=5, batch_stats=True)
    coefficients = (bn.scale, bn.shift, bn.mean, bn.rstd)
    grad_out, grad_pooled, grad_z = data((m,), k), data(pooled, k), data((m,), c)
    dense = (x, *coefficients, weight, grad_out)
    pooling = (x4, *coefficients, weight, grad_pooled)
    bn_relu_args = (x, *coefficients, grad_z)
    dense_partials, dense_sums = OPS.bn_relu_conv1x1_backward_sums(*dense)
    pooled_partials, pooled_sums = OPS.transition_backward_sums(*pooling)
    bn_relu_sums = OPS.bn_relu_backward_sums(*bn_relu_args)
    fold = (bn.mean, (bn.rstd ** -2).contiguous(), bn.scale, bn.shift, 1e-5)
    running = lambda: (data((), c), data((), c).abs(), torch.tensor(3, device=device))  # noqa: E731
    return {
        "fold_batchnorm-momentum": (*fold, *running(), 0.1, m),
        "fold_batchnorm-cumulative": (*fold, *running(), None, m),
        "fold_batchnorm-no_update": (*fold[:2], None, None, 1e-5, None, None, None, None, 0),
        "fold_batchnorm_into-momentum": (torch.empty(4, c, device=device), *fold, *running(), 0.1, m),
        "fold_batchnorm_into-no_update": (torch.empty(4, c, device=device), *fold[:2], None, None, 1e-5, None, None,
                                          None, None, 0),
        "channel_stats": (x,),
        "bn_relu_conv1x1-stats": (x, bn.scale, bn.shift, weight, data((m,), k), True),
        "bn_relu_conv1x1-no_stats": (x, bn.scale, bn.shift, weight, data((m,), k), False),
        "bn_relu_conv1x1_backward_sums": dense,
        "bn_relu_conv1x1_backward_finish-batch": (*dense, dense_partials, dense_sums / m, data((m,), c)),
        "bn_relu_conv1x1_backward_finish-running": (*dense, dense_partials, None, data((m,), c)),
        "bn_relu": (x, bn.scale, bn.shift, data((m,), c)),
        "bn_relu_backward_sums": bn_relu_args,
        "bn_relu_backward_finish-batch": (*bn_relu_args, bn_relu_sums / m, data((m,), c)),
        "bn_relu_backward_finish-running": (*bn_relu_args, None, data((m,), c)),
        "transition": (x4, bn.scale, bn.shift, weight, data(pooled, k)),
        "transition_backward_sums": pooling,
        "transition_backward_finish-batch": (*pooling, pooled_partials, pooled_sums / x4[..., 0].numel(),
                                             data(image, c)),
        "transition_backward_finish-running": (*pooling, pooled_partials, None, data(image, c)),
    }


@pytest.mark.parametrize("case", OP_CASES)
def test_op_passes_opcheck(device, case):
    """Schema (what each op writes), fake implementation and dispatch agree, as
    torch.compile needs (``torch.library.opcheck``, dynamic shapes included)."""
    torch.library.opcheck(getattr(OPS, case.split("-")[0]), op_arguments(device)[case])


def primitive_calls(device: str, batch_stats: bool) -> dict[str, Callable[[], object]]:
    """Every primitive of the triton backend on small fp32 arguments, as a call
    (batch statistics: a running-statistics update, the forward's statistics, and
    ``batch_mean``; else none of them)."""
    m, c, k, image, pooled = SMALL.values()
    x, x4, bn, weight, data = small_arguments(device, seed=6, batch_stats=batch_stats)
    coefficients = (bn.scale, bn.shift, bn.mean, bn.rstd)
    update = RunningUpdate(data((), c), data((), c).abs(), torch.tensor(3, device=device), 0.1, m) if batch_stats \
        else None
    return {
        "fold_batchnorm": lambda: [TRITON.fold_batchnorm(bn.mean, bn.rstd ** -2, None, None, 1e-5, update, out)
                                   for out in (None, torch.empty(4, c, device=device))],
        "channel_stats": lambda: TRITON.channel_stats(x),
        "bn_relu_conv1x1": lambda: TRITON.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, data((m,), k), batch_stats),
        "bn_relu_conv1x1_backward": lambda: TRITON.bn_relu_conv1x1_backward(
            x, *coefficients, weight, data((m,), k), data((m,), c), bn.batch_mean()),
        "bn_relu": lambda: TRITON.bn_relu(x, bn.scale, bn.shift, data((m,), c)),
        "bn_relu_backward": lambda: TRITON.bn_relu_backward(x, *coefficients, data((m,), c), data((m,), c),
                                                            bn.batch_mean()),
        "transition": lambda: TRITON.transition(x4, bn.scale, bn.shift, weight, data(pooled, k)),
        "transition_backward": lambda: TRITON.transition_backward(x4, *coefficients, weight, data(pooled, k),
                                                                  data(image, c), bn.batch_mean()),
    }


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts on the CPU, in Triton's interpreter")
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_every_primitive_runs_through_its_ops(batch_stats):
    """What opcheck and torch.compile check is what runs: each primitive of the
    backend calls its op, a backward one its two ops, each op launches one
    kernel, and no Triton kernel is launched outside the ops."""
    primitives = {name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")}
    assert set(PRIMITIVE_OPS) == primitives
    assert {op for ops in PRIMITIVE_OPS.values() for op in ops} == {case.split("-")[0] for case in OP_CASES}
    for name, call in primitive_calls("cpu", batch_stats).items():
        with LaunchCounter().active() as counter:
            call()
        assert counter.ops == PRIMITIVE_OPS[name], name
        assert sum(counter.triton.values()) == len(counter.ops) and not counter.outside_ops, (name, counter.triton)


BN_BACKWARDS = ["bn_relu_conv1x1_backward", "bn_relu_backward", "transition_backward"]


def check_bn_backward(device: str, primitive: str, x: Tensor, coefficients: list[Tensor], weight: Tensor,
                      g: torch.Generator, means: Optional[Tensor] = None) -> None:
    """The BN backward ``primitive``'s two ops with ``batch_mean`` between them, at
    fp32 ``x`` with BN ``coefficients`` ``[scale, shift, mean, rstd]``, against
    float64 autograd: the hook gets pass 1's sums ``[sum dA, sum dA * xhat]``,
    and pass 2 forms ``dx = scale * (dA - means[0] - xhat * means[1])`` from
    what it returns (``means`` (2, C), or the batch's: the sums over the rows);
    dgamma, dbeta and (where there is one) dW besides. The dense layer adds
    into a random grad_x."""
    scale, shift, mean, rstd = (t.double().cpu() for t in coefficients)
    x64, w64 = x.double().cpu(), weight.double().cpu().requires_grad_()
    a = x64 * scale + shift
    z = a.relu().requires_grad_()
    out = {"bn_relu_backward": lambda: z, "bn_relu_conv1x1_backward": lambda: z @ w64.t(),
           "transition_backward": lambda: avg_pool64(z) @ w64.t()}[primitive]()
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_z, grad_w = torch.autograd.grad(out, (z, w64), grad_out, allow_unused=True)
    grad_a = grad_z * (a > 0)  # (torch's ReLU passes nothing where a is 0)
    xhat = (x64 - mean) * rstd
    rows = tuple(range(x.dim() - 1))
    sums = torch.stack([grad_a.sum(rows), (grad_a * xhat).sum(rows)])
    if means is None:
        means = sums / x[..., 0].numel()
    before = torch.randn(x.shape, generator=g, dtype=torch.float64) if primitive == "bn_relu_conv1x1_backward" \
        else torch.zeros(x.shape, dtype=torch.float64)  # the dense layer adds into grad_x
    expected_dx = before + scale * (grad_a - means[0] - xhat * means[1])

    hook_got = []
    hook = lambda local: hook_got.append(local.clone()) or means.to(device, torch.float32)  # noqa: E731
    grad_x = before.to(device, torch.float32) if primitive == "bn_relu_conv1x1_backward" else torch.empty_like(x)
    grad_out = grad_out.to(device, torch.float32)
    if primitive == "bn_relu_backward":
        grads = TRITON.bn_relu_backward(x, *coefficients, grad_out, grad_x, hook)
    else:
        grads = getattr(TRITON, primitive)(x, *coefficients, weight, grad_out, grad_x, hook)
        assert_close(grads[0], grad_w, TOLERANCE[torch.float32][1], "grad_weight")
    assert len(hook_got) == 1
    assert_close(hook_got[0], sums, TOLERANCE[torch.float32][1], "the sums batch_mean gets")
    assert_close(grads[-2], sums[1], TOLERANCE[torch.float32][1], "grad_gamma")
    assert_close(grads[-1], sums[0], TOLERANCE[torch.float32][1], "grad_beta")
    assert_close(grad_x, expected_dx, TOLERANCE[torch.float32][1], "grad_x")


def batch_coefficients(x: Tensor, g: torch.Generator) -> list[Tensor]:
    """``[scale, shift, mean, rstd]`` of a BatchNorm with ``x``'s batch statistics."""
    bn = make_bn(x, True, g)
    return [bn.scale, bn.shift, bn.mean, bn.rstd]


@pytest.mark.parametrize("primitive", BN_BACKWARDS)
def test_pass_2_uses_the_batch_means_of_the_hook(device, primitive):
    """Pass 2 uses whatever means the hook returns (arbitrary ones here, as an
    all-reduce over processes could give)."""
    g = torch.Generator().manual_seed(11)
    x = channel_range((2, 5, 7) if primitive == "transition_backward" else (41,), 6, torch.float32, g, device)
    coefficients = batch_coefficients(x, g)
    check_bn_backward(device, primitive, x, coefficients, random_weight(5, 6, torch.float32, g, device), g,
                      means=torch.randn(2, 6, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("primitive", BN_BACKWARDS)
def test_no_gradient_through_relu_where_the_bn_output_is_exactly_zero(device, primitive):
    """torch's ReLU passes no gradient where its input is exactly 0 (as
    ``threshold_backward``): scale 0.5 and x = -2 * shift make
    a = x * scale + shift exactly 0 (with FMA or without) in half the pixels."""
    g = torch.Generator().manual_seed(12)
    c = 6
    shape = (2, 5, 7) if primitive == "transition_backward" else (41,)
    x = channel_range(shape, c, torch.float32, g, device)
    scale, shift = torch.full((c,), 0.5, device=device), torch.randn(c, generator=g).to(device)
    x[(torch.rand(shape, generator=g) < 0.5).to(device)] = -2 * shift
    assert ((x * scale + shift) == 0).sum() >= x[..., 0].numel() // 3 * c
    var, mean = torch.var_mean(x.reshape(-1, c).double(), dim=0, correction=0)
    coefficients = [scale, shift, mean.float(), (var + EPS).rsqrt().float()]
    check_bn_backward(device, primitive, x, coefficients, random_weight(5, c, torch.float32, g, device), g)


@pytest.mark.parametrize("primitive", BN_BACKWARDS)
def test_backward_with_more_splits_than_a_block_sums(monkeypatch, device, primitive):
    """A GPU's reduce pass runs up to two splits per multiprocessor (264 on an
    H200), the interpreter at most 3: with 21 (more than SPLITS_BLOCK) and a
    row tile in each, both sums over the splits (dbeta and dgamma in pass 1,
    dW in pass 2) take two steps of their loops."""
    splits = 21
    assert splits > bn_relu_conv.SPLITS_BLOCK
    monkeypatch.setattr(bn_relu_conv, "num_splits", lambda *args: splits)
    g = torch.Generator().manual_seed(14)
    # a tile is 64 rows at most (dense), or 32 cells of a 9x11 image's 5x6 (transition), in the
    # configurations the interpreter runs
    shape = (24, 9, 11) if primitive == "transition_backward" else (splits * 64 + 5,)
    x = channel_range(shape, 6, torch.float32, g, device)
    check_bn_backward(device, primitive, x, batch_coefficients(x, g), random_weight(5, 6, torch.float32, g, device),
                      g)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's arrivals")
@pytest.mark.parametrize("k", [None, 120, 136], ids=["bn_relu", "one_k_block", "two_k_blocks"])
def test_one_program_per_channel_block_sums_the_splits(monkeypatch, k):
    """Only the first K block's programs form dbeta and dgamma and arrive at the
    channel block's counter, so one program per channel block sums the
    splits. (Were every K block's to arrive, the counter would be passed
    twice a launch: on a GPU the first past it would sum splits not yet
    written, and could store after the right sums. The interpreter runs
    programs in turn and always ends on the right sums, so the programs that
    pass the counter are counted.)"""
    passed = []

    def counting(counter_ptr, arrivals):
        last = arrive_last(counter_ptr, arrivals)
        passed.append((int(counter_ptr.handle.data.item()), bool(last.handle.data.item())))
        return last

    monkeypatch.setattr(bn_relu_conv, "arrive_last", counting)
    g = torch.Generator().manual_seed(20)
    c = 70  # two channel blocks of 64, or more of 32
    x = channel_range((100,), c, torch.float32, g, "cpu")
    coefficients = batch_coefficients(x, g)
    splits = bn_relu_conv.backward_grid(common.rows(x), None if k is None else torch.empty(k, c), 1).splits
    assert splits > 1
    if k is None:
        OPS.bn_relu_backward_sums(x, *coefficients, torch.randn(100, c, generator=g))
    else:
        OPS.bn_relu_conv1x1_backward_sums(x, *coefficients, torch.randn(k, c, generator=g),
                                          torch.randn(100, k, generator=g))
    arrivals = Counter(counter for counter, _ in passed)  # by channel block (its counter's address)
    passes = Counter(counter for counter, last in passed if last)
    assert len(arrivals) >= 2 and set(arrivals.values()) == {splits} and passes == Counter(arrivals.keys()), passed


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


def every_candidate(launcher: common.Launcher) -> list[triton.Config]:
    """The candidates and, where they differ, the exact-fp32 ones."""
    return list({config_id(config): config for config in launcher.candidates + launcher.exact_fp32}.values())


@pytest.mark.parametrize("pool, config", [pytest.param(pool, config, id=f"pool{pool}-{config_id(config)}")
                                          for pool, launcher in bn_relu_conv._forward.items()
                                          for config in every_candidate(launcher)])
def test_forward_with_every_configuration(monkeypatch, device, pool, config):
    """Cells just past two row tiles (pool 1) or one (pool 2), input channels
    just past one channel block, K = 136: two output-channel blocks."""
    force(monkeypatch, bn_relu_conv._forward[pool], config)
    block_m, block_c = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_C"]
    c, k = block_c + 7, 136
    dtype = fitting_dtype(device, dict(POOL=pool, BLOCK_K=128), (bn_relu_conv.FORWARD_SHARED_MEMORY, config))
    g = torch.Generator().manual_seed(7)
    shape = (2 * block_m + 5,) if pool == 1 else image_batch(block_m + 3)
    x = channel_range(shape, c, dtype, g, device, left=3, right=2)
    bn = make_bn(x, True, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)

    def run(backend, dtype):
        args = [t.to(dtype) for t in (x, weight)]
        if pool == 1:
            out = torch.empty(x.shape[0], k, device=device, dtype=dtype)
            return [out, *backend.bn_relu_conv1x1(args[0], bn.scale, bn.shift, args[1], out,
                                                  with_stats=True)]
        out = torch.empty(shape[0], shape[1] // 2, shape[2] // 2, k, device=device, dtype=dtype)
        backend.transition(args[0], bn.scale, bn.shift, args[1], out)
        return [out]

    result = run(TRITON, dtype)
    assert_matches_torch(result[:1], lambda d: run(TORCH, d)[:1], dtype, "forward")
    if pool == 1:  # statistics of the stored output
        var64, mean64 = torch.var_mean(result[0].double().cpu(), dim=0, correction=0)
        assert_close(result[1], mean64, 1e-5, "output mean")
        assert_close(result[2], var64, 1e-4, "output var")


def backward_configs(pool: int, exact: bool, index: int) -> list[triton.Config]:
    """The ``index``-th (reduce, dx) candidates (cycling through the shorter
    list): exact fp32's or the others'."""
    lists = [launcher[pool].exact_fp32 if exact else launcher[pool].candidates
             for launcher in (bn_relu_conv._reduce, bn_relu_conv._dx)]
    return [configs[index % len(configs)] for configs in lists]


# (pool, K, exact): with the GEMM, K = 120 (one K block: dOut and W tiles loaded once per tile and program,
# except for exact fp32, which takes the K loop as on a GPU) and K = 136 (two blocks of dW, two steps of the
# dZ loop); without it (BN-ReLU), K is C
BACKWARD_CASES = [(pool, k, exact, index)
                  for pool, k, exact in ((1, 120, False), (1, 136, False), (1, None, False), (2, 120, False),
                                         (2, 136, False), (1, 120, True), (1, 136, True), (2, 120, True),
                                         (2, 136, True))
                  for index in range(max(len(launcher[pool].exact_fp32 if exact else launcher[pool].candidates)
                                         for launcher in (bn_relu_conv._reduce, bn_relu_conv._dx)))]


@pytest.mark.parametrize("pool, k, exact, index", [
    pytest.param(pool, k, exact, index, id=f"pool{pool}-{f'k{k}' if k else 'bn_relu'}-{'exact-' if exact else ''}"
                 + "-".join(config_id(config) for config in backward_configs(pool, exact, index)))
    for pool, k, exact, index in BACKWARD_CASES])
def test_backward_with_every_configuration(monkeypatch, device, pool, k, exact, index):
    """Both passes, each with its ``index``-th configuration, batch statistics,
    at shapes just past the tiles."""
    check_backward(monkeypatch, device, pool, k, exact, index)


@pytest.mark.gpu
@pytest.mark.parametrize("pool, exact, index", [
    pytest.param(pool, exact, index, id=f"pool{pool}-{'exact-' if exact else ''}"
                 + "-".join(config_id(config) for config in backward_configs(pool, exact, index)))
    for pool, k, exact, index in BACKWARD_CASES if k == 136])
def test_backward_with_every_configuration_at_two_full_k_blocks(monkeypatch, pool, exact, index):
    """K = 256 on the GPU: two full K blocks, and a K that Triton's compiler
    specialises as a multiple of 16 (K = 136, which one configuration got wrong
    on an H200, is not one; the interpreter, which runs K = 136, specialises
    nothing)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    check_backward(monkeypatch, "cuda", pool, 256, exact, index)


def check_backward(monkeypatch, device: str, pool: int, k, exact: bool, index: int) -> None:
    """:func:`test_backward_with_every_configuration`'s check (``k`` None: BN-ReLU alone)."""
    configs = backward_configs(pool, exact, index)
    force(monkeypatch, bn_relu_conv._reduce[pool], configs[0])
    force(monkeypatch, bn_relu_conv._dx[pool], configs[1])
    if exact:  # the K loop, as for exact fp32 on a GPU (bn_relu_conv.one_k_block)
        monkeypatch.setattr(bn_relu_conv, "one_k_block", lambda has_gemm, k, dtype, device: not has_gemm)
    block_m = max(config.kwargs["BLOCK_M"] for config in configs)
    c = max(config.kwargs["BLOCK_C"] for config in configs) + 7
    has_gemm = k is not None
    k = k or c
    one_k = bn_relu_conv.one_k_block(has_gemm, k, torch.float32, torch.device(device))
    dtype = fitting_dtype(device, dict(POOL=pool, HAS_GEMM=has_gemm, ONE_K_BLOCK=one_k, BLOCK_K=128),
                          (bn_relu_conv.REDUCE_SHARED_MEMORY, configs[0]), (bn_relu_conv.DX_SHARED_MEMORY, configs[1]))
    g = torch.Generator().manual_seed(8)
    shape = (2 * block_m + 5,) if pool == 1 else image_batch(block_m + 3)
    x = channel_range(shape, c, dtype, g, device, left=3, right=2)
    bn = make_bn(x, True, g)
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)
    out_shape = shape if pool == 1 else (shape[0], shape[1] // 2, shape[2] // 2)
    grad_out = torch.randn(*out_shape, k, generator=g).to(device=device, dtype=dtype)
    grad_x_before = torch.randn(*shape, c, generator=g).to(device=device, dtype=dtype)  # the dense layer adds to it

    def run(backend, dtype):
        x_, w_, g_ = (t.to(dtype) for t in (x, weight, grad_out))
        bn_args = [bn.scale, bn.shift, bn.mean, bn.rstd]
        grad_x = grad_x_before.to(dtype, copy=True) if pool == 1 and has_gemm else torch.empty_like(x_)
        if pool == 2:
            grads = backend.transition_backward(x_, *bn_args, w_, g_, grad_x, bn.batch_mean())
        elif has_gemm:
            grads = backend.bn_relu_conv1x1_backward(x_, *bn_args, w_, g_, grad_x, bn.batch_mean())
        else:
            grads = backend.bn_relu_backward(x_, *bn_args, g_.clone(), grad_x, bn.batch_mean())
        return [grad_x, *grads]

    assert_matches_torch(run(TRITON, dtype), lambda d: run(TORCH, d), dtype, "backward")


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
                for precision in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):  # exact fp32 or not
                    meta = dict(POOL=pool, HAS_GEMM=has_gemm, ONE_K_BLOCK=one_k_block, BLOCK_K=128,
                                DOT_PRECISION=precision)
                    fitting = launcher.fitting(data, meta)
                    assert fitting, (name, pool, precision)
                    for config in fitting:
                        need = shared_memory({**meta, **config.kwargs}, config.num_stages, data.element_size())
                        assert need <= limits.shared_memory, (name, pool, precision, config)
    # the TF32 forward's first candidate needs more than any of these GPUs offers (it compiles to 225 KiB on sm_90)
    first = bn_relu_conv.FORWARD_CONFIGS[1][0]
    meta = dict(POOL=1, BLOCK_K=128, DOT_PRECISION="tf32" if dtype == torch.float32 else "ieee")
    assert (first in bn_relu_conv._forward[1].fitting(data, meta)) == (dtype != torch.float32 and limits == H200)


def test_configuration_follows_the_shapes(monkeypatch):
    """Without timing anything: the first fitting candidate while its grid
    gives every multiprocessor a program, else the one with the most programs;
    autotuning (opt-in) considers every fitting candidate, never in deterministic mode."""
    monkeypatch.setattr(common, "INTERPRETER_LIMITS", H200)
    launcher = bn_relu_conv._forward[1]
    meta = dict(POOL=1, BLOCK_K=128, DOT_PRECISION="ieee")
    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)

    def usable(data: Tensor, rows: int, precision: str = "ieee") -> list[triton.Config]:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), 1)  # noqa: E731
        return launcher.usable(grid, data, {**meta, "DOT_PRECISION": precision})

    def block_m(data: Tensor, rows: int, precision: str = "ieee") -> list[int]:
        return [config.kwargs["BLOCK_M"] for config in usable(data, rows, precision)]

    assert block_m(bf16, 256 * 14 * 14) == [128]  # DenseNet-121 block 3, batch 256: 392 programs
    assert block_m(bf16, 256 * 7 * 7) == [64]  # block 4: 98 programs of 128 rows would leave SMs idle
    assert block_m(bf16, 100) == [64]  # too few rows for any: the most programs
    assert block_m(fp32, 256 * 14 * 14, "tf32") == [64]  # the 128-row candidate does not fit in fp32
    assert usable(fp32, 256 * 14 * 14) == bn_relu_conv.EXACT_FP32_FORWARD_CONFIGS[:1]  # exact fp32: its own list
    assert usable(fp32, 100) == bn_relu_conv.EXACT_FP32_FORWARD_CONFIGS[-1:]
    monkeypatch.setenv(common.AUTOTUNE_ENV_VAR, "1")
    assert block_m(bf16, 256 * 14 * 14) == [128]  # deterministic mode (this file's fixture): no autotuning
    torch.use_deterministic_algorithms(False)
    assert len(block_m(bf16, 256 * 14 * 14)) == len(launcher.fitting(bf16, meta)) > 1


# -- launches per layer ------------------------------------------------------------------

GEMMS = {"convolution", "convolution_backward", "mm", "addmm"}  # the 3x3 convolutions, the stem and classifier
NOT_KERNELS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_", "detach",
               "lift_fresh", "_unsafe_view", "_record_function_enter_new", "_record_function_exit"}


class LaunchCounter(TorchDispatchMode):
    """While :meth:`active`, counts the Triton launches (per kernel) and the
    torch ops that launch a GPU kernel: ``small`` (elementwise, reductions,
    copies) and ``gemm`` (convolutions and matrix products); views and
    allocations launch none.  The ops of ``torch.ops.densenet_fast_triton`` are
    no kernels themselves: it records them (``ops``, in call order) and counts
    what their implementations launch, and the Triton launches made outside
    any of them (``outside_ops``).  On CPU tensors (the interpreter) only."""

    def __init__(self) -> None:
        super().__init__()
        self.triton: Counter[str] = Counter()
        self.small: Counter[str] = Counter()
        self.gemm: Counter[str] = Counter()
        self.ops: list[str] = []
        self.outside_ops: Counter[str] = Counter()
        self.op_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == common.NAMESPACE:  # run its CPU implementation with this mode on, to see inside
            self.ops.append(name)
            self.op_depth += 1
            try:
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
            finally:
                self.op_depth -= 1
        if not func.is_view and name not in NOT_KERNELS:
            (self.gemm if name in GEMMS else self.small)[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def active(self):
        launch_item = common.Launcher.__getitem__

        def counted(launcher, grid):
            launch = launch_item(launcher, grid)

            def run(*args, **meta):
                self.triton[launcher.fn.__name__] += 1
                if not self.op_depth:
                    self.outside_ops[launcher.fn.__name__] += 1
                with _disable_current_modes():  # the interpreter's own copies are no GPU kernels
                    launch(*args, **meta)
            return run

        with mock.patch.object(common.Launcher, "__getitem__", counted), self:
            yield self

    def totals(self) -> Counter[str]:
        return Counter(triton=sum(self.triton.values()), small=sum(self.small.values()),
                       gemm=sum(self.gemm.values()))


def count_launches(block_config: tuple[int, ...]) -> LaunchCounter:
    """The launches of one training step's forward and backward (the second
    step, after the first compiled and allocated) of a tiny DenseNet (ImageNet
    stem, 32x32 input, batch 2) on the triton backend."""
    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=block_config, num_init_features=8, num_classes=5, backend="triton")
    x, target = torch.randn(2, 3, 32, 32), torch.randint(5, (2,))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):  # as a GPU step runs in bf16 (weights cast per use)
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()

    step()
    with LaunchCounter().active() as counter:
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
    counters = {config: count_launches(config) for config in [(2, 2), (3, 2), (4,)]}
    assert not any(counter.outside_ops for counter in counters.values()), "launched outside the ops"
    counts = {config: counter.totals() for config, counter in counters.items()}
    layer = counts[(3, 2)] - counts[(2, 2)]
    transition = counts[(2, 2)] - counts[(4,)]
    rest = counts[(4,)] - Counter({kind: 4 * n for kind, n in layer.items()})
    densenet121 = {kind: rest[kind] + 58 * layer[kind] + 3 * transition[kind] for kind in ("triton", "small", "gemm")}
    print(f"per layer {dict(layer)}, per transition {dict(transition)}, DenseNet-121 {densenet121}")
    assert layer["gemm"] == 2  # the 3x3 convolution, forward and backward
    assert layer["triton"] <= 10 and layer["small"] <= 11, layer
    # a transition's gradients are copied into the stage's gradient store: one copy launch
    assert transition["triton"] <= 5 and transition["small"] <= 7, transition


# -- modes and refusals -----------------------------------------------------------------

def test_deterministic_mode_is_bitwise_reproducible(device):
    m, c, k = 203, 40, 48
    g = torch.Generator().manual_seed(5)
    x = channel_range((m,), c, torch.float32, g, device, left=0, right=8)
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
    x = channel_range((3, 5, 7), 20, torch.float64, g, device, left=2, right=3)
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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records the interpreter's dots")
def test_every_dot_takes_the_precision_of_torchs_tf32_switch(monkeypatch):
    """The interpreter computes every ``tl.dot`` in full fp32 whatever its
    ``input_precision``, so a dot given TF32 where torch's switch asks for fp32
    (relative errors near 1e-3 on a GPU) passes every numeric check here: what
    each dot is given is recorded instead (forward, both backward passes, with
    one K block and with the K loop)."""
    from triton.runtime import interpreter

    precisions = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def recording(self, a, b, acc, input_precision, *args):
        precisions.append(input_precision.name)
        return create_dot(self, a, b, acc, input_precision, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", recording)
    for allow_tf32, expected in ((False, "IEEE"), (True, "TF32")):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
        for one_k in (True, False):
            monkeypatch.setattr(bn_relu_conv, "one_k_block", lambda has_gemm, k, dtype, device: not has_gemm or one_k)
            precisions.clear()
            layer_and_transition("cpu")
            assert precisions and set(precisions) == {expected}, (allow_tf32, one_k, Counter(precisions))


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
    """A dense layer's forward (with statistics) and backward (accumulating),
    BN-ReLU and its backward (into a view of row stride 42), and a
    transition's forward and backward, on the triton and the torch backend:
    ``(ours, torch's)``."""
    g = torch.Generator().manual_seed(10)
    x = channel_range((2, 6, 5), 40, torch.float32, g, device, left=0, right=0)
    bn = make_bn(x, True, g)
    weight = torch.randn(20, 40, generator=g).to(device)
    grad_out = torch.randn(60, 20, generator=g).to(device)
    grad_pooled = torch.randn(2, 3, 2, 20, generator=g).to(device)
    grad_relu = torch.randn(60, 40, generator=g).to(device)
    rows = x.reshape(-1, 40)

    def run(backend) -> list[Tensor]:
        out = torch.empty(60, 20, device=device)
        stats = backend.bn_relu_conv1x1(rows, bn.scale, bn.shift, weight, out, with_stats=True)
        grad_rows = torch.ones_like(rows)
        grads = backend.bn_relu_conv1x1_backward(rows, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                                 grad_rows, bn.batch_mean())
        z = torch.empty_like(rows)
        backend.bn_relu(rows, bn.scale, bn.shift, z)
        grad_z = grad_relu.clone()  # (consumed)
        grad_bn = torch.zeros(60, 42, device=device)[:, 2:]
        bn_grads = backend.bn_relu_backward(rows, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_bn,
                                            bn.batch_mean())
        pooled = torch.empty(2, 3, 2, 20, device=device)
        backend.transition(x, bn.scale, bn.shift, weight, pooled)
        grad_x = torch.empty_like(x)
        transition_grads = backend.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_pooled,
                                                       grad_x, bn.batch_mean())
        return [out, *stats, grad_rows, *grads, z, grad_bn, *bn_grads, pooled, grad_x, *transition_grads,
                *backend.channel_stats(rows)]

    return run(TRITON), run(TORCH)


def test_the_reduce_configuration_wrong_on_the_h200_stays_out():
    """BLOCK_M=64, BLOCK_C=32 with 8 warps gave a wrong dW on an H200 (Triton 3.6,
    fp16, two K blocks; docs/gpu.md) and passes the interpreter: only the lists
    keep it out."""
    for configs in (*bn_relu_conv.REDUCE_CONFIGS.values(), *bn_relu_conv.EXACT_FP32_REDUCE_CONFIGS.values()):
        assert not any(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_C"] == 32 and c.num_warps == 8 for c in configs)


def test_host_arithmetic_equals_tritons():
    """The launchers' plain cdiv and next_power_of_2 (Triton 3.8's are constexpr
    functions, microseconds per host call) give Triton's values."""
    for n in range(0, 3000):
        assert common.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 7, 16, 128):
            assert common.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_vector_alignment(monkeypatch, device):
    """``ALIGN`` is the largest power of two up to a 16-byte vector that divides
    every channel count and row stride (growth rate 12: 124 channels still
    move 16 bytes of fp32 per instruction), and the kernels, told so, give the
    torch backend's results (C = 40, K = 20: ALIGN 4 in fp32; 2 for the
    BN-ReLU backward's second pass, whose ``grad_x`` has row stride 42)."""
    assert common.vector_alignment(4, 124, 124 * 28, 0) == 4
    assert common.vector_alignment(2, 124, 128) == 4
    assert common.vector_alignment(2, 256, 512, 0) == 8
    assert common.vector_alignment(4, 40, 17) == 1
    aligns = []
    spy = lambda *counts: aligns.append(common.vector_alignment(*counts)) or aligns[-1]  # noqa: E731
    for module in (bn_relu, bn_relu_conv, channel_stats):
        monkeypatch.setattr(module, "vector_alignment", spy)
    ours, expected = layer_and_transition(device)
    assert sorted(aligns).count(2) == 1 and set(aligns) == {2, 4}
    for i, (actual, reference) in enumerate(zip(ours, expected)):
        assert_close(actual, reference, 1e-4, f"output {i}")


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


# -- arrival counters -------------------------------------------------------------------

@triton.jit
def _arrive_then_fail_kernel(data_ptr,  # (BLOCK,) fp32
                             counter_ptr,  # () int32
                             FAIL: tl.constexpr, BLOCK: tl.constexpr):
    """Every program arrives at ``counter_ptr``; with FAIL, the last program
    (in the interpreter's order) fails before arriving."""
    pid = tl.program_id(0)
    if FAIL:
        tl.static_assert(pid < tl.num_programs(0) - 1, "a program fails in the middle of the launch")
    if arrive_last(counter_ptr, tl.num_programs(0)):
        tl.store(data_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))


_arrive_then_fail = common.Launcher(_arrive_then_fail_kernel, [triton.Config({}, num_warps=1)])


def test_a_launch_that_raises_leaves_no_arrivals_behind():
    """Under the interpreter an error in the middle of a launch stops it after
    some programs arrived; the thread's counters are dropped, so the next
    launch (channel statistics over two tile groups) merges correctly."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter runs programs in turn")
    data = torch.zeros(16)
    with pytest.raises(Exception, match="fails in the middle"):
        _arrive_then_fail[lambda meta: (3,)](data, common.arrival_counters(data.device, 1), FAIL=True, BLOCK=16)
    assert not common.arrival_counters(data.device, 1).any()
    x = torch.linspace(0, 1, 130 * 65).reshape(-1, 1).expand(-1, 3).contiguous()
    mean, var = channel_stats.channel_stats(x)
    var64, mean64 = torch.var_mean(x.double(), dim=0, correction=0)
    assert_close(mean, mean64, 1e-6, "mean")
    assert_close(var, var64, 1e-5, "var")


@needs_gpu
def test_arrival_counters_under_cuda_graph_capture():
    """Two graphs captured on one stream, then an eager launch there that needs more
    counters than were cached: each replay still merges its statistics right
    (captured launches take fresh counters from the graph's pool)."""
    xs = [torch.randn(130 * 65, c, device="cuda") for c in (3, 5)]
    stream = torch.cuda.Stream()
    graphs, results = [], []
    channel_stats.channel_stats(xs[0])  # compile outside the capture
    channel_stats.channel_stats(xs[1])
    with torch.cuda.stream(stream):
        for x in xs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                results.append(channel_stats.channel_stats(x))
            graphs.append(graph)
        # on the capturing stream, more counters than it has cached: the cached set is replaced and freed
        channel_stats.channel_stats(torch.randn(128 * 64 * 5, 300, device="cuda"))
        torch.full((4096,), 7, dtype=torch.int32, device="cuda")  # may reuse the freed set's memory
    torch.cuda.synchronize()
    for _ in range(2):
        for graph, x, (mean, var) in zip(graphs, xs, results):
            mean.zero_(), var.zero_()
            graph.replay()
            torch.cuda.synchronize()
            var64, mean64 = torch.var_mean(x.double(), dim=0, correction=0)
            assert_close(mean, mean64, 1e-6, "mean")
            assert_close(var, var64, 1e-5, "var")


# -- no rows, too many rows -------------------------------------------------------------

def test_no_rows_give_what_the_torch_backend_gives(monkeypatch, device):
    """``M = 0``: NaN statistics (torch's mean over an empty dimension) and a
    zero weight gradient, not whatever fresh memory held (filled with zeros
    here, where deterministic mode would fill it with NaN)."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).zero_())
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: empty_like(*args, **kwargs).zero_())
    x, weight = torch.empty(0, 5, device=device), torch.randn(4, 5).to(device)
    ones, zeros = torch.ones(5, device=device), torch.zeros(5, device=device)

    def run(backend):
        return (*backend.channel_stats(x),
                *backend.bn_relu_conv1x1(x, ones, zeros, weight, torch.empty(0, 4, device=device), True),
                *backend.bn_relu_conv1x1_backward(x, ones, zeros, zeros, ones, weight, torch.empty(0, 4, device=device),
                                                  torch.empty(0, 5, device=device), None))

    for i, (ours, theirs) in enumerate(zip(run(TRITON), run(TORCH))):
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=f"output {i}")


def test_more_pixels_than_int32_indices_raise():
    big = torch.zeros(1, 4).expand(2**31, 4)
    with pytest.raises(ValueError, match="int32"):
        channel_stats.channel_stats(big)
    with pytest.raises(ValueError, match="int32"):
        TRITON.bn_relu_conv1x1(big, torch.ones(4), torch.zeros(4), torch.ones(2, 4), torch.zeros(1, 2).expand(2**31, 2),
                               True)
    with pytest.raises(ValueError, match="int32"):
        TRITON.bn_relu(big, torch.ones(4), torch.zeros(4), big)


def test_autotuning_keys_hold_every_variant_constexpr():
    """A tuning is reused only for the same kernel variant: every constexpr of
    the fused kernels is in their autotuning key, except the configurations'
    own, BLOCK_K (which follows K) and module constants."""
    import inspect

    not_variants = {"BLOCK_M", "BLOCK_C", "BLOCK_K", "STATS_GROUP", "MERGE_BLOCK", "BLOCK_S", "SLAB"}
    for launchers in (bn_relu_conv._forward, bn_relu_conv._reduce, bn_relu_conv._dx):
        for launcher in launchers.values():
            kernel = getattr(launcher.fn, "fn", launcher.fn)  # the Python function, jitted or interpreted
            constexprs = {name for name, parameter in inspect.signature(kernel).parameters.items()
                          if "constexpr" in str(parameter.annotation)}
            assert constexprs - not_variants <= set(launcher.tuned.keys), kernel.__name__
