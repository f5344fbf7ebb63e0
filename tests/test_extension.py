"""The csrc extension: torch.ops.densenet_fast.channel_stats against plain PyTorch
in float64 (NaN and Inf included; on CUDA also deterministic), its errors and
Meta kernel, CppBackend.channel_stats against the torch backend, and the import
fallback when the extension is missing."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from densenet_fast import _extension

if _extension.load() is None:
    pytest.fail(f"the C++ extension is not built: {_extension.load_error()} (run `make build`)",
                pytrace=False)

from densenet_fast.backends.extension_backend import CppBackend  # noqa: E402
from densenet_fast.backends.torch_backend import TorchBackend  # noqa: E402

channel_stats = torch.ops.densenet_fast.channel_stats


@pytest.fixture
def ext_device(device):
    """``device``, skipping CUDA when the extension was built without its CUDA kernels."""
    if device == "cuda" and not _extension.has_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    return device


def channel_slice(rows, channels, dtype, device, extra_left=0, extra_right=0, offset=0.0):
    """A (rows, channels) channel range of a wider row-major (rows, C_total) buffer."""
    total = extra_left + channels + extra_right
    buffer = (torch.randn(rows, total, dtype=torch.float64) + offset).to(dtype=dtype, device=device)
    return buffer[:, extra_left:extra_left + channels]


def reference_sums(x, shift):
    d = x.double() - shift
    return d.sum(0), (d * d).sum(0)


@pytest.mark.parametrize("rows", [0, 1, 7, 1031])
@pytest.mark.parametrize("channels", [1, 3, 17])
# "aligned": channel 8 of 32 (17 channels) or 16 (1 channel) per row: 16-byte aligned rows, the CUDA
# kernel's vector loads (with a tail of channels); the other layouts take its one-channel-per-lane path.
@pytest.mark.parametrize("extra", [(0, 0), (2, 5), (8, 7)], ids=["contiguous", "slice", "aligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_channel_stats_matches_float64_reference(rows, channels, extra, dtype, ext_device):
    x = channel_slice(rows, channels, dtype, ext_device, *extra)
    shift = torch.randn(channels, dtype=torch.float64, device=ext_device)
    total, total_sq = channel_stats(x, shift)
    expected, expected_sq = reference_sums(x, shift)
    assert total.dtype == total_sq.dtype == torch.float64 and total.shape == (channels,)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(total_sq, expected_sq, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("extra_left", [19, 16], ids=["unaligned", "aligned"])
def test_channel_stats_of_a_large_strided_buffer(ext_device, extra_left):
    """Many rows (several CPU chunks / CUDA row blocks) and channels beyond one CUDA block."""
    x = channel_slice(70_001, 45, torch.float32, ext_device, extra_left=extra_left, extra_right=3)
    shift = x[0].double()
    for got, expected in zip(channel_stats(x, shift), reference_sums(x, shift)):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,channels", [(1, 1), (7, 3), (5003, 17)])
def test_cpp_backend_channel_stats_matches_var_mean(rows, channels, dtype, ext_device):
    x = channel_slice(rows, channels, dtype, ext_device, extra_left=3, extra_right=1)
    mean, var = CppBackend().channel_stats(x)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=0, correction=0)
    assert mean.dtype == var.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean.double(), expected_mean, **tol)
    torch.testing.assert_close(var.double(), expected_var, **tol)


def test_cpp_backend_variance_survives_a_large_mean(ext_device):
    """Values 1e4 + N(0, 1) in fp32: the unshifted E[x^2] - E[x]^2 would lose the variance."""
    x = channel_slice(20_000, 17, torch.float32, ext_device, extra_left=4, extra_right=4, offset=1e4)
    mean, var = CppBackend().channel_stats(x)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=0, correction=0)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-7, atol=0)


def put_nan_and_inf(x):
    """NaN, +Inf and -Inf in channels 0-3 of ``x`` (in place), +Inf in the first
    row (the shift channel_stats sums from), +Inf and -Inf together in channel 3."""
    for row, channel, value in [(0, 0, math.inf), (7, 1, math.nan), (9, 2, -math.inf), (3, 3, math.inf),
                                (5, 3, -math.inf)]:
        x[row, channel] = value


@pytest.mark.parametrize("extra", [(2, 5), (8, 7)], ids=["slice", "aligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_stats_propagate_nan_and_inf(ext_device, extra, dtype):
    x = channel_slice(1031, 17, dtype, ext_device, *extra)
    put_nan_and_inf(x)
    shift = torch.randn(17, dtype=torch.float64, device=ext_device)
    for got, expected in zip(channel_stats(x, shift), reference_sums(x, shift)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_backend_channel_stats_nan_and_inf_as_torch(ext_device, dtype):
    """Mean +-Inf or NaN and variance NaN exactly where the torch backend's are,
    a non-finite value in the first row included."""
    x = channel_slice(1031, 17, dtype, ext_device, extra_left=3, extra_right=1)
    put_nan_and_inf(x)
    for got, expected in zip(CppBackend().channel_stats(x), TorchBackend().channel_stats(x)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_stats_on_cuda_are_deterministic(dtype):
    """Per-block partials added in a fixed order, no atomics: bitwise the same on
    every call, and allowed under torch.use_deterministic_algorithms."""
    if not torch.cuda.is_available() or not _extension.has_cuda():
        pytest.skip("needs a CUDA device and the extension's CUDA kernels")
    x = channel_slice(300_001, 45, dtype, "cuda", extra_left=16, extra_right=3)
    shift = x[0].double()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = channel_stats(x, shift)
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(channel_stats(x, shift), first))
    finally:
        torch.use_deterministic_algorithms(deterministic)


def test_channel_stats_meta_kernel_gives_shapes_only():
    x = torch.empty(1000, 40, device="meta")[:, 3:20]
    total, total_sq = channel_stats(x, torch.empty(17, dtype=torch.float64, device="meta"))
    for out in (total, total_sq):
        assert out.device.type == "meta" and out.shape == (17,) and out.dtype == torch.float64
    with pytest.raises(RuntimeError, match="channel stride 1"):
        channel_stats(torch.empty(17, 1000, device="meta").t(), torch.empty(17, dtype=torch.float64, device="meta"))


def test_channel_stats_passes_opcheck():
    """Schema, Meta/fake kernel and dispatch agree (as torch.compile needs them to)."""
    x = channel_slice(33, 5, torch.float32, "cpu", extra_left=1, extra_right=2)
    torch.library.opcheck(channel_stats, (x, x[0].double()))


@pytest.mark.parametrize("x,shift,message", [
    (torch.zeros(4, 3, 2), torch.zeros(3, dtype=torch.float64), "must be 2-D"),
    (torch.zeros(3, 4).t(), torch.zeros(3, dtype=torch.float64), "channel stride 1"),
    (torch.zeros(4, 6)[:, ::2], torch.zeros(3, dtype=torch.float64), "channel stride 1"),
    (torch.zeros(4, 3).as_strided((4, 3), (2, 1)), torch.zeros(3, dtype=torch.float64), "must not overlap"),
    (torch.zeros(4, 3, dtype=torch.int32), torch.zeros(3, dtype=torch.float64), "unsupported dtype"),
    (torch.zeros(4, 3), torch.zeros(4, dtype=torch.float64), r"shift must be a \(3,\) float64"),
    (torch.zeros(4, 3), torch.zeros(3), r"shift must be a \(3,\) float64"),
    (torch.zeros(4, 3), torch.zeros(1, 3, dtype=torch.float64), r"shift must be a \(3,\) float64"),
    (torch.zeros(4, 3), torch.zeros(3, dtype=torch.float64, device="meta"), "but shift is on meta"),
])
def test_channel_stats_rejects_bad_arguments(x, shift, message):
    with pytest.raises(RuntimeError, match=message):
        channel_stats(x, shift)


def test_has_cuda_is_a_bool():
    assert isinstance(_extension.load().has_cuda(), bool)


def test_import_without_extension_falls_back_to_torch_once():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["densenet_fast._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import densenet_fast
            backends = densenet_fast.available_backends()
            import torch
            model = densenet_fast.densenet_bc(depth=10, growth_rate=4, num_classes=3).eval()
            assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
        messages = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
        assert len(messages) == 1, messages
        assert "cpp" not in backends and "torch" in backends, backends
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
