"""The implementations every benchmark compares, built on the same weights.

Names:
- ``tv-eager``: torchvision's DenseNet (naive, ``memory_efficient=False``);
- ``tv-memeff``: torchvision with ``memory_efficient=True`` (checkpointing);
- ``tv-compile``: ``torch.compile`` of ``tv-eager``;
- ``fast-<backend>-<policy>``: densenet_fast with that backend and recompute
  policy, e.g. ``fast-cpp-keep``; ``fast-auto-<policy>`` lets it choose the
  backend; ``fast-<backend>-auto`` is ``recompute="auto"`` under a memory budget.

Models are named ``densenet121`` (also 161, 169, 201, 264) or
``densenet_bc-<depth>`` (CIFAR DenseNet-BC, ``growth_rate`` k).  For
DenseNet-BC torchvision gets the same 3x3 stem as densenet_fast, so the two
trees are identical and the stem does not bias the comparison.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..memory import OptimizerSpec, bc_layers_per_block

TORCHVISION_IMPLS = ("tv-eager", "tv-memeff", "tv-compile")
POLICIES = ("keep", "recompute")
IMAGENET_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")


@dataclass(frozen=True)
class ModelSpec:
    """Which network: ``name`` is ``densenetXXX`` or ``densenet_bc``; ``drop_rate``
    the dropout after each dense layer (torchvision's ``drop_rate``, MONAI's
    ``dropout_prob``)."""

    name: str
    depth: int = 100
    growth_rate: int = 12
    num_classes: int = 10
    drop_rate: float = 0.0

    @staticmethod
    def parse(text: str, growth_rate: int = 12, num_classes: int | None = None) -> "ModelSpec":
        """``"densenet121"`` or ``"densenet_bc-100"``."""
        if text in IMAGENET_MODELS:
            return ModelSpec(text, num_classes=num_classes or 1000)
        if text.startswith("densenet_bc-"):
            depth = text.split("-", 1)[1]
            if not depth.isdecimal():
                raise ValueError(f"densenet_bc-<depth> takes a whole number of layers, got {text!r}")
            depth = int(depth)
            bc_layers_per_block(depth)
            return ModelSpec("densenet_bc", depth, growth_rate, num_classes or 10)
        raise ValueError(f"unknown model {text!r}: use one of {IMAGENET_MODELS} or densenet_bc-<depth>")

    def label(self) -> str:
        dropout = f", dropout {self.drop_rate:g}" if self.drop_rate else ""
        if self.name == "densenet_bc":
            return f"DenseNet-BC-{self.depth} (k={self.growth_rate}{dropout})"
        if self.name.startswith("monai-densenet_bc-"):  # MONAI's DenseNet shaped as DenseNet-BC, in <d>d
            return f"MONAI DenseNet-BC-{self.depth} (k={self.growth_rate}, {self.name.rsplit('-', 1)[1][:-1]}-D" \
                   f"{dropout})"
        return self.name + (f" ({dropout[2:]})" if dropout else "")

    def to_dict(self) -> dict:
        return asdict(self)


def check_impl_names(impls: list[str], baselines: tuple[str, ...]) -> None:
    """``ValueError`` naming each of ``impls`` that is none of ``baselines`` and no
    ``fast-<backend>-<policy>`` (``<backend>``: one of the backends or ``auto``;
    ``<policy>``: ``keep``, ``recompute`` or ``auto``)."""
    from ..backends import BACKEND_NAMES
    fast = {f"fast-{b}-{p}" for b in (*BACKEND_NAMES, "auto") for p in (*POLICIES, "auto")}
    unknown = [impl for impl in impls if impl not in baselines and impl not in fast]
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}: expected {', '.join(baselines)} or "
                         f"fast-<backend>-<policy> (backend: {', '.join(BACKEND_NAMES)} or auto; policy: "
                         f"{', '.join(POLICIES)} or auto)")


def default_impls(device: str, compile_: bool) -> list[str]:
    """torchvision (eager, memory_efficient, compiled if asked) and densenet_fast
    with every backend that runs on ``device`` and every recompute policy."""
    from ..backends import BackendUnavailableError, available_backends, get_backend

    def runs_here(backend: str) -> bool:
        try:
            get_backend(backend, torch.device(device))
            return True
        except BackendUnavailableError:
            return False

    backends = [b for b in available_backends() if runs_here(b)]
    impls = ["tv-eager", "tv-memeff"] + (["tv-compile"] if compile_ else [])
    return impls + [f"fast-{b}-{p}" for b in backends for p in POLICIES]


def torchvision_model(spec: ModelSpec, memory_efficient: bool) -> nn.Module:
    """torchvision's DenseNet for ``spec`` (with the 3x3 stem for DenseNet-BC)."""
    import torchvision.models as tvm
    if spec.name != "densenet_bc":
        return getattr(tvm, spec.name)(num_classes=spec.num_classes, memory_efficient=memory_efficient,
                                       drop_rate=spec.drop_rate)
    n, k = (spec.depth - 4) // 6, spec.growth_rate
    model = tvm.DenseNet(growth_rate=k, block_config=(n, n, n), num_init_features=2 * k, drop_rate=spec.drop_rate,
                         num_classes=spec.num_classes, memory_efficient=memory_efficient)
    stem = nn.Conv2d(3, 2 * k, kernel_size=3, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight)
    rest = [(name, m) for name, m in model.features.named_children() if name not in ("conv0", "norm0", "relu0", "pool0")]
    model.features = nn.Sequential(OrderedDict([("conv0", stem)] + rest))
    return model


def fast_model(spec: ModelSpec, backend: str, policy: str, memory_budget: float | None = None) -> nn.Module:
    """densenet_fast's model for ``spec`` (torchvision is not imported)."""
    from .. import models
    options = {"backend": None if backend == "auto" else backend, "recompute": policy,
               "num_classes": spec.num_classes, "drop_rate": spec.drop_rate, "memory_budget": memory_budget}
    if spec.name == "densenet_bc":
        return models.densenet_bc(spec.depth, spec.growth_rate, **options)
    return getattr(models, spec.name)(**options)


def build(impl: str, spec: ModelSpec, device: str, channels_last: bool, seed: int = 0,
          memory_budget: float | None = None) -> nn.Module:
    """Implementation ``impl`` of ``spec`` on ``device`` (weights drawn from
    ``seed``; :func:`share_weights` makes them identical across implementations;
    ``memory_budget`` for ``recompute="auto"``)."""
    torch.manual_seed(seed)
    if spec.name.startswith("monai-"):  # MONAI's DenseNets: densenet_fast/bench/monai_impls.py
        from . import monai_impls
        return monai_impls.build(impl, spec, device, channels_last, seed, memory_budget)
    if impl in TORCHVISION_IMPLS:
        model = torchvision_model(spec, memory_efficient=impl == "tv-memeff")
    elif impl.startswith("fast-"):
        _, backend, policy = impl.split("-")
        model = fast_model(spec, backend, policy, memory_budget)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if impl == "tv-compile":
        model = torch.compile(model)
    return model


def share_weights(models: list[nn.Module]) -> None:
    """Copy the first model's parameters and buffers into the others (the
    module trees are identical; ``torch.compile`` wraps its model in ``_orig_mod``)."""
    unwrap = lambda m: getattr(m, "_orig_mod", m)  # noqa: E731
    state = unwrap(models[0]).state_dict()
    for model in models[1:]:
        unwrap(model).load_state_dict(state, strict=True)


def make_inputs(spec: ModelSpec, batch: int, image_size: int, device: str, channels_last: bool,
                seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images ``(batch, 3, s, s)`` (standard normal, never zeros) and labels."""
    if spec.name.startswith("monai-"):
        from . import monai_impls
        return monai_impls.make_inputs(spec, batch, image_size, device, channels_last, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=generator)
    y = torch.randint(spec.num_classes, (batch,), generator=generator)
    x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x, y.to(device)


def offloaded(device_type: str):
    """The context of a training forward with ``--offload``: on CUDA the trainer's,
    ``save_on_cpu(pin_memory=True)``; on the CPU a stand-in with the same
    lifetimes that keeps the saved tensors out of the process's memory, in an
    unlinked temporary file (written when a node saves, read back as a new
    contiguous tensor when its backward unpacks), so that the memory model's
    offload can be checked against measurements without a GPU."""
    if device_type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    spill = _Spill()  # closed when the last packed tensor (which holds it) is released

    def pack(tensor: torch.Tensor) -> tuple:
        offset = spill.file.seek(0, 2)
        spill.file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        return spill, offset, tensor.shape, tensor.dtype

    def unpack(packed: tuple) -> torch.Tensor:
        source, offset, shape, dtype = packed
        out = torch.empty(shape, dtype=dtype)
        source.file.seek(offset)
        source.file.readinto(out.reshape(-1).view(torch.uint8).numpy())
        return out
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _Spill:
    """The unlinked file :func:`offloaded`'s saved tensors go to, closed with it."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()

    def __del__(self) -> None:
        self.file.close()


class Step:
    """One training step (``zero_grad(set_to_none=True)``, forward, cross-entropy,
    backward, the update of ``optimizer``: the trainer's SGD recipe unless told)
    or one inference forward (eval mode, no grad), optionally under autocast;
    ``offload``: the training forward and loss under :func:`offloaded`."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool,
                 autocast_dtype: torch.dtype | None, optimizer: OptimizerSpec = OptimizerSpec(),
                 offload: bool = False) -> None:
        self.model, self.x, self.y, self.train = model, x, y, train
        self.autocast_dtype, self.offload = autocast_dtype, offload
        self.optimizer = optimizer.build(model.parameters()) if train else None
        model.train(train)

    def __call__(self) -> None:
        device_type = self.x.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if not self.train:
                with torch.no_grad():
                    self.model(self.x)
                return
            self.optimizer.zero_grad(set_to_none=True)
            with offloaded(device_type) if self.offload else contextlib.nullcontext():
                loss = F.cross_entropy(self.model(self.x).float(), self.y)
        loss.backward()
        self.optimizer.step()
