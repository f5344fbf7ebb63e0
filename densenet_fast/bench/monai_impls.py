"""MONAI's DenseNets in the model benchmarks: ``bench models --model
monai-densenet121 --image-size 64x128x128`` (an ``--image-size`` of three
sides is a volume, of one side a square image), and ``bench depth --family
monai`` (MONAI's ``DenseNet`` shaped as DenseNet-BC: ``block_config=(n, n, n)``,
``init_features=2k``, growth ``k``, depth ``6n + 4``; spec name
``monai-densenet_bc-<dims>d``).

Implementations, all on the same weights (the ``state_dict`` keys are MONAI's):

- ``monai-eager``: ``monai.networks.nets.DenseNet121`` (169, 201, 264) as MONAI
  builds it (concatenation per layer; MONAI has no memory-efficient option);
- ``monai-ckpt``: the same with each dense layer's ``layers`` (norm1 .. conv2)
  under ``torch.utils.checkpoint`` (``use_reentrant=False``), what a user
  would try first: each layer's concatenated input is still stored;
- ``monai-compile``: ``torch.compile`` of ``monai-eager``;
- ``fast-<backend>-<policy>``: :mod:`densenet_fast.monai`'s model
  (``fast-<backend>-auto``: ``recompute="auto"`` under a memory budget).

Inputs: ``(batch, 1, *size)`` standard normal volumes (one channel, as CT or
MRI) and labels of ``num_classes`` (2) classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..memory import Architecture
from ..models import CHANNELS_LAST
from .impls import POLICIES, ModelSpec

PREFIX = "monai-"
MONAI_IMPLS = ("monai-eager", "monai-ckpt", "monai-compile")
CLASS_NAMES = {"densenet121": "DenseNet121", "densenet169": "DenseNet169", "densenet201": "DenseNet201",
               "densenet264": "DenseNet264", "densenet_bc": "DenseNet"}


def is_monai(spec: ModelSpec) -> bool:
    return spec.name.startswith(PREFIX)


def spatial_dims(image_size) -> int:
    """Spatial dimensions of an ``--image-size`` (one side: 2-D, a list of sides: that many)."""
    dims = len(image_size) if isinstance(image_size, (list, tuple)) else 2
    if dims not in (1, 2, 3):
        raise ValueError(f"an input of 1, 2 or 3 spatial dimensions, got {image_size}")
    return dims


def parse(text: str, image_size, num_classes: int | None = None) -> ModelSpec:
    """``"monai-densenet121"`` for inputs of ``image_size`` as a spec named
    ``monai-densenet121-3d`` (see :func:`spatial_dims`)."""
    arch = text[len(PREFIX):]
    if arch not in CLASS_NAMES or arch == "densenet_bc":
        raise ValueError(f"unknown MONAI model {text!r}: use one of "
                         f"{[PREFIX + a for a in CLASS_NAMES if a != 'densenet_bc']}")
    return ModelSpec(f"{PREFIX}{arch}-{spatial_dims(image_size)}d", num_classes=num_classes or 2)


def bc_spec(depth: int, growth_rate: int, image_size) -> ModelSpec:
    """MONAI's ``DenseNet`` shaped as DenseNet-BC of ``depth`` (``6n + 4``) for inputs of ``image_size``."""
    return ModelSpec(f"{PREFIX}densenet_bc-{spatial_dims(image_size)}d", depth, growth_rate, num_classes=2)


def _arch_and_dims(spec: ModelSpec) -> tuple[str, int]:
    arch, dims = spec.name[len(PREFIX):].rsplit("-", 1)
    return arch, int(dims[:-1])


def default_impls(device: str, compile_: bool) -> list[str]:
    """MONAI eager, checkpointed and (if asked) compiled; densenet_fast with every
    backend that runs on ``device`` and every recompute policy."""
    from .impls import default_impls as torchvision_defaults
    fast = [impl for impl in torchvision_defaults(device, False) if impl.startswith("fast-")]
    return ["monai-eager", "monai-ckpt"] + (["monai-compile"] if compile_ else []) + fast


def checkpoint_dense_layers(model: nn.Module) -> nn.Module:
    """Run each dense layer's ``layers`` of a MONAI DenseNet under
    ``torch.utils.checkpoint`` (the module tree and ``state_dict`` stay MONAI's)."""
    from monai.networks.nets.densenet import _DenseLayer
    from torch.utils.checkpoint import checkpoint

    for module in model.modules():
        if isinstance(module, _DenseLayer):
            plain = module.layers.forward
            module.layers.forward = lambda x, plain=plain: checkpoint(plain, x, use_reentrant=False)
    return model


def constructor_arguments(spec: ModelSpec) -> dict:
    """The keyword arguments of the MONAI class that builds ``spec``."""
    arch, dims = _arch_and_dims(spec)
    kwargs = dict(spatial_dims=dims, in_channels=1, out_channels=spec.num_classes, dropout_prob=spec.drop_rate)
    if arch == "densenet_bc":
        n, k = (spec.depth - 4) // 6, spec.growth_rate
        kwargs.update(init_features=2 * k, growth_rate=k, block_config=(n, n, n))
    return kwargs


def architecture(spec: ModelSpec) -> Architecture:
    """``spec``'s network as the memory model describes it."""
    arch, dims = _arch_and_dims(spec)
    depth, growth_rate = (spec.depth, spec.growth_rate) if arch == "densenet_bc" else (None, None)
    return Architecture.named(arch, depth, growth_rate, spec.num_classes, in_channels=1, spatial_dims=dims,
                              tree="monai", drop_rate=spec.drop_rate)


def build(impl: str, spec: ModelSpec, device: str, channels_last: bool, seed: int = 0,
          memory_budget: float | None = None) -> nn.Module:
    """Implementation ``impl`` of the MONAI model ``spec`` on ``device`` (``memory_budget``:
    for ``fast-<backend>-auto``)."""
    arch, dims = _arch_and_dims(spec)
    torch.manual_seed(seed)
    kwargs = constructor_arguments(spec)
    if impl in MONAI_IMPLS:
        from monai.networks import nets
        model = getattr(nets, CLASS_NAMES[arch])(**kwargs)
        if impl == "monai-ckpt":
            checkpoint_dense_layers(model)
    elif impl.startswith("fast-") and impl.split("-")[2] in (*POLICIES, "auto"):
        from .. import monai as fast_monai
        _, backend, policy = impl.split("-")
        model = getattr(fast_monai, CLASS_NAMES[arch])(**kwargs, backend=None if backend == "auto" else backend,
                                                       recompute=policy, memory_budget=memory_budget)
    else:
        raise ValueError(f"unknown implementation {impl!r} of {spec.name}")
    model = model.to(device)
    if channels_last and dims > 1:
        model = model.to(memory_format=CHANNELS_LAST[dims + 2])
    if impl == "monai-compile":
        model = torch.compile(model)
    return model


def make_inputs(spec: ModelSpec, batch: int, image_size, device: str, channels_last: bool,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random one-channel inputs ``(batch, 1, *image_size)`` and labels."""
    _, dims = _arch_and_dims(spec)
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size,) * dims
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *size, generator=generator)
    y = torch.randint(spec.num_classes, (batch,), generator=generator)
    if channels_last and dims > 1:
        x = x.contiguous(memory_format=CHANNELS_LAST[dims + 2])
    return x.to(device), y.to(device)
