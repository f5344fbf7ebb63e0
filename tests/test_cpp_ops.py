"""What only the C++ extension has (the primitives' contract on every backend is
tests/test_backends.py; the model on every backend, torch.compile included,
tests/test_engine.py): its ops through opcheck, argument checks on the CPU and Meta
kernels, results independent of the thread count, pass 2 of the BN backward
alone with NaN and Inf, the 16-bit stores' rounding, and the CUDA kernels
against the CPU ones (alignment, NaN and Inf, determinism)."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch import Tensor

from densenet_fast import _extension

if _extension.load() is None:
    pytest.fail(f"the C++ extension is not built: {_extension.load_error()} (run `make build`)", pytrace=False)

from densenet_fast.backends.extension_backend import CppBackend  # noqa: E402
from densenet_fast.backends.torch_backend import TorchBackend  # noqa: E402
from primitives import assert_same_numbers, channel_range, make_bn, poisoned_bn, random_buffer  # noqa: E402

CPP, TORCH = CppBackend(), TorchBackend()
# max relative error against the other implementation
TOLERANCE = {torch.float32: 5e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(params=[torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=["fp32", "fp64", "bf16", "fp16"])
def dtype(request) -> torch.dtype:
    return request.param


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
    assert_same_numbers(grad_x, expected, TOLERANCE[dtype], "grad_x")


# -- op contracts --------------------------------------------------------------------------

def op_arguments(dtype=torch.float32, spatial: tuple[int, ...] = (5, 3), m: int = 37) -> dict[str, tuple]:
    """Small valid arguments of every fused op (channel-range views, odd sizes;
    ``spatial``: of the transition's input, ``m``: rows of the others), the same
    on every call."""
    g = torch.Generator().manual_seed(5)
    c, k = 5, 3
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_stores_round_to_nearest_even(dtype):
    """The 16-bit loops store with c10's rounding (bn_relu_rows.h).  z =
    relu(x + shift) for x in that dtype, with shifts of half a unit at 1 (ties
    for x in [1, 2), both parities), more and less than half, in two binades,
    a shift of 16 that takes float16's largest value to the tie with Inf, half
    of float16's smallest subnormal (ties between its subnormals), and NaN, Inf
    and zeros: every stored value must be torch's own conversion of the same
    float, bit for bit.  (ReLU stores no negative value; the formulas pass
    the sign bit through.)"""
    m, c = 4099, 40
    half_unit = torch.finfo(dtype).eps / 2
    g = torch.Generator().manual_seed(15)
    x = (torch.rand(m, c, generator=g, dtype=torch.float64) + 1).to(dtype)
    x[:m // 2] *= 3  # another binade
    x[0, :8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-6, 1.0, 2.0])
    x[1] = torch.finfo(dtype).max
    x[2:6] = torch.arange(4 * c, dtype=torch.float64).view(4, c).mul(2.0**-24).to(dtype)  # float16's subnormals
    scale = torch.ones(c)
    shifts = [half_unit, 1.5 * half_unit, 0.5 * half_unit, 0.0, -half_unit, 3 * half_unit, 16.0, 2.0**-25]
    shift = torch.tensor(shifts).repeat(c // len(shifts))  # the last: ties between float16's subnormals
    z = torch.empty_like(x)
    CPP.bn_relu(x, scale, shift, z)
    expected = (x.float() * scale + shift).relu().to(dtype)
    assert expected[1].isinf().any() == (dtype == torch.float16)
    assert torch.equal(z.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(z.view(torch.int16)[finite], expected.view(torch.int16)[finite])


@pytest.mark.parametrize("op", list(op_arguments()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_op_passes_opcheck(op, dtype):
    """Schema (mutated arguments), Meta/fake kernel and dispatch agree, as torch.compile needs
    (float16 too: the Meta kernels take what the CPU kernels take)."""
    torch.library.opcheck(getattr(torch.ops.densenet_fast, op), op_arguments(dtype)[op])


@pytest.mark.parametrize("op", ["transition", "transition_backward_sums"])
@pytest.mark.parametrize("spatial", [(7,), (3, 5, 2)], ids=["1d", "3d"])
def test_transition_passes_opcheck_in_1d_and_3d(op, spatial):
    torch.library.opcheck(getattr(torch.ops.densenet_fast, op), op_arguments(spatial=spatial)[op])


def tensors_after(fn, args: Sequence) -> list[Tensor]:
    """``fn`` called on copies of ``args``: the tensors among them (which it may
    write), then the tensors it returned."""
    copies = [a.clone() if isinstance(a, Tensor) else a for a in args]
    out = fn(*copies)
    outputs = out if isinstance(out, tuple) else () if out is None else (out,)
    return [a for a in copies if isinstance(a, Tensor)] + [o for o in outputs if isinstance(o, Tensor)]


def on_threads(counts: Sequence[int], run) -> list:
    """``run()`` with each number of torch threads in turn (restored after)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(run())
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m, spatial", [(37, (5, 3)), (5003, (61, 47))], ids=["one_tile", "many_tiles"])
def test_results_do_not_depend_on_the_thread_count(m, spatial):
    """Fixed chunks, partial sums added in chunk order: bitwise equal on 1 and 2 threads."""
    def run() -> list[Tensor]:
        return [t for name, args in op_arguments(m=m, spatial=spatial).items()
                for t in tensors_after(getattr(torch.ops.densenet_fast, name), args)]

    first, second = on_threads((1, 2), run)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("op, c, k, spatial", [
    ("bn_relu_conv1x1_backward_sums", 300, 48, (5000,)),  # 6 row groups x 2 column blocks
    ("bn_relu_conv1x1_backward_sums", 128, 48, (1000,)),  # a single work item (the calling thread)
    ("bn_relu_conv1x1_backward_sums", 257, 48, (1000,)),  # column blocks of unequal width
    ("transition_backward_sums", 600, 300, (2, 40, 39)),  # 2 row groups x 3 column blocks, odd width
    ("transition_backward_sums", 1100, 550, (2, 6, 6)),  # 1 row group (dW itself) x 5 column blocks
])
def test_weight_gradient_at_several_row_groups_and_column_blocks(op, c, k, spatial, dtype):
    """The weight-gradient pass (csrc/ops/cpu/bn_relu_conv_kernel.cpp, weight_gradient) where
    its rows are cut into groups and dW's columns into blocks, dOut a channel range:
    equal to dOut.T @ relu(x * scale + shift) (pooled for a transition) in float64,
    and bitwise the same on 1, 2 and 3 threads."""
    g = torch.Generator().manual_seed(14)
    x = channel_range(spatial, c, dtype, g)
    bn = make_bn(x, True, g)
    weight = random_buffer((k,), c, dtype, g)
    transition = op.startswith("transition")
    pooled = (spatial[0], *(size // 2 for size in spatial[1:])) if transition else spatial
    grad_out = channel_range(pooled, k, dtype, g)
    z = (x.double() * bn.scale.double() + bn.shift.double()).relu()
    if transition:
        z = torch.nn.functional.avg_pool2d(z.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    expected = grad_out.double().reshape(-1, k).t() @ z.reshape(-1, c)

    def grad_weight() -> Tensor:
        grad_x = random_buffer(spatial, c, dtype, torch.Generator().manual_seed(15))
        return getattr(torch.ops.densenet_fast, op)(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                                                    grad_x)[0]

    results = on_threads((1, 2, 3), grad_weight)
    assert_same_numbers(results[0], expected, TOLERANCE[dtype], "grad_weight")
    assert all(torch.equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("op", ["bn_relu_conv1x1_backward_sums", "transition_backward_sums"])
@pytest.mark.parametrize("batch, c, k", [(0, 5, 3), (2, 0, 3), (2, 5, 0)],
                         ids=["no_rows", "no_channels", "no_outputs"])
def test_backward_of_no_rows_channels_or_outputs(op, batch, c, k):
    """A zero weight gradient of the right shape (no channels used to divide by
    zero; a transition without outputs failed to view its pooled rows)."""
    spatial = (batch, 4, 4) if op.startswith("transition") else (batch * 7,)
    pooled = (batch, 2, 2) if op.startswith("transition") else spatial
    x, grad_x = torch.randn(*spatial, c), torch.randn(*spatial, c)
    coefficients = [torch.rand(c) + 0.5 for _ in range(4)]
    out = getattr(torch.ops.densenet_fast, op)(x, *coefficients, torch.randn(k, c), torch.randn(*pooled, k), grad_x)
    assert torch.equal(out[0], torch.zeros(k, c))


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


# -- CUDA kernels --------------------------------------------------------------------------

@pytest.fixture(params=[torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def cuda_dtype(request) -> torch.dtype:
    """The dtypes of the CUDA kernels (float16 on CUDA runs the torch backend)."""
    return request.param


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
def test_cuda_bn_relu_and_backward_match_cpu(cuda_dtype, m, c, batch_stats, left, nonfinite):
    """The CUDA backend's BN-ReLU ops against the cpp backend's (both tested
    against float64 in test_backends.py), grad_x in place of grad_z, NaN and
    Inf in the same places."""
    skip_without_cuda_kernels()
    from densenet_fast.backends.extension_backend import CudaBackend

    dtype = cuda_dtype
    cuda = CudaBackend()
    g = torch.Generator().manual_seed(7)
    x, x_gpu = cpu_and_cuda_range(m, c, left, dtype, g)
    bn = poisoned_bn(x, batch_stats, g) if nonfinite else make_bn(x, batch_stats, g)
    x_gpu.copy_(x)
    coefficients = [t.cuda() for t in (bn.scale, bn.shift, bn.mean, bn.rstd)]
    tol = TOLERANCE[dtype]
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
def test_cuda_bn_relu_backward_is_deterministic(cuda_dtype, left):
    """Per-block partial sums added in a fixed order, no atomics: bitwise the same
    on every call, and allowed under torch.use_deterministic_algorithms."""
    skip_without_cuda_kernels()
    from densenet_fast.backends.extension_backend import CudaBackend

    dtype = cuda_dtype
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


@pytest.mark.gpu
def test_cuda_ops_reject_float16():
    """The CUDA kernels lack float16 (the CPU ones take it): the ops say so."""
    skip_without_cuda_kernels()
    x = torch.randn(37, 5, device="cuda", dtype=torch.float16)
    scale = torch.ones(5, device="cuda")
    with pytest.raises(RuntimeError, match="unsupported dtype Half"):
        torch.ops.densenet_fast.bn_relu(x, scale, scale, torch.empty_like(x))


def test_float16_weight_gradient_where_a_tile_overflows():
    """dW of float16 data is summed in float over tiles of 1024 rows: a tile's
    float16 product of 1024 * 100 overflows (> 65504) while the sum of the two
    tiles is 0, as the torch backend's single product gives."""
    m, c, k = 2048, 5, 3
    x = torch.ones(m, c, dtype=torch.float16)
    ones, zeros = torch.ones(c), torch.zeros(c)
    grad_out = torch.full((m, k), 100.0, dtype=torch.float16)
    grad_out[m // 2:] = -100.0
    weight = torch.full((k, c), 0.5, dtype=torch.float16)
    grads = [backend.bn_relu_conv1x1_backward(x, ones, zeros, zeros, ones, weight, grad_out,
                                              torch.zeros(m, c, dtype=torch.float16), None)
             for backend in (CPP, TORCH)]
    assert torch.equal(grads[1][0], torch.zeros(k, c, dtype=torch.float16))
    assert torch.equal(grads[0][0], grads[1][0])


# -- shapes and values a mutation review found the other tests too kind to ----------------------

def assert_as_torch_backend(method: str, *args) -> None:
    """``CppBackend.<method>`` against ``TorchBackend.<method>`` on copies of
    ``args``: every tensor it returns or writes, NaN and Inf where torch's are."""
    results = [tensors_after(getattr(backend, method), args) for backend in (CPP, TORCH)]
    for i, (actual, expected) in enumerate(zip(*results)):
        assert_same_numbers(actual, expected, TOLERANCE[expected.dtype], f"{method}, tensor {i}")


def conv_case(m: int, c: int, k: int, seed: int, batch_stats: bool = True):
    """``(x (m, C) channel range, bn, weight (K, C), grad_out (m, K))`` in float32."""
    g = torch.Generator().manual_seed(seed)
    x = channel_range((m,), c, torch.float32, g)
    bn = make_bn(x, batch_stats, g)
    return x, bn, random_buffer((k,), c, torch.float32, g), channel_range((m,), k, torch.float32, g)


@pytest.mark.parametrize("m", [4357, 17415], ids=["chunks_of_several_256_row_tiles", "of_several_1024_row_tiles"])
def test_chunks_of_several_tiles(m):
    """Rows enough that a thread's chunk holds several tiles (more than 16 tiles):
    each tile's sums and moments start from zero (a chunk's second tile added to
    its first's: grad_beta 45 off, the output variance 13% off)."""
    x, bn, weight, grad_out = conv_case(m, 17, 23, seed=21)
    assert_as_torch_backend("bn_relu_conv1x1", x, bn.scale, bn.shift, weight, torch.empty(m, 23), True)
    assert_as_torch_backend("bn_relu_backward", x, bn.scale, bn.shift, bn.mean, bn.rstd, grad_out[:, :17].clone(),
                            torch.empty(m, 17), bn.batch_mean())


def test_an_infinite_output_keeps_an_infinite_mean():
    """An output row of +Inf (x = +Inf, positive weights) and no NaN: the output
    mean is +Inf, as torch's (a merge of the chunks' means as mean + delta * w
    gave NaN: the poisoned tests mix NaN into those columns)."""
    x, bn, weight, _ = conv_case(1031, 17, 23, seed=22, batch_stats=False)
    x[5] = float("inf")
    weight.abs_()
    stats = CPP.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, torch.empty(1031, 23), True)
    expected = TORCH.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, torch.empty(1031, 23), True)
    assert_same_numbers(stats[0], expected[0], TOLERANCE[torch.float32], "output mean")
    assert stats[0].isinf().all()


@pytest.mark.parametrize("spatial", [(5, 5, 4), (7, 9)], ids=["3d_odd_depth_and_height", "2d_odd"])
def test_transition_pixels_pooling_drops(spatial):
    """A transition whose pooling drops pixels along more than one side (3-D:
    depth and height odd, where the last plane's last rows were left unwritten),
    and a NaN at only a dropped pixel: its channel's grad_gamma is NaN, as
    torch's conv-then-pool makes it (poison() put a -Inf in the same channel)."""
    g = torch.Generator().manual_seed(23)
    x = channel_range((2, *spatial), 17, torch.float32, g)
    bn = make_bn(x, False, g)
    x[(-1,) * (len(spatial) + 1) + (4,)] = float("nan")
    weight = random_buffer((20,), 17, torch.float32, g)
    pooled = tuple(size // 2 for size in spatial)
    grad_out = channel_range((2, *pooled), 20, torch.float32, g)
    assert_as_torch_backend("transition", x, bn.scale, bn.shift, weight, torch.empty(2, *pooled, 20))
    grad_x = torch.full((2, *spatial, 17), float("nan"))
    assert_as_torch_backend("transition_backward", x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out,
                            grad_x, bn.batch_mean())


def test_channel_stats_do_not_depend_on_the_thread_count():
    """channel_stats, the one op test_results_do_not_depend_on_the_thread_count
    leaves out: chunks fixed by the rows, not by the threads (its float64 sums;
    the backend's float32 statistics round the difference away)."""
    x = channel_range((200_003,), 17, torch.float32, torch.Generator().manual_seed(24))
    shift = torch.zeros(17, dtype=torch.float64)
    first, second = on_threads((1, 2), lambda: torch.ops.densenet_fast.channel_stats(x, shift))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_products_are_redone_where_the_gemm_leaks_a_nan_row(dtype):
    """On any CPU: a stand-in for oneDNN's 16-bit gemm (``at::mm_out``, which the
    C++ kernels call) that makes the row before a NaN row NaN too, as torch
    2.14.1's does on CPUs with AMX or AVX512-FP16; the fused layer's output (a
    NaN pixel of x) and input gradient (a NaN pixel of grad_out) have NaN in
    that row only (this CPU's gemm does not leak, so no other test can fail here
    without the redo)."""
    def leaking_mm_out(a: Tensor, b: Tensor, *, out: Tensor) -> Tensor:
        out.copy_(torch.mm(a.float(), b.float()))  # (functional mm: not this override)
        if a.dtype in (torch.float16, torch.bfloat16):
            out[a.isnan().any(1).roll(-1)] = float("nan")
        return out

    g = torch.Generator().manual_seed(25)
    x = channel_range((64,), 17, dtype, g)
    bn = make_bn(x, False, g)
    x[5, 0] = float("nan")
    weight = random_buffer((23,), 17, dtype, g)
    grad_out = channel_range((64,), 23, dtype, g)
    library = torch.library.Library("aten", "IMPL")
    try:
        library.impl("mm.out", leaking_mm_out, "CPU")
        assert torch.mm(x.contiguous(), weight.t(), out=torch.empty(64, 23, dtype=dtype)).isnan().any(1) \
            .nonzero().flatten().tolist() == [4, 5]  # (the stand-in leaks)
        out = torch.empty(64, 23, dtype=dtype)
        CPP.bn_relu_conv1x1(x, bn.scale, bn.shift, weight, out, False)
        x[5, 0], grad_out[5, 0] = 1.0, float("nan")
        grad_x = torch.zeros(64, 17, dtype=dtype)
        CPP.bn_relu_conv1x1_backward(x, bn.scale, bn.shift, bn.mean, bn.rstd, weight, grad_out, grad_x, None)
    finally:
        library._destroy()
    assert out.isnan().any(1).nonzero().flatten().tolist() == [5]
    assert grad_x.isnan().any(1).nonzero().flatten().tolist() == [5]
