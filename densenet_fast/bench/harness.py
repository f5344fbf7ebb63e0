"""What the model-level benchmarks (models, depth) share: their common
options, the implementations they compare and the worker specs they run."""

from __future__ import annotations

import argparse
import time
from typing import Optional

from ..memory import CPU_HEAP_BELOW, OPTIMIZER_PRESETS
from . import common
from .impls import TORCHVISION_IMPLS, ModelSpec, check_impl_names, default_impls


def image_size(text: str):
    """``--image-size``: one side (``32``), or sides ``DxHxW`` (a volume) or ``L`` x ... ."""
    sides = [int(side) for side in text.lower().split("x")]
    if min(sides) < 1:
        raise argparse.ArgumentTypeError(f"sides must be at least 1, got {text}")
    return sides[0] if len(sides) == 1 else sides


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the model-level benchmarks (models, depth)."""
    parser.add_argument("--device", default="cpu", type=common.device_type)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--autocast", default=None, choices=["bfloat16", "float16"], help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also torch.compile(torchvision) (slow on the CPU)")
    parser.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZER_PRESETS),
                        help="sgd: the trainer's recipe (momentum 0.9, Nesterov, weight decay 1e-4)")
    parser.add_argument("--steps", type=common.at_least(1), default=2,
                        help="measured training steps per memory process; the peak is the highest (on the CPU the "
                             "steps vary a little)")
    parser.add_argument("--warmup", type=common.at_least(0), default=1)
    parser.add_argument("--repeats", type=common.at_least(1), default=3)
    parser.add_argument("--threads", type=common.at_least(1), default=None,
                        help="torch threads per worker (default: torch's)")
    parser.add_argument("--full-warmup", action="store_true",
                        help="memory workers warm up on the full batch (default: on 2 images, and a DenseNet-BC's "
                             "depth-10 twin on the full batch), so that every per-shape library cache is in the "
                             "baseline (oneDNN's bf16 GEMM primitives, one per layer width, are not otherwise)")
    parser.add_argument("--malloc-default", action="store_true",
                        help="keep glibc's adaptive mmap threshold in memory workers (see docs/performance.md)")
    parser.add_argument("--out", type=common.output_file, default=None, help="JSON path (a PNG is written next to it)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


class Runner:
    """Builds worker specs from the arguments and runs them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + 60 * getattr(args, "max_minutes", 1e9)

    def spec(self, mode: str, impls: list[str], model: ModelSpec, batch: int, train: bool = True) -> dict:
        a = self.args
        return {"mode": mode, "impls": impls, "model": model.to_dict(), "batch": batch, "image_size": a.image_size,
                "device": a.device, "dtype": a.dtype, "autocast": a.autocast, "channels_last": a.channels_last,
                "train": train, "optimizer": a.optimizer, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats, "threads": a.threads,
                "offload": getattr(a, "offload", False),
                # a tiny first step loads code and initialises libraries before the baseline;
                # torch.compile must see the real batch or it compiles again
                "warmup_batch": batch if "tv-compile" in impls or a.full_warmup else min(2, batch)}

    def memory(self, impl: str, model: ModelSpec, batch: int, limit_bytes: Optional[float], timeout_s: float,
               train: bool = True, memory_budget: Optional[float] = None) -> dict:
        """Peak memory of ``impl`` in a fresh process, stopped above ``limit_bytes``;
        ``memory_budget``: the one ``fast-<backend>-auto`` is built with."""
        spec = self.spec("memory", [impl], model, batch, train)
        spec["malloc_mmap_threshold"] = None if self.args.malloc_default else MMAP_THRESHOLD
        spec["memory_budget"] = memory_budget
        return common.run_worker(spec, timeout_s, limit_bytes)

    def time(self, impls: list[str], model: ModelSpec, batch: int, train: bool = True,
             memory_budget: Optional[float] = None) -> dict:
        spec = self.spec("time", impls, model, batch, train)
        spec["memory_budget"] = memory_budget
        return common.run_worker(spec, self.seconds_left())

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


MMAP_THRESHOLD = CPU_HEAP_BELOW  # bytes: tensors of this size and more are mmapped and returned to the OS when freed


def check_budget_steps(args: argparse.Namespace) -> None:
    """A budget is about training: refuse to judge it from one measured step
    (later ones can peak higher still on the CPU: by up to 3.9 MiB at batch 16
    in docs/memory_history.md, "Over twelve steps")."""
    if args.budget_gib > 0 and args.steps < 2:
        raise ValueError(f"--budget-gib needs --steps 2 or more (got {args.steps}): on the CPU a later step can "
                         "peak higher than the first")


def model_budget(impl: str, args) -> Optional[float]:
    """The memory budget a worker builds ``impl``'s model with: ``recompute="auto"``
    plans under it; a fixed policy gets none (with one it would check the
    prediction and refuse, and the measurement would verify nothing)."""
    return args.budget_gib * common.GIB if impl.endswith("-auto") and args.budget_gib > 0 else None


def check_impls(impls: list[str], monai: bool, args: argparse.Namespace) -> None:
    """``ValueError`` for a name that is no implementation of the tree (MONAI's
    or torchvision's), or a ``fast-<backend>-auto`` without a budget to plan under."""
    from .monai_impls import MONAI_IMPLS
    check_impl_names(impls, MONAI_IMPLS if monai else TORCHVISION_IMPLS)
    if any(impl.endswith("-auto") for impl in impls) and not args.budget_gib:
        raise ValueError("fast-<backend>-auto plans under the memory budget: give --budget-gib above 0")


def resolve_impls(args: argparse.Namespace) -> list[str]:
    """The implementations asked for (``auto`` resolved to the backend it picks)."""
    import torch
    from ..backends import get_backend
    if args.impls:
        impls = args.impls
    elif getattr(args, "all_backends", True):
        impls = default_impls(args.device, args.compile)
    else:
        auto = get_backend(None, torch.device(args.device)).name
        impls = ["tv-eager", "tv-memeff"] + (["tv-compile"] if args.compile else []) + \
                [f"fast-{auto}-keep", f"fast-{auto}-recompute"]
    return impls


