"""When the fused engine may stand in for a module's own forward, and saying so
once when it may not.

The engine computes what a dense block, a transition or the final BatchNorm
computes, without running their submodules.  It may do so only where nobody
could tell the difference: no hooks, parametrizations or code of their
own (a replaced forward, or a subclass's methods: :func:`own_code`) on those submodules,
exactly the module types and configurations of torchvision's or MONAI's
DenseNet (1, 2 or 3 spatial dimensions, ReLU with BatchNorm), no module hooks
registered for every module, and an input the engine can take (not traced by
``torch.fx`` or ``torch.jit``, no ``torch.func`` transform or forward-mode AD
level active, not empty).  Otherwise the module runs its
own per-layer code, whose hooks fire, and a warning says once per module why
its memory savings are lost (once per process for a transform or forward-mode
AD; not for tracing, which computes nothing, or an empty batch).

:func:`dense_layer_parts` is how the engine reads a dense layer: torchvision's
layer holds ``norm1``, ``conv1``, ... itself, MONAI's keeps them in a
``layers`` Sequential.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                      torch.fx._symbolic_trace.is_fx_tracing)
_warned: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()
_warned_inputs: set[tuple[str, bool]] = set()  # (reason, budgeted) said by engine_takes
_warned_backward: set[str] = set()  # what differentiates_recomputation said
_said_while_tracing: set[str] = set()  # the messages say() gave while torch.compile traced

# The module types of each number of spatial dimensions (index: dimensions - 1).
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
CHANNEL_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # whole channels; nn.Dropout: single values
LAYER_MODULES = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")
TRANSFORM = "a torch.func transform (grad, vjp, jvp, vmap)"
FORWARD_AD = "forward-mode AD (the engine's Functions have no jvp)"
GLOBAL_HOOKS = "module hooks registered for every module (as torch's FlopCounterMode and ModuleTracker do)"
# Where the classes are defined whose computation the engine reproduces (or calls): torch.nn's, this
# package's, torchvision's and MONAI's DenseNets.  A subclass's own methods run as written.
KNOWN_MODULES = ("torch.nn.", "densenet_fast.", "torchvision.models.densenet", "monai.networks.nets.densenet")


@dataclass(frozen=True)
class DenseLayerParts:
    """A dense layer's modules under torchvision's names, and its dropout."""

    norm1: Optional[nn.Module]
    relu1: Optional[nn.Module]
    conv1: Optional[nn.Module]
    norm2: Optional[nn.Module]
    relu2: Optional[nn.Module]
    conv2: Optional[nn.Module]
    drop_rate: float  # dropout probability of a forward now (0 in eval mode)
    channel_dropout: bool  # whole channels dropped (MONAI's Dropout2d/3d), else single values
    standard_dropout: bool  # a dropout the engine reproduces


def spatial_dims(conv: nn.Module) -> Optional[int]:
    """The spatial dimensions of a convolution of ``CONVS``, else ``None``."""
    return CONVS.index(type(conv)) + 1 if type(conv) in CONVS else None


def dense_layer_parts(layer: nn.Module) -> DenseLayerParts:
    """The parts of torchvision's dense ``layer`` (modules as attributes, a
    ``drop_rate``) or of MONAI's (``layers``: the six modules, then an optional
    ``dropout`` module)."""
    sequential = getattr(layer, "layers", None)
    if isinstance(sequential, nn.Sequential):
        modules = [sequential._modules.get(name) for name in LAYER_MODULES]
        dropout = sequential._modules.get("dropout")
        if dropout is None:
            return DenseLayerParts(*modules, 0.0, False, list(sequential._modules) == list(LAYER_MODULES))
        dims = spatial_dims(modules[2])
        channel = dims is not None and type(dropout) is CHANNEL_DROPOUTS[dims - 1]
        standard = (list(sequential._modules) == [*LAYER_MODULES, "dropout"]
                    and (channel or type(dropout) is nn.Dropout) and 0 <= dropout.p < 1)
        return DenseLayerParts(*modules, float(dropout.p) if dropout.training else 0.0, channel, standard)
    modules = [getattr(layer, name, None) for name in LAYER_MODULES]
    drop_rate = getattr(layer, "drop_rate", None)
    standard = isinstance(drop_rate, (int, float)) and 0 <= drop_rate < 1
    return DenseLayerParts(*modules, float(drop_rate) if standard and layer.training else 0.0, False, standard)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks or backward (pre-)hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def own_code(module: nn.Module) -> Optional[str]:
    """``"a forward of its own (<class>)"`` or ``"methods of its own (<class>:
    <names>)"`` where a class in ``module``'s MRO before the first one of
    ``KNOWN_MODULES`` defines methods (``__init__`` aside: a subclass that
    overrides ``forward``, or a helper that torchvision's ``forward`` calls),
    else ``None``."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(KNOWN_MODULES):
            return None
        methods = sorted(name for name, value in vars(cls).items() if name != "__init__" and (
            callable(value) or isinstance(value, (staticmethod, classmethod, property))))
        if methods:
            where = f"{cls.__module__}.{cls.__qualname__}"
            return f"a forward of its own ({where})" if "forward" in methods else \
                f"methods of its own ({where}: {', '.join(methods)})"
    return None


def watched(module: nn.Module) -> Optional[str]:
    """What would make calling ``module`` differ from the engine computing what
    it computes: ``"a hook"`` on it, ``"a replaced forward"`` (as accelerate's
    ``add_hook_to_module`` installs), :func:`own_code`'s reason, or ``None``."""
    if has_hooks(module):
        return "a hook"
    return "a replaced forward" if "forward" in module.__dict__ else own_code(module)


def global_hooks() -> bool:
    """Whether module hooks are registered for every module (``register_module_*_hook``)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def engine_takes(x: Tensor, budgeted: bool = False) -> bool:
    """Whether input ``x`` may go through the engine: not a tracer's proxy (fx,
    TorchScript tracing), no ``torch.func`` transform active, no forward-mode AD
    level open (the engine's Functions have no ``jvp``), at least one value.
    A transform or forward-mode AD, which run the plain path for real, is said
    once per process (``budgeted``: by a model with a memory budget, whose plan
    then does not hold)."""
    if isinstance(x, torch.fx.Proxy) or _fx_tracing() or torch.jit.is_tracing():
        return False
    reason = (TRANSFORM if torch._C._are_functorch_transforms_active()
              else FORWARD_AD if forward_ad._current_level >= 0 else None)
    if reason is not None and (reason, budgeted) not in _warned_inputs:
        _warned_inputs.add((reason, budgeted))
        say(f"densenet_fast: DenseNet runs its plain per-layer path under {reason}; its memory savings are lost"
            + ("; the memory budget's plan does not hold" if budgeted else ""), stacklevel=3)
    return reason is None and x.numel() > 0


def differentiates_recomputation(grad: Tensor) -> bool:
    """Whether a Function's backward, given ``grad``, must differentiate a plain
    recomputation instead of running its fused kernels: under
    ``create_graph=True`` (grad mode on), or under a vmap of backward alone
    (``autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``:
    ``grad`` is batched, and the kernels' in-place writes cannot take it), which
    is said once per process.  Traced code checks grad mode alone: dynamo cannot
    trace the batched checks, and a compiled backward given batched gradients
    fails in torch itself (functionalized custom ops have no batching rule; a
    compiled torchvision DenseNet fails too, under inductor)."""
    if torch.compiler.is_compiling():
        return torch.is_grad_enabled()
    functorch = torch._C._functorch
    if functorch.is_legacy_batchedtensor(grad) or functorch.is_batchedtensor(grad) or \
            torch._C._are_functorch_transforms_active():
        if TRANSFORM not in _warned_backward:
            _warned_backward.add(TRANSFORM)
            say(f"densenet_fast: under {TRANSFORM} around backward (is_grads_batched, a vectorized jacobian), "
                f"DenseNet's backward differentiates a plain recomputation", stacklevel=4)
        return True
    return torch.is_grad_enabled()


def input_matches(x: Tensor, dims: Optional[int], channels: int, pooled: bool = False,
                  x_channels: Optional[int] = None) -> bool:
    """Whether ``x`` is a batch ``(N, channels, *spatial)`` with ``dims`` spatial
    dimensions (each at least 2 where the module pools by 2); ``x_channels``
    stands for ``x``'s where ``x`` is the input of a block before the module.
    Other inputs run the modules, which raise their own errors (torch's
    BatchNorm names both channel counts) or treat them as they do."""
    return (dims is not None and x.dim() == dims + 2 and (not pooled or min(x.shape[2:]) >= 2)
            and (x.shape[1] if x_channels is None else x_channels) == channels)


def _as_tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _conv_is(conv: nn.Module, dims: int, kernel: int, padding: int) -> bool:
    return (type(conv) is CONVS[dims - 1] and conv.kernel_size == (kernel,) * dims and conv.stride == (1,) * dims
            and conv.padding == (padding,) * dims and conv.dilation == (1,) * dims and conv.groups == 1
            and conv.bias is None and conv.padding_mode == "zeros")


def bn_is_standard(bn: nn.Module, dims: int) -> bool:
    """Whether ``bn`` is the BatchNorm of ``dims`` spatial dimensions, with affine parameters."""
    return type(bn) is BATCH_NORMS[dims - 1] and bn.affine


def _observed(module: nn.Module, children_only: bool = False) -> Optional[str]:
    """Why the engine cannot stand in for ``module``'s descendants (and
    ``module``, unless ``children_only``), or ``None``."""
    if global_hooks():
        return GLOBAL_HOOKS
    for name, sub in module.named_modules():
        if children_only and sub is module:
            continue
        where = f"{name} of " if name else ""
        reason = watched(sub) or ("a parametrization" if parametrize.is_parametrized(sub) else None)
        if reason is not None:
            return f"{reason} on {where}{type(module).__name__}"
    return None


def layer_blocker(layer: nn.Module) -> Optional[str]:
    """Why the engine cannot run dense ``layer`` (BN-ReLU-Conv1x1-BN-ReLU-Conv3x3), or ``None``."""
    reason = _observed(layer)
    if reason is not None:
        return reason
    p = dense_layer_parts(layer)
    dims = spatial_dims(p.conv1)
    standard = (dims is not None and p.standard_dropout and bn_is_standard(p.norm1, dims)
                and type(p.relu1) is nn.ReLU and _conv_is(p.conv1, dims, 1, 0) and bn_is_standard(p.norm2, dims)
                and type(p.relu2) is nn.ReLU and _conv_is(p.conv2, dims, 3, 1)
                and p.conv1.in_channels == p.norm1.num_features and p.norm2.num_features == p.conv1.out_channels
                and p.conv2.in_channels == p.conv1.out_channels)
    return None if standard else "modules other than BatchNorm, ReLU, Conv and Dropout as in torchvision's or " \
                                 "MONAI's DenseNet in a dense layer"


def block_blocker(layers: list[nn.Module]) -> Optional[str]:
    """Why the engine cannot run a dense block of ``layers``, or ``None``."""
    first = dense_layer_parts(layers[0])
    for i, layer in enumerate(layers):
        reason = layer_blocker(layer)
        p = dense_layer_parts(layer)
        if reason is None and (type(p.conv2) is not type(first.conv2)
                               or p.conv2.out_channels != first.conv2.out_channels
                               or p.conv1.in_channels != first.conv1.in_channels + i * first.conv2.out_channels
                               or p.conv1.out_channels != first.conv1.out_channels):
            reason = "dense layers of different shapes than torchvision's or MONAI's"
        if reason is None and (p.drop_rate, p.channel_dropout) != (first.drop_rate, first.channel_dropout):
            reason = "dense layers of one block with different dropout"
        if reason is not None:
            return f"{reason} (denselayer{i + 1})"
    return None


def transition_blocker(transition: nn.Module) -> Optional[str]:
    """Why the engine cannot run ``transition`` (BN-ReLU-Conv1x1-AvgPool2), or ``None``."""
    reason = _observed(transition, children_only=True)
    if reason is not None:
        return reason
    norm, relu = getattr(transition, "norm", None), getattr(transition, "relu", None)
    conv, pool = getattr(transition, "conv", None), getattr(transition, "pool", None)
    dims = spatial_dims(conv)
    standard = (dims is not None and len(transition) == 4 and bn_is_standard(norm, dims) and type(relu) is nn.ReLU
                and _conv_is(conv, dims, 1, 0) and conv.in_channels == norm.num_features
                and type(pool) is AVG_POOLS[dims - 1] and _as_tuple(pool.kernel_size, dims) == (2,) * dims
                and _as_tuple(pool.stride, dims) == (2,) * dims and _as_tuple(pool.padding, dims) == (0,) * dims
                and not pool.ceil_mode and getattr(pool, "divisor_override", None) is None)
    return None if standard else "modules other than BatchNorm, ReLU, Conv and AvgPool as in torchvision's or " \
                                 "MONAI's DenseNet"


def head_norm_is_standard(bn: nn.Module) -> bool:
    """Whether the final BatchNorm can be fused with the ReLU and pooling after it."""
    return any(bn_is_standard(bn, dims) for dims in (1, 2, 3)) and _observed(bn) is None


def global_pool_is_standard(relu: nn.Module, pool: nn.Module, flatten: nn.Module) -> bool:
    """Whether ReLU, global average pooling and flattening (MONAI's ``class_layers``
    before ``out``) may run fused with the final BatchNorm."""
    dims = ADAPTIVE_AVG_POOLS.index(type(pool)) + 1 if type(pool) in ADAPTIVE_AVG_POOLS else None
    return (dims is not None and type(relu) is nn.ReLU and _as_tuple(pool.output_size, dims) == (1,) * dims
            and type(flatten) is nn.Flatten and flatten.start_dim == 1 and flatten.end_dim == -1
            and all(_observed(m) is None for m in (relu, pool, flatten)))


def warn_plain_path(module: nn.Module, reason: str, part: Optional[str] = None) -> None:
    """Say once per module and reason that ``module`` runs the plain path, or
    that ``part`` of it runs as modules (the rest stays fused)."""
    seen = _warned.setdefault(module, set())
    if reason not in seen:
        seen.add(reason)
        what = "runs the plain per-layer path" if part is None else f"runs {part} as modules"
        lost = "its memory savings are lost" if part is None else "what their fused pass saves is lost (the rest stays " \
            "fused)"
        say(f"densenet_fast: {type(module).__name__} {what} because of {reason}; {lost}", stacklevel=3)


def say(message: str, stacklevel: int) -> None:
    """``warnings.warn(message, RuntimeWarning)``; while ``torch.compile`` traces,
    at trace time, once per message (dynamo's ``comptime``: dynamo cannot trace
    ``warnings.warn``, which broke the graph and failed ``fullgraph=True`` where
    torchvision's model compiles whole)."""
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime  # dynamo is loaded: it is tracing
        comptime(_say_at_trace_time)
    else:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def _say_at_trace_time(ctx) -> None:
    """:func:`say`'s warning, run by dynamo as it traces ``say`` (``ctx``: its
    frame).  Said once per message: the caller's "once" is a traced side effect,
    applied only when the graph runs, and dynamo may trace a frame twice."""
    message = ctx.get_local("message").as_python_constant()
    if message not in _said_while_tracing:
        _said_while_tracing.add(message)
        warnings.warn(message, RuntimeWarning)


def refuse_unsynchronised(sync_group, what: str) -> None:
    """Raise when batch statistics should be synchronised but ``what`` would run
    plain BatchNorm layers, which do not synchronise them."""
    if sync_group is not None:
        raise NotImplementedError(f"synchronised batch statistics run in the fused engine only, but {what}")
