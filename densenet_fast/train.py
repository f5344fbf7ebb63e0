"""``python -m densenet_fast train``: train a DenseNet with the paper's recipe.

SGD (momentum 0.9, Nesterov, weight decay 1e-4), learning rate 0.1 divided by
10 at 50% and 75% of the epochs (or cosine), per-dataset augmentation, mixed
precision, channels-last, resumable atomic checkpoints, Ctrl-C to stop and
save, and multi-process training under ``torchrun`` (DistributedDataParallel).

Output directory: ``checkpoint.pt``, written after every epoch and on Ctrl-C,
``metrics.csv`` (one row per finished epoch), written after every epoch, and
``curves.png`` (loss and accuracy per epoch) at the end and on Ctrl-C, once an
epoch has finished.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import errno
import gc
import importlib
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from . import models
from . import monai as monai_models
from .data import SYNTHETIC_3D
from .backends import BACKEND_NAMES
from .memory import (CPU_HEAP_BELOW, Architecture, OptimizerSpec, Setup, bc_layers_per_block, cpu_heap_as_modelled,
                     available_memory_bytes, format_bytes, parse_bytes, predict, set_mmap_threshold)
from .cli import CommandFailed
from . import planner
from .planner import MemoryBudgetError
from .data import (DatasetError, ImageData, ShardedBatchSampler, augment, load_dataset, memory_shortfall,
                   whole_split)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet_bc": models.densenet_bc,
    "densenet121": models.densenet121,
    "densenet169": models.densenet169,
    "densenet201": models.densenet201,
    "densenet161": models.densenet161,
    "densenet264": models.densenet264,
}
# Volumes (3-D data) train densenet_fast.monai's DenseNets (MONAI's module tree): the
# named ones, and DenseNet-BC as a MONAI DenseNet of 3 blocks of (depth - 4) / 6 layers.
MONAI_MODELS: dict[str, Callable[..., nn.Module]] = {
    "densenet121": monai_models.DenseNet121,
    "densenet169": monai_models.DenseNet169,
    "densenet201": monai_models.DenseNet201,
    "densenet161": lambda **kwargs: monai_models.DenseNet(init_features=96, growth_rate=48,
                                                          block_config=(6, 12, 36, 24), **kwargs),
    "densenet264": monai_models.DenseNet264,
}
# Defaults that depend on the dataset: small and quick on the embedded digits,
# the paper's CIFAR settings (DenseNet-BC L=100 k=12, 300 epochs, batch 64) otherwise.
DIGITS_DEFAULTS = dict(depth=10, growth_rate=12, epochs=15, batch_size=64, workers=0)
PAPER_DEFAULTS = dict(depth=100, growth_rate=12, epochs=300, batch_size=64, workers=0)
# Volumes: small and quick on the generated synthetic3d, a 3-D DenseNet-BC L=40 k=12 otherwise.
SYNTHETIC_3D_DEFAULTS = dict(depth=10, growth_rate=8, epochs=10, batch_size=16, workers=0)
VOLUME_DEFAULTS = dict(depth=40, growth_rate=12, epochs=100, batch_size=16, workers=0)
IMAGE_FOLDER_WORKERS = 4
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = "densenet_fast.train/1"
CHECKPOINT_KEYS = ("format", "options", "epoch", "step", "partial_sums", "history", "rng", "model", "optimizer",
                   "scaler")
CHECKPOINT, METRICS, CURVES = "checkpoint.pt", "metrics.csv", "curves.png"
DEFAULT_RUNS = "runs"  # the folder (in the working directory) of runs given no --out
# Options a resumed run must share with its checkpoint (the model's, the data's and the recipe's); those of
# RECORDED_SINCE are compared where the checkpoint has them (checkpoints record the data's path and the
# samples' size since 2026-12-03, its fingerprint since a478a97, the same day). The data is compared by its fingerprint
# where the checkpoint has one, not by its path: a moved dataset resumes; so does one whose test split alone changed
# (a test sample repaired), where the checkpoint has the training split's own fingerprint (train_fingerprint).
RECORDED_SINCE = ("data", "sample_size", "data_fingerprint")
FINGERPRINTS = ("data_fingerprint", "train_fingerprint")
# Options added later, with the value every older checkpoint trained with (compared as that).
OLDER_CHECKPOINTS_HAD = {"drop_rate": 0.0}
RESUME_MUST_MATCH = ("dataset", "model", "depth", "growth_rate", "drop_rate", "num_classes", "in_channels",
                     "batch_size", "lr", "momentum", "weight_decay", "nesterov", "schedule", "amp", "seed",
                     "train_limit", *RECORDED_SINCE)
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_s",
                 "seconds")
MAX_SEED = 2**31 - 1  # numpy seeds each process with seed + rank, below 2**32
# How long a process that finished waits for the others before leaving the process groups.
TEARDOWN_TIMEOUT = datetime.timedelta(minutes=5)


class TrainingError(ValueError):
    """Bad input to the trainer (options, output directory, checkpoint)."""


class DivergedError(CommandFailed):
    """The weights hold NaN or infinity (found every 10 steps and before each
    checkpoint): nothing of the run since its last checkpoint is saved."""


class OutputError(CommandFailed):
    """A file of the run could not be written during it (a full disk).  Not a
    :class:`TrainingError`: under torchrun the other processes may be inside a
    collective, so the process groups are left to the end of the process."""


class SampleError(CommandFailed):
    """A sample could not be read during training (a file changed or vanished
    since the dataset was loaded); every process raises it, together."""


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, p, s, v = DIGITS_DEFAULTS, PAPER_DEFAULTS, SYNTHETIC_3D_DEFAULTS, VOLUME_DEFAULTS

    def default(key: str) -> str:
        return (f"default: {d[key]} on digits, {p[key]} on other images, {s[key]} on {SYNTHETIC_3D}, "
                f"{v[key]} on other volumes")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="digits", metavar="DATA",
                      help="'digits' (scikit-learn's 8x8 handwritten digits, embedded; the default) or a directory: "
                           "CIFAR-10 python version (data_batch_1..5, test_batch), CIFAR-100 python version "
                           "(train, test, meta), or an ImageFolder tree (one folder of images per class, optionally "
                           "under train/ and val/; without them a fixed 20%% is held out for testing). 3-D volumes: "
                           f"'{SYNTHETIC_3D}' (generated, for smoke tests), a folder of .npy (or, with nibabel, "
                           ".nii/.nii.gz) volumes with a labels.csv (columns file,label[,split]), or a MedMNIST-3D "
                           ".npz file (or its name, e.g. organmnist3d, in $MEDMNIST_ROOT or ~/.medmnist; nothing is "
                           "downloaded); docs/training.md describes the layouts")
    data.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                      help="side that ImageFolder images are resized and centre-cropped to (default: 32)")
    data.add_argument("--volume-size", type=int, nargs="+", default=None, metavar="SIZE",
                      help="D H W (or one side for all three) that volumes are resized to (trilinear); without it "
                           f"the volumes of a dataset must share one size ({SYNTHETIC_3D}: generated at this size, "
                           f"default 16)")
    data.add_argument("--workers", type=int, default=None, metavar="N",
                      help=f"data-loading worker processes (default: {IMAGE_FOLDER_WORKERS} for ImageFolder, at most one per CPU; "
                           f"0 for the in-memory datasets)")
    data.add_argument("--train-limit", type=int, default=None, metavar="N",
                      help="train on N training images only, each class's share as in the whole, drawn with a "
                           "fixed seed (quick checks)")
    data.add_argument("--test-limit", type=int, default=None, metavar="N",
                      help="test on N test images only, drawn as --train-limit's (quick checks)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="densenet_bc", choices=sorted(MODELS),
                       help="architecture (default: %(default)s, the paper's CIFAR DenseNet-BC); for volumes the 3-D "
                            "DenseNets of densenet_fast.monai (MONAI's module tree)")
    model.add_argument("--depth", type=int, default=None, metavar="L",
                       help=f"DenseNet-BC depth, 6n+4 ({default('depth')})")
    model.add_argument("--growth-rate", type=int, default=None, metavar="K",
                       help=f"DenseNet-BC growth rate ({default('growth_rate')})")
    model.add_argument("--drop-rate", type=float, default=0.0, metavar="P",
                       help="dropout after each dense layer (default: none; the paper's 0.2 is for CIFAR and SVHN "
                            "without augmentation); on volumes whole channels, as MONAI's dropout_prob")
    model.add_argument("--backend", default=None, choices=BACKEND_NAMES,
                       help="primitive backend (default: automatic per device)")
    model.add_argument("--recompute", default=None, choices=(*models.RECOMPUTE_POLICIES, models.AUTO),
                       help="'keep' stores bottleneck outputs for backward (faster), 'recompute' recomputes them "
                            "(leanest), 'auto' chooses per dense block to fit --memory-budget (default: keep, or "
                            "auto with --memory-budget)")
    model.add_argument("--memory-budget", default=None, metavar="BYTES",
                       help="memory a training step of one process may use (parameters, gradients, optimizer state "
                            "and the step's peak), e.g. 2GiB: the planner chooses the recompute policy per block "
                            "(or checks --recompute) before the first step and says what it chose")

    recipe = parser.add_argument_group("optimisation (the paper's recipe by default)")
    recipe.add_argument("--epochs", type=int, default=None, metavar="N",
                        help=f"training epochs ({default('epochs')})")
    recipe.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help=f"global batch size, split evenly over the processes ({default('batch_size')})")
    recipe.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: %(default)s)")
    recipe.add_argument("--schedule", default="step", choices=("step", "cosine"),
                        help="'step' divides the learning rate by 10 at 50%% and 75%% of the epochs; 'cosine' "
                             "anneals it to 0 step by step (default: %(default)s)")
    recipe.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    recipe.add_argument("--no-nesterov", dest="nesterov", action="store_false",
                        help="plain instead of Nesterov momentum")
    recipe.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (default: %(default)s)")
    recipe.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights, data order and augmentation (default: %(default)s)")

    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="'auto' uses CUDA when available (default: %(default)s)")
    run.add_argument("--amp", default="none", choices=sorted(AMP_DTYPES),
                     help="mixed precision: autocast to bf16, or fp16 with a gradient scaler (default: %(default)s)")
    run.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and input")
    run.add_argument("--offload", action="store_true", help="CUDA: keep the tensors saved for backward in pinned "
                     "host memory (torch.autograd.graph.save_on_cpu), two copies per step; they come back a node "
                     "(a dense block) at a time, parameters as copies: the log gives the predicted peak with and "
                     "without it, and --memory-budget plans with it (docs/memory.md, \"Offload\")")
    run.add_argument("--sync-bn", action="store_true",
                     help="synchronise batch statistics across processes (under torchrun)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR",
                     help=f"output directory for {CHECKPOINT}, {METRICS} and {CURVES} "
                          f"(default: a new {DEFAULT_RUNS}/<dataset>-<model>[-<depth>-<k>]-<date>-<time>-<process id>; "
                          f"depth and k for densenet_bc)")
    existing = out.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help=f"continue the run whose {CHECKPOINT} is in the output directory")
    existing.add_argument("--overwrite", action="store_true",
                          help="start afresh even if the output directory holds an earlier run's files (they "
                               "are replaced when this run saves its first checkpoint)")


def run(args: argparse.Namespace) -> int:
    """Entry point of the ``train`` subcommand; returns the exit status."""
    summary = train(args)
    return 130 if summary["interrupted"] else 0


def check_numbers(args: argparse.Namespace) -> None:
    """One-line errors for numeric options out of range, before any work (a NaN fails every test)."""
    for key, least in (("epochs", 1), ("batch_size", 1), ("image_size", 1), ("train_limit", 1), ("test_limit", 1),
                       ("growth_rate", 1), ("workers", 0)):
        value = getattr(args, key)
        if value is not None and value < least:
            raise TrainingError(f"--{key.replace('_', '-')} must be at least {least}, got {value}")
    volume_size = getattr(args, "volume_size", None)
    if volume_size is not None and (len(volume_size) not in (1, 3) or min(volume_size) < 1):
        raise TrainingError(f"--volume-size takes one side or three (D H W), each at least 1; got "
                            f"{' '.join(map(str, volume_size))}")
    if not 0 < args.lr < math.inf:
        raise TrainingError(f"--lr must be a positive finite number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise TrainingError(f"--momentum must be at least 0 and below 1, got {args.momentum}")
    if args.nesterov and args.momentum == 0:
        raise TrainingError("--momentum 0 needs --no-nesterov (Nesterov momentum needs a momentum)")
    if not 0 <= args.drop_rate < 1:
        raise TrainingError(f"--drop-rate must be at least 0 and below 1, got {args.drop_rate}")
    if not 0 <= args.weight_decay < math.inf:
        raise TrainingError(f"--weight-decay must be a finite number, 0 or more, got {args.weight_decay}")
    if not 0 <= args.seed <= MAX_SEED:
        raise TrainingError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    if args.memory_budget is not None:
        try:
            parse_bytes(args.memory_budget)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"--memory-budget: {exc}") from None
    if args.recompute == models.AUTO and args.memory_budget is None:
        raise TrainingError("--recompute auto needs --memory-budget")
    if args.resume and args.out is None:
        raise TrainingError("--resume needs --out: the directory of the run to continue")


# -- the run, step by step -------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict:
    """Train as the command line says; returns the final metrics (also printed).

    Under torchrun the process groups are left by :func:`stop_processes` after a
    run that ended normally or with an error that every process raises alike,
    so without waiting for the others: a :class:`TrainingError` (bad input,
    found before the first step) or a :class:`SampleError` (the processes agree
    on it between steps). Any other exception leaves them to the end of the
    process: a collective may be in flight, and the other processes may be gone."""
    check_numbers(args)
    if args.offload and (args.device == "cpu" or not torch.cuda.is_available()):
        raise TrainingError("--offload keeps saved tensors in host memory instead of GPU memory: it needs CUDA, "
                            "and this run is on the CPU")
    procs, device = start_processes(args.device)
    try:
        summary = _train(args, procs, device)
    except (TrainingError, SampleError) as error:
        traceback.clear_frames(error.__traceback__)  # its frames hold the model, and so the groups
        stop_processes(procs, wait_for_others=False)
        raise
    stop_processes(procs)
    return summary


def _train(args: argparse.Namespace, procs: Processes, device: torch.device) -> dict:
    """The steps of a run, in order."""
    if device.type == "cpu" and args.memory_budget is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # before the data and the model, so that the heap holds no large free blocks that would serve tensors
        # (without glibc's malloc it sets nothing, and the model's plan warns)
        set_mmap_threshold()
    options, data, file_sizes = prepare(args, procs)
    run = build_run(options, data, procs, device)
    run.file_sizes = file_sizes
    position = resume(run) if options["resume"] else Position()
    distribute(run)
    plan = plan_memory(run) if options["memory_budget"] is not None else None  # (refused before the header)
    if plan is None and device.type == "cpu":
        refuse_step_beyond_memory(run)
    procs.log(describe(run))
    if plan is not None:
        procs.log(plan)
    if options["offload"]:
        procs.log(offload_note(run))
    if position.epoch >= options["epochs"]:  # (after the header, whose schedule it overrides)
        more = "" if position.epoch == options["epochs"] else f", more than --epochs {options['epochs']}"
        procs.log(f"the checkpoint has trained {plural(position.epoch, 'epoch')}{more}: nothing is left to train "
                  f"(a larger --epochs trains on)")
    created = start_output(options) if procs.is_main else []
    run.replaces_earlier_run = options["overwrite"]
    try:
        try:
            outcome = train_epochs(run, position)
        except DatasetError as exc:  # a sample that cannot be read
            # its frames hold a loader's iterator, in a cycle (the loader's re-raise holds the error): cleared,
            # so that run.close() ends the workers
            traceback.clear_frames(exc.__traceback__)
            raise SampleError(worker_error_text(exc)) from None
        return finish(run, outcome)
    finally:
        run.close()
        with suppress(OSError):  # a run that failed before its first checkpoint leaves no folder (its error stands)
            for folder in created:
                os.rmdir(folder)  # (only where empty)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def worker_error_text(exc: Exception) -> str:
    """``exc``'s message; for one that a DataLoader worker raised, the worker's
    own message (torch puts the worker's traceback in front of it)."""
    text = str(exc).strip()
    if not text.startswith("Caught "):
        return text
    last = text.splitlines()[-1]  # "densenet_fast.data.DatasetError: cannot read image ..."
    return last.partition(": ")[2] or last


@dataclass
class Run:
    """What the steps of one training run share."""

    options: dict
    procs: Processes
    device: torch.device
    data: ImageData
    model: nn.Module
    net: nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_factor: Callable[[int], float]
    train_sampler: ShardedBatchSampler
    train_loader: Optional[DataLoader]  # None once the run has ended (close)
    test_loader: Optional[DataLoader]
    history: list[dict] = field(default_factory=list)  # one row of metrics per finished epoch
    replaces_earlier_run: bool = False  # --overwrite, until the first checkpoint is saved
    file_sizes: Optional[tuple] = None  # on rank 0, the sizes of the data's files as loaded (ImageData.file_sizes)

    @property
    def out(self) -> str:
        return self.options["out"]

    def close(self) -> None:
        """Drop the data loaders, so that their worker processes end now (a
        loader's iterator shuts them down when freed), not whenever the garbage
        collector frees what still holds the run (matplotlib's savefig leaves
        such a reference cycle)."""
        self.train_loader = self.test_loader = None


@dataclass
class Sums:
    """Running sums of one pass over data: loss x images, correct predictions, images."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def as_list(self) -> list[float]:
        return [self.loss, self.correct, self.count]

    def plus(self, values: list[float]) -> "Sums":
        return Sums(*(a + b for a, b in zip(self.as_list(), values)))


@dataclass
class Position:
    """Where training continues: ``step`` batches into ``epoch``, with the sums of
    that epoch's earlier steps (summed over the processes, in every process) and
    the seconds they took."""

    epoch: int = 0
    step: int = 0
    partial: Sums = field(default_factory=Sums)
    seconds: Optional[float] = 0.0


@dataclass
class Outcome:
    """How training ended, how many images it trained on in how many seconds, and
    how many epochs it ended (evaluated)."""

    interrupted: bool = False
    images: int = 0
    seconds: float = 0.0
    epochs: int = 0


def prepare(args: argparse.Namespace, procs: Processes) -> tuple[dict, ImageData, Optional[tuple]]:
    """The run's settings and data (its fingerprint before ``--train-limit`` and
    ``--test-limit``, made by rank 0), after checking the output directory; on
    rank 0 the sizes of the data's files as loaded (``ImageData.file_sizes``)."""
    refuse_output_inside_data(args)
    try:
        data = load_dataset(args.data, args.image_size, args.volume_size)
        file_sizes = data.file_sizes() if procs.is_main else None
        fingerprints = procs.gather(data.fingerprints(sizes=file_sizes) if procs.is_main else None)[0]
    except DatasetError as exc:
        raise TrainingError(str(exc)) from exc
    data = data.limit(args.train_limit, args.test_limit)
    options = resolve_options(args, data, procs)
    options["data_fingerprint"], options["train_fingerprint"] = fingerprints
    check_output_directory(options, procs)
    return options, data, file_sizes


def build_run(options: dict, data: ImageData, procs: Processes, device: torch.device) -> Run:
    """Seeded model, samplers, loaders, optimiser and gradient scaler."""
    random.seed(options["seed"] + procs.rank)
    np.random.seed(options["seed"] + procs.rank)
    torch.manual_seed(options["seed"])  # the same initial weights in every process
    try:
        model = build_volume_model(options) if data.spatial_dims == 3 else build_model(options)
    except RuntimeError as exc:  # the CPU allocator's "can't allocate memory" (CUDA's out-of-memory is one too)
        if "allocate" not in str(exc):
            raise
        raise TrainingError(f"the model does not fit in memory ({str(exc).strip().splitlines()[0]})") from None
    set_memory_plan(model, options)
    model = model.to(device)
    # (synchronised batch statistics count every process's images)
    check_input_size(model, data, options["model"],
                     options["batch_size"] // (1 if options["sync_bn"] else procs.world_size))
    if data.size is not None:  # (an ImageFolder's images are read a batch at a time)
        batch = options["batch_size"] // procs.world_size
        why = memory_shortfall(f"a batch of {plural(batch, data.unit[:-1])} of {'x'.join(map(str, data.size))}",
                               batch * data.in_channels * math.prod(data.size) * 4)
        if why is not None:  # said by every process alike
            raise TrainingError(why)
    if options["channels_last"]:
        model = model.to(memory_format=models.CHANNELS_LAST[data.spatial_dims + 2])
    torch.manual_seed(options["seed"] + procs.rank)  # per-process dropout masks

    per_process_batch = options["batch_size"] // procs.world_size
    train_sampler = ShardedBatchSampler(len(data.train), per_process_batch, shuffle=True, drop_last=True,
                                        seed=options["seed"], rank=procs.rank, world_size=procs.world_size)
    test_sampler = ShardedBatchSampler(len(data.test), per_process_batch, shuffle=False, drop_last=False,
                                       rank=procs.rank, world_size=procs.world_size)
    if len(train_sampler) == 0:
        raise TrainingError(f"{len(data.train)} training {data.unit} do not fill one batch of "
                            f"{options['batch_size']}; lower --batch-size")
    # Each iterator of a loader draws its workers' base seed: from a generator of its own, not torch's, which
    # the dropout masks draw from and a checkpoint restores (a resumed epoch starts an iterator mid-epoch).
    loader_options = dict(num_workers=options["workers"], pin_memory=device.type == "cuda",
                          persistent_workers=options["workers"] > 0,
                          generator=torch.Generator().manual_seed(options["seed"] + procs.rank))
    optimizer = torch.optim.SGD(model.parameters(), lr=options["lr"], momentum=options["momentum"],
                                nesterov=options["nesterov"], weight_decay=options["weight_decay"])
    return Run(options, procs, device, data, model, model, optimizer,
               scaler=torch.amp.GradScaler(device.type, enabled=options["amp"] == "fp16"),
               lr_factor=learning_rate_factor(options["schedule"], options["epochs"], len(train_sampler)),
               train_sampler=train_sampler,
               train_loader=DataLoader(data.train, batch_sampler=train_sampler, **loader_options),
               test_loader=DataLoader(data.test, batch_sampler=test_sampler, **loader_options))


def resume(run: Run) -> Position:
    """Restore the model, optimiser, scaler, RNGs and metrics of the checkpoint in
    the output directory; the position it was saved at."""
    checkpoint = load_checkpoint(os.path.join(run.out, CHECKPOINT), run.options, run.model, run.data)
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint["rng"]
    set_rng_state(rng_states[run.procs.rank % len(rng_states)])
    run.history = checkpoint["history"]
    # (a checkpoint from before partial_seconds: None, and the epoch's speed counts this run's steps alone)
    position = Position(checkpoint["epoch"], checkpoint["step"], seconds=checkpoint.get("partial_seconds"))
    # already summed over the processes; in every process, whose epoch totals add this run's steps to them (on
    # rank 0 alone, the others' divided zero by zero after a stop at an epoch's last step)
    position.partial = Sums(*checkpoint["partial_sums"])
    run.procs.log(f"resuming {run.out} at epoch {position.epoch + 1}, step {position.step}")
    saved_epochs = checkpoint["options"]["epochs"]
    if not run.options["epochs_given"] and saved_epochs != run.options["epochs"]:
        # the run's own length, not the dataset's default: the schedule is a function of it (the learning rate
        # jumped where a resumed run fell back to the default)
        run.options["epochs"] = saved_epochs
        run.lr_factor = learning_rate_factor(run.options["schedule"], saved_epochs, len(run.train_sampler))
        run.procs.log(f"training to the checkpoint's {plural(saved_epochs, 'epoch')} (--epochs to change)")
    saved_data = checkpoint["options"].get("data")
    if saved_data is not None and saved_data != run.options["data"]:  # with equal fingerprints (load_checkpoint)
        run.procs.log(f"the data moved: {saved_data} in the checkpoint, {run.options['data']} now (its fingerprint, "
                      f"of the labels and the samples' shape or the files' names and sizes, is the same)")
    if "unreadable" in checkpoint:
        run.procs.log(f"reading again the training sample(s) that could not be read when the checkpoint was "
                      f"written: {', '.join(checkpoint['unreadable']['samples'])}")
    saved, now = checkpoint["compared_fingerprints"]
    if saved.get("data_fingerprint", now["data_fingerprint"]) != now["data_fingerprint"]:
        earlier = f": the {plural(len(run.history), 'epoch')} before were tested on the other" if run.history else ""
        run.procs.log(f"the test split differs from the checkpoint's (its samples changed; the training split's are "
                      f"the same){earlier}")  # (load_checkpoint lets it pass)
    saved_limit, limit = checkpoint["options"].get("test_limit"), run.options["test_limit"]
    whole = len(whole_split(run.data.test, [])[0])
    if run.history and min(saved_limit or whole, whole) != min(limit or whole, whole):  # (as many: the same samples)
        def given(limit: Optional[int]) -> str:
            return f"--test-limit {limit}" if limit is not None else "no --test-limit"

        run.procs.log(f"the test split differs from the checkpoint's ({given(limit)} now, {given(saved_limit)} "
                      f"then): the {plural(len(run.history), 'epoch')} before were tested on other samples")
    saved_processes = checkpoint["options"].get("world_size", 1)
    if saved_processes != run.procs.world_size:
        run.procs.log(f"the checkpoint was trained by {saved_processes} process(es), this run has "
                      f"{run.procs.world_size}: it continues, but no longer repeats an uninterrupted run exactly "
                      f"(each process draws its own augmentation)")
    return position


def distribute(run: Run) -> None:
    """With ``--sync-bn``, the group of the synchronised batch statistics; under
    torchrun, the DistributedDataParallel wrapper."""
    procs = run.procs
    if run.options["sync_bn"]:
        if not hasattr(run.model, "set_sync_group"):
            raise TrainingError("--sync-bn: this version of densenet_fast cannot synchronise batch statistics")
        if procs.distributed:
            try:
                # A group of its own: the statistics collectives run inside backward,
                # next to DDP's asynchronous gradient all-reduces on the default group.
                procs.sync_group = dist.new_group(list(range(procs.world_size)))
                run.model.set_sync_group(procs.sync_group)
            except NotImplementedError as exc:
                raise TrainingError(f"--sync-bn: {exc}") from exc
        else:
            procs.log("--sync-bn: one process, whose batch statistics are already the whole batch's: nothing to "
                      "synchronise")
    if procs.distributed:
        device = run.device
        run.net = nn.parallel.DistributedDataParallel(run.model,
                                                      device_ids=[device.index] if device.type == "cuda" else None)


def plan_memory(run: Run) -> str:
    """Plan the training step under ``--memory-budget`` before the first step
    (densenet_fast.planner through the model: recompute="auto" chooses the
    policies, a fixed policy is checked); what was chosen, as a log line."""
    options = run.options
    images = run.data.train[0][0]
    batch = options["batch_size"] // run.procs.world_size
    heap = ""
    if run.device.type == "cpu" and cpu_heap_as_modelled():
        heap = (f"; glibc's mmap threshold is {format_bytes(CPU_HEAP_BELOW)} for this run, as the memory model "
                f"assumes (steps are slower: docs/memory.md, \"The training process's allocator\")")
    try:
        with warnings.catch_warnings():  # the model's MemoryPlanNotice: said here instead
            warnings.simplefilter("ignore", models.MemoryPlanNotice)
            choice = run.model.plan_for(batch, tuple(images.shape[1:]), autocast=AMP_DTYPES[options["amp"]],
                                        device=run.device)
    except MemoryBudgetError as exc:
        raise TrainingError(f"--memory-budget: {exc}") from None
    ddp = " (not counted: DistributedDataParallel's gradient buckets)" if run.procs.distributed else ""
    return f"memory plan for batch {batch} per process{ddp}: {choice.describe(run.model.memory_budget)}{heap}"


def refuse_step_beyond_memory(run: Run) -> None:
    """Without ``--memory-budget``, on the CPU: refuse (before the header) a
    training step that the memory model predicts will not fit in the memory
    this machine has available, for this machine's processes of the run (the
    kernel kills such a run without a word), saying what would fit; as rank 0
    finds it, every process alike."""
    problem = run.procs.gather(step_memory_problem(run) if run.procs.is_main else None)[0]
    if problem:
        raise TrainingError(problem)


def step_memory_problem(run: Run) -> Optional[str]:
    """Why :func:`refuse_step_beyond_memory` refuses the run, or ``None`` (also
    where the model is not one the memory model describes)."""
    available = available_memory_bytes()
    model = run.model
    policy = getattr(model, "recompute", None)
    if available is None or policy not in ("keep", "recompute") or model.memory_model_blocker() is not None \
            or run.data.size is None:
        return None
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    batch = run.options["batch_size"] // run.procs.world_size
    setup = dict(batch=batch, image_size=tuple(run.data.size), autocast=AMP_DTYPES[run.options["amp"]])
    with warnings.catch_warnings():  # (the planner's notes on what it leaves out)
        warnings.simplefilter("ignore")
        each = planner.plan(model, **setup)["policies"][policy]["total_bytes"]
        predicted = each * local_processes
        if predicted <= available:
            return None
        fitting = planner.plan(model, **setup, budget=available // local_processes)["largest_batch"]
    processes = f", {format_bytes(each)} for each of {local_processes} processes on this machine" \
        if local_processes > 1 else ""
    largest = [f"--recompute {name}: the largest batch that fits is {fitting[name] * run.procs.world_size}"
               if fitting[name] else f"--recompute {name}: no batch fits" for name in ("keep", "recompute")]
    return (f"a training step of batch {run.options['batch_size']} with --recompute {policy} needs about "
            f"{format_bytes(predicted)} (the memory model's prediction{processes}), more than the "
            f"{format_bytes(available)} of memory available ({'; '.join(largest)}; --memory-budget plans it)")


def describe(run: Run) -> str:
    """The first line of the log: model, data, processes and schedule."""
    options, data = run.options, run.data
    volumes = f" of {'x'.join(map(str, data.size))}" if data.spatial_dims == 3 and data.size else ""
    return (f"training {options['model']}" + (" (3-D)" if data.spatial_dims == 3 else "")
            + (f" (depth {options['depth']}, growth rate {options['growth_rate']})" if options["depth"] else "")
            + (f", dropout {options['drop_rate']:g}" if options["drop_rate"] else "")
            + f", {sum(p.numel() for p in run.model.parameters()):,} parameters, on {data.name}: "
              f"{len(data.train)} train / {len(data.test)} test {data.unit}{volumes}, {data.num_classes} classes; "
              f"augmentation: "
              f"{data.augmentation.describe()}; {run.procs.world_size} process(es) on {run.device.type}; "
              f"{plural(options['epochs'], 'epoch')} of {plural(len(run.train_sampler), 'step')}, "
              f"batch {options['batch_size']}; {engine_settings(run)}; output {run.out}")


def engine_settings(run: Run) -> str:
    """The header's backend, recompute policy, mixed precision and memory format."""
    options = run.options
    recompute = getattr(run.model, "recompute", None)  # (auto's per-block choice comes with the memory plan)
    settings = [f"backend {options['backend'] or 'automatic'}"] + ([f"recompute {recompute}"] if recompute else [])
    settings += [f"amp {options['amp']}"] if options["amp"] != "none" else []
    return ", ".join(settings + (["channels-last"] if options["channels_last"] else []))


def train_epochs(run: Run, position: Position) -> Outcome:
    """Train from ``position`` to the last epoch, evaluating and checkpointing after
    each; a Ctrl-C stops after the current step, with a checkpoint of it."""
    outcome = Outcome()
    with StopRequest() as stop:
        while position.epoch < run.options["epochs"]:
            trained = train_epoch(run, position, stop)
            if trained is None:
                outcome.interrupted = True
                break
            sums, seconds = trained
            outcome.images += int(sums.count) * run.procs.world_size
            outcome.seconds += seconds
            end_epoch(run, position, sums, seconds)
            outcome.epochs += 1
            position = Position(position.epoch + 1)
    return outcome


def train_epoch(run: Run, position: Position, stop: StopRequest) -> Optional[tuple[Sums, float]]:
    """Train the rest of ``position.epoch``: this process's sums over its steps and
    the seconds they took, or ``None`` when a stop was requested (after saving a
    checkpoint at the step reached).  Where a process cannot read a training
    sample, every process raises :class:`DatasetError` before that step, after
    a checkpoint of the steps before it (:func:`unreadable_training_sample`)."""
    options, procs, device = run.options, run.procs, run.device
    epoch = position.epoch
    run.net.train()
    run.train_sampler.set_epoch(epoch, position.step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    first_step = epoch * len(run.train_sampler)
    bar = _progress_bar(len(run.train_sampler), position.step, f"epoch {epoch + 1}/{options['epochs']}",
                        options["progress"] and procs.is_main)
    started = time.perf_counter()
    batches = iter(run.train_loader)
    for step in range(position.step, len(run.train_sampler) + 1):  # (the last round checks for a stop only)
        batch, unreadable = None, None
        stop_here = stop.requested and (epoch, step) != (0, 0)  # (then no batch is read: the stop is honoured now)
        if step < len(run.train_sampler) and not stop_here:
            try:
                batch = next(batches)
            except DatasetError as exc:
                traceback.clear_frames(exc.__traceback__)  # (they hold the loader's iterator, and so its workers)
                unreadable = exc
        stopping, failing = _check_step(stop, unreadable is not None, procs)
        if failing or (stopping and (epoch, step) != (0, 0)):  # (a stop before the run's first step: after it)
            batch = None  # (not held while the checkpoint is written)
            sums = Sums(loss_sum.item(), float(correct.item()), count)
            earlier = None if position.seconds is None else position.seconds + time.perf_counter() - started
            reached = Position(epoch, step, position.partial.plus(procs.sum(sums.as_list())), earlier)
            bar.close()
            if failing:
                raise unreadable_training_sample(run, reached, unreadable)
            save_checkpoint(run, reached)
            return None
        if batch is None:
            break
        images, labels = batch
        del batch  # (so that the loader's images are freed once augmented)
        images = augment(images, run.data.augmentation, step_generator(options["seed"], epoch, step, procs.rank))
        images, labels = to_device(images, device, options["channels_last"]), labels.to(device)
        for group in run.optimizer.param_groups:
            group["lr"] = options["lr"] * run.lr_factor(first_step + step)
        with autocast(device, options["amp"]), offload_saved_tensors(options["offload"]):
            logits = run.net(images)
            loss = F.cross_entropy(logits.float(), labels)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            refuse_diverged(run, f"in epoch {epoch + 1}, by step {step + 1}")  # (an epoch can be long)
    seconds = time.perf_counter() - started
    bar.close()
    return Sums(loss_sum.item(), float(correct.item()), count), seconds


def resume_command(run: Run) -> str:
    """How to continue this run from its checkpoint, in words."""
    again = " without --overwrite" if run.options["overwrite"] else ""
    return f"the same command{again} and --out {run.out} --resume"


def unreadable_training_sample(run: Run, position: Position, exc: Optional[DatasetError]) -> DatasetError:
    """The error to raise where a process could not read a sample of the batch
    of ``position`` (``exc``, in that process), after a checkpoint of the steps
    before it (unless none were trained) that records which samples cannot be
    read: a run resumed once they are repaired accepts their new sizes."""
    procs = run.procs
    own = exc is not None
    samples = sum(procs.gather(run.data.train_sample_names(unreadable_indices(run, position.step)) if own else []),
                  [])
    text = worker_error_text(exc) if own else "another process could not read a training sample (its error names it)"
    if position.epoch == 0 and position.step == 0:  # nothing to save (an --overwrite run leaves the earlier one)
        return DatasetError(text)
    save_checkpoint(run, position, unreadable=samples)
    more = f" (this step's samples that cannot be read: {', '.join(samples)})" if len(samples) > 1 else ""
    return DatasetError(f"{text}{more}; the training before it is saved in {run.out} (epoch {position.epoch + 1}, "
                        f"step {position.step} of {len(run.train_sampler)}): once the sample is repaired, "
                        f"{resume_command(run)} trains on from there")


def unreadable_indices(run: Run, step: int) -> list[int]:
    """The indices of this process's training samples of ``step`` that cannot be
    read (read again here, one by one)."""
    unreadable = []
    for index in run.train_sampler.batch(step):
        try:
            run.data.train[index]
        except DatasetError:
            unreadable.append(index)
    return unreadable


def end_epoch(run: Run, position: Position, sums: Sums, seconds: float) -> None:
    """Evaluate, record the epoch's metrics, checkpoint, write ``metrics.csv`` and log the epoch.
    Where a test sample cannot be read, the epoch's training is checkpointed
    first: ``--resume`` evaluates it again."""
    options, procs = run.options, run.procs
    epoch = position.epoch
    refuse_diverged(run, f"in epoch {epoch + 1}")  # before it is evaluated
    totals = position.partial.plus(procs.sum(sums.as_list()))
    if position.seconds is None:
        images_per_s = sums.count * procs.world_size / seconds
    else:  # with the steps before a resume
        seconds += position.seconds
        images_per_s = totals.count / seconds
    try:
        test = evaluate(run.model, run.test_loader, run.device, options, procs)
    except DatasetError as exc:  # (in every process: evaluate agrees)
        traceback.clear_frames(exc.__traceback__)  # (they hold the test loader's iterator, and so its workers)
        save_checkpoint(run, Position(epoch, len(run.train_sampler), totals,
                                      None if position.seconds is None else seconds))
        raise DatasetError(f"{worker_error_text(exc)}; epoch {epoch + 1}'s training is saved in {run.out}: once the "
                           f"sample is repaired (or removed from a test folder of its own: the held-out split of a "
                           f"single tree is drawn from all of it), {resume_command(run)} evaluates that "
                           f"epoch") from None
    lr = options["lr"] * run.lr_factor(epoch * len(run.train_sampler))
    run.history.append(dict(epoch=epoch + 1, lr=lr, train_loss=totals.loss / totals.count,
                            train_accuracy=totals.correct / totals.count, test_loss=test.loss / test.count,
                            test_accuracy=test.correct / test.count, images_per_s=images_per_s, seconds=seconds))
    save_checkpoint(run, Position(epoch + 1))
    if procs.is_main:
        write_metrics(run.history, run.out)
    row = run.history[-1]
    procs.log(f"epoch {epoch + 1}/{options['epochs']}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2%}  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.2%}  "
              f"{images_per_s:.0f} {run.data.unit}/s  {seconds:.1f}s", flush=True)


def finish(run: Run, outcome: Outcome) -> dict:
    """Plot the curves (a Ctrl-C skips them); log and return the summary of the run."""
    procs, history = run.procs, run.history
    if procs.is_main and history:
        try:
            plot_curves(history, run.out, f"{run.options['model']} on {run.data.name}")
        except KeyboardInterrupt:  # the files that matter are written; --resume plots again
            print(f"\nSIGINT: stopped plotting, no {CURVES}", file=sys.stderr, flush=True)
            outcome.interrupted = True
    summary = dict(interrupted=outcome.interrupted, history=history, out=run.out,
                   images_per_s=outcome.images / outcome.seconds if outcome.seconds else float("nan"),
                   peak_memory=peak_memory(run.device))
    if outcome.interrupted:
        procs.log(f"interrupted: checkpoint saved in {run.out}; continue with {resume_command(run)}")
        return summary
    if not history:
        raise TrainingError(f"{run.out} holds no finished epoch")
    summary["test_accuracy"] = history[-1]["test_accuracy"]
    speed = f"{summary['images_per_s']:.0f} {run.data.unit}/s (training)" if outcome.images else \
        "no training in this run"
    # (a run that ended no epoch reports the checkpoint's accuracy, measured on its test set: --test-limit may differ)
    tested = f"{len(run.data.test)} held-out {run.data.unit}" if outcome.epochs else "as the checkpoint recorded it"
    procs.log(f"done: test accuracy {summary['test_accuracy']:.2%} ({tested}) | "
              f"{speed} | peak memory {summary['peak_memory']} | {plural(len(history), 'epoch')}, results in {run.out}",
              flush=True)
    return summary


def weights_finite(model: nn.Module) -> bool:
    """Whether no weight holds NaN or infinity, with one device synchronisation."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def refuse_diverged(run: Run, when: str) -> None:
    """:class:`DivergedError` where a weight holds NaN or infinity (every process
    holds the same weights, and stops alike); ``when``: "in epoch 2", say.  Where
    none does, one device synchronisation (:func:`weights_finite`)."""
    if weights_finite(run.model):
        return
    diverged = [name for name, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    more = f" (and {len(diverged) - 1} more parameters)" if len(diverged) > 1 else ""
    raise DivergedError(f"training diverged {when}: {diverged[0]}{more} holds NaN or infinity; nothing of it was "
                        f"saved (the files in {run.out}, if any, are from before; a lower --lr may help)")


def save_checkpoint(run: Run, position: Position, unreadable: Sequence[str] = ()) -> None:
    """Checkpoint at ``position`` (collective: every process calls it); never of
    diverged weights. The first of an ``--overwrite`` run then removes the earlier
    run's metrics and curves (its checkpoint is replaced): an ``--overwrite`` run
    that fails before it has anything to save leaves the earlier run intact.
    ``unreadable``: the names of training samples that could not be read
    (:meth:`ImageData.train_sample_names`), recorded by :func:`repair_record`."""
    refuse_diverged(run, f"in epoch {position.epoch + (position.step > 0)}")
    rng_states = run.procs.gather(rng_state())
    if run.procs.is_main:
        save_atomically({
            "format": CHECKPOINT_FORMAT, "options": run.options, "epoch": position.epoch, "step": position.step,
            "partial_sums": position.partial.as_list(), "partial_seconds": position.seconds,
            "history": run.history, "rng": rng_states,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), **repair_record(run, unreadable),
        }, os.path.join(run.out, CHECKPOINT))
        if run.replaces_earlier_run:
            for name in (METRICS, CURVES):
                if os.path.exists(os.path.join(run.out, name)):
                    os.remove(os.path.join(run.out, name))
    run.replaces_earlier_run = False


def repair_record(run: Run, unreadable: Sequence[str]) -> dict:
    """What a checkpoint records of the training samples named ``unreadable``
    (none: nothing): their names and the fingerprints of the data as the run
    loaded it (its files' sizes then: other files may be gone now, a data disk
    unmounted, or changed, which a resume must refuse) without their sizes."""
    if not unreadable:
        return {}
    return {"unreadable": {"samples": list(unreadable),
                           "fingerprints": run.data.fingerprints(unreadable, sizes=run.file_sizes)}}


# -- processes and devices ------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place among the ``world_size`` processes of a torchrun launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sync_group: Optional[dist.ProcessGroup] = None  # the group of the synchronised BN statistics (--sync-bn)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order."""
        if not self.distributed:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects


def start_processes(device_choice: str) -> tuple[Processes, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), torch.device("cuda" if use_cuda else "cpu")
    procs = Processes(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(procs.local_rank)
    # torch.distributed.nn.functional takes the default group as a default argument when it is
    # first imported (DistributedDataParallel imports it, through torch._dynamo): imported
    # before the group exists, it takes None instead of keeping the group alive for good.
    importlib.import_module("torch.distributed.nn")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return procs, torch.device(f"cuda:{procs.local_rank}" if use_cuda else "cpu")


def stop_processes(procs: Processes, wait_for_others: bool = True) -> None:
    """Leave the process groups while the interpreter is fully alive (docs/training.md,
    "Clean shutdown under torchrun").

    In order: collect the garbage (DDP wrappers and models that reference cycles keep
    alive hold the groups); wait until every process is done with its collectives
    (``wait_for_others``, after a run that ended normally; a process that raised must
    not wait for others that may be gone); destroy the synchronised-BN group, then the
    default group. A group that nothing else holds is destroyed at once, and joining
    its gloo threads lets them finish releasing the tensors of their last collectives.
    """
    if not procs.distributed:
        return
    gc.collect()
    if wait_for_others:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=TEARDOWN_TIMEOUT)
        else:
            dist.barrier(device_ids=[procs.local_rank])
    if procs.sync_group is not None:
        dist.destroy_process_group(procs.sync_group)
        procs.sync_group = None
    dist.destroy_process_group()


# -- configuration ----------------------------------------------------------------------------
def resolve_options(args: argparse.Namespace, data: ImageData, procs: Processes) -> dict:
    """The run's settings: the command line with dataset-dependent defaults filled in."""
    if data.spatial_dims == 3:
        defaults = SYNTHETIC_3D_DEFAULTS if data.name == SYNTHETIC_3D else VOLUME_DEFAULTS
    else:
        defaults = DIGITS_DEFAULTS if data.name == "digits" else PAPER_DEFAULTS
    options = dict(vars(args))
    options.pop("func", None)
    options["epochs_given"] = args.epochs is not None  # else --resume keeps the checkpoint's (resume)
    for key, value in defaults.items():
        if options.get(key) is None:
            options[key] = value
    if args.workers is None and data.name in ("imagefolder", "volumefolder"):
        options["workers"] = min(IMAGE_FOLDER_WORKERS, os.cpu_count() or 1)
    if args.model != "densenet_bc" and (args.depth is not None or args.growth_rate is not None):
        raise TrainingError(f"--depth and --growth-rate apply to densenet_bc only; {args.model} has a fixed shape")
    if args.model != "densenet_bc":
        options["depth"] = options["growth_rate"] = None
    if options["batch_size"] % procs.world_size:
        raise TrainingError(f"--batch-size {options['batch_size']} is not divisible by the {procs.world_size} "
                            f"processes")
    options.update(dataset=data.name, num_classes=data.num_classes, in_channels=data.in_channels,
                   spatial_dims=data.spatial_dims, world_size=procs.world_size,
                   sample_size=list(data.size or data.train[0][0].shape[1:]))
    if os.path.exists(options["data"]):  # a directory or file: the same one from another working directory
        options["data"] = os.path.abspath(options["data"])
    options["out_is_new"] = options["out"] is None
    if options["out_is_new"]:  # a new directory per run, named by rank 0
        shape = f"-{options['depth']}-{options['growth_rate']}" if args.model == "densenet_bc" else ""
        options["out"] = procs.gather(new_run_directory(f"{data.name}-{args.model}{shape}"))[0]
    return options


def new_run_directory(stem: str) -> str:
    """``runs/<stem>-<date>-<time>-<process id>`` (runs started in the same second
    differ by their process), with ``-2``, ``-3``... where this process already
    made one in that second; :func:`start_output` creates it."""
    base = os.path.join(DEFAULT_RUNS, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    path, count = base, 1
    while os.path.lexists(path):
        count += 1
        path = f"{base}-{count}"
    return path


def build_model(options: dict) -> nn.Module:
    """A DenseNet of densenet_fast (torchvision's module tree) for images."""
    kwargs = dict(num_classes=options["num_classes"], in_channels=options["in_channels"],
                  drop_rate=options["drop_rate"], backend=options["backend"])
    if options["model"] == "densenet_bc":
        return models.densenet_bc(options["depth"], options["growth_rate"], **kwargs)
    return MODELS[options["model"]](**kwargs)


def set_memory_plan(model: nn.Module, options: dict) -> None:
    """The recompute policy, planned under ``--memory-budget`` when one is given
    (``--recompute auto`` then by default), for the recipe's optimizer: its
    state and update are part of the step."""
    budget = options["memory_budget"]
    if budget is not None:
        try:
            model.set_memory_budget(budget, recipe_optimizer(options), offload=options["offload"])
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"--memory-budget: {exc}") from None
    model.set_recompute(options["recompute"] or (models.AUTO if budget is not None else "keep"))


def build_volume_model(options: dict) -> nn.Module:
    """A 3-D DenseNet of densenet_fast.monai (MONAI's module tree: a MONAI checkpoint
    loads into it): ``densenet_bc`` is MONAI's DenseNet with 3 blocks of
    ``(depth - 4) / 6`` layers, ``2 * growth_rate`` stem channels and MONAI's stem
    (7x7x7 convolution and max pooling, each of stride 2)."""
    kwargs = dict(spatial_dims=3, in_channels=options["in_channels"], out_channels=options["num_classes"],
                  dropout_prob=options["drop_rate"], backend=options["backend"])
    if options["model"] != "densenet_bc":
        return MONAI_MODELS[options["model"]](**kwargs)
    depth, k = options["depth"], options["growth_rate"]
    try:
        n = bc_layers_per_block(depth)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    return monai_models.DenseNet(init_features=2 * k, growth_rate=k, block_config=(n, n, n), **kwargs)


def check_input_size(model: nn.Module, data: ImageData, name: str, batch: int) -> None:
    """The data's images or volumes are not too small for ``model``, nor, in a
    training batch of ``batch`` (the images one BatchNorm normalises together:
    a process's, all processes' with --sync-bn), for its last BatchNorm, which
    needs more than one value per channel (said before any work; ``name``: its
    ``--model``)."""
    size = model.feature_size(*data.size) if data.size is not None and hasattr(model, "feature_size") else None
    if size is not None and min(size) < 1:
        hints = ["choose a smaller model (densenet_bc)"] if name != "densenet_bc" else []
        resize = {"imagefolder": "--image-size"}.get(data.name, "--volume-size" if data.spatial_dims == 3 else None)
        hints += [f"resize them with {resize}"] if resize else []
        raise TrainingError(f"{data.unit} of {'x'.join(map(str, data.size))} are too small for {type(model).__name__}"
                            f" (it needs at least {'x'.join(map(str, model.min_input_size()))})"
                            + (f"; {' or '.join(hints)}" if hints else ""))
    if size is not None and batch * math.prod(size) < 2:
        one = data.unit[:-1]  # "image", "volume"
        raise TrainingError(f"a training batch of {plural(batch, one)} of {'x'.join(map(str, data.size))} "
                            f"(per process) leaves one value per channel at {type(model).__name__}'s last BatchNorm "
                            f"({'x'.join(map(str, size))} per {one}), which training cannot normalise; raise "
                            f"--batch-size or the size of the {data.unit}")


def learning_rate_factor(schedule: str, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the initial learning rate for optimiser step ``step`` (from 0).

    A function of the step alone, so a resumed run (or one given more
    ``--epochs``) follows the schedule without any scheduler state."""
    total = epochs * steps_per_epoch

    def step_factor(step: int) -> float:
        epoch = step // steps_per_epoch
        return 0.1 ** ((epoch >= 0.5 * epochs) + (epoch >= 0.75 * epochs))

    def cosine_factor(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return step_factor if schedule == "step" else cosine_factor


def refuse_output_inside_data(args: argparse.Namespace) -> None:
    """Refuse an output directory (the default's ``runs/`` included) inside a
    dataset directory: an image tree would read the run's ``curves.png`` as a
    sample of a class named after the run's folder."""
    out = os.path.realpath(args.out or DEFAULT_RUNS)
    data = os.path.realpath(args.data)
    if os.path.isdir(data) and os.path.commonpath([out, data]) == data:
        given = f"--out {args.out}" if args.out else f"the default --out (under {DEFAULT_RUNS}/)"
        raise TrainingError(f"{given} lies inside --data {args.data}: the run's files would become part of the "
                            f"dataset; choose an --out outside it")


def check_output_directory(options: dict, procs: Processes) -> None:
    """The output directory can be written (:func:`start_output` creates it), and
    holds an earlier run's files only with ``--resume`` or ``--overwrite``: as
    rank 0 finds it (it alone writes there), refused by every process alike (one
    that saw another file system would go on into the next collective)."""
    if not options["out"]:
        raise TrainingError("--out is empty: give the run's directory, or leave --out out for a new one")
    problem = procs.gather(output_problem(options) if procs.is_main else None)[0]
    if problem:
        raise TrainingError(problem)


def output_problem(options: dict) -> Optional[str]:
    """Why the run cannot write its files in its ``--out``, or ``None``."""
    out = options["out"]
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file, not a directory"
    found = [f for f in (CHECKPOINT, METRICS, CURVES) if os.path.lexists(os.path.join(out, f))]
    for name in found:
        if not os.path.isfile(os.path.join(out, name)):
            return f"{os.path.join(out, name)} is not a file: the run cannot write its {name} there"
    if options["resume"]:
        if CHECKPOINT not in found:
            return f"--resume: there is no {CHECKPOINT} in {out} to resume from"
    elif found and not options["overwrite"]:
        return (f"{out} already holds an earlier run ({', '.join(found)}); pass --resume to continue it or "
                f"--overwrite to start afresh and replace those files (or choose another --out)")
    problem = write_problem(out)
    return None if problem is None else f"--out {out}: cannot write there ({problem})"


def start_output(options: dict) -> list[str]:
    """Create the output directory when the run starts (so that a refused run
    leaves nothing behind); the folders created, the innermost first."""
    out = options["out"]
    created = missing_folders(out)
    try:
        if options["out_is_new"]:  # its own: another run that took the name meanwhile is not joined
            os.makedirs(os.path.dirname(out), exist_ok=True)
            os.mkdir(out)
        else:
            os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out} ({exc.strerror or exc})") from exc
    return created


def missing_folders(directory: str) -> list[str]:
    """``directory`` and the folders above it that do not exist, the innermost first."""
    missing, folder = [], os.path.abspath(directory)
    while not os.path.lexists(folder):  # a dangling link exists, and is not a directory
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def write_problem(directory: str) -> Optional[str]:
    """Why no file can be written in ``directory``, or ``None``. An actual write:
    permission bits do not tell (root, read-only file systems); the folders it
    creates to write there (``directory`` and those above it that do not exist)
    are removed again, as :func:`start_output` creates them when training starts."""
    missing = missing_folders(directory)
    existing = os.path.dirname(missing[-1]) if missing else os.path.abspath(directory)
    if os.path.islink(existing) and not os.path.exists(existing):
        return f"{existing} is a link to {os.readlink(existing)}, which does not exist"
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    created = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            created.append(folder)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for folder in reversed(created):
            os.rmdir(folder)
    return None


# -- the training step and evaluation -------------------------------------------------------
def step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The augmentation generator of one step: a function of its position alone (taken
    modulo 2**64, the seeds ``manual_seed`` accepts)."""
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1024 + rank) % 2**64)


OFFLOAD_NOTE = ("--offload: the tensors saved for backward go to pinned host memory during the forward and "
                "come back a node (a dense block) at a time during the backward, parameters as copies "
                "(torch.autograd.graph.save_on_cpu); the peak drops by what the stem and the later blocks keep "
                "while the first block's backward runs, and rises by a block's parameter copies (docs/memory.md, "
                "\"Offload\"); the copies cost time (1.28x the step for DenseNet-BC-100, batch 64, on an H200: "
                "docs/gpu.md), which shows in images/s against a run without --offload; --memory-budget plans with "
                "the offload")


def recipe_optimizer(options: dict) -> OptimizerSpec:
    """The trainer's optimizer, as the memory model describes it."""
    return OptimizerSpec("sgd", options["momentum"], options["weight_decay"], options["nesterov"])


def offload_note(run: Run) -> str:
    """:data:`OFFLOAD_NOTE` and, where the memory model describes the model, its
    predicted peak of this run's step with and without the offload."""
    model = run.model
    if not hasattr(model, "memory_model_blocker") or model.memory_model_blocker() is not None:
        return OFFLOAD_NOTE
    options = run.options
    policies = tuple(block.recompute for block in model.blocks())
    peaks = [predict(Architecture.of(model),
                     Setup(options["batch_size"] // run.procs.world_size, tuple(run.data.train[0][0].shape[1:]),
                           model.features.conv0.weight.dtype, AMP_DTYPES[options["amp"]], str(run.device),
                           model.backend, recipe_optimizer(options), offload=offload), policies).total_bytes
             for offload in (True, False)]
    return (f"{OFFLOAD_NOTE}. Predicted peak of a step with recompute={policies}: {format_bytes(peaks[0])} "
            f"offloaded, {format_bytes(peaks[1])} without")


def offload_saved_tensors(enabled: bool):
    """The forward's context for ``--offload``: saved tensors to pinned host memory."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if enabled else nullcontext()


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=models.CHANNELS_LAST[images.dim()]) if channels_last else images


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, options: dict, procs: Processes) -> Sums:
    """The test set's loss and accuracy sums over every process.  Where a process
    cannot read a test sample, every process raises :class:`DatasetError` once
    all have ended their share (so that they can checkpoint together)."""
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count, unreadable = 0, None
    try:
        for images, labels in loader:
            images, labels = to_device(images, device, options["channels_last"]), labels.to(device)
            with autocast(device, options["amp"]):
                logits = model(images)
            loss += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
            count += len(labels)
    except DatasetError as exc:
        unreadable = exc
    *sums, failed = procs.sum([loss.item(), float(correct.item()), float(count), float(unreadable is not None)])
    if failed:
        raise unreadable or DatasetError("another process could not read a test sample (its error names it)")
    return Sums(*sums)


def _progress_bar(total: int, initial: int, description: str, enabled: bool):
    from tqdm import tqdm
    # disable=None: shown on a terminal only, so logs stay free of carriage returns
    return tqdm(total=total, initial=initial, desc=description, disable=None if enabled else True, leave=False,
                dynamic_ncols=True, unit="step")


# -- checkpoints ------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every random generator the training step may draw from (torch, CUDA, numpy, python)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@contextmanager
def replacing(path: str) -> Iterator[str]:
    """A temporary file name next to ``path`` to write to, renamed over ``path`` when
    the block succeeds and removed when it fails: a crash or a Ctrl-C mid-write
    leaves the previous file intact and no partial file behind."""
    root, extension = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{extension}"
    earlier = os.path.exists(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # a full disk
        with suppress(OSError):
            os.remove(tmp)  # (before the free space is measured)
        free = format_bytes(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)
        kept = "; the file there before is intact" if earlier else ""
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}; {free} free there){kept}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomically(obj, path: str) -> None:
    """``torch.save`` to ``path``, all or nothing (see :func:`replacing`);
    :class:`OutputError` where it cannot be written (a full disk)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # torch.save's zip writer's, on a full disk
            raise OSError(f"torch.save: {str(exc).strip().splitlines()[0]}") from exc
        f.flush()
        os.fsync(f.fileno())


def damaged_record(path: str) -> Optional[str]:
    """The first record of the zip archive that ``torch.save`` wrote at ``path``
    whose bytes do not match its CRC (``torch.load`` does not check them), or
    ``None`` (also where it is no zip archive: ``torch.load`` then says why)."""
    record = None
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC:  # 0: saved without checksums (torch's save.compute_crc32 = False)
                    with archive.open(record) as f:
                        while f.read(1 << 24):
                            pass
    except zipfile.BadZipFile:  # before the first record: no zip archive
        return None if record is None else record.filename
    return None


def compared_fingerprints(checkpoint: dict, options: dict, data: ImageData) -> tuple[dict, dict]:
    """The data's fingerprints (``data_fingerprint``, ``train_fingerprint``) of
    ``checkpoint`` and of this run, as a resumed run compares them: where the
    checkpoint records training samples that could not be read, both without
    those samples' sizes (a repaired file may have another size).  Absent from
    the first where an older checkpoint lacks them."""
    saved = {key: checkpoint["options"][key] for key in FINGERPRINTS if key in checkpoint["options"]}
    now = {key: options[key] for key in FINGERPRINTS}
    repair = checkpoint.get("unreadable")
    if repair is not None:
        saved = dict(zip(FINGERPRINTS, repair["fingerprints"]))
        now = dict(zip(FINGERPRINTS, data.fingerprints(unsized=repair["samples"])))
    return saved, now


def load_checkpoint(path: str, options: dict, model: nn.Module, data: ImageData) -> dict:
    """The checkpoint at ``path``, after checking that it belongs to this run's
    model, recipe and ``data`` (every difference named) and that all shapes
    match; with the fingerprints compared under ``"compared_fingerprints"``."""
    try:
        damaged = damaged_record(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # (what torch.load's reader says of a file cut short)
            raise TrainingError(f"cannot read checkpoint {path} ({exc.strerror or exc})") from exc
        raise TrainingError(f"cannot read checkpoint {path} (damaged, or not a file torch.save wrote: "
                            f"{exc.strerror or exc})") from exc
    except Exception as exc:  # torch.load's messages run over many lines
        raise TrainingError(f"cannot read checkpoint {path} (damaged, or not a file torch.save wrote: "
                            f"{type(exc).__name__})") from exc
    if damaged is not None:
        raise TrainingError(f"cannot read checkpoint {path} (damaged: its record {damaged} does not match its "
                            f"checksum)")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a densenet_fast training checkpoint ({CHECKPOINT_FORMAT})")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise TrainingError(f"checkpoint {path} lacks {', '.join(missing)}")
    checkpoint["compared_fingerprints"] = saved_fingerprints, fingerprints = \
        compared_fingerprints(checkpoint, options, data)
    saved = {**OLDER_CHECKPOINTS_HAD, **checkpoint["options"], **saved_fingerprints}
    options = {**options, **fingerprints}
    differences = [f"{key} is {saved.get(key)!r} in the checkpoint but {options[key]!r} now"
                   for key in RESUME_MUST_MATCH if saved.get(key) != options[key]
                   and (key not in RECORDED_SINCE or key in saved)
                   and not (key == "data" and "data_fingerprint" in saved)
                   and not (key == "data_fingerprint"
                            and saved.get("train_fingerprint") == options["train_fingerprint"])]
    if options["train_limit"] is not None and "train_fingerprint" not in saved:  # (both new on 2026-12-04)
        differences.append(f"--train-limit took the first {options['train_limit']} training samples when the "
                           f"checkpoint was written and draws each class's share now, so other samples would train")
    if "unreadable" in checkpoint and any(difference.startswith("data_fingerprint ") for difference in differences):
        differences.append(f"the checkpoint was written where {', '.join(checkpoint['unreadable']['samples'])} "
                           f"could not be read: repaired, at any size, it resumes, but not removed")
    if differences:
        raise TrainingError(f"checkpoint {path} does not match this run: " + "; ".join(differences))
    own, theirs = model.state_dict(), checkpoint["model"]
    problems = [f"missing {k}" for k in own if k not in theirs]
    problems += [f"unexpected {k}" for k in theirs if k not in own]
    problems += [f"{k} has shape {tuple(theirs[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
                 for k, v in own.items() if k in theirs and theirs[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise TrainingError(f"checkpoint {path} does not fit the model: {shown}")
    return checkpoint


# -- metrics ----------------------------------------------------------------------------------
def write_metrics(history: list[dict], out: str) -> None:
    with replacing(os.path.join(out, METRICS)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict], out: str, title: str) -> None:
    """``curves.png``: train and test loss (left) and accuracy (right) per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for split, style in (("train", "-o"), ("test", "-s")):
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], style, markersize=3, label=split)
        acc_ax.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], style, markersize=3, label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    try:
        with replacing(os.path.join(out, CURVES)) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, max allocated)"
    # the whole process (torch, the data, the loaders' buffers): not what --memory-budget covers, the training
    # step's parameters, gradients, optimizer state and peak
    return (f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (CPU, max resident: the whole "
            f"process)")


# -- Ctrl-C -----------------------------------------------------------------------------------
class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current
    step (and save); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        self.pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a DataLoader worker forked from this process, which stops it
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


def _check_step(stop: StopRequest, unreadable: bool, procs: Processes) -> tuple[bool, bool]:
    """Before a step: whether any process was asked to stop, and whether any
    could not read its batch (``unreadable`` here); all processes agree (one
    collective), so they stop together."""
    if not procs.distributed:
        return stop.requested, unreadable
    stopping, failing = procs.sum([float(stop.requested), float(unreadable)])
    return stopping > 0, failing > 0
