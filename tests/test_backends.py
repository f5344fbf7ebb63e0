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
(opcheck, every kernel configuration, autotuning, shared memory, determinism).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from densenet_fast.backends import BACKEND_NAMES, BackendUnavailableError, get_backend, resolve_backend_name
from densenet_fast.backends.interface import stats_dtype
from densenet_fast.backends.torch_backend import TorchBackend, mm as torch_backend_mm
from densenet_fast.memory import Architecture, Setup, StepSimulation
from helpers import max_relative_error
from helpers import one_thread  # noqa: F401  (fixture)
from primitives import (BN, INF, NAN, assert_only_range_written, assert_same_numbers, avg_pool64,
                        channel_range, float64_grads, float64_leaf, make_bn, output_range, poisoned_bn, random_rows,
                        random_weight)

pytestmark = pytest.mark.usefixtures("one_thread", "nan_filled_fresh_memory", "no_tf32")

# max relative error against the float64 reference, per data dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
ROW_SHAPES = [(1031, 17, 23), (77, 40, 16), (3, 2, 1)]  # (M, C, K)
TRANSITION_SHAPES = {  # (N, spatial, C, K)
    "2d_odd": (2, (7, 9), 17, 20), "2d_tiny": (1, (3, 2), 5, 3), "2d_to_1x1": (2, (3, 2), 5, 3),
    "1d_odd": (3, (11,), 17, 20), "3d_odd": (2, (5, 6, 3), 17, 20),
}
TORCH = TorchBackend()


@pytest.fixture(params=[pytest.param((name, device), id=f"{name}-{device}",
                                      marks=[pytest.mark.gpu] if device == "cuda" else [])
                         for device in ("cpu", "cuda") for name in BACKEND_NAMES])
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


def modelled_weight_gradient(backend: str, device: str, dtype, spatial_dims: int, primitive: str, k: int,
                             c: int) -> float:
    """The bytes of a ``(k, c)`` weight gradient that ``primitive`` returns, as the
    memory model counts them for ``backend`` and ``dtype`` (on the GPU, where
    the model describes Triton)."""
    setup = Setup(2, (32,) * spatial_dims, dtype, device="cuda" if backend == "triton" else device, backend=backend)
    arch = Architecture.named("densenet_bc", 40, spatial_dims=spatial_dims)
    workspace = StepSimulation(arch, setup, ("keep",) * 3).workspace
    return getattr(workspace, f"{primitive}_weight_gradient")(k, c)


def check_sums(grads, truth, bn: BN, dtype, names) -> None:
    for name, got, expected in zip(names, grads, truth):
        assert_close(got, expected, dtype, name)
    assert grads[-1].dtype == grads[-2].dtype == bn.scale.dtype, "grad_gamma and grad_beta in the statistics dtype"


def random_case(seed: int, shape: tuple[int, ...], c: int, dtype, device, batch_stats: bool, poisoned: bool
                ) -> tuple[torch.Generator, Tensor, BN]:
    """``(generator, x, bn)`` drawn in this order from a generator seeded with ``seed``:
    ``x`` a channel range ``(*shape, c)`` of a wider buffer, and its BN
    (:func:`primitives.poisoned_bn`, NaN and Inf in ``x``, if ``poisoned``)."""
    g = torch.Generator().manual_seed(seed)
    x = channel_range(shape, c, dtype, g, device)
    return g, x, (poisoned_bn if poisoned else make_bn)(x, batch_stats, g)


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


@pytest.mark.parametrize("m, c", [(1031, 17), (3, 2)])
def test_channel_stats_of_huge_values(backend, m, c):
    """float32 data around 1e20, whose square overflows (variance about 1e34,
    finite; torch's own BN sums the squared deviations and overflows only
    above about 3e38 / M): a merge that multiplies a zero count by the square
    of a mean (Inf) makes NaN."""
    backend, device = backend
    g = torch.Generator().manual_seed(1)
    x64 = (1 + 1e-3 * torch.randn(m, c, generator=g, dtype=torch.float64)) * 1e20
    mean, var = backend.channel_stats(x64.to(device=device, dtype=torch.float32))
    var64, mean64 = torch.var_mean(x64.float().double(), dim=0, correction=0)
    assert_close(mean, mean64, torch.float32, "mean")
    assert_close(var, var64, torch.float32, "var")


# -- fused BN-ReLU-Conv1x1 --------------------------------------------------------------------

@pytest.mark.parametrize("m, c, k", ROW_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1(backend, dtype, m, c, k, batch_stats):
    backend, device = backend
    g, x, bn = random_case(1, (m,), c, dtype, device, batch_stats, poisoned=False)
    weight = random_weight(k, c, dtype, g, device)
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
    grad_out = random_rows((m, k), dtype, device, g)
    grad_buffer, grad_x = output_range((m,), c, dtype, device, left=0, right=2)
    grad_x.copy_(random_rows((m, c), dtype, device, g))
    before = grad_x.clone()
    grads = backend.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                             bn.batch_mean())
    truth = float64_grads(out64, grad_out, x64, w64, bn.gamma, bn.beta)
    if dtype in (torch.float16, torch.bfloat16):  # the stored sum is rounded: judge it, not the increment
        assert_close(grad_x, before.double().cpu() + truth[0], dtype, "grad_x")
    else:
        assert_close(grad_x.double() - before.double(), truth[0], dtype, "grad_x increment")
    assert_only_range_written(grad_buffer, slice(0, c))
    assert grads[0].dtype in (dtype, stats_dtype(dtype)), "grad_weight in the data dtype or fp32"
    assert grads[0].nbytes == modelled_weight_gradient(backend.name, device, dtype, 2, "conv1x1", k, c)
    check_sums(grads, truth[1:], bn, dtype, ["grad_weight", "grad_gamma", "grad_beta"])


# -- BN-ReLU ----------------------------------------------------------------------------------

@pytest.mark.parametrize("m, c", [(1031, 17), (3, 2)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
@pytest.mark.parametrize("in_place", [True, False], ids=["grad_x_is_grad_z", "separate"])
def test_bn_relu(backend, dtype, m, c, batch_stats, in_place):
    backend, device = backend
    g, x, bn = random_case(3, (m,), c, dtype, device, batch_stats, poisoned=False)
    out_buffer, out = output_range((m,), c, dtype, device)
    backend.bn_relu(x, bn.scale, bn.shift, out)
    x64 = float64_leaf(x)
    z64 = bn.relu_bn64(x64)
    assert_close(out, z64, dtype, "bn_relu")
    assert_only_range_written(out_buffer, slice(4, 4 + c))

    grad_z = channel_range((m,), c, dtype, g, device, left=1, right=1)
    truth = float64_grads(z64, grad_z, x64, bn.gamma, bn.beta)
    grad_buffer, grad_x = (None, grad_z) if in_place else output_range((m,), c, dtype, device)
    grads = backend.bn_relu_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z, grad_x, bn.batch_mean())
    assert_close(grad_x, truth[0], dtype, "grad_x")
    if grad_buffer is not None:
        assert_only_range_written(grad_buffer, slice(4, 4 + c))
    check_sums(grads, truth[1:], bn, dtype, ["grad_gamma", "grad_beta"])


# -- transition -------------------------------------------------------------------------------

@pytest.mark.parametrize("n, spatial, c, k", TRANSITION_SHAPES.values(), ids=TRANSITION_SHAPES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_transition(backend, dtype, n, spatial, c, k, batch_stats):
    """Odd sizes: pooling floors, and the dropped pixels still get the statistics
    terms of the BN gradient (written, not left alone)."""
    backend, device = backend
    g = torch.Generator().manual_seed(4)
    pooled = tuple(size // 2 for size in spatial)
    x = channel_range((n, *spatial), c, dtype, g, device)
    bn = make_bn(x, batch_stats, g)
    weight = random_weight(k, c, dtype, g, device)
    out_buffer, out = output_range((n, *pooled), k, dtype, device, left=0)  # like the next block's buffer
    backend.transition(x, bn.scale, bn.shift, weight, out)
    x64, w64 = float64_leaf(x), float64_leaf(weight)
    out64 = avg_pool64(bn.relu_bn64(x64)) @ w64.t()
    assert_close(out, out64, dtype, "transition")
    assert_only_range_written(out_buffer, slice(0, k))

    # any stride in a dimension of size 1, as views have (a 1x1 output's gradient in densenet121 at 32x32: the
    # cpp backend refused it)
    grad_out = random_rows((n, *pooled, k), dtype, device, g)
    grad_out = grad_out.as_strided(grad_out.shape, [7 if size == 1 else stride
                                                    for size, stride in zip(grad_out.shape, grad_out.stride())])
    grad_buffer, grad_x = output_range((n, *spatial), c, dtype, device)
    grads = backend.transition_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x,
                                        bn.batch_mean())
    truth = float64_grads(out64, grad_out, x64, w64, bn.gamma, bn.beta)
    assert_close(grad_x, truth[0], dtype, "grad_x")
    assert_only_range_written(grad_buffer, slice(4, 4 + c))
    assert grads[0].dtype in (dtype, stats_dtype(dtype)), "grad_weight in the data dtype or fp32"
    assert grads[0].nbytes == modelled_weight_gradient(backend.name, device, dtype, len(spatial), "transition", k,
                                                       c)
    check_sums(grads, truth[1:], bn, dtype, ["grad_weight", "grad_gamma", "grad_beta"])


# -- NaN and Inf: exactly as torch's BatchNorm and ReLU ----------------------------------------
# The torch backend is plain torch ops (its model equals torchvision's with NaN input:
# test_reliability.py); every other backend must put NaN and Inf where it does.

def assert_as_torch(actual: list[Tensor], expected: list[Tensor], dtype, names: list[str]) -> None:
    for name, got, reference in zip(names, actual, expected):
        assert_same_numbers(got, reference, TOLERANCE[dtype], f"{name} vs torch backend")


@pytest.fixture
def other_backend(backend):
    if backend[0].name == "torch":
        pytest.skip("the reference itself")
    return backend


def check_as_torch(backend, primitive: str, args: tuple, target: Tensor, after: tuple, dtype, names: list[str]
                   ) -> None:
    """``primitive(*args, target, *after)`` on ``backend`` and, on copies of the
    tensors as they are now, on the torch backend: NaN and Inf in the same places,
    finite values within the tolerance.  ``names``: ``target``'s, then those of the
    returned tensors."""
    copies = [a.clone() if isinstance(a, Tensor) else a for a in args]
    expected_target = target.clone()
    expected = getattr(TORCH, primitive)(*copies, expected_target, *after)
    result = getattr(backend, primitive)(*args, target, *after)
    returned = lambda r: [] if r is None else list(r)  # noqa: E731
    assert_as_torch([target, *returned(result)], [expected_target, *returned(expected)], dtype, names)


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_conv1x1_nan_and_inf(other_backend, dtype, batch_stats):
    backend, device = other_backend
    m, c, k = 1031, 17, 23
    g, x, bn = random_case(10, (m,), c, dtype, device, batch_stats, poisoned=True)
    weight = random_weight(k, c, dtype, g, device)
    check_as_torch(backend, "bn_relu_conv1x1", (x, bn.scale, bn.shift, weight), output_range((m,), k, dtype, device)[1],
                   (True,), dtype, ["out", "mean", "var"])
    grad_out = random_rows((m, k), dtype, device, g)
    check_as_torch(backend, "bn_relu_conv1x1_backward", (x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out),
                   random_rows((m, c), dtype, device, g), (bn.batch_mean(),), dtype,
                   ["grad_x", "grad_weight", "grad_gamma", "grad_beta"])


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_bn_relu_nan_and_inf(other_backend, dtype, batch_stats):
    backend, device = other_backend
    m, c = 1031, 17
    g, x, bn = random_case(11, (m,), c, dtype, device, batch_stats, poisoned=True)
    check_as_torch(backend, "bn_relu", (x, bn.scale, bn.shift), output_range((m,), c, dtype, device)[1], (), dtype,
                   ["out"])
    grad_z = random_rows((m, c), dtype, device, g)  # also grad_x: in place
    check_as_torch(backend, "bn_relu_backward", (x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_z), grad_z,
                   (bn.batch_mean(),), dtype, ["grad_x", "grad_gamma", "grad_beta"])


@pytest.mark.parametrize("spatial", [(7, 9), (5, 6, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "running"])
def test_transition_nan_and_inf(other_backend, dtype, spatial, batch_stats):
    """Odd sizes: the last pixel, a NaN, is dropped by pooling and still makes
    grad_gamma NaN (0 * NaN in the BN backward's sums), as in torch."""
    backend, device = other_backend
    n, c, k = 2, 17, 20
    pooled = tuple(size // 2 for size in spatial)
    g, x, bn = random_case(12, (n, *spatial), c, dtype, device, batch_stats, poisoned=True)
    weight = random_weight(k, c, dtype, g, device)
    check_as_torch(backend, "transition", (x, bn.scale, bn.shift, weight),
                   output_range((n, *pooled), k, dtype, device)[1], (), dtype, ["out"])
    grad_out = random_rows((n, *pooled, k), dtype, device, g)
    check_as_torch(backend, "transition_backward", (x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out),
                   output_range((n, *spatial), c, dtype, device)[1], (bn.batch_mean(),), dtype,
                   ["grad_x", "grad_weight", "grad_gamma", "grad_beta"])


def test_this_cpus_gemm_leaks_nan_rows():
    """Not a check of this package: whether this CPU's float16 gemm (oneDNN's)
    leaks a NaN row into the row before it.  Where it does not, the NaN-row tests
    below and in tests/test_reliability.py pass without exercising the redo, and
    this test says so by skipping."""
    z, w = torch.randn(64, 17).half(), torch.randn(17, 23).half()
    z[5, 0] = NAN
    rows = torch.mm(z, w).isnan().any(1).nonzero().flatten().tolist()
    if rows == [5]:
        pytest.skip("this CPU's float16 gemm keeps NaN rows apart: the NaN-row tests cannot fail here")
    assert rows == [4, 5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_torch_backends_product_is_redone_where_the_gemm_leaks_a_nan_row(monkeypatch, dtype):
    """On any CPU: a stand-in for oneDNN's 16-bit gemm that makes the row before
    a NaN row NaN too (as torch 2.14.1's does on CPUs with AMX or AVX512-FP16);
    the product the backend returns has only the NaN row (without the redo, the
    NaN-row tests pass on CPUs whose gemm does not leak)."""
    gemm = torch.mm

    def leaking_gemm(a: Tensor, b: Tensor, out=None) -> Tensor:
        product = gemm(a, b, out=out)
        if a.dtype in (torch.float16, torch.bfloat16):
            product[a.isnan().any(1).roll(-1)] = NAN
        return product

    monkeypatch.setattr(torch, "mm", leaking_gemm)
    z, w = torch.randn(64, 17).to(dtype), torch.randn(17, 23).to(dtype)
    z[5, 0] = NAN
    assert torch.mm(z, w).isnan().any(1).nonzero().flatten().tolist() == [4, 5]  # (the stand-in leaks)
    for out in (None, torch.empty(64, 23, dtype=dtype)):
        assert torch_backend_mm(z, w, out=out).isnan().any(1).nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize("under_autocast", [False, True], ids=["direct", "autocast"])
def test_a_non_finite_pixel_stays_in_its_row(backend, dtype, under_autocast):
    """A NaN or Inf pixel (row) reaches only its own rows of the products, as in
    float64, also where it sits in channel 0 and K is odd: torch 2.14.1's oneDNN
    gemm in float16/bfloat16 makes the row before it NaN on CPUs with AMX or
    AVX512-FP16 (docs/cpp.md, "A NaN one row early"), which the backends redo in
    float32, also when called under autocast (which must not make that product
    float16/bfloat16 again).  Running statistics, so the poison travels pixel by
    pixel."""
    backend, device = backend
    if under_autocast and (device != "cpu" or dtype not in (torch.float16, torch.bfloat16)):
        pytest.skip("CPU autocast to the data's own float16/bfloat16")
    m, c, k = 1031, 17, 23
    g = torch.Generator().manual_seed(13)
    x, grad_out = random_rows((m, c), dtype, device, g), random_rows((m, k), dtype, device, g)
    bn = make_bn(x, False, g)
    weight = random_weight(k, c, dtype, g, device)
    for row, value in [(m // 5, NAN), (m // 3, INF), (m // 2 + 1, NAN)]:
        x[row, 0] = value
        grad_out[row + 7, 0] = value
    cases = [("bn_relu_conv1x1", (x, bn.scale, bn.shift, weight), torch.empty(m, k, dtype=dtype, device=device),
              (False,), ["out"]),
             ("bn_relu_conv1x1_backward", (x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out),
              torch.zeros(m, c, dtype=dtype, device=device), (None,), ["grad_x", "grad_weight"])]
    for primitive, args, target, after, names in cases:
        in_float64 = [a.double() if isinstance(a, Tensor) else a for a in (*args, target)]
        expected = getattr(TORCH, primitive)(*in_float64, *after)
        with torch.autocast("cpu", dtype=dtype, enabled=under_autocast):
            result = getattr(backend, primitive)(*args, target, *after)
        returned = [] if result is None else list(result)[:len(names) - 1]
        expected = [] if expected is None else list(expected)[:len(names) - 1]
        for name, got, reference in zip(names, [target, *returned], [in_float64[-1], *expected]):
            assert_same_numbers(got, reference, TOLERANCE[dtype], f"{primitive} {name} vs float64")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_torch_backend_mm_compiles_to_one_graph(dtype):
    """The torch backend's CPU gemm check branches on data in eager mode only: a
    compiled graph (fullgraph) multiplies in float32, with the NaN in its row."""
    g = torch.Generator().manual_seed(14)
    a, b = random_rows((64, 17), dtype, "cpu", g), random_rows((17, 23), dtype, "cpu", g)
    a[5, 0] = NAN
    compiled = torch.compile(torch_backend_mm, fullgraph=True, backend="eager")
    product = compiled(a, b)
    assert product.dtype == dtype
    assert product.isnan().any(1).nonzero().flatten().tolist() == [5]
    assert_same_numbers(product, a.double() @ b.double(), TOLERANCE[dtype], "compiled mm")


def test_a_backend_on_the_wrong_device_says_where_it_runs(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="the cuda backend runs on CUDA tensors, not on cpu ones"):
        get_backend("cuda", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="CPU ones with TRITON_INTERPRET=1 set, not on cpu ones"):
        get_backend("triton", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="the cpp backend runs on CPU tensors, not on cuda ones"):
        get_backend("cpp", torch.device("cuda"))
