"""Comparison helpers shared by the model and engine tests.

The reference is torchvision's naive DenseNet loaded with the same weights
(:func:`torchvision_twin`).  How results are judged (docs/engine.md, "Judging fp32 gradients"):
float64 runs must agree to ~1e-8 on every tensor; fp32 outputs and running
statistics agree tightly, while fp32 gradients are judged by their global
relative error against a float64 reference, next to torchvision fp32's own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from densenet_fast import DenseNet

if TYPE_CHECKING:
    import torchvision

FLOAT64_RTOL = 1e-8
FP32_RTOL = 1e-4
STEM_NAMES = ("conv0", "norm0", "relu0", "pool0")


@pytest.fixture
def one_thread():
    """Tests on tiny tensors run on one CPU thread: with several, thread start-up
    and contention with other processes dominate their run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_twin(model: DenseNet) -> torchvision.models.DenseNet:
    """torchvision's naive DenseNet with ``model``'s architecture, weights,
    buffers, dtype, device and train/eval mode.  A CIFAR stem (one 3x3 conv)
    replaces torchvision's ImageNet stem, so that the module trees match."""
    import torchvision  # only here: tests that need no twin run without torchvision

    blocks = model.blocks()
    first = blocks[0].denselayer1
    growth_rate = first.conv2.out_channels
    num_init_features = model.features.conv0.out_channels
    tv = torchvision.models.DenseNet(
        growth_rate=growth_rate, block_config=tuple(len(b) for b in blocks), num_init_features=num_init_features,
        bn_size=first.conv1.out_channels // growth_rate, drop_rate=first.drop_rate,
        num_classes=model.classifier.out_features)
    if model.stem == "cifar":
        conv0 = nn.Conv2d(model.in_channels, num_init_features, kernel_size=3, padding=1, bias=False)
        rest = [(name, m) for name, m in tv.features.named_children() if name not in STEM_NAMES]
        tv.features = nn.Sequential(OrderedDict([("conv0", conv0)] + rest))
    elif model.in_channels != 3:
        tv.features.conv0 = nn.Conv2d(model.in_channels, num_init_features, kernel_size=7, stride=2, padding=3,
                                      bias=False)
    weight = model.features.conv0.weight
    tv.to(device=weight.device, dtype=weight.dtype)
    tv.load_state_dict(model.state_dict(), strict=True)
    return tv.train(model.training)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial affine parameters and running statistics, so
    that eval mode and the gamma/beta paths are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for tensor, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.3, 0.3),
                                          (m.running_var, 0.5, 2.0)):
                    values = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * (high - low) + low
                    tensor.copy_(values)


def make_model(dtype: torch.dtype = torch.float64, device="cpu", seed: int = 0, **config) -> DenseNet:
    """``DenseNet(**config)`` with randomised BN parameters and statistics, in training mode."""
    torch.manual_seed(seed)
    ours = DenseNet(**config)
    randomize_batchnorm(ours, seed)
    return ours.to(device=device, dtype=dtype)


def make_pair(dtype: torch.dtype = torch.float64, device="cpu", seed: int = 0, **config
              ) -> tuple[DenseNet, torchvision.models.DenseNet]:
    """``(ours, torchvision twin)``: :func:`make_model` and its twin."""
    ours = make_model(dtype, device, seed, **config)
    return ours, torchvision_twin(ours)


def random_batch(model: nn.Module, batch: int, height: int, width: int, seed: int, dtype=None
                 ) -> tuple[Tensor, Tensor]:
    """A fresh random input ``(N, C, H, W)`` and class labels ``(N,)`` for ``model``."""
    generator = torch.Generator().manual_seed(seed)
    weight = next(model.parameters())
    in_channels = model.features.conv0.in_channels
    x = torch.randn(batch, in_channels, height, width, generator=generator, dtype=torch.float64)
    classifier = model.classifier if isinstance(model.classifier, nn.Linear) else model.classifier[-1]
    target = torch.randint(classifier.out_features, (batch,), generator=generator)
    return x.to(device=weight.device, dtype=dtype or weight.dtype), target.to(weight.device)


@dataclass
class StepResult:
    """What one forward/backward of a model produced."""

    output: Tensor
    input_grad: Tensor
    grads: dict[str, Tensor]
    buffers: dict[str, Tensor]


def forward_backward(model: nn.Module, x: Tensor, target: Tensor) -> StepResult:
    """Cross-entropy forward and backward from ``x`` (as a new leaf with the same
    strides); gradients are reset first."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    output = model(x)
    F.cross_entropy(output.float() if output.dtype == torch.bfloat16 else output, target).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return StepResult(output.detach().clone(), x.grad.detach().clone(), grads, buffers(model))


def buffers(model: nn.Module) -> dict[str, Tensor]:
    """Every buffer (running statistics, num_batches_tracked), cloned."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (absolute if ``expected`` is 0)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_all_close(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float, what: str,
                     atol: float = 0.0) -> None:
    """Every tensor of ``actual`` within ``rtol`` (max-relative) of ``expected``'s,
    or within ``atol`` absolute (for tensors that are zero in exact arithmetic,
    where rounding noise is all there is)."""
    assert actual.keys() == expected.keys(), f"{what}: different names"
    for name in expected:
        assert actual[name].shape == expected[name].shape, f"{what} {name}: shape differs"
    errors = {name: max_relative_error(actual[name], expected[name]) for name in expected
              if not (actual[name].double() - expected[name].double()).abs().max() <= atol}
    bad = sorted(((e, n) for n, e in errors.items() if not e <= rtol), reverse=True)
    assert not bad, f"{what}: {len(bad)} of {len(errors)} tensors off by more than {rtol:g}, worst: {bad[:5]}"


def assert_results_equal(actual: StepResult, expected: StepResult, rtol: float, with_buffers: bool = True,
                         atol: float = 0.0) -> None:
    """Output, input gradient, every parameter gradient and (``with_buffers``)
    every buffer within ``rtol`` (parameter gradients: or ``atol``).  Two steps
    of one model differ in their buffers: running statistics move on each
    training forward."""
    assert_all_close({"output": actual.output, "input_grad": actual.input_grad},
                     {"output": expected.output, "input_grad": expected.input_grad}, rtol, "output")
    assert_all_close(actual.grads, expected.grads, rtol, "parameter gradients", atol)
    if with_buffers:
        assert_all_close(actual.buffers, expected.buffers, rtol, "buffers")


def global_relative_error(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """``||actual - expected|| / ||expected||`` over all tensors together (float64)."""
    num = sum(((actual[k].double().cpu() - expected[k].double().cpu()) ** 2).sum().item() for k in expected)
    den = sum((expected[k].double().cpu() ** 2).sum().item() for k in expected)
    return (num / den) ** 0.5


def gradient_errors(result: StepResult, reference: StepResult) -> tuple[float, float]:
    """Global relative errors of ``(parameter gradients, input gradient)`` against ``reference``."""
    return (global_relative_error(result.grads, reference.grads),
            global_relative_error({"x": result.input_grad}, {"x": reference.input_grad}))


def assert_gradients_as_good_as_torchvision(ours: list[tuple[float, float]], torchvision: list[tuple[float, float]],
                                            factor: float = 10.0, floor: float = 1e-6,
                                            outlier_bound: float = 5e-2) -> None:
    """Over several steps, given each step's :func:`gradient_errors`
    of our fp32 run and torchvision's against float64: ours at most ``factor``
    times torchvision's own (the larger of its NCHW and channels-last runs) plus
    ``floor``.

    One step may exceed that (but not ``outlier_bound``): a ReLU input within
    fp32 rounding of zero can take the other side in our summation order than
    in the float64 run, whose summation order torchvision fp32 shares; at tiny
    test sizes (a few pixels per channel in the last block) that one flipped
    mask moves the gradients by up to ~2%.  Errors of the code itself show in
    every step."""
    outliers = {}
    for step, (ours_errors, tv_errors) in enumerate(zip(ours, torchvision)):
        for what, ours_error, tv_error in zip(("parameter gradients", "input gradient"), ours_errors, tv_errors):
            message = f"step {step}, fp32 {what}: global relative error {ours_error:.3g} vs float64, " \
                      f"torchvision fp32's own {tv_error:.3g}"
            assert ours_error <= outlier_bound, message
            if ours_error > factor * tv_error + floor:
                outliers.setdefault(step, []).append(message)
    assert len(outliers) <= 1, outliers


def copy_parameters(source: nn.Module, *targets: nn.Module) -> None:
    """Copy ``source``'s parameters (not buffers) into ``targets`` (cast to their dtype)."""
    params = dict(source.named_parameters())
    with torch.no_grad():
        for target in targets:
            for name, p in target.named_parameters():
                p.copy_(params[name])


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def check_training_float64(ours: DenseNet, tv: nn.Module, shape: tuple[int, int, int], steps: int) -> None:
    """``steps`` SGD steps on both float64 models, each on a fresh batch of
    ``shape (N, H, W)``: every output, gradient, buffer and updated parameter
    equal to ``FLOAT64_RTOL``."""
    optimizers = sgd(ours), sgd(tv)
    for step in range(steps):
        x, target = random_batch(ours, *shape, seed=step)
        expected = forward_backward(tv, x, target)
        assert_results_equal(forward_backward(ours, x, target), expected, FLOAT64_RTOL)
        for optimizer in optimizers:
            optimizer.step()
    assert_all_close(dict(ours.named_parameters()), dict(tv.named_parameters()), FLOAT64_RTOL, "parameters")


def check_eval_float64(ours: DenseNet, tv: nn.Module, shape: tuple[int, int, int]) -> None:
    """Both models in eval mode (running statistics, no dropout): output, input
    gradient and every parameter gradient equal to ``FLOAT64_RTOL``."""
    ours.eval(), tv.eval()
    x, target = random_batch(ours, *shape, seed=50)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(tv, x, target), FLOAT64_RTOL)


def check_training_fp32(ours: DenseNet, shape: tuple[int, int, int], steps: int) -> None:
    """In fp32: ``steps`` SGD steps of ``ours``; before each, the
    same parameters are copied into a torchvision fp32 twin and a float64 one.
    Outputs and running statistics (which evolve on their own in both fp32
    models) agree to ``FP32_RTOL``; gradients are judged against float64."""
    tv = torchvision_twin(ours)
    tv_channels_last = torchvision_twin(ours).to(memory_format=torch.channels_last)
    reference = torchvision_twin(ours).double()
    optimizer = sgd(ours)
    ours_errors, tv_errors = [], []
    for step in range(steps):
        x, target = random_batch(ours, *shape, seed=100 + step)
        result = forward_backward(ours, x, target)
        tv_result = forward_backward(tv, x, target)
        tv_cl_result = forward_backward(tv_channels_last, x.contiguous(memory_format=torch.channels_last), target)
        reference_result = forward_backward(reference, x.double(), target)
        assert_all_close({"output": result.output}, {"output": tv_result.output}, FP32_RTOL, "fp32 output")
        assert_all_close(result.buffers, tv_result.buffers, FP32_RTOL, "fp32 running statistics")
        ours_errors.append(gradient_errors(result, reference_result))
        # torchvision fp32's own error depends on its summation order (NCHW shares
        # the float64 run's); the channels-last run is an equally valid fp32 order.
        tv_errors.append(tuple(map(max, gradient_errors(tv_result, reference_result),
                                   gradient_errors(tv_cl_result, reference_result))))
        optimizer.step()
        copy_parameters(ours, tv, tv_channels_last, reference)
    assert_gradients_as_good_as_torchvision(ours_errors, tv_errors)


class OpRecorder(TorchDispatchMode):
    """Records ``(op name, output shape)`` of every aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out


class NewStorages(TorchDispatchMode):
    """The most bytes alive at once (``peak``) in storages the ops run inside it
    made: an op's output whose storage is none of its inputs', counted until
    the storage is freed (``live``: data pointer -> (weak reference, bytes))."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.live = {key: (ref, n) for key, (ref, n) in self.live.items() if not ref.expired()}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out

    def alive(self) -> int:
        """Bytes of the storages made inside it that are alive now."""
        return sum(n for ref, n in self.live.values() if not ref.expired())
