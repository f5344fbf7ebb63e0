"""The memory model: the peak memory of one training step, predicted from the
architecture and the step's setup without running it (docs/memory.md).

A step is ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward
and the optimizer's update.  :func:`predict` walks the step in the order the
code allocates and frees (:class:`Timeline`): the stem, each dense stage's
forward (:mod:`densenet_fast.engine.stage`), the classifier, each stage's
backward in reverse, the stem's backward and the optimizer.  It returns the
bytes that live between steps (``persistent``: parameters, gradients,
optimizer state) and the peak of the step above them (``step``), broken down
into what was alive at that peak.

Every size is what the code allocates: block buffers (``M*C_total``, ``M`` the
batch's pixels, ``N*H*W``, or voxels, ``N*D*H*W``), bottleneck outputs
(``M*4k``), each stage pass's scratch slots (their largest request in the
pass, freed when it ends), folded BN coefficients (``4*C``), the 3x3
convolution's output and input gradient, the gradient passed between stages, the backends' workspaces
and the parameters' gradients: one tensor per stage that its backward copies
each layer's gradients into as soon as they are made (``GradientStore``).
On the CPU, tensors below glibc's mmap threshold count at the C heap's
high-water mark, and the heap's pages beyond them at a measured constant
(:class:`Timeline`).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import numbers
import operator
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Iterator, Optional, Sequence, Union

import torch

from .backends import gpu_partials
from .engine import stem
from .engine.stage import bfloat16_weight_gradient_fails
from .engine.fastpath import CHANNEL_DROPOUTS

POLICIES = ("keep", "recompute")
TREES = ("torchvision", "monai")  # the module trees: densenet_fast.DenseNet's, densenet_fast.monai's
OPTIMIZERS = ("sgd", "adam", "adamw")
NAMED_MODELS = {  # torchvision's DenseNets: growth rate, block config, stem channels
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}
ELEMENT_BYTES = {torch.float64: 8, torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPP_TILE_BYTES = 512 * 1024  # the C++ kernels' per-thread tiles (csrc/ops/cpu/bn_relu_conv_kernel.cpp)
CPP_TILE_ROWS = (32, 1024)
ATEN_SMALL_CONVOLUTION = 20480  # input values up to which ATen convolves batch 1 by im2col, not oneDNN
CPP_MAX_GROUPS = 16  # the weight-gradient pass's row groups (kMinChunks), at most
CPP_MAX_BLOCK_COLUMNS = 256  # its column blocks (kMaxBlockColumns)
CPP_PARTIAL_BYTES = 4 * 1024 * 1024  # its row groups' copies of dW, at most (kPartialBytes)
TRITON_STATS_ROWS = 128  # channel_stats' rows per tile (TILE_STATS_BLOCK_M, backends/triton_kernels/channel_stats.py)
TRITON_MIN_BLOCK_M = 32  # the smallest dense-layer forward tile (bn_relu_conv.py's configs): its statistics'
# partials at most (16-bit data and TF32 take tiles of 64 rows or more)
TRITON_MAX_BLOCK_K = 128  # output channels per program of the backward (MAX_BLOCK_K, bn_relu_conv.py)
ASSUMED_MULTIPROCESSORS = 132  # an H100's or H200's: a CUDA plan made where there is no GPU
ONEDNN_SLICE_PIXELS_PER_THREAD = 256  # gemm convolution: below this per thread, every thread takes images


def parse_bytes(value: Union[numbers.Real, str]) -> int:
    """``8589934592``, ``"8GiB"``, ``"8 GB"``, ``"512MiB"``, ``"8gb"`` or ``"1.5e9"``
    as bytes (rounded down; at least 1).  A string in bytes (no unit, or ``B``)
    must be a whole number (``"1.5"`` is refused: a unit forgotten)."""
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        units = {"": 1, "B": 1}
        for power, prefix in enumerate("KMGTPE", start=1):
            units[f"{prefix}B"], units[f"{prefix}IB"] = 10 ** (3 * power), 2 ** (10 * power)
            if prefix != "E":  # a bare "1e" is more likely a typo than an exbibyte
                units[prefix] = 2 ** (10 * power)
        number = text.rstrip("KMGTPEkmgtpeIiBb")
        try:
            unit = units[text[len(number):].upper()]
            nbytes = float(number) * unit
        except (ValueError, KeyError):
            raise ValueError(f"cannot read {value!r} as a memory size; write e.g. '8GiB', '512MiB', '2GB' or "
                             f"bytes") from None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # NumPy's numbers too
        nbytes = int(value) if isinstance(value, numbers.Integral) else float(value)
    else:
        raise TypeError(f"a memory budget is a number of bytes or a string like '8GiB', got {type(value).__name__}")
    if (isinstance(nbytes, float) and not math.isfinite(nbytes)) or nbytes < 1:
        raise ValueError(f"a memory budget must be a finite number of bytes, at least 1, got {value!r}")
    if isinstance(value, str) and unit == 1 and nbytes != int(nbytes):
        raise ValueError(f"a memory budget in bytes is a whole number, got {value!r}; give a larger unit, "
                         f"e.g. '{number}GiB'")
    return int(nbytes)


def format_bytes(nbytes: float) -> str:
    """``1.5 GiB``, ``12.3 MiB``, ``1000 MiB``: binary units, three significant
    digits (more where the number has more before the point; 1000 EiB and
    more in powers of ten: ``8.67e+11 EiB``)."""
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            text = f"{nbytes / size:.3g}"
            return f"{text if 'e' not in text or unit == 'EiB' else f'{nbytes / size:.0f}'} {unit}"
    return f"{nbytes:.0f} B"


# -- what is trained ----------------------------------------------------------------------------
def layer_dropout(layer: torch.nn.Module) -> tuple[float, bool]:
    """A dense layer's dropout in a training step: ``(probability, whole
    channels)`` (torchvision's ``drop_rate``; MONAI's ``dropout`` module, of
    single values or of whole channels)."""
    monai = getattr(layer, "layers", None)
    dropout = monai._modules.get("dropout") if monai is not None else None
    drop_rate = dropout.p if dropout is not None else getattr(layer, "drop_rate", 0.0)
    return float(drop_rate), isinstance(dropout, CHANNEL_DROPOUTS)


@dataclass(frozen=True)
class Architecture:
    """A DenseNet as :class:`densenet_fast.DenseNet` (``tree="torchvision"``, images)
    or :class:`densenet_fast.monai.DenseNet` (``tree="monai"``: ImageNet's stem,
    ``spatial_dims`` 1, 2 or 3) builds it."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int = 4
    num_classes: int = 1000
    in_channels: int = 3
    stem: str = "imagenet"
    drop_rate: float = 0.0
    spatial_dims: int = 2
    channel_dropout: bool = False  # MONAI's Dropout2d/3d: a mask of (N, k), not of every value
    tree: str = "torchvision"

    def __post_init__(self) -> None:
        for name in ("growth_rate", "num_init_features", "bn_size", "num_classes", "in_channels"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        object.__setattr__(self, "block_config", as_block_config(self.block_config))
        if self.tree not in TREES:
            raise ValueError(f"tree must be one of {TREES}, got {self.tree!r}")
        if self.spatial_dims not in (1, 2, 3) or (self.tree == "torchvision" and self.spatial_dims != 2):
            raise ValueError(f"spatial_dims must be 2 for torchvision's tree and 1, 2 or 3 for MONAI's, got "
                             f"{self.spatial_dims!r}")
        if self.tree == "monai" and self.stem != "imagenet":
            raise ValueError("MONAI's tree has ImageNet's stem")
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, numbers.Real) \
                or not 0 <= self.drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @staticmethod
    def of(model: torch.nn.Module) -> "Architecture":
        """The architecture of a :class:`densenet_fast.DenseNet` or a
        :class:`densenet_fast.monai.DenseNet`."""
        blocks = model.blocks()
        layer = blocks[0].denselayer1  # (memory_model_blocker refuses blocks whose dropout differs)
        monai = getattr(layer, "layers", None)  # MONAI's layer: a Sequential, dropout a module in it
        conv1, conv2 = (monai.conv1, monai.conv2) if monai is not None else (layer.conv1, layer.conv2)
        k = conv2.out_channels
        drop_rate, channel_dropout = layer_dropout(layer)
        return Architecture(k, tuple(len(b) for b in blocks), model.features.conv0.out_channels,
                            conv1.out_channels // k, model.classifier_layer().out_features, model.in_channels,
                            model.stem, drop_rate, model.spatial_dims, channel_dropout,
                            "torchvision" if monai is None else "monai")

    @staticmethod
    def named(name: str, depth: Optional[int] = None, growth_rate: Optional[int] = None,
              num_classes: Optional[int] = None, in_channels: Optional[int] = None,
              spatial_dims: int = 2, tree: Optional[str] = None, drop_rate: float = 0.0) -> "Architecture":
        """``densenet121`` (161, 169, 201, 264) or ``densenet_bc`` with ``depth``
        (``6n + 4``) and ``growth_rate`` (12), as the constructors of the same name
        build them in ``tree``: torchvision's for images (the default for
        ``spatial_dims`` 2), MONAI's (:mod:`densenet_fast.monai`; the default
        otherwise; DenseNet-BC as MONAI's ``DenseNet`` with ImageNet's stem and
        ``init_features=2k``); ``drop_rate``: torchvision's ``drop_rate``, MONAI's
        ``dropout_prob`` (whole channels in 2-D and 3-D, as MONAI's ``Dropout2d/3d``)."""
        tree = tree or ("torchvision" if spatial_dims == 2 else "monai")
        if name == "densenet_bc":
            n = bc_layers_per_block(100 if depth is None else depth)
            k = 12 if growth_rate is None else growth_rate
            arch = Architecture(k, (n, n, n), 2 * k, num_classes=10 if num_classes is None else num_classes,
                                stem="cifar")  # a bad k is named first: growth_rate is checked first
        elif name not in NAMED_MODELS:
            raise ValueError(f"unknown model {name!r}: use densenet_bc or one of {tuple(NAMED_MODELS)}")
        elif depth is not None:
            raise ValueError(f"{name} has a fixed depth; --depth is for densenet_bc")
        else:
            k, blocks, init = NAMED_MODELS[name]
            arch = Architecture(k if growth_rate is None else growth_rate, blocks, init,
                                num_classes=1000 if num_classes is None else num_classes)
        stem = "imagenet" if tree == "monai" else arch.stem
        return replace(arch, in_channels=arch.in_channels if in_channels is None else in_channels, stem=stem,
                       spatial_dims=spatial_dims, tree=tree, drop_rate=drop_rate,
                       channel_dropout=bool(drop_rate) and tree == "monai" and spatial_dims > 1)

    def with_depth(self, depth: int) -> "Architecture":
        """The DenseNet-BC of ``depth`` in this tree, with this growth rate,
        bottleneck width, dropout, head and input: torchvision's the paper's (CIFAR
        stem), MONAI's its ``DenseNet`` shaped so (ImageNet's stem, ``init_features=2k``)."""
        bc = Architecture.named("densenet_bc", depth, self.growth_rate, self.num_classes, self.in_channels,
                                self.spatial_dims, self.tree)
        return replace(bc, bn_size=self.bn_size, drop_rate=self.drop_rate, channel_dropout=self.channel_dropout)

    @property
    def depth(self) -> Optional[int]:
        """DenseNet-BC's depth ``6n + 4``, when this is one (as :meth:`with_depth` builds it)."""
        n = self.block_config[0]
        stem = "cifar" if self.tree == "torchvision" else "imagenet"
        bc = self.stem == stem and len(self.block_config) == 3 and set(self.block_config) == {n}
        return 6 * n + 4 if bc and self.num_init_features == 2 * self.growth_rate else None

    @property
    def width(self) -> int:
        """Bottleneck channels ``bn_size * k``."""
        return self.bn_size * self.growth_rate

    def block_channels(self) -> list[tuple[int, int]]:
        """``(C0, C_total)`` of every dense block: input and output channels."""
        out, c = [], self.num_init_features
        for i, n in enumerate(self.block_config):
            out.append((c, c + n * self.growth_rate))
            c = (c + n * self.growth_rate) // 2
        return out

    def parameter_sizes(self) -> Iterator[int]:
        """Elements of every parameter tensor, in the model's order."""
        yield from self.stem_parameter_sizes()
        for b in range(len(self.block_config)):
            yield from self.stage_parameter_sizes(b)
        yield from self.classifier_parameter_sizes()

    @property
    def stem_kernel(self) -> int:
        """Width of the stem's convolution: 7 (ImageNet's stem) or 3 (CIFAR's)."""
        return 7 if self.stem == "imagenet" else 3

    def stem_parameter_sizes(self) -> list[int]:
        """Elements of the stem's parameters: its convolution (and, ImageNet's, its BN)."""
        conv = self.num_init_features * self.in_channels * self.kernel_taps(self.stem_kernel)
        return [conv, self.num_init_features, self.num_init_features] if self.stem == "imagenet" else [conv]

    def classifier_parameter_sizes(self) -> list[int]:
        """Elements of the classifier's weight and bias."""
        return [self.num_classes * self.block_channels()[-1][1], self.num_classes]

    def stage_parameter_sizes(self, b: int) -> list[int]:
        """Elements of dense stage ``b``'s parameters, as its Function receives
        them: each layer's six, then its tail's (a transition's BN and
        convolution, or the final BN)."""
        k, w, d = self.growth_rate, self.width, self.spatial_dims
        c_in, c_total = self.block_channels()[b]
        out = []
        for layer in range(self.block_config[b]):
            c = c_in + layer * k
            out += [c, c, w * c, w, w, k * w * 3**d]
        return out + [c_total, c_total] + ([c_total * (c_total // 2)] if b + 1 < len(self.block_config) else [])

    def parameter_count(self) -> int:
        return sum(self.parameter_sizes())

    def spatial_sizes(self, size: Sequence[int]) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """``(stem convolution output, [every block's input])`` for an input of
        ``size``; each is one side per spatial dimension (``(H, W)``, ``(D, H, W)``)."""
        if len(size) != self.spatial_dims:
            raise ValueError(f"an input of {self.spatial_dims} spatial dimension(s) for this model, got size "
                             f"{tuple(size)}")
        sides = [self._block_sides(side) for side in size]
        if min(blocks[-1] for _, blocks in sides) < 1:
            least = next(n for n in itertools.count(1) if self._block_sides(n)[1][-1] >= 1)
            raise ValueError(f"an input of {'x'.join(map(str, size))} is too small for this model: the last "
                             f"dense block would have no pixels (it needs at least {least} on every side)")
        return tuple(stem for stem, _ in sides), [tuple(blocks[b] for _, blocks in sides)
                                                   for b in range(len(self.block_config))]

    def _block_sides(self, side: int) -> tuple[int, list[int]]:
        """``(stem convolution output, [every block's input])`` along one side of ``side``."""
        if self.stem == "imagenet":
            side = (side - 1) // 2 + 1  # conv0: 7, stride 2, padding 3
        stem = side
        if self.stem == "imagenet":
            side = (side - 1) // 2 + 1  # pool0: 3, stride 2, padding 1
        blocks = []
        for _ in self.block_config:
            blocks.append(side)
            side //= 2  # a transition's 2-wide average pool
        return stem, blocks

    def kernel_taps(self, side: int) -> int:
        """Weights per input channel of a convolution ``side`` wide in every spatial dimension."""
        return side ** self.spatial_dims


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of the step: ``sgd`` (``momentum`` 0 or not, ``nesterov``),
    ``adam`` or ``adamw``, with ``weight_decay``.  The default is the trainer's
    recipe: SGD with momentum 0.9, Nesterov, weight decay 1e-4."""

    name: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} (the modelled ones), got {self.name!r}")

    @staticmethod
    def parse(value: Union[str, "OptimizerSpec", None]) -> "OptimizerSpec":
        """A preset of :data:`OPTIMIZER_PRESETS` by name; an ``OptimizerSpec`` as
        it is; ``None``: the default."""
        if value is None or isinstance(value, OptimizerSpec):
            return value or OptimizerSpec()
        if not isinstance(value, str):
            raise TypeError(f"the memory model's optimizer is an OptimizerSpec or a preset's name, one of "
                            f"{tuple(OPTIMIZER_PRESETS)}, got {value!r}")
        if value not in OPTIMIZER_PRESETS:
            raise ValueError(f"unknown optimizer {value!r}; choose one of {tuple(OPTIMIZER_PRESETS)}")
        return OPTIMIZER_PRESETS[value]

    def build(self, params, lr: float = 1e-3) -> torch.optim.Optimizer:
        """The torch optimizer this spec describes."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.nesterov and self.momentum > 0)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, weight_decay=self.weight_decay)

    def state_tensors(self) -> int:
        """Parameter-sized state tensors per parameter (momentum buffer; Adam's two moments)."""
        if self.name == "sgd":
            return 1 if self.momentum else 0
        return 2

    def update_temporaries(self) -> int:
        """Parameter-sized temporaries alive at once in the update, per parameter
        (torch's single-tensor implementation, the CPU's) or per parameter list
        (the foreach implementation, CUDA's)."""
        if self.name == "sgd":
            return (self.weight_decay != 0) + (self.nesterov and self.momentum != 0)
        return 2 + (self.name == "adam" and self.weight_decay != 0)

    def foreach_temporaries(self) -> int:
        """Parameter-list-sized temporaries of the foreach update (CUDA)."""
        if self.name == "sgd":
            return int(self.weight_decay != 0)  # Nesterov then updates that copy in place
        return 1  # sqrt(v): Adam's weight-decayed gradients are freed before it


OPTIMIZER_PRESETS = {
    "sgd": OptimizerSpec(),  # the trainer's recipe
    "sgd-plain": OptimizerSpec("sgd", momentum=0.0, weight_decay=0.0, nesterov=False),
    "adam": OptimizerSpec("adam", momentum=0.0, weight_decay=0.0, nesterov=False),
    "adamw": OptimizerSpec("adamw", momentum=0.0, weight_decay=1e-2, nesterov=False),
}


@dataclass(frozen=True)
class Setup:
    """How a training step runs: ``batch`` images of ``image_size`` (``(H, W)``;
    one side per spatial dimension: ``(D, H, W)`` for volumes; an int: a square),
    parameters in ``dtype``, optionally under ``autocast`` (the dtype the blocks
    compute in: bfloat16 or float16; dtypes or their names), on ``device``
    (``"cpu"`` or ``"cuda"``) with ``backend`` (``None``: the automatic choice
    for that device), ``optimizer``, ``threads`` CPU threads (the C++
    kernels' per-thread tiles; ``None``: this process's) and, on CUDA, the GPU's ``multiprocessors``
    (the GPU kernels' partial sums; ``None``: this machine's current GPU's,
    else an H100's or H200's, ``ASSUMED_MULTIPROCESSORS``).  ``offload``: the
    forward and the loss run under ``torch.autograd.graph.save_on_cpu`` (the
    trainer's ``--offload``): what autograd saves leaves the device at once and
    comes back, a node at a time, in backward."""

    batch: int
    image_size: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    autocast: Optional[torch.dtype] = None
    device: str = "cpu"
    backend: Optional[str] = None
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    threads: Optional[int] = None
    multiprocessors: Optional[int] = None
    offload: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", image_sides(self.image_size))
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "autocast", as_autocast(self.autocast))
        try:
            index, device = torch.device(self.device).index, torch.device(self.device).type
        except (RuntimeError, TypeError):
            index, device = None, None
        if device not in ("cpu", "cuda"):
            raise ValueError(f"the memory model describes training on 'cpu' or 'cuda', got device {self.device!r}")
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "backend", resolve_backend(self.backend, self.device, self.compute_dtype))
        object.__setattr__(self, "batch", positive_int("batch", self.batch))
        object.__setattr__(self, "threads", torch.get_num_threads() if self.threads is None
                           else positive_int("threads", self.threads))
        if device != "cuda":
            object.__setattr__(self, "multiprocessors", None)
        elif self.multiprocessors is None:
            object.__setattr__(self, "multiprocessors", torch.cuda.get_device_properties(
                torch.cuda.current_device() if index is None else index).multi_processor_count
                if torch.cuda.is_available() else ASSUMED_MULTIPROCESSORS)
        else:
            object.__setattr__(self, "multiprocessors", positive_int("multiprocessors", self.multiprocessors))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The block data's dtype: autocast's, except for float64 (autocast leaves it alone)."""
        return self.dtype if self.autocast is None or self.dtype == torch.float64 else self.autocast

    def with_batch(self, batch: int) -> "Setup":
        return replace(self, batch=batch)


def positive_int(name: str, value) -> int:
    """``value`` as an ``int`` (NumPy's integers too, not ``bool``), or a
    ``ValueError`` naming ``name`` unless it is a positive integer."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def as_block_config(block_config) -> tuple[int, ...]:
    """The layers of each dense block, as a tuple of at least one positive ``int``."""
    layers = tuple(positive_int("every entry of block_config", n) for n in block_config)
    if not layers:
        raise ValueError("block_config must name at least one dense block")
    return layers


def bc_layers_per_block(depth) -> int:
    """The layers in each of DenseNet-BC's three dense blocks at ``depth`` (``6n + 4``)."""
    try:
        n = (positive_int("depth", depth) - 4) // 6
    except ValueError:
        n = None
    if n is None or n < 1 or 6 * n + 4 != depth:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (10, 16, 22, 40, 100, ...), got {depth!r}")
    return n


def as_dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    """A dtype the memory model describes, from its name or itself."""
    dtype = DTYPES.get(value) if isinstance(value, str) else value
    if dtype not in DTYPES.values():
        raise ValueError(f"the memory model describes the dtypes {tuple(DTYPES)}, got {value!r}")
    return dtype


def as_autocast(value: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """The dtype autocast computes in (``None``: no autocast)."""
    if value is None:
        return None
    dtype = as_dtype(value)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast computes in bfloat16 or float16, got {value!r}")
    return dtype


def image_sides(size) -> tuple[int, ...]:
    """``size`` as a tuple of 1 to 3 positive sides (an integer: a square image)."""
    try:
        sides = (operator.index(size),) * 2 if not isinstance(size, (tuple, list)) else tuple(map(operator.index, size))
    except TypeError:
        sides = ()
    if not 1 <= len(sides) <= 3 or min(sides) < 1 or any(isinstance(s, bool) for s in (size, *sides)):
        raise ValueError(f"image_size must be a positive integer or 1 to 3 of them (one per spatial dimension), "
                         f"got {size!r}")
    return sides


def onednn_convolves(dtype: torch.dtype) -> bool:
    """Whether this CPU's convolutions of ``dtype`` run in oneDNN (else ATen's im2col path)."""
    if not (torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def resolve_backend(name: Optional[str], device: str, dtype: torch.dtype) -> str:
    """The backend that runs (``None``: the automatic choice, as :func:`densenet_fast.backends.get_backend`
    makes it where the device exists here, else the first in the automatic order).  ``dtype``
    is unused: a backend runs the torch backend's primitives for the dtypes its kernels lack
    (:func:`workspace_backend`)."""
    from .backends import BACKENDS, get_backend, wrong_device
    if name is not None:
        reason = wrong_device(name, torch.device(device))  # an unknown name raises there
        if reason is not None:
            raise ValueError(reason)
        return name
    if device == "cpu" or (device == "cuda" and torch.cuda.is_available()):
        return get_backend(None, torch.device(device)).name
    return next(spec.name for spec in BACKENDS if spec.chosen_for is None or device in spec.chosen_for)


NATIVE_DTYPES = {  # the dtypes each backend's kernels take (backends/extension_backend.py, triton_backend.py)
    "cpp": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def workspace_backend(backend: str, dtype: torch.dtype) -> str:
    """Whose primitives run for ``dtype`` block data: ``backend``'s, or the torch
    backend's where its kernels lack the dtype."""
    return backend if dtype in NATIVE_DTYPES.get(backend, (dtype,)) else "torch"


def policies_of(recompute: Union[str, Sequence[str]], blocks: int) -> tuple[str, ...]:
    """One policy per dense block from one policy or a sequence of them."""
    policies = (recompute,) * blocks if isinstance(recompute, str) else tuple(recompute)
    if len(policies) != blocks or any(p not in POLICIES for p in policies):
        raise ValueError(f"recompute must be one of {POLICIES} or a sequence of {blocks} of them (one per dense "
                         f"block), got {recompute!r}")
    return policies


# -- the timeline ---------------------------------------------------------------------------------
PARTS = ("gradients_released", "block_buffers", "kept_bottlenecks", "gradient_buffer", "scratch_arena",
         "stage_gradient", "bn_coefficients", "stem", "layer_transients", "optimizer_update", "head_and_loss",
         "unpacked_copies", "small_allocations", "heap_pages")
CPU_HEAP_BELOW = 65536  # glibc's mmap threshold the model assumes on the CPU: smaller allocations come from its heap
CPU_HEAP_PAGES = 400 * 1024  # C heap pages a step touches beyond its small tensors, measured (docs/memory.md)
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # free top of glibc's heap above it goes back to the system
_mmap_threshold: Optional[int] = None  # what set_mmap_threshold() set in this process


def available_memory_bytes() -> Optional[int]:
    """Memory available to a new allocation of this process: the machine's
    (``MemAvailable``), or less where a memory cgroup of the process (a
    container's limit) leaves less room; ``None`` where ``/proc/meminfo`` does
    not say (not Linux)."""
    machine = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    machine = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_memory_room()
    return machine if room is None or machine is None else min(machine, room)


CGROUP_UNLIMITED = 2**62  # cgroup v1 writes "no limit" as the largest page-aligned int64


def cgroup_memory_room(own: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The least room under the memory limits of the process's cgroup and its
    ancestors (v2: ``memory.max``; v1: ``memory.limit_in_bytes``): the limit
    less the working set (usage less the inactive file cache, which the kernel
    reclaims first, as container runtimes count it); ``None`` where no limit is
    set or none can be read."""
    try:
        with open(own) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    v1 = next((path for _, controllers, path in entries if "memory" in controllers.split(",")), None)
    if v1 is not None:
        base, path = os.path.join(root, "memory"), v1
        limit_file, usage_file, inactive = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
    else:
        base = root
        path = next((path for hierarchy, controllers, path in entries if hierarchy == "0" and not controllers), None)
        limit_file, usage_file, inactive = "memory.max", "memory.current", "inactive_file"
        if path is None:
            return None
    rooms = []
    parts = [part for part in path.split("/") if part]
    for depth in range(len(parts), -1, -1):  # the cgroup, then each ancestor
        folder = os.path.join(base, *parts[:depth])
        try:
            with open(os.path.join(folder, limit_file)) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= CGROUP_UNLIMITED:
                continue
            with open(os.path.join(folder, usage_file)) as f:
                usage = int(f.read())
            with open(os.path.join(folder, "memory.stat")) as f:
                stats = dict(line.split() for line in f if len(line.split()) == 2)
        except (OSError, ValueError):
            continue
        rooms.append(max(0, int(limit) - (usage - int(stats.get(inactive, 0)))))
    return min(rooms, default=None)


@functools.cache  # a process keeps its malloc
def glibc_malloc() -> Optional[ctypes.CDLL]:
    """glibc, where it is the C library and its ``malloc`` is the one this
    process calls (``None`` under musl, or where jemalloc or tcmalloc is preloaded)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        called = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
        return libc if called == ctypes.cast(libc.malloc, ctypes.c_void_p).value else None
    except (OSError, AttributeError):
        return None


def set_mmap_threshold(nbytes: int = CPU_HEAP_BELOW) -> bool:
    """Make glibc map every allocation of ``nbytes`` or more on its own and
    return it to the system when freed, for the rest of this process (by
    default the threshold the memory model assumes on the CPU: glibc's own
    threshold adapts up to 32 MiB and keeps freed tensors below it resident,
    docs/memory.md, "The training process's allocator").  glibc maps a
    request only where no free block of its heap fits it, so the heap top's
    trim threshold goes back to glibc's default (the adaptive threshold raises
    it to twice its mmap threshold) and the heap is trimmed now; large free
    blocks inside the heap stay, so call it before anything large is allocated
    and freed.  False where glibc's malloc is not this process's (nothing set)."""
    global _mmap_threshold
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    libc = glibc_malloc()
    if libc is None or not (libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD)
                            and libc.mallopt(M_MMAP_THRESHOLD, nbytes)):
        return False
    trim_heap()
    _mmap_threshold = nbytes
    return True


def trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: the free top of its heap, and the free pages
    inside every arena, go back to the system (nothing where it is not glibc's)."""
    libc = glibc_malloc()
    if libc is not None:
        libc.malloc_trim(0)


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: its heap's extent (``arena``), blocks and bytes."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_info() -> Optional[MallInfo2]:
    """glibc's ``mallinfo2()`` now (``None`` where glibc's malloc is not this
    process's, or is older than 2.33): for measurements and tests."""
    libc = glibc_malloc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def cpu_heap_as_modelled() -> bool:
    """Whether this process allocates on the CPU as the memory model assumes:
    glibc's mmap threshold at :data:`CPU_HEAP_BELOW`, set by
    :func:`set_mmap_threshold` or by ``MALLOC_MMAP_THRESHOLD_`` at start."""
    if _mmap_threshold is not None:
        return _mmap_threshold == CPU_HEAP_BELOW
    return glibc_malloc() is not None and \
        os.environ.get("MALLOC_MMAP_THRESHOLD_", "").strip() == str(CPU_HEAP_BELOW)


def cpu_heap_note() -> str:
    """Why a plan on the CPU may not hold in this process (:func:`cpu_heap_as_modelled` false)."""
    if glibc_malloc() is None:
        why = "this process does not allocate with glibc's malloc (another C library, or a preloaded allocator)"
    elif "MALLOC_MMAP_THRESHOLD_" in os.environ:
        why = (f"this process started with MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']!r} "
               f"(glibc takes a plain byte count: {CPU_HEAP_BELOW})")
    else:
        why = "this process has not set it"
    return (f"the memory model assumes glibc's mmap threshold of {format_bytes(CPU_HEAP_BELOW)} on the CPU, and {why}: "
            "with glibc's adaptive threshold, steps measured up to 1.6x their prediction and totals up to 1.17x "
            "(docs/memory.md, \"The training process's allocator\"); call densenet_fast.memory.set_mmap_threshold() "
            "before training (the trainer does under --memory-budget) or start Python with "
            f"MALLOC_MMAP_THRESHOLD_={CPU_HEAP_BELOW}")


class Timeline:
    """Bytes alive over one steady-state step, relative to its start, by part
    (:data:`PARTS`) in program order.

    Every allocation is one tensor.  With ``heap_below`` (the CPU), tensors
    smaller than that come from the C heap, which keeps freed blocks resident:
    they add the heap's high-water mark over the step (reached in the previous
    step already, so present throughout) instead of following what is alive,
    and the heap's pages that the step touches beyond them (allocator and
    autograd metadata, partly used pages) add a measured constant.
    A small gradient that ``zero_grad`` frees leaves its block to the same-size
    gradient backward makes again, so those count neither when freed nor when
    made again.
    """

    def __init__(self, heap_below: Optional[int]) -> None:
        self.heap_below = heap_below or 0
        self.live: dict[str, float] = defaultdict(float)
        self.total = 0.0  # bytes alive in allocations not on the heap
        self.heap = 0.0  # bytes alive on the heap
        self.heap_high = 0.0
        self.peak = 0.0
        self.peak_parts: dict[str, float] = {}
        self.peak_where = "between steps"
        self.where = ""
        self.allocations: list[float] = []  # the bytes of every allocation, in program order

    def alloc(self, part: str, *sizes: float) -> None:
        """Allocate one tensor of each of ``sizes`` bytes under ``part``."""
        for nbytes in sizes:
            self.allocations.append(nbytes)
            self._change(part, nbytes)

    def free(self, part: str, *sizes: float) -> None:
        for nbytes in sizes:
            self._change(part, -nbytes)

    def transient(self, part: str, *sizes: float) -> None:
        """Allocate and free at once: only the peak sees them."""
        self.alloc(part, *sizes)
        self.free(part, *sizes)

    def _change(self, part: str, nbytes: float) -> None:
        if nbytes == 0:
            return
        if abs(nbytes) < self.heap_below:
            if part == "gradients_released":
                return
            self.heap += nbytes
            self.heap_high = max(self.heap_high, self.heap)
            return
        self.live[part] += nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak, self.peak_parts, self.peak_where = self.total, dict(self.live), self.where

    def peak_breakdown(self) -> dict[str, float]:
        """What was alive at the peak, by part, the heap's included."""
        heap = {"small_allocations": self.heap_high, "heap_pages": CPU_HEAP_PAGES} if self.heap_below else {}
        return {**self.peak_parts, **heap}


# -- the prediction ---------------------------------------------------------------------------------
@dataclass
class Prediction:
    """What :func:`predict` finds.  ``persistent``: bytes that live between steps;
    ``step``: what was alive at the step's peak above them, by part (it sums to
    :attr:`step_bytes`; ``gradients_released`` is negative: gradients that
    ``zero_grad`` freed and backward had not produced again by the peak);
    ``peak_at``: where."""

    persistent: dict[str, int]
    step: dict[str, int]
    peak_at: str
    policies: tuple[str, ...]
    not_counted: tuple[str, ...] = ()  # what the model leaves out for this setup (:func:`not_counted`)

    @property
    def persistent_bytes(self) -> int:
        return sum(self.persistent.values())

    @property
    def step_bytes(self) -> int:
        return sum(self.step.values())

    @property
    def total_bytes(self) -> int:
        return self.persistent_bytes + self.step_bytes

    def to_dict(self) -> dict:
        return {"policies": list(self.policies), "persistent_bytes": self.persistent_bytes,
                "step_bytes": self.step_bytes, "total_bytes": self.total_bytes,
                "persistent": dict(self.persistent), "step": dict(self.step), "peak_at": self.peak_at,
                "not_counted": list(self.not_counted)}


def predict(arch: Architecture, setup: Setup, recompute: Union[str, Sequence[str]] = "keep") -> Prediction:
    """The peak memory of one steady-state training step of ``arch`` under
    ``setup`` with ``recompute`` (one policy, or one per dense block)."""
    policies = policies_of(recompute, len(arch.block_config))
    simulation = StepSimulation(arch, setup, policies)
    timeline = simulation.run()
    step = {part: int(round(nbytes)) for part, nbytes in timeline.peak_breakdown().items()}
    return Prediction(simulation.persistent(), {p: b for p, b in step.items() if b}, timeline.peak_where, policies,
                      not_counted(setup))


def peak_floor(arch: Architecture, setup: Setup, recompute: Union[str, Sequence[str]] = "keep") -> int:
    """A lower bound of :func:`predict`'s ``total_bytes`` that never drops as the
    layers per block grow: the step's tensors, each counted while it lives
    (the C heap's too, not its high-water mark), without the workspaces that
    can shrink as the channels grow.  The prediction itself can drop as a
    model deepens: on the CPU where one of the step's allocations grows past
    glibc's mmap threshold and leaves the heap, and where the C++ weight
    gradient's row groups give way to a larger dW.  The floor does neither,
    so once it exceeds a budget, no deeper model fits
    (:func:`.planner.deepest_depth`)."""
    simulation = StepSimulation(arch, setup, policies_of(recompute, len(arch.block_config)), floor=True)
    return sum(simulation.persistent().values()) + int(simulation.run().peak)


def persistent_parts(arch: Architecture, setup: Setup) -> dict[str, int]:
    """What lives between steps: parameters, their gradients and the optimizer's state."""
    params = arch.parameter_count() * ELEMENT_BYTES[setup.dtype]
    return {"parameters": params, "gradients": params, "optimizer_state": setup.optimizer.state_tensors() * params}


def persistent_bytes(arch: Architecture, setup: Setup) -> int:
    """:func:`persistent_parts` in all: a lower bound of every prediction's and
    floor's total, whatever the policies, found without simulating the step."""
    return sum(persistent_parts(arch, setup).values())


def heap_exits(arch: Architecture, setup: Setup, recompute: Union[str, Sequence[str]] = "keep",
               up_to: int = 2**24) -> frozenset[int]:
    """The batches from 3 to ``up_to`` at which one of the step's allocations on
    the C heap (below :data:`CPU_HEAP_BELOW`, on the CPU) grows to the
    threshold and leaves it.  Between them the predicted peak grows with the
    batch; at them it can drop.

    From batch 2 on, the step makes the same allocations in the same order
    (only batch 1 takes other paths), each as large or larger at a larger
    batch, but not always in proportion (the C++ kernels' workspaces step and
    saturate).  So a line through each allocation's bytes at batches 2 and 4
    guesses where it leaves; the step is simulated on either side of each
    guess and at ``up_to``, and bisection finds every exit between two
    simulated batches whose sets of heap allocations differ."""
    up_to = positive_int("up_to", up_to)
    if setup.device != "cpu" or up_to < 3:
        return frozenset()
    return _heap_exits(arch, setup.with_batch(2), policies_of(recompute, len(arch.block_config)), up_to,
                       onednn_convolves(setup.compute_dtype))


@functools.lru_cache(maxsize=256)  # a search asks again for each budget
def _heap_exits(arch: Architecture, setup: Setup, policies: tuple[str, ...], up_to: int,
                onednn: bool) -> frozenset[int]:
    """:func:`heap_exits`; ``onednn`` keys the cache (the simulation reads whether oneDNN convolves)."""
    @functools.cache
    def allocations(batch: int) -> list[float]:
        return StepSimulation(arch, setup.with_batch(batch), policies).run().allocations

    def on_heap(batch: int) -> list[bool]:
        return [nbytes < CPU_HEAP_BELOW for nbytes in allocations(batch)]

    guesses = {2 + math.ceil(Fraction(2 * (CPU_HEAP_BELOW - small)) / Fraction(large - small))
               for small, large in zip(allocations(2), allocations(4)) if small < CPU_HEAP_BELOW and large > small}
    batches = sorted({2, up_to} | {b for guess in guesses for b in (guess - 1, guess) if 2 < b < up_to})
    exits: set[int] = set()

    def search(low: int, high: int) -> None:
        """Every exit in ``(low, high]``."""
        if on_heap(low) == on_heap(high):
            return
        if high - low == 1:
            exits.add(high)
            return
        middle = (low + high) // 2
        search(low, middle)
        search(middle, high)

    for low, high in zip(batches, batches[1:]):
        search(low, high)
    return frozenset(exits)


def not_counted(setup: Setup) -> tuple[str, ...]:
    """What the model leaves out that can matter for ``setup``, in words (on this
    machine: float16/bfloat16 GEMMs run in oneDNN only where the CPU supports them)."""
    if setup.device == "cpu" and setup.compute_dtype in (torch.float16, torch.bfloat16) \
            and onednn_convolves(setup.compute_dtype):  # the same support checks as torch's oneDNN matmul
        return ("oneDNN's cached primitives for float16/bfloat16 GEMMs, which stay for the process (measured on an "
                "AMX Xeon at batch 16: about 10 MiB at DenseNet-BC-40 and 69 MiB at DenseNet-BC-100 with the cpp "
                "backend, 95 MiB with the torch backend; docs/memory.md)",)
    return ()


class StepSimulation:
    """One training step of the fused model, tensor by tensor, in the engine's
    order (:func:`densenet_fast.engine.stage.stage_forward` and
    :func:`~densenet_fast.engine.stage.stage_backward`)."""

    def __init__(self, arch: Architecture, setup: Setup, policies: tuple[str, ...], floor: bool = False) -> None:
        """``floor``: :func:`peak_floor`'s step: every tensor counts while it lives,
        the C heap's too, and workspaces that can shrink as the channels grow
        (the C++ kernels') are left out."""
        self.arch, self.setup, self.policies, self.floor = arch, setup, policies, floor
        self.e = ELEMENT_BYTES[setup.compute_dtype]  # block data
        self.s = 8 if setup.compute_dtype == torch.float64 else 4  # statistics, BN coefficients
        self.p = ELEMENT_BYTES[setup.dtype]  # parameters
        self.k, self.w = arch.growth_rate, arch.width
        n = setup.batch
        self.stem_sides, self.block_sides = arch.spatial_sizes(setup.image_size)
        self.stem_pixels = n * math.prod(self.stem_sides)
        self.pixels = [n * math.prod(sides) for sides in self.block_sides]
        self.channels = arch.block_channels()
        workspace = WORKSPACES[workspace_backend(setup.backend, setup.compute_dtype)]
        self.workspace = Workspace(self) if floor and not workspace.grows else workspace(self)
        self.timeline = Timeline(CPU_HEAP_BELOW if setup.device == "cpu" and not floor else None)
        self.im2col = setup.device == "cpu" and not onednn_convolves(setup.compute_dtype)

    # -- sizes -------------------------------------------------------------------------------
    def scratch_slots(self, b: int, backward: bool) -> dict[str, float]:
        """Bytes of each scratch slot of stage ``b``'s forward or backward pass
        (``ScratchArena``): the pass's largest request under each name."""
        m, c_total, e = self.pixels[b], self.channels[b][1], self.e
        slots = {"grad_buffer": m * c_total * e} if backward else {}
        if b + 1 == len(self.pixels):
            slots["head"] = m * c_total * e
        if self.arch.block_config[b]:  # the layers' roles
            if self.policies[b] == "recompute":
                slots["bottleneck"] = m * self.w * e
            slots["bn2_out"] = m * self.w * e
        return slots

    @staticmethod
    def scratch_part(name: str) -> str:
        """The breakdown's part for the scratch slot ``name``."""
        return "gradient_buffer" if name == "grad_buffer" else "scratch_arena"

    def take_scratch(self, b: int, backward: bool, name: str) -> None:
        """The pass's first request under ``name``: its slot is made."""
        self.timeline.alloc(self.scratch_part(name), self.scratch_slots(b, backward)[name])

    def end_pass(self, b: int, backward: bool) -> None:
        """The pass ends: its scratch is freed."""
        for name, nbytes in self.scratch_slots(b, backward).items():
            self.timeline.free(self.scratch_part(name), nbytes)

    def coefficient_bytes(self, b: int) -> float:
        """Stage ``b``'s coefficient store: every folded BatchNorm its forward saves,
        ``(4, C)`` each (norm1 and norm2 of each layer, the tail's)."""
        (c0, c_total), k = self.channels[b], self.k
        return 4 * self.s * (sum(c0 + i * k + self.w for i in range(self.arch.block_config[b])) + c_total)

    def parameter_bytes(self) -> int:
        return self.arch.parameter_count() * self.p

    def persistent(self) -> dict[str, int]:
        return persistent_parts(self.arch, self.setup)

    def stem_gradients(self) -> list[float]:
        return [n * self.p for n in self.arch.stem_parameter_sizes()]

    def stage_gradient_bytes(self, b: int) -> float:
        """Stage ``b``'s gradient store: the gradients of its layers' and its tail's
        parameters, in the parameters' dtype."""
        return sum(self.arch.stage_parameter_sizes(b)) * self.p

    def classifier_gradients(self) -> list[float]:
        return [n * self.p for n in self.arch.classifier_parameter_sizes()]

    def dropout(self, b: int) -> tuple[list[float], list[float]]:
        """A dropout of a layer's new channels in stage ``b``: ``(its mask, the product)``
        (none without dropout). The mask has one value per output value, or per image
        and channel (channel dropout)."""
        if not self.arch.drop_rate:
            return [], []
        values = self.setup.batch if self.arch.channel_dropout else self.pixels[b]
        return [values * self.k * self.e], [self.pixels[b] * self.k * self.e]

    def cast(self, elements: int) -> float:
        """Bytes of a parameter's copy in the data dtype (none when they share it)."""
        return elements * self.e if self.e != self.p else 0.0

    def aten_im2col(self, c: int, kernel: int, input_sides: tuple[int, ...]) -> bool:
        """Whether ATen's CPU convolution of a ``kernel``-wide kernel over ``c``
        channels of ``input_sides`` takes its im2col (vol2col) path instead of
        oneDNN: where oneDNN does not take the dtype, and, as ATen's
        ``use_mkldnn`` decides, at batch 1 for kernels up to 3 wide (a 1-D one
        is seen as 1 x kernel: any) over at most 20480 values in the channels
        and the input's first two spatial dimensions (a 1-D input is seen as 1 x L)."""
        if self.setup.device != "cpu":
            return False
        narrow = kernel <= 3 or self.arch.spatial_dims == 1
        return self.im2col or (self.setup.batch == 1 and narrow
                               and c * math.prod(input_sides[:2]) <= ATEN_SMALL_CONVOLUTION)

    def columns(self, m: int, c: int, kernel: int, input_sides: tuple[int, ...]) -> float:
        """ATen's im2col buffer of that convolution with ``m`` output pixels, where it takes that path."""
        return m * c * self.arch.kernel_taps(kernel) * self.e if self.aten_im2col(c, kernel, input_sides) else 0.0

    def onednn_weight_gradient(self, c: int, k: int, kernel: int, input_sides: tuple[int, ...],
                               output_sides: tuple[int, ...], channels_last: bool,
                               dtype: Optional[torch.dtype] = None) -> float:
        """oneDNN's scratch for a 3-D convolution's weight gradient (``c`` input and
        ``k`` output channels) on the CPU in float32.  On AVX-512 its direct kernel
        (``jit:avx512_core``) computes it, with no scratch of this size; on AVX2 the
        direct kernels refuse padding in depth and its gemm convolution computes
        it (both seen with ``ONEDNN_VERBOSE=1``).  Per thread, the
        im2col columns of one output depth slice (``c * kernel^3 * OH * OW``) and,
        from a channels-last input, a transposed copy of one input (``c * D * H * W``);
        every thread works (on its own images, with its own copy of the weight
        gradient) when the batch is over 1 and a slice has fewer than 256 pixels
        per thread, else one (oneDNN's ``gemm_convolution_utils.cpp``, ``init_conf``).
        ``dtype``: the convolution's (default: the compute dtype)."""
        if (self.setup.device != "cpu" or self.arch.spatial_dims != 3
                or (dtype or self.setup.compute_dtype) != torch.float32
                or not onednn_convolves(torch.float32) or self.aten_im2col(c, kernel, input_sides)
                or torch.backends.cpu.get_cpu_capability() == "AVX512"):
            return 0.0
        slice_pixels, taps, threads = math.prod(output_sides[1:]), kernel ** 3, self.setup.threads
        if self.setup.batch == 1 or slice_pixels >= ONEDNN_SLICE_PIXELS_PER_THREAD * threads:
            threads = 1
        columns = c * taps * slice_pixels * 4
        transposed = c * math.prod(input_sides) * 4 if channels_last else 0
        return threads * (columns + transposed) + (threads * k * c * taps * 4 if threads > 1 else 0)

    # -- the step ----------------------------------------------------------------------------
    def run(self) -> Timeline:
        t = self.timeline
        gradients = self.stem_gradients() + self.classifier_gradients()
        gradients += [self.stage_gradient_bytes(b) for b in range(len(self.pixels))]
        t.where = "zero_grad"
        t.free("gradients_released", *gradients)
        stem_saved, stem_out = self.stem_forward()
        for b in range(len(self.pixels)):
            self.stage_forward(b)
            if b == 0:  # the caller holds the stem's output until the first stage returns
                t.free("stem", stem_out)
        n, c_last, classes = self.setup.batch, self.channels[-1][1], self.arch.num_classes
        t.where = "classifier and loss"
        # pooled features (saved by the classifier), logits, their fp32 copy (none for fp32 logits), log-softmax
        head_and_loss = [n * c_last * self.e, n * classes * self.e, n * classes * 4 if self.e != 4 else 0,
                         n * classes * 4]
        t.alloc("head_and_loss", *head_and_loss)
        self.unpack(self.classifier_gradients())  # the classifier's weight and bias, for its backward
        t.alloc("gradients_released", *self.classifier_gradients())
        self.unpacked_freed(self.classifier_gradients())
        t.free("head_and_loss", *head_and_loss)
        grad_out = n * c_last * self.e
        for b in reversed(range(len(self.pixels))):
            grad_out = self.stage_backward(b, grad_out)
        self.stem_backward(stem_saved, grad_out)
        self.optimizer_update()
        return t

    def stem_forward(self) -> tuple[list[float], float]:
        """The stem up to the first block's buffer; returns the tensors it saved for
        backward and the bytes of its output."""
        t, e, c0 = self.timeline, self.e, self.arch.num_init_features
        t.where = "forward, stem"
        saved = []
        if self.setup.compute_dtype != self.setup.dtype:  # the input cast to autocast's dtype, saved by conv0
            saved.append(self.setup.batch * self.arch.in_channels * math.prod(self.setup.image_size) * e)
        t.alloc("stem", *saved)
        conv_out = self.stem_pixels * c0 * e
        t.alloc("stem", conv_out)
        t.transient("stem", self.columns(self.stem_pixels, self.arch.in_channels, self.arch.stem_kernel,
                                         self.setup.image_size))
        self.pack("stem", saved)  # conv0 returns
        stem_out = conv_out
        if self.arch.stem == "imagenet":  # norm0-relu0-pool0 as one Function (engine/stem.py)
            pooled = self.pixels[0] * c0
            t.alloc("stem", conv_out)  # norm0's output, ReLU in place
            t.alloc("stem", pooled * e, pooled * 8)  # the max-pool's output and int64 indices
            t.transient("stem", pooled)  # pooled <= 0 (bool)
            t.alloc("stem", pooled)  # where ReLU passes the gradient, its negation
            t.free("stem", conv_out)  # norm0's output
            # saved: conv0's output (norm0's input), the indices, the mask
            saved += [conv_out, pooled * 8, pooled]
            self.pack("stem", saved[-3:])
            stem_out = pooled * e
        t.alloc("block_buffers", self.pixels[0] * self.channels[0][1] * e)  # IntoBuffer
        return saved, stem_out

    def stage_forward(self, b: int) -> None:
        t, e, s, k, w = self.timeline, self.e, self.s, self.k, self.w
        m, (c0, c_total) = self.pixels[b], self.channels[b]
        keep = self.policies[b] == "keep"
        ws = self.workspace
        taps, columns = self.arch.kernel_taps(3), self.columns(m, w, 3, self.block_sides[b])
        t.where = f"forward, block {b + 1}"
        statistics = [c_total * s, c_total * s]  # per-channel mean and variance of the buffer
        t.alloc("bn_coefficients", *statistics)
        t.transient("layer_transients", ws.channel_stats(m, c0))
        t.alloc("bn_coefficients", self.coefficient_bytes(b))  # the backend folds each BN into it
        if keep:  # every layer's bottleneck output, one (L, M, 4k) tensor
            t.alloc("kept_bottlenecks", self.arch.block_config[b] * m * w * e)
        for layer in range(self.arch.block_config[b]):
            c = c0 + layer * k
            t.where = f"forward, block {b + 1}, layer {layer + 1}"
            if layer == 0 and not keep:
                self.take_scratch(b, False, "bottleneck")
            t.transient("layer_transients", ws.bn_relu_conv1x1(m, c, w, with_stats=True), self.cast(w * c))
            if layer == 0:
                self.take_scratch(b, False, "bn2_out")
            t.transient("layer_transients", ws.bn_relu(m, w))
            t.alloc("layer_transients", self.cast(k * w * taps), columns)
            t.alloc("layer_transients", m * k * e)  # the 3x3 output
            t.free("layer_transients", self.cast(k * w * taps), columns)
            mask, masked = self.dropout(b)  # the output times the mask replaces it
            t.alloc("layer_transients", *mask, *masked)
            t.free("layer_transients", *mask, *([m * k * e] if masked else []))
            t.transient("layer_transients", ws.channel_stats(m, k))
            t.free("layer_transients", m * k * e)
        t.where = f"forward, block {b + 1}, {'transition' if b + 1 < len(self.pixels) else 'head'}"
        if b + 1 < len(self.pixels):
            m_next, (_, c_next) = self.pixels[b + 1], self.channels[b + 1]
            t.alloc("block_buffers", m_next * c_next * e)
            t.transient("layer_transients", ws.transition(m, m_next, c_total, c_total // 2, self.block_sides[b]),
                        self.cast(c_total * (c_total // 2)))
        else:
            self.take_scratch(b, False, "head")
            t.transient("layer_transients", ws.bn_relu(m, c_total))
        t.free("bn_coefficients", *statistics)
        self.end_pass(b, False)
        # the stage saved its buffer, coefficients, kept bottlenecks (x, a view of the buffer, and the parameters
        # need no device memory of their own); x and the buffer, channels-last, are not contiguous: the copy to
        # a contiguous host tensor goes through a contiguous copy on the device (ATen's copy_requires_temporaries)
        if self.setup.offload:
            t.transient("block_buffers", m * c0 * e)
            t.transient("block_buffers", m * c_total * e)
        self.pack("block_buffers", [m * c_total * e])
        self.pack("bn_coefficients", [self.coefficient_bytes(b)])
        self.pack("kept_bottlenecks", [self.arch.block_config[b] * m * w * e] if keep else [])

    def stage_backward(self, b: int, grad_out: float) -> float:
        """Stage ``b``'s backward with ``grad_out`` bytes of incoming gradient; returns
        the bytes of the gradient it passes on (its input's)."""
        t, e, s, k, w = self.timeline, self.e, self.s, self.k, self.w
        m, (c0, c_total) = self.pixels[b], self.channels[b]
        n_layers = self.arch.block_config[b]
        keep = self.policies[b] == "keep"
        ws = self.workspace
        sides = self.block_sides[b]
        taps, columns = self.arch.kernel_taps(3), self.columns(m, w, 3, sides)
        weight_scratch = self.onednn_weight_gradient(w, k, 3, sides, sides, channels_last=True)
        # conv2's weight gradient made again in float32, from float32 copies of its input and gradient
        float_weight_gradient = bfloat16_weight_gradient_fails(self.setup.device, self.setup.compute_dtype, sides)
        last = b + 1 == len(self.pixels)
        t.alloc("stage_gradient", grad_out)
        t.where = f"backward, block {b + 1}, saved tensors"
        params = [self.stage_gradient_bytes(b)]  # the parameters' copies, as one
        if self.setup.offload:  # ctx.saved_tensors: all at once (engine/stage.py, StageFunction.backward)
            self.unpack([m * c_total * e], "block_buffers")
            self.unpack([m * c0 * e] + params)  # x and the parameters
            self.unpack([self.coefficient_bytes(b)], "bn_coefficients")
            self.unpack([n_layers * m * w * e] if keep else [], "kept_bottlenecks")
            self.unpacked_freed([m * c0 * e])  # x, dropped
            # the buffer comes back contiguous; a channels-last copy replaces it
            t.transient("block_buffers", m * c_total * e)
        t.where = f"backward, block {b + 1}, {'head' if last else 'transition'}"
        self.take_scratch(b, True, "grad_buffer")
        # each primitive's parameter gradients (a convolution's weight as the backend returns it,
        # a BN's weight and bias as one (2, C) tensor in the statistics dtype) live until they are
        # copied into the stage's gradient store, which is made after the tail's backward
        tail_grads = [2 * c_total * s] + ([] if last else [ws.transition_weight_gradient(c_total // 2, c_total)])
        if last:
            self.take_scratch(b, True, "head")
            t.transient("layer_transients", ws.bn_relu_backward(m, c_total))
        else:
            t.transient("layer_transients", ws.transition_backward(m, self.pixels[b + 1], c_total, c_total // 2,
                                                                   sides),
                        self.cast(c_total * (c_total // 2)))
        t.alloc("layer_transients", *tail_grads)
        t.alloc("gradients_released", self.stage_gradient_bytes(b))
        t.free("layer_transients", *tail_grads)
        for layer in reversed(range(n_layers)):
            c = c0 + layer * k
            t.where = f"backward, block {b + 1}, layer {layer + 1}"
            cast_w1 = self.cast(w * c)  # conv1's weight in the data dtype, for the whole layer
            t.alloc("layer_transients", cast_w1)
            first = layer == n_layers - 1
            if not keep:
                if first:
                    self.take_scratch(b, True, "bottleneck")
                t.transient("layer_transients", ws.bn_relu_conv1x1(m, c, w, with_stats=False))
            if first:
                self.take_scratch(b, True, "bn2_out")
            t.transient("layer_transients", ws.bn_relu(m, w))
            conv2_grad = k * w * taps * (4 if float_weight_gradient else e)
            t.alloc("layer_transients", conv2_grad)
            # dL/dnew times the dropout mask (the mask for the product only), its channels-last copy,
            # then the convolution's input gradient (M, 4k)
            mask, masked = self.dropout(b)
            t.alloc("layer_transients", *mask, *masked)
            t.free("layer_transients", *mask)
            grad_new = [m * k * e] + masked
            t.alloc("layer_transients", m * k * e)
            t.alloc("layer_transients", self.cast(k * w * taps), columns, m * w * e)
            t.transient("layer_transients", weight_scratch)
            if float_weight_gradient:
                t.transient("layer_transients", m * k * 4, m * w * 4, k * w * taps * 4,
                            self.onednn_weight_gradient(w, k, 3, sides, sides, True, torch.float32))
            t.free("layer_transients", self.cast(k * w * taps), columns, *grad_new)
            t.transient("layer_transients", ws.bn_relu_backward(m, w))
            t.transient("layer_transients", ws.bn_relu_conv1x1_backward(m, c, w))
            others = [ws.conv1x1_weight_gradient(w, c), 2 * w * s, 2 * c * s]  # conv1's, norm2's, norm1's
            t.alloc("layer_transients", *others)
            t.free("layer_transients", m * w * e, cast_w1, conv2_grad, *others)
        t.where = f"backward, block {b + 1}, end"
        grad_in = m * c0 * e
        t.alloc("stage_gradient", grad_in)
        self.end_pass(b, True)
        # autograd releases what the stage saved, and its incoming gradient
        t.free("stage_gradient", grad_out)
        t.free("block_buffers", m * c_total * e)
        if keep:
            t.free("kept_bottlenecks", n_layers * m * w * e)
        t.free("bn_coefficients", self.coefficient_bytes(b))
        self.unpacked_freed(params)
        t.free("stage_gradient", grad_in)
        return grad_in

    def stem_backward(self, saved: list[float], grad_in: float) -> None:
        """IntoBuffer's copy of the first block's input gradient, then the stem's backward."""
        t, c0 = self.timeline, self.arch.num_init_features
        t.where = "backward, stem"
        t.alloc("stage_gradient", grad_in)
        t.alloc("stem", grad_in)  # IntoBuffer's gradient in the stem output's layout
        t.free("stage_gradient", grad_in)
        if self.arch.stem == "imagenet":  # NormReluMaxPool's backward
            saved, (conv_out, indices, passes) = saved[:-3], saved[-3:]
            self.unpack([conv_out, indices, passes], "stem")
            t.alloc("stem", grad_in)  # the pooled gradient where ReLU passes it
            t.alloc("stem", conv_out)  # the max-pool's input gradient, then BN's in place
            t.free("stem", grad_in)
            if self.e < 4:  # finished in float32 a slice at a time (and on the CPU the gradient's cast too)
                side = self.stem_sides[0]
                rows = stem.reduced_precision_rows(side)
                temporaries = 2 if self.setup.device == "cpu" else 1
                t.transient("stem", *[self.stem_pixels * c0 * 4 * rows / side] * temporaries)
            t.free("stem", grad_in, conv_out, indices, passes)  # autograd releases the node's input and saved tensors
            grad_in = conv_out
        # conv0's weight gradient (its input is the user's; a copy of it, offloaded, where no autocast cast it)
        user_input = [] if saved else [self.setup.batch * self.arch.in_channels * math.prod(self.setup.image_size)
                                        * self.e]
        self.unpack(saved, "stem")
        self.unpack(user_input)
        self.unpack(self.stem_gradients())  # conv0's weight (and norm0's weight and bias, counted with it)
        t.transient("stem", self.onednn_weight_gradient(self.arch.in_channels, c0, self.arch.stem_kernel,
                                                        self.setup.image_size, self.stem_sides, channels_last=False))
        t.alloc("gradients_released", *self.stem_gradients())
        self.unpacked_freed(self.stem_gradients() + user_input)
        t.free("stem", grad_in, *saved)

    # -- save_on_cpu (Setup.offload) -----------------------------------------------------------
    def pack(self, part: str, saved: list[float]) -> None:
        """Tensors a node saved leave the device when it returns (nothing else holds them)."""
        if self.setup.offload:
            self.timeline.free(part, *saved)

    def unpack(self, saved: list[float], part: str = "unpacked_copies") -> None:
        """A node's backward reads its saved tensors: each comes back as a new tensor
        (a parameter too: a copy beside the parameter)."""
        if self.setup.offload:
            self.timeline.alloc(part, *saved)

    def unpacked_freed(self, copies: list[float]) -> None:
        """The copies of parameters (or ``x``) that :meth:`unpack` made, released."""
        if self.setup.offload:
            self.timeline.free("unpacked_copies", *copies)

    def optimizer_update(self) -> None:
        t, optimizer = self.timeline, self.setup.optimizer
        t.where = "optimizer step"
        if self.setup.device == "cuda":  # foreach: temporaries for every parameter at once
            t.transient("optimizer_update", *[self.parameter_bytes()] * optimizer.foreach_temporaries())
        else:  # one parameter at a time
            largest = max(self.arch.parameter_sizes()) * self.p
            t.transient("optimizer_update", *[largest] * optimizer.update_temporaries())


# -- the backends' workspaces ------------------------------------------------------------------------
class Workspace:
    """Temporary bytes a backend allocates inside each primitive (besides its
    outputs), for ``m`` pixels, ``c`` input and ``k`` output channels;
    ``grows``: they never shrink as ``m``, ``pooled`` or ``c`` grow."""

    grows = True

    def __init__(self, sim: StepSimulation) -> None:
        self.e, self.s, self.threads = sim.e, sim.s, sim.setup.threads

    def channel_stats(self, m: int, c: int) -> float:
        return 0.0

    def bn_relu_conv1x1(self, m: int, c: int, k: int, with_stats: bool) -> float:
        return 0.0

    def bn_relu(self, m: int, c: int) -> float:
        return 0.0

    def bn_relu_backward(self, m: int, c: int) -> float:
        return 0.0

    def bn_relu_conv1x1_backward(self, m: int, c: int, k: int) -> float:
        return 0.0

    def transition(self, m: int, pooled: int, c: int, k: int, sides: tuple[int, ...]) -> float:
        """A transition over ``m`` pixels of spatial ``sides`` whose average pool leaves ``pooled``."""
        return 0.0

    def transition_backward(self, m: int, pooled: int, c: int, k: int, sides: tuple[int, ...]) -> float:
        return 0.0

    def conv1x1_weight_gradient(self, k: int, c: int) -> float:
        """The ``(k, c)`` weight gradient :meth:`bn_relu_conv1x1_backward` returns."""
        return k * c * self.e

    def transition_weight_gradient(self, k: int, c: int) -> float:
        """The ``(k, c)`` weight gradient :meth:`transition_backward` returns."""
        return k * c * self.e


class TorchWorkspace(Workspace):
    """The torch backend (densenet_fast/backends/torch_backend.py): whole ``(M, C)``
    temporaries in the statistics dtype, each primitive's highest sum of them
    alive at once. For 16-bit data ``to_stats`` is x's copy in the statistics
    dtype, alive beside what is made from it."""

    def to_stats(self, m: int, c: int) -> float:
        """A copy into the statistics dtype (none when the data already is)."""
        return m * c * self.s if self.e != self.s else 0.0

    def channel_stats(self, m, c):
        return self.to_stats(m, c) + m * c * self.s

    def bn_relu(self, m, c):
        return self.to_stats(m, c) + m * c * self.s  # x's copy beside z

    def bn_relu_conv1x1(self, m, c, k, with_stats):
        # z made (z's cast to the data dtype for the GEMM, beside z, is less than x's copy beside z);
        # then the statistics of the output beside the cast z
        return max(self.bn_relu(m, c), m * c * self.e + self.channel_stats(m, k) if with_stats else 0)

    def bn_relu_backward(self, m, c):
        return 3 * m * c * self.s  # dA, x - mean (or x's copy) and their product

    def bn_relu_conv1x1_backward(self, m, c, k):
        # z, dL/dz and dA together; then dA, x - mean (or x's copy) and their product; grad_weight
        return 3 * m * c * self.s + k * c * self.e

    def transition(self, m, pooled, c, k, sides):
        # z made, then z and its pooled rows (their cast to 16-bit data beside them is less than x's copy)
        return max(self.bn_relu(m, c), m * c * self.s + pooled * c * self.s)

    def transition_backward(self, m, pooled, c, k, sides):
        # z, its pooled rows (data dtype) and their gradient (statistics dtype), the unpooled gradient, then dA
        return m * c * self.s * 3 + pooled * c * (self.s + self.e) + k * c * self.e


class CppWorkspace(Workspace):
    """The C++ CPU kernels: per-thread row tiles; the backward's weight-gradient pass."""

    grows = False  # tiles and column blocks divide the channels; dW's copies are capped

    def tile_rows(self, c: int) -> int:
        return min(max(CPP_TILE_BYTES // max(1, c * self.e), CPP_TILE_ROWS[0]), CPP_TILE_ROWS[1])

    def tiles(self, rows: int, c: int) -> float:
        """The row tiles the running threads hold: each thread's chunk allocates
        a tile of ``tile_rows`` rows, but only the rows it writes become
        resident (a tile above the mmap threshold is fresh pages), so together
        at most ``rows``."""
        return min(rows, self.threads * self.tile_rows(c)) * c * self.e

    def weight_gradient(self, rows: int, c: int, k: int) -> float:
        """``weight_gradient`` in csrc/ops/cpu/bn_relu_conv_kernel.cpp: one copy of
        dW (K, C) in the statistics dtype per row group (dW itself when there is
        one group), with a z tile of one column block per thread; then the copies'
        sum and, for 16-bit data, dW cast to the data dtype."""
        copy = k * c * self.s
        blocks = max(1, math.ceil(c / CPP_MAX_BLOCK_COLUMNS))
        columns = math.ceil(c / blocks)
        rows_per_tile = self.tile_rows(columns)
        groups = min(max(min(CPP_PARTIAL_BYTES // max(1, copy), math.ceil(rows / rows_per_tile)), 1), CPP_MAX_GROUPS)
        z = min(rows, self.threads * rows_per_tile) * columns * self.e
        cast = k * c * self.e if self.e != self.s else 0
        # 16-bit data: each tile's product, and its copy in the statistics dtype that add_ makes
        products = self.threads * k * columns * (self.e + self.s) if cast else 0
        return max(groups * copy + z + products, groups * copy + (copy if groups > 1 else 0), copy + cast)

    def bn_relu_conv1x1(self, m, c, k, with_stats):
        return self.tiles(m, c)

    def bn_relu_conv1x1_backward(self, m, c, k):
        return max(self.tiles(m, c), self.weight_gradient(m, c, k))

    def transition(self, m, pooled, c, k, sides):
        return self.tiles(pooled, c)

    def transition_backward(self, m, pooled, c, k, sides):
        return max(self.tiles(pooled, c), self.weight_gradient(pooled, c, k))


class CudaWorkspace(TorchWorkspace):
    """The csrc CUDA kernels: statistics and BN-ReLU with float64 partial sums
    per row block (:func:`~densenet_fast.backends.gpu_partials.cuda_row_blocks`);
    the GEMM primitives are the torch backend's."""

    def __init__(self, sim: StepSimulation) -> None:
        super().__init__(sim)
        self.multiprocessors, self.floor = sim.setup.multiprocessors, sim.floor

    def partial_sums(self, m: int, c: int) -> float:
        """Left out of :func:`peak_floor`'s step: they can shrink as ``m`` or ``c`` grow."""
        if self.floor or not m:
            return 0.0
        return 2 * gpu_partials.cuda_row_blocks(m, c, self.e, self.multiprocessors) * c * 8

    def channel_stats(self, m, c):
        return self.partial_sums(m, c)

    def bn_relu(self, m, c):
        return 0.0

    def bn_relu_backward(self, m, c):
        return self.partial_sums(m, c)


class TritonWorkspace(Workspace):
    """The Triton kernels: fp32 partial statistics per row tile, and the
    two-pass backward's fp32 partial sums per row split
    (:mod:`densenet_fast.backends.gpu_partials`, for the GPU's multiprocessors);
    1-D and 3-D transitions run the torch backend's primitives."""

    grows = False  # the backward's splits fall as the channels grow

    def __init__(self, sim: StepSimulation) -> None:
        super().__init__(sim)
        self.multiprocessors = sim.setup.multiprocessors
        self.torch_transitions = TorchWorkspace(sim) if sim.arch.spatial_dims != 2 else None

    def splits(self, cells: int, c: int, k: int) -> int:
        """Row splits of a backward over ``cells`` rows of ``c`` channels (``k``
        output channels; 0: BN-ReLU alone)."""
        k_blocks = gpu_partials.cdiv(k, TRITON_MAX_BLOCK_K) if k else 1
        return gpu_partials.backward_splits(cells, c, k, k_blocks, self.e, self.multiprocessors)

    def channel_stats(self, m, c):
        return gpu_partials.stats_partials(m, TRITON_STATS_ROWS) * 2 * c * 4

    def bn_relu_conv1x1(self, m, c, k, with_stats):
        return gpu_partials.stats_partials(m, TRITON_MIN_BLOCK_M) * 2 * k * 4 if with_stats else 0.0

    def bn_relu_backward(self, m, c):
        return self.splits(m, c, 0) * 2 * c * 4

    def bn_relu_conv1x1_backward(self, m, c, k):
        # pass 1: the dW partials (splits, K, C) and the sums' (splits, 2, C); pass 2: the dW partials and dW (K, C)
        splits = self.splits(m, c, k)
        return max(splits * (k + 2) * c * 4, (splits + 1) * k * c * 4)

    def transition(self, m, pooled, c, k, sides):
        return self.torch_transitions.transition(m, pooled, c, k, sides) if self.torch_transitions else 0.0

    def transition_backward(self, m, pooled, c, k, sides):
        if self.torch_transitions:
            return self.torch_transitions.transition_backward(m, pooled, c, k, sides)
        # the kernels' cells of 2 x 2 pixels cover every pixel, the last row and column of odd sides too
        cells = m // math.prod(sides) * math.prod(gpu_partials.cdiv(side, 2) for side in sides)
        return self.bn_relu_conv1x1_backward(cells, c, k)

    def conv1x1_weight_gradient(self, k, c):
        return k * c * 4  # float32, whatever the data dtype

    def transition_weight_gradient(self, k, c):
        if self.torch_transitions:
            return self.torch_transitions.transition_weight_gradient(k, c)
        return k * c * 4


WORKSPACES = {"torch": TorchWorkspace, "cpp": CppWorkspace, "cuda": CudaWorkspace, "triton": TritonWorkspace}
