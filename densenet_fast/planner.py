"""``plan``: what trains in a memory budget, before the first step.

For a model, an input size, a batch, a dtype and a budget, the memory model
(:mod:`densenet_fast.memory`) predicts the peak of a training step for each
recompute policy, ``keep`` in every block, ``recompute`` in every block, and
``auto``: the fastest per-block assignment predicted to fit.  It also answers
the deepest DenseNet-BC depth and the largest batch that fit the budget.  The
step-time ratios (against ``keep`` everywhere) come from per-policy costs
measured on the CPU (``densenet_fast/policy_costs.json``).

    python -m densenet_fast plan --model densenet_bc --depth 400 --growth-rate 12 \\
        --batch 16 --image-size 32 --budget 2GiB [--json]

``densenet_fast.plan(...)`` returns the same as plain data.  The command's exit
status is 1 when a budget is given and nothing fits it (the plan is printed all
the same), 2 for bad arguments, 0 otherwise.  Budgets cover the
whole step: parameters, gradients and optimizer state (``persistent_bytes``)
plus the peak of the step above them (``step_bytes``).  Explained in
docs/memory.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import numbers
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional, Sequence, Union

import torch

from .backends import BACKEND_NAMES
from .memory import (ASSUMED_MULTIPROCESSORS, CPU_HEAP_BELOW, DTYPES, NAMED_MODELS, OPTIMIZER_PRESETS, POLICIES,
                     Architecture, OptimizerSpec, Prediction, Setup, format_bytes, heap_exits, parse_bytes, peak_floor,
                     persistent_bytes, predict, workspace_backend)

MAX_DEPTH_LAYERS = 10_000  # per block: the depth search stops there (DenseNet-BC-60004, k=12: 703 GiB of parameters)
MAX_BATCH = 2**24
OFFLOAD_NEEDS_CUDA = ("offload (torch.autograd.graph.save_on_cpu) moves saved tensors from a GPU to host memory; "
                      "on the CPU it saves nothing")


class MemoryBudgetError(ValueError):
    """No recompute assignment is predicted to fit the memory budget; the
    message says what does fit."""


# -- time --------------------------------------------------------------------------------------------
@functools.cache
def policy_costs() -> dict:
    """The measured per-policy costs (``policy_costs.json``), per device type."""
    return json.loads(resources.files(__package__).joinpath("policy_costs.json").read_text())


def training_flops(arch: Architecture, setup: Setup) -> float:
    """FLOPs of one training step: 3x the forward's convolutions and classifier
    (backward costs two forwards), 2 FLOPs per multiply-add."""
    stem, pixels = pixel_counts(arch, setup)
    forward = 2.0 * stem * arch.in_channels * arch.num_init_features * arch.kernel_taps(arch.stem_kernel)
    k, w, taps = arch.growth_rate, arch.width, arch.kernel_taps(3)
    for b, ((c0, c_total), m) in enumerate(zip(arch.block_channels(), pixels)):
        forward += sum(2.0 * m * ((c0 + i * k) * w + w * k * taps) for i in range(arch.block_config[b]))
        if b + 1 < len(pixels):
            forward += 2.0 * pixels[b + 1] * c_total * (c_total // 2)  # pooled before the 1x1 convolution
    forward += 2.0 * setup.batch * arch.block_channels()[-1][1] * arch.num_classes
    return 3 * forward


def recompute_flops(arch: Architecture, setup: Setup, policies: Sequence[str]) -> float:
    """FLOPs backward adds by recomputing bottleneck outputs: each recomputed
    block's BN-ReLU-Conv1x1 forward once more."""
    _, pixels = pixel_counts(arch, setup)
    total = 0.0
    for b, ((c0, _), m, policy) in enumerate(zip(arch.block_channels(), pixels, policies)):
        if policy == "recompute":
            total += sum(2.0 * m * (c0 + i * arch.growth_rate) * arch.width for i in range(arch.block_config[b]))
    return total


def pixel_counts(arch: Architecture, setup: Setup) -> tuple[int, list[int]]:
    """Pixels (voxels) of the batch at the stem convolution's output and at every block."""
    stem, blocks = arch.spatial_sizes(setup.image_size)
    return setup.batch * math.prod(stem), [setup.batch * math.prod(sides) for sides in blocks]


def step_time_ratio(arch: Architecture, setup: Setup, policies: Sequence[str]) -> tuple[float, str]:
    """Predicted step time with ``policies`` over that with ``keep`` in every
    block, and where the cost per recomputed FLOP comes from."""
    costs = policy_costs().get(setup.device)
    cost = costs["recompute_cost_per_flop"] if costs else 1.0
    source = costs["label"] if costs else "FLOP count (no measured costs for this device)"
    return 1.0 + cost * recompute_flops(arch, setup, policies) / training_flops(arch, setup), source


# -- choices -----------------------------------------------------------------------------------------
@dataclass
class Choice:
    """A per-block assignment and its predicted memory and step time."""

    policies: tuple[str, ...]
    prediction: Prediction
    step_time_ratio: float

    def describe(self, budget: Optional[int] = None) -> str:
        p = self.prediction
        of_budget = f" of the {format_bytes(budget)} budget" if budget is not None else ""
        not_counted = "".join(f"; not counted: {text}" for text in p.not_counted)
        return (f"recompute={self.policies}: predicted peak {format_bytes(p.total_bytes)}{of_budget} "
                f"({format_bytes(p.persistent_bytes)} parameters, gradients and optimizer state + "
                f"{format_bytes(p.step_bytes)} step), step time {self.step_time_ratio:.3f}x keep{not_counted}")


def assignments(blocks: int) -> list[tuple[str, ...]]:
    """Every per-block assignment, fastest first (more blocks kept first)."""
    return sorted(itertools.product(POLICIES, repeat=blocks), key=lambda a: a.count("recompute"))


def evaluate(arch: Architecture, setup: Setup, policies: Sequence[str]) -> Choice:
    policies = tuple(policies)
    return Choice(policies, predict(arch, setup, policies), step_time_ratio(arch, setup, policies)[0])


def allowed_assignments(arch: Architecture, recompute: Union[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """The assignments ``recompute`` allows: one policy everywhere, the given
    per-block ones, or every assignment for ``"auto"``."""
    blocks = len(arch.block_config)
    if recompute == "auto":
        return assignments(blocks)
    return [(recompute,) * blocks if isinstance(recompute, str) else tuple(recompute)]


def candidates(arch: Architecture, setup: Setup, recompute: Union[str, Sequence[str]]) -> list[Choice]:
    """Each allowed assignment with its prediction and step time."""
    return [evaluate(arch, setup, a) for a in allowed_assignments(arch, recompute)]


def best_fitting(arch: Architecture, setup: Setup, budget: int, recompute: Union[str, Sequence[str]] = "auto"
                 ) -> Optional[Choice]:
    """The fastest allowed assignment predicted to fit (``None`` if none does);
    ties go to the leaner.  The assignments are predicted fastest first, and
    only until one fits (and those as fast as it)."""
    if persistent_bytes(arch, setup) > budget:  # the same for every assignment: no simulation needed
        return None
    # (ties in time keep assignments()'s order, fewest recomputed blocks first, as the leaner-first choice did)
    timed = sorted((step_time_ratio(arch, setup, a)[0], i, a)
                   for i, a in enumerate(allowed_assignments(arch, recompute)))
    best: Optional[Choice] = None
    for ratio, _, policies in timed:
        if best is not None and ratio > best.step_time_ratio:
            break
        choice = Choice(policies, predict(arch, setup, policies), ratio)
        if choice.prediction.total_bytes <= budget and \
                (best is None or choice.prediction.total_bytes < best.prediction.total_bytes):
            best = choice
    return best


def any_fits(arch: Architecture, setup: Setup, budget: int, recompute: Union[str, Sequence[str]] = "auto") -> bool:
    """Whether :func:`best_fitting` finds an assignment; predicted leanest-looking
    first (most blocks recomputed), until one fits."""
    if persistent_bytes(arch, setup) > budget:  # the same for every assignment: no simulation needed
        return False
    return any(predict(arch, setup, a).total_bytes <= budget for a in reversed(allowed_assignments(arch, recompute)))


def choose(arch: Architecture, setup: Setup, budget: int, recompute: Union[str, Sequence[str]] = "auto") -> Choice:
    """:func:`best_fitting`, or :class:`MemoryBudgetError` saying what fits."""
    choice = best_fitting(arch, setup, budget, recompute)
    if choice is None:
        raise MemoryBudgetError(refusal(arch, setup, budget, recompute))
    return choice


def refusal(arch: Architecture, setup: Setup, budget: int, recompute: Union[str, Sequence[str]]) -> str:
    """Why nothing fits ``budget``, and what would at that budget."""
    leanest = min(candidates(arch, setup, recompute), key=lambda c: c.prediction.total_bytes)
    p = leanest.prediction
    what = f"recompute={leanest.policies}" if recompute == "auto" else f"recompute={recompute!r}"
    needed, allowed = format_bytes(p.total_bytes), format_bytes(budget)
    if needed == allowed:  # within the rounding: the bytes
        needed, allowed = f"{p.total_bytes:,.0f} bytes", f"{budget:,} bytes"
    lines = [f"{describe_model(arch)} at batch {setup.batch} of {size_text(setup.image_size)} "
             f"{str(setup.compute_dtype)[6:]} on "
             f"{setup.device} needs {needed} per training step even with {what} "
             f"({format_bytes(p.persistent_bytes)} parameters, gradients and optimizer state + "
             f"{format_bytes(p.step_bytes)} step), more than the memory budget of {allowed}."]
    batch = largest_batch(arch, setup, budget, recompute)
    lines.append(f"At this budget the largest batch that fits is {batch}." if batch else
                 "At this budget not even a batch of 1 fits.")
    if arch.depth is not None:
        depth = deepest_depth(arch, setup, budget, recompute)
        bc = f"{dims_text(arch)}DenseNet-BC (k={arch.growth_rate})"
        lines.append(f"The deepest {bc} that fits at batch {setup.batch} is depth {depth}." if depth else
                     f"No {bc} fits at batch {setup.batch}.")
    return " ".join(lines)


def describe_model(arch: Architecture) -> str:
    """E.g. ``"3-D DenseNet-121"`` or ``"DenseNet-BC-100 (k=12), dropout 0.2"``."""
    dropout = f", dropout {arch.drop_rate:g}" + (" (whole channels)" if arch.channel_dropout else "") \
        if arch.drop_rate else ""
    if arch.depth is not None:
        width = f", bn_size {arch.bn_size}" if arch.bn_size != 4 else ""
        return f"{dims_text(arch)}DenseNet-BC-{arch.depth} (k={arch.growth_rate}{width}){dropout}"
    shape = (arch.growth_rate, arch.block_config, arch.num_init_features)
    name = next((n for n, named in NAMED_MODELS.items() if named == shape and arch.stem == "imagenet"
                 and arch.bn_size == 4), None)
    if name is not None:  # densenet121 -> DenseNet-121
        return f"{dims_text(arch)}DenseNet-{name[len('densenet'):]}{dropout}"
    return f"{dims_text(arch)}DenseNet (k={arch.growth_rate}, blocks {arch.block_config}, {arch.stem} stem){dropout}"


def dims_text(arch: Architecture) -> str:
    """``"3-D "`` for a model of volumes, ``"MONAI "`` for MONAI's tree on images, nothing for torchvision's."""
    if arch.spatial_dims != 2:
        return f"{arch.spatial_dims}-D "
    return "MONAI " if arch.tree == "monai" else ""


def size_text(image_size: Sequence[int]) -> str:
    return "x".join(map(str, image_size))


# -- searches ----------------------------------------------------------------------------------------
def largest_true(fits: Callable[[int], bool], low: int, high: int) -> Optional[int]:
    """The largest ``x`` in ``[low, high]`` with ``fits(x)``, for ``fits`` true up
    to some point and false after it (doubling, then bisection; ``high`` is
    tried before a bisection up to it)."""
    if not fits(low):
        return None
    good, step = low, 1
    while good + step <= high and fits(good + step):
        good, step = good + step, step * 2
    if good + step > high:
        if good == high or fits(high):
            return high
        step = high - good
    bad = good + step
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def largest_fitting(fits: Callable[[int], bool], floor_fits: Callable[[int], bool], low: int, high: int
                    ) -> Optional[int]:
    """The largest ``x`` in ``[low, high]`` with ``fits(x)``, where ``fits`` can
    turn true again after false, but implies ``floor_fits``, which cannot: the
    last ``x`` where ``floor_fits`` holds (:func:`largest_true`), then down
    from it to the first that fits."""
    top = largest_true(floor_fits, low, high)
    return None if top is None else next((x for x in range(top, low - 1, -1) if fits(x)), None)


def deepest_depth(arch: Architecture, setup: Setup, budget: int, recompute: Union[str, Sequence[str]] = "auto"
                  ) -> Optional[int]:
    """The deepest DenseNet-BC with ``arch``'s growth rate and head whose training
    step is predicted to fit ``budget`` (``None``: not even depth 10).  The
    predicted peak can drop as the model deepens, its floor
    (:func:`memory.peak_floor`) cannot: the search bisects on the floor, then
    steps down from the deepest depth the floor allows to the first that fits."""
    def fits(n: int) -> bool:
        return any_fits(arch.with_depth(6 * n + 4), setup, budget, recompute)

    def floor_fits(n: int) -> bool:
        deeper = arch.with_depth(6 * n + 4)
        if persistent_bytes(deeper, setup) > budget:  # no simulation needed
            return False
        return any(peak_floor(deeper, setup, a) <= budget for a in reversed(allowed_assignments(deeper, recompute)))
    n = largest_fitting(fits, floor_fits, 1, MAX_DEPTH_LAYERS)
    return None if n is None else 6 * n + 4


def largest_batch(arch: Architecture, setup: Setup, budget: int, recompute: Union[str, Sequence[str]] = "auto"
                  ) -> Optional[int]:
    """The largest batch whose training step is predicted to fit ``budget``
    (searched up to ``MAX_BATCH``).  The predicted peak does not always grow
    with the batch: it drops from batch 1 (ATen's CPU im2col path, up to several
    MiB), and by up to a few hundred KiB wherever a small tensor grows past
    glibc's mmap threshold and leaves the heap (:func:`memory.heap_exits`).
    Between those batches it grows, so each stretch is searched by doubling
    and bisection, from the last stretch down to the first whose smallest
    batch fits."""
    @functools.cache
    def fits(b: int) -> bool:
        return any_fits(arch, setup.with_batch(b), budget, recompute)
    if persistent_bytes(arch, setup) > budget:  # whatever the batch
        return None
    exits = set().union(*(heap_exits(arch, setup, a, MAX_BATCH) for a in allowed_assignments(arch, recompute)))
    starts = sorted({1, 2} | exits)
    ends = [b - 1 for b in starts[1:]] + [MAX_BATCH]
    return next((largest_true(fits, lo, hi) for lo, hi in reversed(list(zip(starts, ends))) if fits(lo)), None)


# -- plan ----------------------------------------------------------------------------------------------
def refuse_unplannable(model: torch.nn.Module, caller: str) -> None:
    """Raise where the memory model does not describe ``model``'s training step:
    where a block, transition or stem takes the plain per-layer path, or the
    stem or ``norm5`` was replaced."""
    if not hasattr(model, "memory_model_blocker"):
        wrapper = " (a wrapper: pass the model it wraps, .module)" \
            if isinstance(getattr(model, "module", None), torch.nn.Module) else ""
        raise TypeError(f"{caller}: {type(model).__name__} is not a densenet_fast DenseNet{wrapper}; convert "
                        f"torchvision's with densenet_fast.from_torchvision, MONAI's with densenet_fast.monai.from_monai")
    blocker = model.memory_model_blocker()
    if blocker is not None:
        raise ValueError(f"{caller}: the memory model describes the memory-efficient engine on the network as "
                         f"built, and this model runs the plain per-layer path or other modules ({blocker}); plan "
                         f"and train it without a budget")


def planned_device(weight: torch.Tensor) -> str:
    """The device a model with parameter ``weight`` is planned on by default:
    its own (with its index: a GPU's multiprocessors count); the CPU for a meta
    model (shapes only)."""
    return "cpu" if weight.device.type == "meta" else str(weight.device)


def indexed(device: Union[str, torch.device]) -> torch.device:
    """``device`` with its index: a bare ``"cuda"`` is the current GPU (where
    there is one), as a tensor made there."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def plan(model: Union[str, Architecture, torch.nn.Module] = "densenet_bc", *, depth: Optional[int] = None,
         growth_rate: Optional[int] = None, num_classes: Optional[int] = None, in_channels: Optional[int] = None,
         drop_rate: Optional[float] = None, batch: int = 64, image_size: Union[int, tuple[int, ...]] = 32,
         dtype: Union[None, str, torch.dtype] = None,
         autocast: Union[None, str, torch.dtype] = None, device: Optional[str] = None, backend: Optional[str] = None,
         optimizer: Union[None, str, OptimizerSpec] = None, budget: Union[None, int, str] = None,
         offload: Optional[bool] = None, threads: Optional[int] = None) -> dict:
    """The memory plan of a training step as plain data (see the module docstring).

    ``model``: a name (``densenet_bc`` with ``depth``/``growth_rate``, or
    ``densenet121`` ...; with an ``image_size`` of three sides, ``(D, H, W)``,
    MONAI's tree of that shape for volumes; ``drop_rate``: the dropout after
    each dense layer), an
    :class:`~densenet_fast.memory.Architecture`, a :class:`densenet_fast.DenseNet`
    or a :class:`densenet_fast.monai.DenseNet`; an ``image_size`` of one int is
    that side in every spatial dimension.  ``dtype``, ``device``, ``backend`` and
    ``optimizer`` default to a model's (as ``plan_for`` takes them; a meta model
    is planned on the CPU), else
    float32 on the CPU, automatic, SGD with momentum; ``offload`` (CUDA: the
    forward and loss under ``torch.autograd.graph.save_on_cpu``) to a model's,
    else False; ``threads``: the CPU threads of the training process (they
    set the CPU backends' per-thread scratch), this process's by default.
    Returns ``{"policies": {"keep", "recompute",
    "auto"}}`` (``auto`` is None without a ``budget``) with each policy's
    ``persistent_bytes``, ``step_bytes``, ``total_bytes``, breakdowns, where the
    peak is, whether it fits and its step-time ratio; ``deepest_depth``
    (DenseNet-BC) and ``largest_batch`` per policy (None without a budget), and
    the ``search_limits`` they stop at (a value equal to its limit: that or more)."""
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        image_size = int(image_size)
    elif isinstance(image_size, (str, bool)) or not isinstance(image_size, Sequence):
        raise TypeError(f"image_size is one side (an int) or a tuple of sides, got {image_size!r}")
    if not isinstance(model, str) and any(v is not None for v in (depth, growth_rate, num_classes, in_channels,
                                                                  drop_rate)):
        raise ValueError("depth, growth_rate, num_classes, in_channels and drop_rate shape a named model; this model "
                         "is given whole")
    if isinstance(model, Architecture):
        arch = model
    elif isinstance(model, torch.nn.Module):
        refuse_unplannable(model, "plan")
        arch = Architecture.of(model)
        weight = next(model.parameters())
        dtype = dtype or weight.dtype
        device = device or planned_device(weight)
        backend = backend or model.backend
        optimizer = optimizer or getattr(model, "memory_optimizer", None)
        offload = getattr(model, "memory_offload", False) if offload is None else offload
    else:
        dims = 2 if isinstance(image_size, int) else len(image_size)
        arch = Architecture.named(model, depth, growth_rate, num_classes, in_channels, dims, drop_rate=drop_rate or 0.0)
    if isinstance(image_size, int):
        image_size = (image_size,) * arch.spatial_dims
    setup = Setup(batch, image_size, dtype or torch.float32, autocast, device or "cpu", backend,
                  OptimizerSpec.parse(optimizer), offload=bool(offload), threads=threads)
    if setup.offload and setup.device != "cuda":
        raise ValueError(OFFLOAD_NEEDS_CUDA)
    budget = None if budget is None else parse_bytes(budget)
    policies: dict[str, Optional[dict]] = {}
    for policy in POLICIES:
        policies[policy] = entry(evaluate(arch, setup, (policy,) * len(arch.block_config)), budget)
    policies["auto"] = None
    if budget is not None:
        choice = best_fitting(arch, setup, budget)
        if choice is not None:
            policies["auto"] = entry(choice, budget)
        else:
            leanest = min(candidates(arch, setup, "auto"), key=lambda c: c.prediction.total_bytes)
            policies["auto"] = {**entry(leanest, budget), "error": refusal(arch, setup, budget, "auto")}
    out = {"model": {"description": describe_model(arch), "depth": arch.depth, "growth_rate": arch.growth_rate,
                     "block_config": list(arch.block_config), "num_init_features": arch.num_init_features,
                     "bn_size": arch.bn_size, "drop_rate": arch.drop_rate, "channel_dropout": arch.channel_dropout,
                     "num_classes": arch.num_classes, "in_channels": arch.in_channels,
                     "stem": arch.stem, "spatial_dims": arch.spatial_dims, "tree": arch.tree,
                     "parameters": arch.parameter_count()},
           "setup": {"batch": setup.batch, "image_size": list(setup.image_size), "dtype": str(setup.dtype)[6:],
                     "autocast": str(setup.autocast)[6:] if setup.autocast else None, "device": setup.device,
                     "backend": setup.backend, "optimizer": vars(setup.optimizer), "threads": setup.threads,
                     "multiprocessors": setup.multiprocessors, "offload": setup.offload},
           "budget_bytes": budget, "policies": policies, "assumes": assumptions(setup),
           "step_time_ratio_source": step_time_ratio(arch, setup, ("keep",) * len(arch.block_config))[1]}
    # the searches' keys are always there (None where there is no budget, or no depth to vary), and the limits
    # they stop at: a value equal to its limit means "that or more"
    modes = list(POLICIES) + ["auto"]
    out["largest_batch"] = None if budget is None else {m: largest_batch(arch, setup, budget, m) for m in modes}
    out["deepest_depth"] = None if budget is None or arch.depth is None else \
        {m: deepest_depth(arch, setup, budget, m) for m in modes}
    out["search_limits"] = {"largest_batch": MAX_BATCH, "deepest_depth": 6 * MAX_DEPTH_LAYERS + 4}
    return out


def assumptions(setup: Setup) -> list[str]:
    """What the plan assumes of the process that trains, in words."""
    offload = ["the forward and loss under torch.autograd.graph.save_on_cpu; the step-time ratios leave out its "
               "copies to host memory and back (1.28x the step for DenseNet-BC-100 at batch 64 on an H200: "
               "docs/gpu.md)"] if setup.offload else []
    return offload + _process_assumptions(setup)


def _process_assumptions(setup: Setup) -> list[str]:
    if setup.device == "cuda":
        if workspace_backend(setup.backend, setup.compute_dtype) == "torch":
            return []  # torch's primitives: nothing depends on the GPU
        assumed = "; there is no GPU here: an H100's or H200's" if not torch.cuda.is_available() \
            and setup.multiprocessors == ASSUMED_MULTIPROCESSORS else ""
        return [f"a GPU of {setup.multiprocessors} multiprocessors (the {setup.backend} kernels' partial sums "
                f"follow the count{assumed})"]
    return [f"glibc's mmap threshold of {format_bytes(CPU_HEAP_BELOW)} in the training process (the trainer sets it "
            "under --memory-budget; elsewhere densenet_fast.memory.set_mmap_threshold())"]


def entry(choice: Choice, budget: Optional[int]) -> dict:
    p = choice.prediction
    return {**p.to_dict(), "fits": None if budget is None else p.total_bytes <= budget,
            "step_time_ratio": choice.step_time_ratio}


# -- the command ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="densenet_bc", help="densenet_bc (with --depth, --growth-rate) or "
                        "densenet121, densenet161, densenet169, densenet201, densenet264")
    parser.add_argument("--depth", type=int, default=None, help="DenseNet-BC depth 6n+4 (default 100)")
    parser.add_argument("--growth-rate", type=int, default=None, help="k (default: the model's; 12 for densenet_bc)")
    parser.add_argument("--num-classes", type=int, default=None, help="(default: the model's; 10 for densenet_bc)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="channels of the input (default 3; CT and MRI volumes have 1)")
    parser.add_argument("--drop-rate", type=float, default=None,
                        help="dropout after each dense layer, in [0, 1) (default: none)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[32],
                        help="S (a square image), H W, or D H W (a volume: MONAI's tree of the model; default: 32)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="the parameters' dtype (default: %(default)s)")
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                        help="the step runs under torch.autocast to this dtype (default: none)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    parser.add_argument("--backend", default=None, choices=BACKEND_NAMES, help="default: the device's")
    parser.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZER_PRESETS),
                        help="sgd: momentum 0.9, Nesterov, weight decay 1e-4 (the trainer's recipe)")
    parser.add_argument("--offload", action="store_true", help="CUDA: the forward and loss run under "
                        "torch.autograd.graph.save_on_cpu (train --offload)")
    parser.add_argument("--budget", default=None, help="memory budget: bytes or e.g. 8GiB, 512MiB, 2GB (default: "
                        "none; then only the policies' peaks)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the training process (default: this process's, torch.get_num_threads)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if not 1 <= len(args.image_size) <= 3:
        raise ValueError(f"--image-size takes 1 to 3 sides, got {len(args.image_size)}")
    image_size = tuple(args.image_size) if len(args.image_size) > 1 else args.image_size[0]
    result = plan(args.model, depth=args.depth, growth_rate=args.growth_rate, num_classes=args.num_classes,
                  in_channels=args.in_channels, drop_rate=args.drop_rate, batch=args.batch, image_size=image_size,
                  dtype=args.dtype,
                  autocast=args.autocast, device=args.device, backend=args.backend, optimizer=args.optimizer,
                  budget=args.budget, offload=args.offload, threads=args.threads)
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 1 if result["policies"]["auto"] is not None and "error" in result["policies"]["auto"] else 0


def report(result: dict) -> str:
    """The plan as text: per policy the peak, its breakdown and the step-time ratio, then the searches."""
    setup, budget = result["setup"], result["budget_bytes"]
    dtype = setup["dtype"] + (f", autocast {setup['autocast']}" if setup["autocast"] else "")
    lines = [f"{result['model']['description']}, {result['model']['parameters']:,} parameters; batch "
             f"{setup['batch']} of {size_text(setup['image_size'])}, {dtype}, {setup['device']} "
             f"({setup['backend']} backend" + (f", {setup['threads']} threads" if setup["device"] == "cpu" else "")
             + "), optimizer "
             f"{setup['optimizer']['name']}" + ("; saved tensors offloaded (save_on_cpu)" if setup["offload"] else "")
             + (f"; budget {format_bytes(budget)}" if budget else ""), ""]
    for name, entry_ in result["policies"].items():
        if entry_ is None:
            lines.append(f"{name}: needs --budget")
            continue
        fits = "" if entry_["fits"] is None else ("  fits" if entry_["fits"] else "  DOES NOT FIT")
        lines.append(f"{name}: {format_bytes(entry_['total_bytes'])} = {format_bytes(entry_['persistent_bytes'])} "
                     f"persistent + {format_bytes(entry_['step_bytes'])} step{fits}; step time "
                     f"{entry_['step_time_ratio']:.3f}x keep; recompute={tuple(entry_['policies'])}")
        parts = {**entry_["persistent"], **entry_["step"]}
        lines.append("    " + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items()))
        lines.append(f"    peak: {entry_['peak_at']}")
        if "error" in entry_:
            lines.append(f"    {entry_['error']}")
    first = next((e for e in result["policies"].values() if e is not None), {})  # the same for every policy
    lines += [f"not counted: {text}" for text in first.get("not_counted", [])]
    lines += [f"assumes: {text}" for text in result["assumes"]]
    lines.append(f"\nstep-time ratios: {result['step_time_ratio_source']}")
    labels = {"deepest_depth": "deepest depth at this batch", "largest_batch": "largest batch for this model"}
    for key, label in labels.items():
        if result[key] is not None:
            limit, at_limit = result["search_limits"][key], " or more (the search stops there)"
            lines.append(f"{label}: " + ", ".join(f"{k} {'none fits' if v is None else v}"
                                                  f"{at_limit if v == limit else ''}" for k, v in result[key].items()))
    return "\n".join(lines)
