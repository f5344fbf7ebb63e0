"""When the fused engine may stand in for a module's own forward, and saying so
once when it may not.

The engine computes what a dense block, a transition or the final BatchNorm
computes, without running their submodules.  It may do so only where nobody
could tell the difference: no hooks or parametrizations on those submodules,
exactly the module types and configurations of torchvision's DenseNet, and an
input the engine can take (not traced by ``torch.fx`` or ``torch.jit``, no
``torch.func`` transform active, not empty).  Otherwise the module runs
torchvision's own per-layer code, whose hooks fire, and a warning says once
per module why its memory savings are lost.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                      torch.fx._symbolic_trace.is_fx_tracing)
_warned: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks or backward (pre-)hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether module hooks are registered for every module (``register_module_*_hook``)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def engine_takes(x: Tensor) -> bool:
    """Whether input ``x`` may go through the engine: not a tracer's proxy (fx,
    TorchScript tracing), no ``torch.func`` transform active, at least one value."""
    if isinstance(x, torch.fx.Proxy) or _fx_tracing() or torch.jit.is_tracing():
        return False
    return not torch._C._are_functorch_transforms_active() and x.numel() > 0


def _conv_is(conv: nn.Module, kernel: int, padding: int) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (kernel, kernel) and conv.stride == (1, 1)
            and conv.padding == (padding, padding) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None and conv.padding_mode == "zeros")


def _bn_is_standard(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and bn.affine


def _observed(module: nn.Module, children_only: bool = False) -> Optional[str]:
    """Why the engine cannot stand in for ``module`` (and its descendants), or ``None``."""
    for name, sub in module.named_modules():
        if children_only and sub is module:
            continue
        where = f"{name} of " if name else ""
        if has_hooks(sub):
            return f"a hook on {where}{type(module).__name__}"
        if parametrize.is_parametrized(sub):
            return f"a parametrization on {where}{type(module).__name__}"
        if "forward" in sub.__dict__:
            return f"a replaced forward on {where}{type(module).__name__}"
    return None


def layer_blocker(layer: nn.Module) -> Optional[str]:
    """Why the engine cannot run dense ``layer`` (BN-ReLU-Conv1x1-BN-ReLU-Conv3x3), or ``None``."""
    reason = _observed(layer)
    if reason is not None:
        return reason
    norm1, relu1, conv1 = getattr(layer, "norm1", None), getattr(layer, "relu1", None), getattr(layer, "conv1", None)
    norm2, relu2, conv2 = getattr(layer, "norm2", None), getattr(layer, "relu2", None), getattr(layer, "conv2", None)
    standard = (_bn_is_standard(norm1) and type(relu1) is nn.ReLU and _conv_is(conv1, 1, 0)
                and _bn_is_standard(norm2) and type(relu2) is nn.ReLU and _conv_is(conv2, 3, 1)
                and conv1.in_channels == norm1.num_features and norm2.num_features == conv1.out_channels
                and conv2.in_channels == conv1.out_channels)
    return None if standard else "modules other than torchvision's (BatchNorm2d, ReLU, Conv2d) in a dense layer"


def block_blocker(layers: list[nn.Module]) -> Optional[str]:
    """Why the engine cannot run a dense block of ``layers``, or ``None``."""
    growth = layers[0].conv2.out_channels if hasattr(layers[0], "conv2") else None
    for i, layer in enumerate(layers):
        reason = layer_blocker(layer)
        if reason is None and (layer.conv2.out_channels != growth
                               or layer.conv1.in_channels != layers[0].conv1.in_channels + i * growth
                               or layer.conv1.out_channels != layers[0].conv1.out_channels
                               or layer.drop_rate != layers[0].drop_rate):
            reason = "dense layers of different shapes than torchvision's"
        if reason is not None:
            return f"{reason} (denselayer{i + 1})"
    return None


def transition_blocker(transition: nn.Module) -> Optional[str]:
    """Why the engine cannot run ``transition`` (BN-ReLU-Conv1x1-AvgPool2x2), or ``None``."""
    reason = _observed(transition, children_only=True)
    if reason is not None:
        return reason
    norm, relu = getattr(transition, "norm", None), getattr(transition, "relu", None)
    conv, pool = getattr(transition, "conv", None), getattr(transition, "pool", None)
    standard = (len(transition) == 4 and _bn_is_standard(norm) and type(relu) is nn.ReLU and _conv_is(conv, 1, 0)
                and conv.in_channels == norm.num_features and type(pool) is nn.AvgPool2d
                and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
                and not pool.ceil_mode and pool.divisor_override is None)
    return None if standard else "modules other than torchvision's (BatchNorm2d, ReLU, Conv2d, AvgPool2d)"


def head_norm_is_standard(bn: nn.Module) -> bool:
    """Whether the final BatchNorm can be fused with the ReLU and pooling after it."""
    return _bn_is_standard(bn) and _observed(bn) is None


def warn_plain_path(module: nn.Module, reason: str) -> None:
    """Say once per module and reason that ``module`` runs the plain path."""
    seen = _warned.setdefault(module, set())
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"densenet_fast: {type(module).__name__} runs torchvision's plain per-layer path because of "
                      f"{reason}; its memory savings are lost", RuntimeWarning, stacklevel=3)


def refuse_unsynchronised(sync_group, what: str) -> None:
    """Raise when batch statistics should be synchronised but ``what`` would run
    plain ``nn.BatchNorm2d`` layers, which do not synchronise them."""
    if sync_group is not None:
        raise NotImplementedError(f"synchronised batch statistics run in the fused engine only, but {what}")
