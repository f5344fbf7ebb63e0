"""MONAI's DenseNets with MONAI's constructor, module tree and ``state_dict``,
whose dense blocks run in the memory-efficient engine for 1-, 2- and 3-D inputs.

``DenseNet``, ``DenseNet121/169/201/264`` and their aliases take the arguments
of ``monai.networks.nets`` (``spatial_dims``, ``in_channels``, ``out_channels``,
``init_features``, ``growth_rate``, ``block_config``, ``bn_size``, ``act``,
``norm``, ``dropout_prob``; ``pretrained`` and ``progress`` for the named
ones) and build MONAI's modules under MONAI's names
(``features.denseblock1.denselayer1.layers.norm1``, ..., ``class_layers.out``),
initialised as MONAI does: a MONAI checkpoint loads with ``strict=True``, the
same seed gives the same weights, and :func:`from_monai` converts a MONAI model
in one call.

ReLU with BatchNorm (MONAI's default) runs fused, as the torchvision tree of
:mod:`densenet_fast.models` does.  Other ``act``/``norm`` choices (instance or
group norm, PReLU, ...) are built by MONAI's own layer factories (MONAI must be
installed for them) and run MONAI's plain per-layer code, said once in a
warning.  MONAI is not needed otherwise.
"""

import re
import warnings
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import engine, memory, models
from .engine import fastpath

__all__ = [
    "DenseNet", "Densenet", "DenseNet121", "densenet121", "Densenet121", "DenseNet169", "densenet169", "Densenet169",
    "DenseNet201", "densenet201", "Densenet201", "DenseNet264", "densenet264", "Densenet264", "from_monai",
]

LayerSpec = Union[str, tuple]  # MONAI's act/norm argument: a name, or (name, keyword arguments)
DEFAULT_ACT = ("relu", {"inplace": True})
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.Dropout3d)  # MONAI's choice per spatial dimensions
NORM_NAMES = ("norm0", "norm1", "norm2", "norm", "norm5")  # the modules MONAI's norm builds
ACT_NAMES = ("relu0", "relu1", "relu2", "relu")  # and act


# -- MONAI's layer factories -----------------------------------------------------------------
def _name_and_args(spec: LayerSpec) -> tuple[object, Optional[dict]]:
    """``(name, keyword arguments)`` of an act/norm argument; arguments ``None``
    for a form only MONAI's factories read."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        return spec
    return spec, None


def _monai_factories():
    try:
        from monai.networks.layers import utils
    except ImportError as exc:
        raise ImportError("densenet_fast.monai builds act/norm other than ReLU and batch norm with MONAI's layer "
                          "factories; install monai for them") from exc
    return utils


def norm_layer(norm: LayerSpec, spatial_dims: int, channels: int) -> nn.Module:
    """MONAI's ``get_norm_layer``: batch norm built here, other choices by MONAI's factory."""
    name, args = _name_and_args(norm)
    if isinstance(name, str) and name.lower() == "batch" and args is not None:
        return fastpath.BATCH_NORMS[spatial_dims - 1](**{"num_features": channels, **args})
    return _monai_factories().get_norm_layer(norm, spatial_dims=spatial_dims, channels=channels)


def act_layer(act: LayerSpec) -> nn.Module:
    """MONAI's ``get_act_layer``: ReLU built here, other choices by MONAI's factory."""
    name, args = _name_and_args(act)
    if isinstance(name, str) and name.lower() == "relu" and args is not None:
        return nn.ReLU(**args)
    return _monai_factories().get_act_layer(act)


# -- the module tree ---------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    """MONAI's dense layer: ``layers`` (norm1, relu1, conv1 1x1, norm2, relu2, conv2
    3x3, then dropout if ``dropout_prob > 0``); forward returns the input and the
    new features concatenated.  Inside a block the engine computes it."""

    def __init__(self, spatial_dims: int, in_channels: int, growth_rate: int, bn_size: int, dropout_prob: float,
                 act: LayerSpec = DEFAULT_ACT, norm: LayerSpec = "batch") -> None:
        super().__init__()
        out_channels = bn_size * growth_rate
        conv_type = fastpath.CONVS[spatial_dims - 1]
        self.layers = nn.Sequential()
        self.layers.add_module("norm1", norm_layer(norm, spatial_dims, in_channels))
        self.layers.add_module("relu1", act_layer(act))
        self.layers.add_module("conv1", conv_type(in_channels, out_channels, kernel_size=1, bias=False))
        self.layers.add_module("norm2", norm_layer(norm, spatial_dims, out_channels))
        self.layers.add_module("relu2", act_layer(act))
        self.layers.add_module("conv2", conv_type(out_channels, growth_rate, kernel_size=3, padding=1, bias=False))
        if dropout_prob > 0:
            self.layers.add_module("dropout", DROPOUTS[spatial_dims - 1](dropout_prob))

    def forward(self, x: Tensor) -> Tensor:
        new_features = self.layers(x)
        return torch.cat([x, new_features], 1)


class _DenseBlock(models._EngineBlock, nn.Sequential):
    """MONAI's dense block: ``layers`` dense layers called in turn (each returns
    its input and its new features); fused, the block's output is its buffer
    (a copy of it where backward reads it)."""

    def __init__(self, spatial_dims: int, layers: int, in_channels: int, bn_size: int, growth_rate: int,
                 dropout_prob: float, act: LayerSpec = DEFAULT_ACT, norm: LayerSpec = "batch") -> None:
        super().__init__()
        for i in range(layers):
            layer = _DenseLayer(spatial_dims, in_channels, growth_rate, bn_size, dropout_prob, act=act, norm=norm)
            in_channels += growth_rate
            self.add_module(f"denselayer{i + 1}", layer)
        self.engine = engine.Settings()
        self.recompute = "keep"

    forward = models.sequential_forward


class _Transition(models._EngineTransition, nn.Sequential):
    """MONAI's transition: norm, relu, 1x1 conv, average pooling by 2 (fused by the engine)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act: LayerSpec = DEFAULT_ACT,
                 norm: LayerSpec = "batch") -> None:
        super().__init__()
        self.add_module("norm", norm_layer(norm, spatial_dims, in_channels))
        self.add_module("relu", act_layer(act))
        self.add_module("conv", fastpath.CONVS[spatial_dims - 1](in_channels, out_channels, kernel_size=1,
                                                                 bias=False))
        self.add_module("pool", fastpath.AVG_POOLS[spatial_dims - 1](kernel_size=2, stride=2))
        self.engine = engine.Settings()


class DenseNet(models._EngineModel):
    """MONAI's ``DenseNet`` (Huang et al., CVPR 2017, for 1-, 2- and 3-D inputs),
    a drop-in for ``monai.networks.nets.DenseNet``.

    Args (MONAI's, same meaning and defaults):
        spatial_dims: 1, 2 or 3.
        in_channels: channels of the input.
        out_channels: outputs of the classifier (``class_layers.out``).
        init_features: channels of the stem convolution.
        growth_rate: channels each layer adds (``k``).
        block_config: number of layers in each dense block.
        bn_size: bottleneck width as a multiple of ``growth_rate``.
        act: activation, MONAI's name or ``(name, arguments)``; ReLU runs fused.
        norm: normalisation, likewise; batch norm runs fused.
        dropout_prob: dropout after each dense layer (MONAI's: whole channels
            in 2-D and 3-D, single values in 1-D).
    Extra (keyword-only), as for :class:`densenet_fast.DenseNet`:
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``; ``None``
            chooses per device.
        recompute: ``"keep"`` (default, faster) or ``"recompute"`` (leanest)
            for the bottleneck outputs, one of them per dense block, or
            ``"auto"`` (needs ``memory_budget``).
        memory_budget: bytes, or a string like ``"8GiB"``, that a training step
            may use; planned per input shape at its first training forward
            (see :class:`densenet_fast.DenseNet`).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        act: LayerSpec = DEFAULT_ACT,
        norm: LayerSpec = "batch",
        dropout_prob: float = 0.0,
        *,
        backend: Optional[str] = None,
        recompute: Union[None, str, Sequence[str]] = None,
        memory_budget: Union[None, int, str] = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        in_channels = memory.positive_int("in_channels", in_channels)
        out_channels = memory.positive_int("out_channels", out_channels)
        init_features = memory.positive_int("init_features", init_features)
        growth_rate = memory.positive_int("growth_rate", growth_rate)
        bn_size = memory.positive_int("bn_size", bn_size)
        block_config = memory.as_block_config(block_config)
        if not 0 <= float(dropout_prob) < 1:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.stem = "imagenet"  # conv 7 stride 2, norm, act, max-pool 3 stride 2
        conv_type = fastpath.CONVS[spatial_dims - 1]

        self.features = models._Features(OrderedDict([
            ("conv0", conv_type(in_channels, init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", norm_layer(norm, spatial_dims, init_features)),
            ("relu0", act_layer(act)),
            ("pool0", MAX_POOLS[spatial_dims - 1](kernel_size=3, stride=2, padding=1)),
        ]))
        channels = init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(spatial_dims, num_layers, channels, bn_size, growth_rate, dropout_prob, act=act,
                                norm=norm)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i == len(block_config) - 1:
                self.features.add_module("norm5", norm_layer(norm, spatial_dims, channels))
            else:
                self.features.add_module(f"transition{i + 1}", _Transition(spatial_dims, channels, channels // 2,
                                                                           act=act, norm=norm))
                channels //= 2
        self.class_layers = nn.Sequential(OrderedDict([
            ("relu", act_layer(act)),
            ("pool", fastpath.ADAPTIVE_AVG_POOLS[spatial_dims - 1](1)),
            ("flatten", nn.Flatten(1)),
            ("out", nn.Linear(channels, out_channels)),
        ]))

        self._initialise(conv_type)
        self.engine = engine.Settings()
        self.set_backend(backend)
        self._check_act_norm()  # before the budget: the memory model does not describe the plain path
        self.set_memory_budget(memory_budget)
        self.set_recompute("keep" if recompute is None else recompute)

    def _check_act_norm(self) -> None:
        """Where the dense layers' or transitions' act or norm are not ReLU and
        affine BatchNorm (MONAI's ``act``/``norm`` choice), say so once: every
        block and transition then runs MONAI's plain per-layer code without a
        warning of its own.  (A stem or head module replaced alone runs as a
        module beside fused blocks, as in torchvision's tree.)"""
        unsupported = sorted({type(m).__name__ for stage in self.stages() for name, m in stage.named_modules()
                              if (name.rsplit(".", 1)[-1] in NORM_NAMES
                                  and not fastpath.bn_is_standard(m, self.spatial_dims))
                              or (name.rsplit(".", 1)[-1] in ACT_NAMES and type(m) is not nn.ReLU)})
        self.engine.plain_reason = f"act/norm {', '.join(unsupported)}" if unsupported else None
        if unsupported:
            warnings.warn(f"densenet_fast.monai: {', '.join(unsupported)} run MONAI's plain per-layer path (the "
                          f"memory-efficient engine runs ReLU with affine BatchNorm); its memory savings are lost",
                          RuntimeWarning, stacklevel=3)

    def classifier_layer(self) -> nn.Linear:
        return self.class_layers._modules.get("out")  # None where class_layers was rebuilt without one

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._runs_fused_head(x):
            return self.class_layers.out(self.features.fused(x, pooled=True))
        x = self.features(x)
        x = self.class_layers(x)
        return x

    @torch.jit.unused
    def _runs_fused_head(self, x: Tensor) -> bool:
        """Checks ``x``; whether ``features`` and ``class_layers`` up to ``out``
        may run as fused stages (nobody observes ``features``, ``norm5`` or
        ``class_layers`` before ``out``)."""
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():  # (a trace records no check: the modules')
            return False
        self._check_and_plan(x)
        return (self.engine.plain_reason is None and fastpath.engine_takes(x, self.engine.budgeted)
                and self.head_blocker() is None)

    @torch.jit.unused
    def head_blocker(self) -> Optional[str]:
        """Why ``features`` and ``class_layers`` up to ``out`` cannot run as fused
        stages (someone observes them, or ``class_layers`` is not ReLU, global
        average pooling and flattening before ``out``), or ``None``."""
        reason = super().head_blocker()
        if reason is not None:
            return reason
        head = self.class_layers._modules
        if fastpath.watched(self.class_layers):
            return f"{fastpath.watched(self.class_layers)} on class_layers"
        if list(head) != ["relu", "pool", "flatten", "out"] or \
                not fastpath.global_pool_is_standard(head["relu"], head["pool"], head["flatten"]):
            return "class_layers other than ReLU, global average pooling and flattening before out"
        return None


# -- the named networks, with MONAI's pretrained weights ----------------------------------------
_URLS = {
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "densenet169": "https://download.pytorch.org/models/densenet169-b2777c0a.pth",
    "densenet201": "https://download.pytorch.org/models/densenet201-c1103571.pth",
}
_OLD_KEY = re.compile(r"^(.*denselayer\d+)(\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _load_pretrained(model: DenseNet, arch: str, progress: bool) -> None:
    """MONAI's ``pretrained=True``: torchvision's ImageNet weights (through the
    torch hub cache), renamed to MONAI's keys; those whose name and shape match
    replace the model's (the classifier and, for other ``in_channels``, the
    stem convolution stay as initialised)."""
    state_dict = torch.hub.load_state_dict_from_url(_URLS[arch], progress=progress, weights_only=True)
    state_dict = {_OLD_KEY.sub(r"\1.layers\2\3", key): value for key, value in state_dict.items()}
    own = model.state_dict()
    own.update({key: value for key, value in state_dict.items() if key in own and own[key].shape == value.shape})
    model.load_state_dict(own)


class _Named(DenseNet):
    """A named DenseNet: MONAI's defaults for its ``block_config``, and ``pretrained``."""

    arch = ""
    default_block_config: tuple[int, ...] = ()

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, init_features: int = 64,
                 growth_rate: int = 32, block_config: Optional[Sequence[int]] = None, pretrained: bool = False,
                 progress: bool = True, **kwargs) -> None:
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         init_features=init_features, growth_rate=growth_rate,
                         block_config=self.default_block_config if block_config is None else block_config, **kwargs)
        if pretrained:
            if self.arch not in _URLS:
                raise NotImplementedError(f"Currently PyTorch Hub does not provide {self.arch} pretrained models.")
            if spatial_dims > 2:
                raise NotImplementedError("Parameter `spatial_dims` is > 2 ; currently PyTorch Hub does not"
                                          "provide pretrained models for more than two spatial dimensions.")
            _load_pretrained(self, self.arch, progress)


class DenseNet121(_Named):
    """DenseNet-121 (blocks 6-12-24-16); ``pretrained`` (2-D) loads torchvision's ImageNet weights as MONAI does."""

    arch, default_block_config = "densenet121", (6, 12, 24, 16)


class DenseNet169(_Named):
    """DenseNet-169 (blocks 6-12-32-32); ``pretrained`` as for :class:`DenseNet121`."""

    arch, default_block_config = "densenet169", (6, 12, 32, 32)


class DenseNet201(_Named):
    """DenseNet-201 (blocks 6-12-48-32); ``pretrained`` as for :class:`DenseNet121`."""

    arch, default_block_config = "densenet201", (6, 12, 48, 32)


class DenseNet264(_Named):
    """DenseNet-264 (blocks 6-12-64-48); there are no pretrained weights."""

    arch, default_block_config = "densenet264", (6, 12, 64, 48)


Densenet = DenseNet
Densenet121 = densenet121 = DenseNet121
Densenet169 = densenet169 = DenseNet169
Densenet201 = densenet201 = DenseNet201
Densenet264 = densenet264 = DenseNet264


# -- conversion --------------------------------------------------------------------------------
def from_monai(monai_model: nn.Module, **kwargs) -> DenseNet:
    """A densenet_fast copy of a MONAI ``DenseNet``: the same tree of module names,
    with copies of MONAI's modules (convolutions, norms, activations, pooling,
    dropout, the classifier: weights, buffers, device, dtype and train/eval
    mode included; 3-D dense layers' 3x3x3 weights then stored channels-last,
    as :class:`DenseNet`'s are).  ``kwargs``: ``backend``, ``recompute``, ``memory_budget``."""
    models.refuse_wrapper(monai_model, "from_monai")
    features = getattr(monai_model, "features", None)
    blocks = [m for name, m in features.named_children() if name.startswith("denseblock")] \
        if isinstance(features, nn.Module) else []
    if not blocks or not hasattr(monai_model, "class_layers"):
        torchvision_tree = " (it has torchvision's: convert it with densenet_fast.from_torchvision)" \
            if blocks and hasattr(monai_model, "classifier") else ""
        raise TypeError(f"{type(monai_model).__name__} is not a MONAI DenseNet (no features.denseblock*, "
                        f"class_layers){torchvision_tree}")
    conv0, first = features.conv0, blocks[0].denselayer1.layers
    growth_rate = first.conv2.out_channels
    with warnings.catch_warnings():  # said below, once, for MONAI's modules
        warnings.simplefilter("ignore", RuntimeWarning)
        out = monai_model.class_layers._modules.get("out")  # a replaced one is copied below
        model = DenseNet(fastpath.spatial_dims(conv0), conv0.in_channels, getattr(out, "out_features", 2),
                         init_features=conv0.out_channels, growth_rate=growth_rate,
                         block_config=tuple(len(b) for b in blocks), bn_size=first.conv1.out_channels // growth_rate,
                         dropout_prob=first.dropout.p if "dropout" in first._modules else 0.0,
                         backend=kwargs.pop("backend", None))
    models.copy_modules(model, monai_model)
    model._volume_weights_channels_last()  # the copies are in MONAI's (contiguous) layout
    model._check_act_norm()
    return models.set_conversion_options(model, "from_monai", kwargs)
