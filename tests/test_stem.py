"""The ImageNet stem's BN-ReLU-max-pool as one Function (densenet_fast/engine/stem.py)
against torch's three modules in float64: outputs, running statistics and
gradients at odd shapes in 1, 2 and 3 spatial dimensions, what it keeps for
backward, double backward, and where the model falls back to the modules."""

import copy

import pytest
import torch
import torch.nn as nn

import densenet_fast
import densenet_fast.monai
from densenet_fast.engine import stem
from densenet_fast.engine.fastpath import BATCH_NORMS

SHAPES = {1: (3, 5, 23), 2: (2, 5, 13, 10), 3: (2, 3, 7, 6, 9)}
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def modules(dims: int, channels: int, momentum=0.1, track_running_stats=True, eps=1e-5) -> nn.Sequential:
    """torch's BN-ReLU-max-pool as the stems have them, with random affine parameters."""
    g = torch.Generator().manual_seed(dims)
    bn = BATCH_NORMS[dims - 1](channels, eps=eps, momentum=momentum, track_running_stats=track_running_stats)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.weight[0] = -bn.weight[0]  # a negative scale: ReLU's mask then differs from x's sign
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.3)
    return nn.Sequential(bn, nn.ReLU(inplace=True), MAX_POOLS[dims - 1](kernel_size=3, stride=2, padding=1)).double()


def pooled_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:2], *((side - 1) // 2 + 1 for side in shape[2:]))  # 3x3 windows, stride 2, padding 1


def step(net: nn.Sequential, fused: bool, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, gradients and buffers after one forward and backward of ``net``
    (``fused``: through the Function) on a copy of ``x``."""
    inputs = x.clone().requires_grad_()
    out = stem.norm_relu_max_pool(net[0], inputs) if fused else net(inputs)
    net.zero_grad()
    out.backward(grad)
    return {"out": out, "grad_x": inputs.grad, "grad_weight": net[0].weight.grad, "grad_bias": net[0].bias.grad,
            **{name: b.clone() for name, b in net[0].named_buffers()}}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum, track, eps", [(0.1, True, 1e-5), (None, True, 1e-5), (0.1, False, 1e-5),
                                                  (0.1, "turned_off", 1e-5), (0.1, True, 0.5)],
                         ids=["momentum", "cumulative", "no_running_stats", "running_stats_not_tracked", "eps"])
def test_equals_torchs_modules_in_float64(dims, layout, momentum, track, eps):
    """``turned_off``: the BN has running statistics but ``track_running_stats``
    was set to False after construction; in training torch then neither uses nor
    updates them (in eval it uses them).  ``eps``: another BatchNorm eps."""
    if layout == "channels_last" and dims == 1:
        pytest.skip("no channels-last layout in 1-D")
    reference = modules(dims, SHAPES[dims][1], momentum, track is not False, eps)
    reference[0].track_running_stats = track is True
    fused = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two steps: the running statistics' second update (cumulative: factor 1/2)
        x = torch.randn(SHAPES[dims], dtype=torch.float64, generator=g) * 2 + 0.5
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
        grad = torch.randn(pooled_shape(x.shape), dtype=torch.float64, generator=g)
        expected, actual = step(reference, False, x, grad), step(fused, True, x, grad)
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    assert actual["grad_x"].stride() == expected["grad_x"].stride()


def test_nan_and_ties_as_torch():
    """A NaN makes its channel NaN, forward and backward (the parameters'
    gradients too), as with torch's modules; equal values tie as torch's
    max-pool breaks ties."""
    reference = modules(2, 3)
    fused = copy.deepcopy(reference)
    x = torch.randn(4, 3, 9, 8, dtype=torch.float64)
    x[1, 2, 4, 4] = float("nan")
    x[2, 1, :4, :4] = 0.25  # a plateau
    grad = torch.randn(pooled_shape(x.shape), dtype=torch.float64)
    expected, actual = step(reference, False, x, grad), step(fused, True, x, grad)
    for name in ("out", "grad_x", "grad_weight", "grad_bias"):
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)


def test_keeps_the_input_and_indices_not_the_activation():
    """Saved for backward: x, the (C,) parameters and statistics, the int64
    indices and a bool mask, against torch's modules' x, activation and indices."""
    x = torch.randn(2, 4, 33, 31, dtype=torch.float64, requires_grad=True)

    def saved_bytes(call) -> int:
        sizes = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            call()
        return sum(sizes.values()) - x.untyped_storage().nbytes()  # x is the caller's either way

    reference = modules(2, 4)
    pooled = 2 * 4 * 17 * 16
    assert saved_bytes(lambda: reference(x)) >= x.numel() * 8 + pooled * 8  # the activation and the indices
    fused = saved_bytes(lambda: stem.norm_relu_max_pool(modules(2, 4)[0], x))
    assert fused <= pooled * (8 + 1) + 4 * 4 * 8


def test_double_backward():
    bn = modules(2, 3)[0]
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)

    def function(x, weight, bias):
        return stem.NormReluMaxPool.apply(x, weight, bias, None, None, 0.0, bn.eps)

    assert torch.autograd.gradgradcheck(function, (x, bn.weight, bn.bias), fast_mode=True)


def test_batch_of_one_value_per_channel_is_refused_as_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        stem.norm_relu_max_pool(modules(2, 3)[0], torch.randn(1, 3, 1, 1, dtype=torch.float64))


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_a_model_runs_the_stem_fused_in_training_only(spatial_dims, monkeypatch):
    calls = []
    model = densenet_fast.monai.DenseNet(spatial_dims, 1, 2, init_features=4, growth_rate=2, block_config=(1, 1),
                                         bn_size=2)
    x = torch.randn(2, 1, *(17,) * spatial_dims)
    original = stem.NormReluMaxPool.apply
    monkeypatch.setattr(stem.NormReluMaxPool, "apply", lambda *a: calls.append(1) or original(*a))
    model(x).sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        model(x)
    model.eval()
    model(x).sum().backward()
    assert len(calls) == 1


def test_a_hooked_stem_runs_the_modules_and_the_budget_refuses_it():
    model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    seen = []
    model.features.relu0.register_forward_hook(lambda *_: seen.append(1))
    with pytest.warns(RuntimeWarning, match="_Features runs the stem's BN, ReLU and max-pool as modules because of "
                                            "a hook on ReLU; what their fused pass saves is lost \\(the rest "
                                            "stays fused\\)"):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == [1]
    assert "hook on ReLU" in model.memory_model_blocker()
    with pytest.raises(ValueError, match="hook on ReLU"):
        model.set_memory_budget("1GiB")


def test_an_input_the_modules_refuse_runs_the_modules():
    """An unbatched image reaches norm0 as (C, H, W) (conv0 takes it): BatchNorm2d's
    own error, not the Function on a misread shape."""
    model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    with pytest.raises(ValueError, match="expected 4D input"):
        model.features(torch.randn(3, 32, 32))


@pytest.mark.parametrize("mean, std", [(6, 1), (100, 4)])
@pytest.mark.parametrize("dims", [1, 3])
def test_bfloat16_gradient_as_accurate_as_torchs(dims, mean, std):
    """bfloat16 input, float32 parameters (autocast's BN): the input gradient's
    error against float64 is no worse than torch's modules', where the input's
    mean is six standard deviations (``x b`` and ``mean b`` cancel in ``dx``),
    and 25 (at 100, the mean rounded to bfloat16 before ``x - mean`` would be
    up to 0.25 off: a sixteenth of a standard deviation)."""
    reference = modules(dims, SHAPES[dims][1]).float()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(SHAPES[dims], generator=g) * std + mean).bfloat16()
    grad = torch.randn(pooled_shape(x.shape), generator=g).bfloat16()
    exact = step(copy.deepcopy(reference).double(), False, x.double(), grad.double())["grad_x"]
    errors = {}
    for fused in (False, True):
        result = step(copy.deepcopy(reference), fused, x, grad)["grad_x"]
        assert result.dtype == torch.bfloat16
        errors[fused] = ((result.double() - exact).norm() / exact.norm()).item()
    assert errors[True] <= 1.1 * errors[False], errors  # rounded apart: 1.5x-1.8x here


def test_compiles_whole():
    """torch.compile (fullgraph, aot_eager) of the stem: the forward and the fused backward as eager."""
    reference = modules(2, 4)
    compiled_net = copy.deepcopy(reference)
    compiled = torch.compile(lambda t: stem.norm_relu_max_pool(compiled_net[0], t), backend="aot_eager",
                             fullgraph=True)
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    grad = torch.randn(pooled_shape(x.shape), dtype=torch.float64)
    expected = step(reference, True, x, grad)
    inputs = x.clone().requires_grad_()
    compiled(inputs).backward(grad)
    torch.testing.assert_close(inputs.grad, expected["grad_x"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled_net[0].weight.grad, expected["grad_weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled_net[0].running_var, expected["running_var"], rtol=1e-12, atol=1e-12)
