"""The DenseNet family with torchvision's module tree and ``state_dict``.

Every model here has exactly the parameter and buffer names of
``torchvision.models.DenseNet`` (``features.conv0``, ``features.denseblock1.
denselayer1.norm1``, ..., ``classifier``), so torchvision weights load with
``strict=True``.  The forward pass does not run the modules one by one: each
dense block, together with the transition or the head that follows it, runs as
one memory-efficient autograd Function (:mod:`densenet_fast.autograd`) that
reads the modules' parameters and updates their running statistics.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import autograd as engine
from .backends import resolve_backend_name

__all__ = [
    "DenseNet",
    "densenet121",
    "densenet169",
    "densenet201",
    "densenet161",
    "densenet264",
    "densenet_bc",
    "from_torchvision",
    "load_torchvision_weights",
]

RECOMPUTE_POLICIES = ("keep", "recompute")
STEMS = ("imagenet", "cifar")


class _DenseLayer(nn.Module):
    """Parameters of one bottleneck layer (BN-ReLU-Conv1x1-BN-ReLU-Conv3x3).

    Its input has ``num_input_features`` channels, its output ``growth_rate``.
    The computation lives in the block Function; ``forward`` is torchvision's
    naive layer, kept for users who call a layer on its own.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, input: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        features = torch.cat(list(input), 1) if not isinstance(input, Tensor) else input
        out = self.conv1(self.relu1(self.norm1(features)))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; forward returns the concatenated features
    ``(N, num_input_features + num_layers * growth_rate, H, W)`` (channels-last)."""

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)
        self.backend: Optional[str] = None
        self.recompute = "keep"
        self.arena = None
        self.sync_group = None

    def forward(self, init_features: Tensor) -> Tensor:
        return engine.run_stage(self, None, init_features, self.backend, self.recompute, self.arena)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 between two dense blocks."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al., CVPR 2017), a drop-in for ``torchvision.models.DenseNet``.

    Args (torchvision's, same meaning and defaults):
        growth_rate: channels each layer adds (``k``).
        block_config: number of layers in each dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck width as a multiple of ``growth_rate``.
        drop_rate: dropout probability after each dense layer.
        num_classes: outputs of the classifier.
        memory_efficient: accepted for compatibility; every block here is
            memory-efficient. ``True`` selects ``recompute="recompute"``.
    Extra (keyword-only):
        in_channels: channels of the input images (3).
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or
            ``"cifar"`` (one 3x3 conv, as in the paper's CIFAR models).
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``; ``None``
            chooses per device (and obeys ``DENSENET_FAST_BACKEND``).
        recompute: ``"keep"`` stores each bottleneck output for backward
            (faster); ``"recompute"`` recomputes it (leanest).
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0,
        num_classes: int = 1000,
        memory_efficient: bool = False,
        *,
        in_channels: int = 3,
        stem: str = "imagenet",
        backend: Optional[str] = None,
        recompute: Optional[str] = None,
    ) -> None:
        super().__init__()
        block_config = tuple(block_config)
        _check_positive_int("growth_rate", growth_rate)
        _check_positive_int("num_init_features", num_init_features)
        _check_positive_int("bn_size", bn_size)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if not block_config:
            raise ValueError("block_config must name at least one dense block")
        for n in block_config:
            _check_positive_int("every entry of block_config", n)
        if not 0 <= float(drop_rate) < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if recompute is None:
            recompute = "recompute" if memory_efficient else "keep"
        if recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")
        self.in_channels = in_channels
        self.stem = stem
        self.num_transitions = len(block_config) - 1

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(layers))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), _Transition(num_features, num_features // 2))
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

        self.arena = engine.ScratchArena()
        self.set_backend(backend)
        self.set_recompute(recompute)

    # -- configuration -----------------------------------------------------------------
    def blocks(self) -> list[_DenseBlock]:
        return [m for m in self.features.children() if isinstance(m, _DenseBlock)]

    def set_backend(self, backend: Optional[str]) -> None:
        """Choose the primitive backend (``None``: automatic per device)."""
        self.backend = resolve_backend_name(backend)
        for block in self.blocks():
            block.backend, block.arena = self.backend, self.arena

    def set_recompute(self, recompute: str) -> None:
        """``"keep"`` (store bottleneck outputs) or ``"recompute"`` (leanest)."""
        if recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {recompute!r}")
        self.recompute = recompute
        for block in self.blocks():
            block.recompute = recompute

    def set_sync_group(self, group) -> None:
        """Synchronise batch statistics over the processes of ``group`` (a
        ``torch.distributed`` process group; ``None`` turns it off): one small
        all-gather of per-channel statistics per BN forward and one all-reduce
        of the BN gradient sums per BN backward, inside the block Functions."""
        if group is not None and self.stem == "imagenet":
            raise NotImplementedError("synchronised BN covers the dense blocks, transitions and head; the "
                                      "ImageNet stem's norm0 is not synchronised, so only stem='cifar' supports it")
        for block in self.blocks():
            block.sync_group = group

    # -- shapes ------------------------------------------------------------------------
    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the last dense block for an ``height x width``
        input; a value below 1 means the image is too small."""
        def shrink(n: int) -> int:
            if self.stem == "imagenet":
                n = (n - 1) // 2 + 1  # conv0: 7x7, stride 2, padding 3
                n = (n - 1) // 2 + 1  # pool0: 3x3, stride 2, padding 1
            for _ in range(self.num_transitions):
                n //= 2  # 2x2 average pooling
            return n

        return shrink(height), shrink(width)

    def min_input_size(self) -> int:
        """Smallest height (and width) this network accepts."""
        n = 1
        while self.feature_size(n, n)[0] < 1:
            n += 1
        return n

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for input this network cannot take."""
        if not isinstance(x, Tensor):
            raise TypeError(f"DenseNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"DenseNet expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"DenseNet expects a floating-point input, got dtype {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"DenseNet was built for {self.in_channels} input channels, got {x.shape[1]} (input shape "
                f"{tuple(x.shape)}); pass in_channels={x.shape[1]} to the constructor for such images")
        weight = self.features.conv0.weight
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input dtype {x.dtype} differs from the model's {weight.dtype}; "
                            f"convert one of them or use torch.autocast")
        h, w = self.feature_size(x.shape[2], x.shape[3])
        if h < 1 or w < 1:
            m = self.min_input_size()
            raise ValueError(
                f"input images of {x.shape[2]}x{x.shape[3]} are too small for this DenseNet "
                f"({self.num_transitions} transitions, {self.stem} stem): it needs at least {m}x{m}")
        if self.training and x.shape[0] * h * w == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training: a batch of {x.shape[0]} image(s) of "
                f"{x.shape[2]}x{x.shape[3]} leaves {h}x{w} pixels per channel in the last block; use a larger "
                f"batch or larger images, or call model.eval()")

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        modules = list(self.features.children())
        first_block = next(i for i, m in enumerate(modules) if isinstance(m, _DenseBlock))
        for stem_module in modules[:first_block]:
            x = stem_module(x)
        rest = modules[first_block:]
        for i in range(0, len(rest) - 1, 2):  # (block, transition) ... (block, norm5)
            x = engine.run_stage(rest[i], rest[i + 1], x, self.backend, self.recompute, self.arena)
        return self.classifier(x)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# -- constructors --------------------------------------------------------------------------
def _densenet(growth_rate: int, block_config, num_init_features: int, weights, **kwargs) -> DenseNet:
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        load_torchvision_weights(model, weights)
    return model


def densenet121(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16); ``weights``: a local torchvision
    weights file or state_dict."""
    return _densenet(32, (6, 12, 24, 16), 64, weights, **kwargs)


def densenet169(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _densenet(32, (6, 12, 32, 32), 64, weights, **kwargs)


def densenet201(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _densenet(32, (6, 12, 48, 32), 64, weights, **kwargs)


def densenet161(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels)."""
    return _densenet(48, (6, 12, 36, 24), 96, weights, **kwargs)


def densenet264(*, weights=None, **kwargs) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48)."""
    return _densenet(32, (6, 12, 64, 48), 64, weights, **kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, **kwargs) -> DenseNet:
    """The paper's CIFAR DenseNet-BC of ``depth`` layers: 3 blocks of ``(depth - 4) / 6``
    bottleneck layers, a 3x3 stem with ``2 * growth_rate`` channels, compression 0.5."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (10, 16, 22, 40, 100, ...), got {depth!r}")
    n = (depth - 4) // 6
    kwargs.setdefault("stem", "cifar")
    return DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes, **kwargs)


# -- torchvision interoperability ----------------------------------------------------------
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_torchvision_weights(model: DenseNet, weights) -> DenseNet:
    """Load torchvision DenseNet weights: a local file path or a ``state_dict``.

    Accepts the old ``norm.1``-style keys of torchvision's published files.
    Never downloads anything.
    """
    state_dict = torch.load(weights, map_location="cpu", weights_only=True) if not isinstance(weights, dict) else weights
    state_dict = {(_OLD_KEY.sub(r"\1\2", k)): v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


def from_torchvision(tv_model: nn.Module, **kwargs) -> DenseNet:
    """A densenet_fast copy of a torchvision ``DenseNet`` (same weights, buffers,
    device, dtype and train/eval mode). ``kwargs``: ``backend``, ``recompute``."""
    features = getattr(tv_model, "features", None)
    blocks = [m for name, m in features.named_children() if name.startswith("denseblock")] \
        if isinstance(features, nn.Module) else []
    if not blocks:
        raise TypeError(f"{type(tv_model).__name__} has no dense blocks; expected a torchvision DenseNet")
    conv0 = features.conv0
    first_layer = blocks[0].denselayer1
    growth_rate = first_layer.conv2.out_channels
    model = DenseNet(
        growth_rate=growth_rate,
        block_config=tuple(len(b) for b in blocks),
        num_init_features=conv0.out_channels,
        bn_size=first_layer.conv1.out_channels // growth_rate,
        drop_rate=float(getattr(first_layer, "drop_rate", 0.0)),
        num_classes=tv_model.classifier.out_features,
        in_channels=conv0.in_channels,
        stem="imagenet" if hasattr(features, "norm0") else "cifar",
        **kwargs,
    )
    model.load_state_dict(tv_model.state_dict(), strict=True)
    return model.to(device=conv0.weight.device, dtype=conv0.weight.dtype).train(tv_model.training)
