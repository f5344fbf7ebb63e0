"""The DenseNet family with torchvision's module tree and ``state_dict``.

Every model here has exactly the parameter and buffer names of
``torchvision.models.DenseNet`` (``features.conv0``, ``features.denseblock1.
denselayer1.norm1``, ..., ``classifier``), so torchvision weights load with
``strict=True``.  The forward pass does not run the modules one by one: each
dense block, together with the transition or the head that follows it, runs as
one memory-efficient autograd Function (:mod:`densenet_fast.engine.stage`) that
reads the modules' parameters and updates their running statistics.
"""


import copy
import itertools
import os
import re
import warnings
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import engine, memory, planner
from .backends import resolve_backend_name
from .engine import fastpath, stem
from .engine.batchnorm import uses_batch_stats
from .engine.stage import autocast_enabled

# torchvision is optional: without it, weights load from local files and state_dicts only.  It is imported
# here, not lazily (about 3 s): torchvision's get_model_weights finds the enums in the builders' annotations.
try:
    from torchvision.models import DenseNet121_Weights, DenseNet161_Weights, DenseNet169_Weights, DenseNet201_Weights
    from torchvision.models import WeightsEnum
except ImportError:
    DenseNet121_Weights = DenseNet161_Weights = DenseNet169_Weights = DenseNet201_Weights = WeightsEnum = None
_WEIGHTS = {"densenet121": DenseNet121_Weights, "densenet161": DenseNet161_Weights,
            "densenet169": DenseNet169_Weights, "densenet201": DenseNet201_Weights}

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
AUTO = "auto"  # the fastest per-block assignment predicted to fit the memory budget


class MemoryPlanNotice(UserWarning):
    """What ``recompute="auto"`` chose for an input shape (once per shape)."""


class InputError(ValueError, RuntimeError):
    """Input this network cannot take (wrong channel count, device, size).  A
    ``RuntimeError`` too, as torchvision's convolution raises for a wrong channel count."""


class InputDtypeError(TypeError, RuntimeError):
    """Input of a dtype this network cannot take.  A ``RuntimeError`` too, as
    torchvision's convolution raises for it."""

STEMS = ("imagenet", "cifar")
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # memory format by tensor dimensions
ACTIVATIONS = tuple(c for c in vars(nn.modules.activation).values() if isinstance(c, type)
                    and c.__module__ == nn.modules.activation.__name__ and c not in (nn.GLU, nn.MultiheadAttention))
# modules a stem may hold that keep the spatial size (others are convolutions, max pooling, or unknown)
SIZE_PRESERVING = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.dropout._DropoutNd, nn.Identity,
                   *ACTIVATIONS)


class _DenseLayer(nn.Module):
    """One bottleneck layer, BN-ReLU-Conv1x1-BN-ReLU-Conv3x3: ``num_input_features``
    channels in, ``growth_rate`` out.  Inside a block the engine computes it;
    ``forward`` is torchvision's, for the plain path and for calls on a layer alone."""

    __jit_unused_properties__ = ["memory_efficient"]

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    @property
    def memory_efficient(self) -> bool:
        """torchvision's per-layer checkpointing flag: ``False`` (the plain path does
        not checkpoint; the blocks' recompute policy sets memory use). Setting it raises."""
        return False

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        raise AttributeError("densenet_fast's dense layers do not checkpoint one by one: the model's recompute "
                             "policy sets what backward recomputes (model.set_recompute('recompute'), the leanest; "
                             "or recompute= when building it)")

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    @torch.jit._overload_method  # noqa: F811
    def forward(self, input: list[Tensor]) -> Tensor:  # noqa: F811
        pass

    @torch.jit._overload_method  # noqa: F811
    def forward(self, input: Tensor) -> Tensor:  # noqa: F811
        pass

    def forward(self, input: Tensor) -> Tensor:  # noqa: F811  (a Tensor or a list of them, as in torchvision)
        if isinstance(input, Tensor):
            prev_features = [input]
        else:
            prev_features = input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _EngineBlock:
    """What the dense blocks of every module tree (torchvision's, MONAI's) share:
    running as one engine stage where nobody could tell the difference.  Needs
    ``engine`` (:class:`engine.Settings`) and ``recompute`` attributes and the
    dense layers as children."""

    @torch.jit.unused
    def _runs_fused(self, x: Tensor, in_step: bool = False, x_channels: Optional[int] = None) -> bool:
        """Whether the engine runs this block (else its per-layer code, said once);
        ``in_step``: as a stage of the model's forward (else :func:`refuse_unplanned`);
        ``x_channels``: as in :func:`fastpath.input_matches`."""
        if not engine_may_run(self, x, in_step, "block"):
            return False
        conv1 = fastpath.dense_layer_parts(next(iter(self.children()))).conv1
        return fastpath.input_matches(x, fastpath.spatial_dims(conv1), self.input_channels(), x_channels=x_channels)

    @torch.jit.unused
    def engine_blocker(self) -> Optional[str]:
        """Why the engine cannot run this block, or ``None``."""
        return fastpath.block_blocker(list(self.children()))

    @torch.jit.unused
    def _fused(self, x: Tensor) -> Tensor:
        """This block as a stage of its own, in the dtype of torchvision's ``torch.cat``:
        under autocast the new features are 16-bit and ``cat`` promotes them and
        the input to their common dtype (float32 for a float32 input; then a copy,
        the input's channels exact)."""
        out = self.run(x, engine.NoTail())[0]
        dtype = torch.promote_types(x.dtype, out.dtype)
        if dtype == out.dtype:
            return out
        return torch.cat([x.to(dtype), out[:, x.shape[1]:].to(dtype)], 1)

    @torch.jit.unused
    def run(self, x: Tensor, tail: "engine.Tail", buffer: Optional[Tensor] = None,
            next_channels: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
        """This block and ``tail`` as one engine stage (see :func:`engine.run_stage`)."""
        return engine.run_stage(list(self.children()), tail, x, self.engine, self.recompute == "keep", buffer,
                                next_channels)

    def input_channels(self) -> int:
        """Channels of the block's input."""
        return fastpath.dense_layer_parts(next(iter(self.children()))).conv1.in_channels

    def total_channels(self) -> int:
        """Channels of the block's output."""
        layers = list(self.children())
        return self.input_channels() + len(layers) * fastpath.dense_layer_parts(layers[0]).conv2.out_channels


class _DenseBlock(_EngineBlock, nn.ModuleDict):
    """``num_layers`` dense layers; forward returns the concatenated features
    ``(N, num_input_features + num_layers * growth_rate, H, W)`` (channels-last
    on the fused path: the block's buffer, or a copy of it where backward reads it)."""

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)
        self.engine = engine.Settings()
        self.recompute = "keep"

    def forward(self, init_features: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._runs_fused(init_features, False, None):
            return self._fused(init_features)
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


def engine_may_run(module: nn.Module, x: Tensor, in_step: bool, kind: str) -> bool:
    """Whether the engine may run ``module`` (a dense block or transition, the
    ``kind`` named in errors) on ``x``, its shape aside: the engine takes ``x``
    and the module's modules (else its per-layer code runs, said once, or, under
    a sync group, an error); ``in_step``: as a stage of the model's forward
    (else :func:`refuse_unplanned`)."""
    if not fastpath.engine_takes(x, module.engine.budgeted) or module.engine.plain_reason is not None:
        fastpath.refuse_unsynchronised(module.engine.sync_group, "this input runs the plain path")
        return False
    if not in_step:
        refuse_unplanned(module)
    reason = module.engine_blocker()
    if reason is not None:
        fastpath.refuse_unsynchronised(module.engine.sync_group, f"this {kind} has {reason}")
        fastpath.warn_plain_path(module, reason)
        return False
    return True


def refuse_unplanned(module: nn.Module) -> None:
    """Raise where ``module`` (``features``, a dense block or a transition) is
    called on its own in a training forward of a model with a memory budget:
    the budget plans the model's whole training step, which this is not.
    (Where the engine does not take the input, the model's forward calls them
    too, as torchvision's does; then nobody asks.)"""
    if module.engine.budgeted and module.training and torch.is_grad_enabled():
        what = "features" if isinstance(module, _Features) else \
            "a dense block" if isinstance(module, _EngineBlock) else "a transition"
        raise planner.MemoryBudgetError(
            f"the model's {what} was called on its own in a training forward, but the model's memory budget plans "
            f"its whole training step (model(x)), not this one; train through the model, or call the model's "
            f"set_memory_budget(None) (for a copy of this module: before copying it) and choose recompute yourself")


def sequential_forward(self, input: Tensor) -> Tensor:
    """The ``forward`` of an ``nn.Sequential`` that the engine may run: ``_fused``
    where ``_runs_fused`` says so, else each module in turn (assigned in the
    class body: TorchScript compiles it there, not from a mixin)."""
    if not torch.jit.is_scripting() and self._runs_fused(input, False, None):  # (TorchScript wants every argument)
        return self._fused(input)
    for module in self:
        input = module(input)
    return input


class _EngineTransition:
    """What the transitions of every module tree share (an ``nn.Sequential`` of
    ``norm``, ``relu``, ``conv``, ``pool`` with an ``engine`` attribute): the
    engine runs it as a stage with no layers (pooling first, then the
    convolution: exact and 2, 4 or 8 times cheaper)."""

    forward = sequential_forward

    @torch.jit.unused
    def _runs_fused(self, x: Tensor, in_step: bool = False, x_channels: Optional[int] = None) -> bool:
        """As :meth:`_EngineBlock._runs_fused`, for this transition."""
        return (engine_may_run(self, x, in_step, "transition")
                and fastpath.input_matches(x, fastpath.spatial_dims(self.conv), self.norm.num_features, pooled=True,
                                           x_channels=x_channels))

    @torch.jit.unused
    def engine_blocker(self) -> Optional[str]:
        """Why the engine cannot run this transition, or ``None``."""
        return fastpath.transition_blocker(self)

    @torch.jit.unused
    def _fused(self, x: Tensor) -> Tensor:
        return engine.run_stage([], engine.TransitionTail(self), x, self.engine, keep=True)[0]


class _Transition(_EngineTransition, nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 between two dense blocks (fused by the engine)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.engine = engine.Settings()


class _Features(nn.Sequential):
    """``features`` of torchvision's and MONAI's DenseNet: the stem, dense blocks,
    transitions and ``norm5``.

    Called as a module it returns ``norm5``'s output, as torchvision's does.  Where
    no hook or other observer sits between a dense block and the transition after
    it, the two run as one engine stage, and the transition writes its output
    straight into the next block's buffer."""

    def __init__(self, modules: OrderedDict) -> None:
        super().__init__(modules)
        self.engine = engine.Settings()

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._runs_fused(input):
            return self.fused(input, pooled=False)
        for module in self:
            input = module(input)
        return input

    @torch.jit.unused
    def _runs_fused(self, x: Tensor) -> bool:
        """Whether the engine runs these features, called as a module (then not
        from the model's forward under a memory budget: :func:`refuse_unplanned`)."""
        if not fastpath.engine_takes(x, self.engine.budgeted) or self.engine.plain_reason is not None:
            return False
        refuse_unplanned(self)
        return True

    @torch.jit.unused
    def fused(self, x: Tensor, pooled: bool) -> Tensor:
        """The features (``pooled=False``: ``norm5``'s output, ``(N, C, *spatial)``)
        or the classifier's input (``pooled=True``: ReLU and global average
        pooling of them, ``(N, C)``), fusing every unobserved block with what
        follows it."""
        modules = list(self._modules.values())
        last_block = max((i for i, m in enumerate(modules) if isinstance(m, _EngineBlock)), default=None)
        weight = getattr(getattr(self, "conv0", None), "weight", None)  # torchvision's output is channels-last
        contiguous = x.is_contiguous() and (not isinstance(weight, Tensor)  # where its input or conv0's weight is
                                            or isinstance(weight, nn.parameter.UninitializedParameter)
                                            or weight.is_contiguous())
        buffer = None
        i = 0
        while i < len(modules):
            module = modules[i]
            following = modules[i + 1] if i + 1 < len(modules) else None
            fusable = (isinstance(module, _EngineBlock) and fastpath.watched(module) is None
                       and module._runs_fused(x, in_step=True))
            if fusable and isinstance(following, _EngineTransition) and fastpath.watched(following) is None \
                    and following._runs_fused(x, in_step=True, x_channels=module.total_channels()):
                after = modules[i + 2] if i + 2 < len(modules) else None
                next_channels = after.total_channels() if isinstance(after, _EngineBlock) and \
                    fastpath.watched(after) is None and not torch.compiler.is_compiling() and \
                    after.input_channels() == following.conv.out_channels else None
                x, buffer = module.run(x, engine.TransitionTail(following), buffer, next_channels)
                i += 2
            elif fusable and pooled and i + 2 == len(modules) and fastpath.head_norm_is_standard(following) \
                    and following.num_features == module.total_channels():
                return module.run(x, engine.HeadTail(following), buffer)[0]
            elif fusable:
                x, buffer = module.run(x, engine.NoTail(), buffer)[0], None
                if i == last_block and contiguous and not pooled:  # norm5's output in torchvision's layout
                    x = x.contiguous()
                i += 1
            elif self._runs_fused_stem(modules[i:i + 3], x):
                x, buffer = stem.norm_relu_max_pool(module, x), None
                i += 3
            else:
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    fastpath.refuse_unsynchronised(self.engine.sync_group, f"{type(module).__name__} runs on its own")
                x, buffer = module(x), None
                i += 1
        if pooled:
            return global_average_pool(F.relu(x))
        return x.contiguous() if contiguous else x  # a transition's output (features ending in one: a slice)

    @torch.jit.unused
    def _runs_fused_stem(self, modules: list[nn.Module], x: Tensor) -> bool:
        """Whether ``modules`` are the ImageNet stem's BN-ReLU-max-pool in a forward
        that trains them on batch statistics, on a batch they take (else the
        modules run, and raise their own errors; see :mod:`.engine.stem`)."""
        if not (len(modules) == 3 and isinstance(modules[0], nn.modules.batchnorm._BatchNorm)
                and torch.is_grad_enabled() and uses_batch_stats(modules[0]) and self.engine.sync_group is None):
            return False
        reason = stem.stem_blocker(*modules)
        if reason is not None:
            fastpath.warn_plain_path(self, reason, part="the stem's BN, ReLU and max-pool")
            return False
        return fastpath.input_matches(x, stem.MAX_POOLS.index(type(modules[2])) + 1, modules[0].num_features)

    @torch.jit.unused
    def stem_blocker(self) -> Optional[str]:
        """Why the ImageNet stem's BN-ReLU-max-pool runs as three modules in
        training, or ``None`` (also where there is no such stem)."""
        if "norm0" not in self._modules:
            return None
        modules = [self._modules.get(name) for name in ("norm0", "relu0", "pool0")]
        return "a stem without relu0 or pool0" if None in modules else stem.stem_blocker(*modules)


def global_average_pool(x: Tensor) -> Tensor:
    """``(N, C)``: the mean of ``x (N, C, *spatial)`` over its 1, 2 or 3 spatial dimensions."""
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[x.dim() - 3]
    return torch.flatten(pool(x, 1), 1)


class _EngineModel(nn.Module):
    """What every DenseNet here shares (torchvision's tree, MONAI's): the engine's
    settings (backend, scratch arena, synchronised statistics), shared by every
    block and transition of ``features``, the recompute policy of each block,
    and the memory budget its training steps are planned to fit."""

    # engine settings and the memory plan: not part of a scripted model
    __jit_unused_properties__ = ["arena", "backend", "recompute", "memory_budget"]
    _memory_budget: Optional[int] = None
    memory_offload = False  # set_memory_budget(offload=)
    __jit_ignored_attributes__ = ["_built_stem"]
    _built_stem = None  # stem_geometry() when built (None in older pickles: unknown)
    _auto_recompute = False

    def _initialise(self, conv_type: type) -> None:
        """torchvision's and MONAI's initialisation (the same rules): Kaiming-normal
        ``conv_type`` weights, affine BatchNorm weight 1 and bias 0, Linear bias 0;
        then :meth:`_volume_weights_channels_last`.  Records the stem as built,
        which the memory model describes."""
        self._built_stem = self.stem_geometry()
        for m in self.modules():
            if isinstance(m, conv_type):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, fastpath.BATCH_NORMS) and m.affine:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        self._volume_weights_channels_last()

    def _volume_weights_channels_last(self) -> None:
        """Store the dense layers' 3x3x3 weights channels-last, as the buffers they
        convolve are: ATen would otherwise copy each one into that layout on every
        call (same values, same ``state_dict``; contiguous ones made a CPU step at
        64^3 11-38% slower, docs/performance.md, "Weight layout").  2-D and 1-D
        weights stay contiguous, as torchvision's are: there the copies cost no
        measurable time (CPU), and code that flattens parameters with ``view`` works."""
        for block in self.blocks():
            for layer in block.children():
                weight = fastpath.dense_layer_parts(layer).conv2.weight
                if weight.dim() == 5:
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last_3d)

    # -- configuration -----------------------------------------------------------------
    def blocks(self) -> list[_EngineBlock]:
        return [m for m in self.features.children() if isinstance(m, _EngineBlock)]

    def stages(self) -> list[nn.Module]:
        """The dense blocks and transitions of ``features``, as they are now."""
        return [m for m in self.features.children() if isinstance(m, (_EngineBlock, _EngineTransition))]

    @property
    def arena(self) -> engine.ScratchArena:
        """The scratch memory of the dense stages (see :class:`engine.ScratchArena`)."""
        return self.engine.arena

    @property
    def backend(self) -> Optional[str]:
        """The primitive backend chosen (``None``: automatic per device and dtype)."""
        return self.engine.backend

    def set_backend(self, backend: Optional[str]) -> None:
        """Choose the primitive backend (``None``: automatic per device and dtype)."""
        self.engine.backend = resolve_backend_name(backend)
        self.share_engine()

    def share_engine(self) -> None:
        """Make every block and transition (also one assigned since construction)
        share the model's engine settings: backend, scratch arena, sync group
        (each forward does, so a block put in later cannot run apart)."""
        for module in (self.features, *self.features.children()):  # where blocks and transitions are
            if hasattr(module, "engine") and module.engine is not self.engine:
                module.engine = self.engine

    # -- recompute policy and memory budget --------------------------------------------
    def set_recompute(self, recompute: Union[str, Sequence[str]]) -> None:
        """``"keep"`` (store bottleneck outputs), ``"recompute"`` (leanest), one of
        them per dense block, or ``"auto"`` (chosen per input shape to fit the
        memory budget)."""
        if isinstance(recompute, str) and recompute == AUTO:
            if self._memory_budget is None:
                raise ValueError('recompute="auto" needs a memory budget: pass memory_budget= (bytes or a string '
                                 'like "8GiB") to the constructor, or call set_memory_budget() first')
            self._auto_recompute = True
            self._memory_plans = {}
            return
        blocks = self.blocks()
        policies = [recompute] * len(blocks) if isinstance(recompute, str) else \
            list(recompute) if isinstance(recompute, Sequence) else []
        if len(policies) != len(blocks) or any(p not in RECOMPUTE_POLICIES for p in policies):
            raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, {AUTO!r} or a sequence of "
                             f"{len(blocks)} of {RECOMPUTE_POLICIES} (one per dense block), got {recompute!r}")
        for block, policy in zip(blocks, policies):
            block.recompute = policy
        self._auto_recompute = False
        self._memory_plans = {}

    @property
    def recompute(self) -> Union[str, tuple[str, ...]]:
        """``"auto"``, or the policy of every block, or one per block where they differ."""
        if self._auto_recompute:
            return AUTO
        policies = tuple(block.recompute for block in self.blocks())
        return policies[0] if len(set(policies)) == 1 else policies

    @property
    def memory_budget(self) -> Optional[int]:
        """Bytes a training step may use, or ``None`` (no planning)."""
        return self._memory_budget

    def set_memory_budget(self, budget: Union[None, int, str],
                          optimizer: Union[None, str, "memory.OptimizerSpec"] = None,
                          offload: Optional[bool] = None) -> None:
        """Plan training steps to fit ``budget`` (bytes or e.g. ``"8GiB"``; ``None``:
        stop planning), with ``optimizer``'s state and update (an ``OptimizerSpec``
        or a preset's name, e.g. ``"adam"``; ``None``: the one set before, at
        first SGD with momentum, as the trainer's recipe).  ``offload``: the
        steps run their forward and loss under
        ``torch.autograd.graph.save_on_cpu`` (on CUDA; the plan assumes it,
        nothing checks it; ``None``: as set before, at first not)."""
        if budget is None and self._auto_recompute:
            raise ValueError('recompute="auto" needs a memory budget; set another recompute policy first')
        optimizer = memory.OptimizerSpec.parse(optimizer or getattr(self, "memory_optimizer", None))
        offload = self.memory_offload if offload is None else offload
        if not isinstance(offload, bool):
            raise TypeError(f"offload is True or False, got {offload!r}")
        if budget is not None:
            budget = memory.parse_bytes(budget)
            planner.refuse_unplannable(self, "memory_budget")
        self._memory_budget = budget
        self.engine.budgeted = budget is not None
        self.memory_optimizer, self.memory_offload = optimizer, offload
        self._memory_plans = {}

    @torch.jit.unused
    def plan_for(self, batch: int, image_size: Union[int, tuple[int, ...]], *,
                 dtype: Union[None, str, torch.dtype] = None, autocast: Union[None, str, torch.dtype] = None,
                 device: Union[None, str, torch.device] = None) -> "planner.Choice":
        """Plan the training step of ``batch`` inputs of ``image_size`` (one side per
        spatial dimension; an int: that side in each) under the memory budget:
        returns the chosen policies with their predicted peak memory and step
        time, and uses them from now on for that input shape (``"auto"``).
        ``dtype``/``device`` default to the model's (a meta model: the CPU); ``autocast``: the dtype
        autocast computes in, if any.  Raises
        :class:`densenet_fast.MemoryBudgetError` when nothing fits."""
        if self._memory_budget is None:
            raise ValueError("plan_for needs a memory budget: pass memory_budget= or call set_memory_budget()")
        planner.refuse_unplannable(self, "plan_for")
        weight = self.features.conv0.weight
        if isinstance(image_size, int):
            image_size = (image_size,) * self.spatial_dims
        device = device or planner.planned_device(weight)
        setup = memory.Setup(batch, image_size, dtype or weight.dtype, autocast, device, self.backend,
                             self.memory_optimizer, offload=self.memory_offload)
        if setup.offload and setup.device != "cuda":
            raise ValueError(planner.OFFLOAD_NEEDS_CUDA)
        key = self._plan_key(setup.batch, setup.image_size, setup.dtype, setup.autocast, planner.indexed(device))
        choice = self._stored_plan(key)
        if choice is None:
            recompute = AUTO if self._auto_recompute else tuple(block.recompute for block in self.blocks())
            choice = planner.choose(memory.Architecture.of(self), setup, self._memory_budget, recompute)
            self._memory_plans[key] = choice, setup.threads if setup.device == "cpu" else None
            if setup.device == "cpu" and not memory.cpu_heap_as_modelled():
                warnings.warn(f"densenet_fast: {memory.cpu_heap_note()}", RuntimeWarning, stacklevel=2)
            if self._auto_recompute:
                size = planner.size_text(setup.image_size)
                warnings.warn(f"densenet_fast: for batch {batch} of {size} {str(setup.compute_dtype)[6:]} on "
                              f"{setup.device}: {choice.describe(self._memory_budget)}", MemoryPlanNotice,
                              stacklevel=2)
        if self._auto_recompute:
            for block, policy in zip(self.blocks(), choice.policies):
                block.recompute = policy
        return choice

    def classifier_layer(self) -> nn.Linear:
        """The final Linear layer (torchvision's ``classifier``, MONAI's ``class_layers.out``)."""
        raise NotImplementedError

    @torch.jit.unused
    def memory_model_blocker(self) -> Optional[str]:
        """Why the memory model does not describe this model's training step (it
        describes the engine on the network as built; a block or transition the
        engine cannot run takes the plain per-layer path), or ``None``."""
        reason = self.engine.plain_reason or self.features_blocker()
        if reason is not None:
            return reason
        reasons = [m.engine_blocker() for m in self.stages()] + [self.features.stem_blocker()]
        if self._built_stem is not None and self.stem_geometry() != self._built_stem:
            reasons.append("a stem changed since construction; the memory model describes the one built")
        if type(self.classifier_layer()) is not nn.Linear:
            reasons.append("a classifier other than one nn.Linear; the memory model describes the one built")
        dropouts = {(rate > 0, channels) for rate, channels in
                    (memory.layer_dropout(layer) for block in self.blocks() for layer in block.children())}
        if len(dropouts) > 1:
            reasons.append("dense blocks with dropout and without it, or of single values and of whole channels; "
                           "the memory model describes one dropout in every layer")
        reasons += [f"{fastpath.watched(module)} on features.{name}, which the engine then runs as a stage of its own"
                    for name, module in self.features.named_children()
                    if isinstance(module, (_EngineBlock, _EngineTransition)) and fastpath.watched(module)]
        reasons.append(self.head_blocker())
        return next((reason for reason in reasons if reason is not None), None)

    @torch.jit.unused
    def features_blocker(self) -> Optional[str]:
        """Why ``features`` is not the engine's (replaced by another container,
        whose modules run one by one), or ``None``."""
        if isinstance(self.features, _Features):
            return None
        return f"features replaced by a {type(self.features).__name__} (its modules run one by one)"

    @torch.jit.unused
    def head_blocker(self) -> Optional[str]:
        """Why ``features`` cannot run as fused stages up to the classifier's
        pooled input (``features`` replaced, someone observes ``features`` or
        ``norm5``), or ``None``."""
        reason = self.features_blocker()
        if reason is not None:
            return reason
        norm5 = list(self.features.children())[-1]
        if fastpath.global_hooks():
            return fastpath.GLOBAL_HOOKS
        if fastpath.watched(self.features):
            return f"{fastpath.watched(self.features)} on features"
        if not fastpath.head_norm_is_standard(norm5):
            return f"a norm5 ({type(norm5).__name__}) the engine does not fuse with the head"
        return None

    @torch.jit.unused
    def _check_and_plan(self, x: Tensor) -> None:
        """Check ``x`` (and, under a sync group, that ``features`` is the engine's:
        another container runs ``norm5`` unsynchronised); in a training forward
        under a memory budget, plan its step."""
        self.check_input(x)
        replaced = self.features_blocker()
        if replaced is not None:
            fastpath.refuse_unsynchronised(self.engine.sync_group, replaced)
        self.share_engine()
        if self._memory_budget is not None and self.training and torch.is_grad_enabled() and x.shape[0] > 0 \
                and x.device.type != "meta":  # nothing to plan for an empty batch or shapes alone
            self._plan_memory(x)

    @torch.jit.unused
    def _plan_memory(self, x: Tensor) -> None:
        """Plan a training step on ``x`` under the memory budget, once per input
        shape, dtype and device: the lookup is one torch.compile traces, so a
        compiled step plans (outside its graph) only for an input not planned
        before, and ``fullgraph=True`` holds once it has been (each input shape
        is then a graph of its own: docs/memory.md)."""
        planner.refuse_unplannable(self, "plan_for")  # every step: a hook may have come since the plan
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else None
        key = self._plan_key(x.shape[0], x.shape[2:], self.features.conv0.weight.dtype, autocast, x.device)
        choice = self._stored_plan(key)
        if choice is None:
            choice = self._plan_outside_graph(key)
        if self._auto_recompute:
            for block, policy in zip(self.blocks(), choice.policies):
                block.recompute = policy

    def _plan_key(self, batch: int, image_size: Sequence[int], dtype: torch.dtype, autocast: Optional[torch.dtype],
                  device: torch.device) -> tuple:
        """The key of a plan in ``_memory_plans`` (:meth:`plan_for` stores it,
        :meth:`_plan_memory` looks it up from an input, in traced code): the
        input's batch, spatial shape, dtype, autocast dtype and device (with its
        index: GPUs may differ), the backend setting, and the architecture last
        (a classifier or dropout rate changed since a plan is planned again)."""
        return (batch, tuple(image_size), dtype, autocast, (device.type, device.index), self.backend,
                memory.Architecture.of(self))

    def _stored_plan(self, key: tuple) -> Optional["planner.Choice"]:
        """The plan stored under ``key``, or ``None``, also where it was made on
        the CPU for another thread count (the C++ kernels hold a tile per
        thread; traced code cannot read the thread count, so a compiled step
        keeps the plan it was compiled with)."""
        choice, threads = self._memory_plans.get(key, (None, None))
        if threads is not None and not torch.compiler.is_compiling() and threads != torch.get_num_threads():
            return None
        return choice

    @torch.compiler.disable(reason="densenet_fast plans the memory of a training step on an input it has not "
                                   "planned for: call plan_for(batch, image_size) before torch.compile(fullgraph=True)")
    def _plan_outside_graph(self, key: tuple) -> "planner.Choice":
        """:meth:`plan_for` the input of ``key`` (see :meth:`_plan_memory`)."""
        batch, image_size, dtype, autocast, (device_type, index), *_ = key
        return self.plan_for(batch, image_size, dtype=dtype, autocast=autocast, device=torch.device(device_type, index))

    def set_sync_group(self, group) -> None:
        """Synchronise batch statistics over the processes of ``group`` (a
        ``torch.distributed`` process group; ``None`` turns it off): one small
        all-gather of per-channel statistics per BN forward and one all-reduce
        of the BN gradient sums per BN backward, inside the dense stages."""
        if group is not None and hasattr(self.features, "norm0"):
            raise NotImplementedError("synchronised BN covers the dense blocks, transitions and head; the "
                                      "ImageNet stem's norm0 is not synchronised, so only stem='cifar' supports it")
        self.engine.sync_group = group
        self.share_engine()

    # -- shapes ------------------------------------------------------------------------
    # (``in_channels``, ``stem`` and ``spatial_dims`` are set by the subclass)
    @property
    def num_transitions(self) -> int:
        """The transitions in ``features``, as they are now."""
        return sum(isinstance(m, _EngineTransition) for m in self.features.children())

    def stem_modules(self) -> list[nn.Module]:
        """``features``' modules before the first dense block, as they are now."""
        return list(itertools.takewhile(lambda m: not isinstance(m, _EngineBlock), self.features.children()))

    def stem_geometry(self) -> list[tuple]:
        """Each stem module's type and the settings that size its output (what the
        memory model assumes; compared with the stem the model was built with)."""
        sizing = ("in_channels", "out_channels", "num_features", "kernel_size", "stride", "padding", "dilation",
                  "ceil_mode")
        return [(type(m), *(getattr(m, name, None) for name in sizing)) for m in self.stem_modules()]

    def _sizing_modules(self) -> Optional[list[nn.Module]]:
        """The modules of ``features`` that change the spatial size, as they are
        now: the stem's convolutions and poolings and the transitions' (their
        pooling by 2, unless replaced), in order; ``None`` where ``features``
        holds a module whose output size is not known here (one that raises its
        own errors)."""
        sizing = []
        for module in self.features.children():
            if isinstance(module, _EngineBlock):  # (its layers keep the size)
                continue
            parts = list(module.children()) if isinstance(module, _EngineTransition) else [module]
            sizing += [m for m in parts if not isinstance(m, SIZE_PRESERVING)]
        known = all(isinstance(m, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                                   nn.modules.pooling._AvgPoolNd))
                    and not isinstance(m, nn.modules.conv._ConvTransposeNd)
                    and not isinstance(m.padding, str) and not getattr(m, "ceil_mode", False) for m in sizing)
        return sizing if known else None

    @staticmethod
    def _feature_side(sizing: list[nn.Module], n: int, dim: int) -> int:
        """The last block's side along spatial dimension ``dim`` for an input side
        ``n``, through ``sizing`` (below 1: too small)."""
        for m in sizing:
            if n < 1:
                return n
            kernel, stride, padding, dilation = (v if isinstance(v, int) else v[dim]
                                                 for v in (m.kernel_size, m.stride, m.padding,
                                                           getattr(m, "dilation", 1)))
            n = (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1  # PyTorch's output size
        return n

    def feature_size(self, *sizes: int) -> Optional[tuple[int, ...]]:
        """Spatial size of the last dense block for an input of spatial size
        ``sizes`` (one per spatial dimension), through the modules of the stem and
        the transitions as they are now; a value below 1 means the input is too
        small.  ``None`` where ``features`` holds a module whose output size is
        not known here (a replaced one: it raises its own errors)."""
        sizing = self._sizing_modules()
        return None if sizing is None else tuple(self._feature_side(sizing, n, d) for d, n in enumerate(sizes))

    def min_input_size(self) -> Optional[tuple[int, ...]]:
        """Smallest size along each spatial dimension this network accepts
        (``None``: its modules are not ones :meth:`feature_size` knows)."""
        sizing = self._sizing_modules()
        if sizing is None:
            return None
        least = []
        for dim in range(self.spatial_dims):
            n = 1
            while self._feature_side(sizing, n, dim) < 1:
                n += 1
            least.append(n)
        return tuple(least)

    @torch.jit.unused
    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for input this network cannot take (as its
        modules are now: a replaced stem is checked by what it is)."""
        dims = self.spatial_dims
        if not isinstance(x, Tensor):
            raise TypeError(f"DenseNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != dims + 2:
            layout = ("(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)")[dims - 1]
            raise ValueError(f"DenseNet expects a {dims + 2}-D input {layout}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputDtypeError(f"DenseNet expects a floating-point input, got dtype {x.dtype}")
        conv0 = getattr(self.features, "conv0", None)
        lazy = isinstance(getattr(conv0, "weight", None), nn.parameter.UninitializedParameter)
        if isinstance(conv0, nn.modules.conv._ConvNd) and not lazy and x.shape[1] != conv0.in_channels:
            advice = (f"pass in_channels={x.shape[1]} to the constructor for such images"
                      if conv0.in_channels == self.in_channels else "features.conv0 was replaced after construction")
            raise InputError(f"DenseNet's conv0 takes {conv0.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)}); {advice}")
        weight = next(self.features.parameters(), None)
        if weight is not None and x.device != weight.device:
            raise InputError(f"input is on {x.device} but the model is on {weight.device}")
        autocast = autocast_enabled(x.device.type)
        if weight is not None and x.dtype != weight.dtype and not autocast:
            raise InputDtypeError(f"input dtype {x.dtype} differs from the model's {weight.dtype}; "
                            f"convert one of them or use torch.autocast")
        size = self.feature_size(*x.shape[2:])
        if size is not None and min(size) < 1:
            transitions = self.num_transitions
            raise InputError(
                f"input images of {'x'.join(map(str, x.shape[2:]))} are too small for this DenseNet "
                f"(its stem and {transitions} transition{'s' * (transitions != 1)}): it needs at least "
                f"{'x'.join(map(str, self.min_input_size()))}")


class DenseNet(_EngineModel):
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
            (faster); ``"recompute"`` recomputes it (leanest); a sequence
            with one of them per dense block; or ``"auto"`` (needs
            ``memory_budget``): per input shape, the fastest per-block
            assignment predicted to fit the budget.
        memory_budget: bytes, or a string like ``"8GiB"``, that a training step
            may use: parameters, gradients, optimizer state and the step's
            peak above them (see :meth:`plan_for`).  At the first training
            forward of each input shape the step is planned for it, before any
            work: ``"auto"`` chooses the policies and says so once
            (:class:`MemoryPlanNotice`); a fixed policy is checked.  When
            nothing fits, :class:`densenet_fast.MemoryBudgetError` says what
            does (the largest batch, the deepest DenseNet-BC).
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
        recompute: Union[None, str, Sequence[str]] = None,
        memory_budget: Union[None, int, str] = None,
    ) -> None:
        super().__init__()
        growth_rate = memory.positive_int("growth_rate", growth_rate)
        num_init_features = memory.positive_int("num_init_features", num_init_features)
        bn_size = memory.positive_int("bn_size", bn_size)
        num_classes = memory.positive_int("num_classes", num_classes)
        in_channels = memory.positive_int("in_channels", in_channels)
        block_config = memory.as_block_config(block_config)
        if not 0 <= float(drop_rate) < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if recompute is None:
            recompute = "recompute" if memory_efficient else "keep"
        self.in_channels = in_channels
        self.stem = stem
        self.spatial_dims = 2

        if stem == "imagenet":
            layers = [
                ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1, bias=False))]
        self.features = _Features(OrderedDict(layers))

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

        self._initialise(nn.Conv2d)
        self.engine = engine.Settings()
        self.set_backend(backend)
        self.set_memory_budget(memory_budget)
        self.set_recompute(recompute)

    def classifier_layer(self) -> nn.Linear:
        return self.classifier

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._runs_fused_head(x):
            return self.classifier(self.features.fused(x, pooled=True))
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out

    @torch.jit.unused
    def _runs_fused_head(self, x: Tensor) -> bool:
        """Checks ``x`` (and plans a training step on it under a memory budget);
        whether ``features`` and the classifier's pooled input may run as fused
        stages (nobody observes ``features`` or ``norm5``)."""
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():  # (a trace records no check: the modules')
            return False
        self._check_and_plan(x)
        return fastpath.engine_takes(x, self.engine.budgeted) and self.head_blocker() is None


# -- constructors --------------------------------------------------------------------------
Weights = Union[str, os.PathLike, Mapping[str, Tensor], None]  # a local file or a state_dict


def _densenet(arch: str, growth_rate: int, block_config, num_init_features: int, weights, progress: bool,
              pretrained: Optional[bool], **kwargs) -> "DenseNet":
    """Build ``arch`` as torchvision does: ``weights`` is a torchvision weights
    enum (or its name, e.g. ``"DEFAULT"``), loaded through torchvision (torch hub
    cache), or a local weights file or state_dict; ``pretrained`` is torchvision's
    deprecated spelling of the default weights."""
    enum = _WEIGHTS.get(arch)
    if isinstance(weights, bool) and pretrained is None:  # torchvision reads it as the deprecated pretrained
        weights, pretrained = None, weights
    if pretrained is not None:
        warnings.warn("The parameter 'pretrained' is deprecated, please use 'weights' instead.", UserWarning,
                      stacklevel=3)
        if pretrained and weights is None:
            if enum is None:
                raise ValueError(f"No weights available for model {arch}")
            weights = enum.IMAGENET1K_V1
    if isinstance(weights, str) and not os.path.exists(weights):
        if enum is None or weights.rsplit(".", 1)[-1] not in enum.__members__:
            why = "torchvision is missing" if arch in _WEIGHTS else "torchvision publishes none"
            names = f"one of {enum.__name__}'s names ({', '.join(enum.__members__)})" if enum is not None else \
                f"the name of torchvision weights ({arch} has none: {why})"
            raise FileNotFoundError(f"weights={weights!r} is neither a file nor {names}")
        weights = enum.verify(weights)
    if WeightsEnum is not None and isinstance(weights, WeightsEnum):
        if enum is None:
            raise ValueError(f"No weights available for model {arch}")
        weights = enum.verify(weights)
        kwargs["num_classes"] = _only_num_classes(kwargs, len(weights.meta["categories"]))
        model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
        return load_torchvision_weights(model, weights.get_state_dict(progress=progress, check_hash=True))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    return model if weights is None else load_torchvision_weights(model, weights)


def _only_num_classes(kwargs: dict, expected: int) -> int:
    """torchvision's rule: pretrained weights fix ``num_classes``."""
    if kwargs.get("num_classes", expected) != expected:
        raise ValueError(f"The parameter 'num_classes' expected value {expected} but got {kwargs['num_classes']} "
                         f"instead.")
    return expected


def densenet121(*, weights: Union[DenseNet121_Weights, Weights] = None, progress: bool = True,
                pretrained: Optional[bool] = None, **kwargs) -> "DenseNet":
    """DenseNet-121 (k=32, blocks 6-12-24-16).  ``weights``: ``DenseNet121_Weights``
    (or ``"DEFAULT"``), a local torchvision weights file or a state_dict."""
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, weights, progress, pretrained, **kwargs)


def densenet169(*, weights: Union[DenseNet169_Weights, Weights] = None, progress: bool = True,
                pretrained: Optional[bool] = None, **kwargs) -> "DenseNet":
    """DenseNet-169 (k=32, blocks 6-12-32-32); ``weights`` as for :func:`densenet121`."""
    return _densenet("densenet169", 32, (6, 12, 32, 32), 64, weights, progress, pretrained, **kwargs)


def densenet201(*, weights: Union[DenseNet201_Weights, Weights] = None, progress: bool = True,
                pretrained: Optional[bool] = None, **kwargs) -> "DenseNet":
    """DenseNet-201 (k=32, blocks 6-12-48-32); ``weights`` as for :func:`densenet121`."""
    return _densenet("densenet201", 32, (6, 12, 48, 32), 64, weights, progress, pretrained, **kwargs)


def densenet161(*, weights: Union[DenseNet161_Weights, Weights] = None, progress: bool = True,
                pretrained: Optional[bool] = None, **kwargs) -> "DenseNet":
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels); ``weights`` as for :func:`densenet121`."""
    return _densenet("densenet161", 48, (6, 12, 36, 24), 96, weights, progress, pretrained, **kwargs)


def densenet264(*, weights: Weights = None, progress: bool = True, pretrained: Optional[bool] = None,
                **kwargs) -> "DenseNet":
    """DenseNet-264 (k=32, blocks 6-12-64-48); torchvision publishes no weights for
    it, so ``weights`` is a local file or a state_dict."""
    return _densenet("densenet264", 32, (6, 12, 64, 48), 64, weights, progress, pretrained, **kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, **kwargs) -> DenseNet:
    """The paper's CIFAR DenseNet-BC of ``depth`` layers: 3 blocks of ``(depth - 4) / 6``
    bottleneck layers, a 3x3 stem with ``2 * growth_rate`` channels, compression 0.5."""
    n = memory.bc_layers_per_block(depth)
    kwargs.setdefault("stem", "cifar")
    return DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes, **kwargs)


# -- torchvision interoperability ----------------------------------------------------------
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_torchvision_weights(model: DenseNet, weights) -> DenseNet:
    """Load torchvision DenseNet weights: a local file (a path or a file object)
    or a ``state_dict``; the trainer's ``checkpoint.pt`` gives its model's.

    Accepts the old ``norm.1``-style keys of torchvision's published files.
    Never downloads anything.
    """
    if not isinstance(weights, (Mapping, str, os.PathLike)) and not hasattr(weights, "read"):
        raise TypeError(f"weights are a torchvision weights enum or its name, a local file or a state_dict, "
                        f"got {weights!r}")
    state_dict = weights if isinstance(weights, Mapping) else torch.load(weights, map_location="cpu",
                                                                          weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{weights} holds a {type(state_dict).__name__}, not a state_dict (a mapping from parameter "
                        f"names to tensors)")
    if str(state_dict.get("format", "")).startswith("densenet_fast.train/"):
        from .train import CHECKPOINT_FORMAT
        if state_dict["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{weights} is a densenet_fast training checkpoint of format {state_dict['format']!r}; "
                             f"this version reads {CHECKPOINT_FORMAT!r}")
        state_dict = state_dict["model"]
    state_dict = {(_OLD_KEY.sub(r"\1\2", k)): v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True)
    return model


def from_torchvision(tv_model: nn.Module, **kwargs) -> DenseNet:
    """A densenet_fast copy of a torchvision ``DenseNet``: the same module tree,
    with copies of its modules (replaced ones included: a stem without
    max-pooling, another classifier), weights, buffers, device, dtype and
    train/eval mode.  ``kwargs``: ``backend``, ``recompute`` (default: ``"recompute"``
    for a model built with ``memory_efficient=True``, else ``"keep"``), ``memory_budget``."""
    refuse_wrapper(tv_model, "from_torchvision")
    if hasattr(tv_model, "class_layers"):
        raise TypeError(f"{type(tv_model).__name__} has MONAI's tree (class_layers): convert it with "
                        f"densenet_fast.monai.from_monai")
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
        num_classes=getattr(tv_model.classifier, "out_features", 1000),  # a replaced classifier is copied below
        in_channels=conv0.in_channels,
        stem="imagenet" if hasattr(features, "norm0") else "cifar",
        backend=kwargs.pop("backend", None),
    )
    copy_modules(model, tv_model)
    if getattr(first_layer, "memory_efficient", False) is True:
        kwargs.setdefault("recompute", "recompute")  # torchvision's checkpointed layers: the leanest policy
    return set_conversion_options(model, "from_torchvision", kwargs)


def refuse_wrapper(model: nn.Module, caller: str) -> None:
    """Raise for a model inside a wrapper (``torch.compile``'s, ``DataParallel``,
    ``DistributedDataParallel``), saying which module to convert instead."""
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError(f"{caller}: this is torch.compile's wrapper; convert the model it compiles (._orig_mod), "
                        f"then compile the copy")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"{caller}: this is a {type(model).__name__} wrapper; convert the model it wraps (.module)")


def set_conversion_options(model: "_EngineModel", caller: str, options: dict) -> "_EngineModel":
    """``model``, a converter's copy, with ``options`` (``recompute``,
    ``memory_budget``; ``backend`` went to its constructor) set once it holds the
    copied modules, so that the budget is checked against those."""
    budget, recompute = options.pop("memory_budget", None), options.pop("recompute", None)
    if options:
        raise TypeError(f"{caller} takes backend, recompute and memory_budget, got {', '.join(options)}")
    model.set_memory_budget(budget)
    model.set_recompute("keep" if recompute is None else recompute)
    return model


def copy_modules(model: nn.Module, source: nn.Module) -> None:
    """Give ``model`` copies of ``source``'s modules under the same names: each
    module of ``source`` without children (a convolution, norm, activation,
    pooling), and each subtree that ``model`` lacks or holds as one module (a
    replaced classifier), and each dense layer or leaf whose class has code of
    its own (a subclass's methods, which then run as written: the plain path),
    replaces ``model``'s; every other module takes ``source``'s train/eval
    flag.  A module ``source`` holds under several names is copied once.
    ``TypeError`` where the two trees' names still differ, ``source``, its
    ``features``, a block or a transition has code of its own (the converted
    model runs its own classes there), or a hook or a replaced ``forward`` sits
    on one of ``source``'s modules (the copy would call back into ``source``:
    set it on the copy)."""
    ours = dict(model.named_modules(remove_duplicate=False))
    copied: list[str] = []
    memo: dict = {}  # one copy of each module, and of each parameter, however many names share it
    for name, module in source.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix + ".") for prefix in copied):
            continue
        reason, own = fastpath.watched(module), fastpath.own_code(module)
        if reason not in (None, own):
            raise TypeError(f"{reason} on {name or type(source).__name__} of the {type(source).__name__} to "
                            f"convert: set it on the converted model instead")
        if own and (not name or isinstance(ours.get(name), (_Features, _EngineBlock, _EngineTransition))):
            raise TypeError(f"{name or type(source).__name__} of the {type(source).__name__} to convert has {own}, "
                            f"which the converted model would not run (it has its own "
                            f"{type(ours.get(name, model)).__name__} there)")
        if name and (own or not list(module.children()) or name not in ours or not list(ours[name].children())):
            parent, _, child = name.rpartition(".")
            ours[parent].add_module(child, copy.deepcopy(module, memo))
            copied.append(name)
        else:
            ours[name].training = module.training
    if [name for name, _ in model.named_modules(remove_duplicate=False)] != \
            [name for name, _ in source.named_modules(remove_duplicate=False)]:
        raise TypeError(f"{type(source).__name__}'s module tree differs from the DenseNet it describes")
