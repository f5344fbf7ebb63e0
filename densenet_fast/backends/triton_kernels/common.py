"""Helpers shared by the Triton ops: dtype rules, tensor addressing, launching,
registering the ops.

Every op sees its activations as *pixels*: a channels-last tensor with ``n``
images of ``h x w`` pixels, channel stride 1.  A row view ``(M, C)`` is the
special case ``n = M``, ``h = w = 1`` (``spatial=False``), so one kernel serves
both the dense layers (row views of a block buffer) and the transitions
(4-D channels-last views).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..gpu_partials import backward_splits

DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMESPACE = "densenet_fast_triton"  # of the torch ops, torch.ops.densenet_fast_triton (docs/triton.md)
AUTOTUNE_ENV_VAR = "DENSENET_FAST_AUTOTUNE"
CONFIG_LOG_ENV_VAR = "DENSENET_FAST_CONFIG_LOG"  # a file: each launcher appends its choices (JSON lines)


def custom_op(name: str, mutates_args: Sequence[str] = ()):
    """A decorator: the function as the torch op ``densenet_fast_triton::<name>``
    (``torch.library.custom_op``), which writes only the arguments named in
    ``mutates_args`` and is given its arguments with their strides as they are
    (``needs_exact_strides``: the kernels write into strided views), as the
    C++ ops are.  Register its fake implementation with ``.register_fake``."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args),
                                   tags=(torch.Tag.needs_exact_strides,))


def check_data(*tensors: Tensor) -> None:
    """Raise unless all ``tensors`` share one supported dtype and have channel stride 1."""
    dtype = tensors[0].dtype
    if dtype not in DATA_DTYPES:
        raise TypeError(f"the triton backend supports {DATA_DTYPES}, not {dtype}; use backend='torch' for it")
    if dtype == torch.bfloat16 and tensors[0].device.type == "cpu":
        raise TypeError("the Triton interpreter (CPU tensors) gives wrong bfloat16 results (relative errors "
                        "near 1); use float32 or float16 there, or a GPU")
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"the triton backend needs one dtype for data, weights and gradients; got {dtype} "
                            f"and {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"the triton backend needs channel stride 1, got strides {t.stride()}")


# Pixel (cell, row) indices are int32 in the kernels, and a tile's indices run up
# to a block past the last pixel, and the statistics merge's up to
# MERGE_BLOCK * STATS_GROUP tiles past it: keep 2**20 indices of room.
MAX_PIXELS = 2**31 - 2**20


def check_pixels(count: int) -> None:
    """Raise unless ``count`` pixels (rows, cells) fit the kernels' int32 indices."""
    if count > MAX_PIXELS:
        raise ValueError(f"the triton kernels index pixels with int32 and take at most {MAX_PIXELS} "
                         f"(2**31 - 2**20) per call, not {count}; split the batch or use backend='torch'")


def nan_stats(channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` of no rows: NaN, as the torch backend's (a mean over an empty dimension)."""
    return (torch.full((channels,), math.nan, device=device, dtype=torch.float32),
            torch.full((channels,), math.nan, device=device, dtype=torch.float32))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` data: fp32 follows torch's
    TF32 switch for convolutions; fp16/bf16 use the native dot either way."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


class Pixels(NamedTuple):
    """A channels-last tensor as ``n`` images of ``h x w`` pixels; strides in elements."""
    tensor: Tensor
    n: int
    h: int
    w: int
    sn: int
    sh: int
    sw: int
    spatial: bool

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.sn, self.sh, self.sw


def rows(t: Tensor) -> Pixels:
    """A row view ``(M, C)``: ``M`` one-pixel images."""
    return Pixels(t, t.shape[0], 1, 1, t.stride(0), 0, 0, False)


def image(t: Tensor) -> Pixels:
    """A channels-last view ``(N, H, W, C)``."""
    return Pixels(t, *t.shape[:3], *t.stride()[:3], True)


# Host-side arithmetic: Triton 3.8's triton.cdiv and triton.next_power_of_2 are constexpr functions that
# cost microseconds per host call (most of a primitive call's Python time there: docs/performance.md)
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (0 for 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def num_splits(cells: int, channels: int, k: int, k_blocks: int, element_size: int, device: torch.device) -> int:
    """:func:`~densenet_fast.backends.gpu_partials.backward_splits` for
    ``device``'s multiprocessors (for the interpreter: small, but > 1 so that
    the tests cover the merge)."""
    if device.type != "cuda":
        return max(1, min(3, cdiv(cells, 32)))
    return backward_splits(cells, channels, k, k_blocks, element_size, gpu_limits(device).multiprocessors)


def vector_alignment(element_size: int, *counts: int) -> int:
    """The kernels' ``ALIGN``: the largest power of two, at most a 16-byte
    vector (``16 // element_size`` elements), that divides every channel count
    and element stride in ``counts``."""
    align = 16 // element_size
    while any(count % align for count in counts):
        align //= 2
    return align


def block_size(n: int, cap: int) -> int:
    """A power-of-two block covering ``n`` (at least 16, the smallest ``tl.dot`` size), at most ``cap``."""
    return min(cap, max(16, next_power_of_2(n)))


class GpuLimits(NamedTuple):
    shared_memory: int  # bytes of shared memory one program may use (the opt-in maximum)
    multiprocessors: int


# What the interpreter (CPU tensors) stands for: an H200's shared memory and a
# single multiprocessor, so that it runs the configurations an H200 runs on
# large shapes (the first fitting candidate of each kernel).
INTERPRETER_LIMITS = GpuLimits(shared_memory=232448, multiprocessors=1)


@functools.cache
def _cuda_limits(index: int) -> GpuLimits:
    properties = torch.cuda.get_device_properties(index)
    return GpuLimits(properties.shared_memory_per_block_optin, properties.multi_processor_count)


def gpu_limits(device: torch.device) -> GpuLimits:
    return _cuda_limits(device.index) if device.type == "cuda" else INTERPRETER_LIMITS


def on_device(t: Tensor):
    """Make ``t``'s GPU the current device: Triton launches on the current
    device's current stream, whatever device the pointers are on."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_arrival_counters: dict[tuple, Tensor] = {}


def _counter_key(device: torch.device) -> tuple:
    queue = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else threading.get_ident()
    return str(device), queue


def arrival_counters(device: torch.device, count: int) -> Tensor:
    """At least ``count`` int32 counters, all 0, for :func:`arrive_last`: one set
    per CUDA stream (per thread for the interpreter), since launches on one
    stream run one after another and each leaves its counters at 0 again.

    While the current stream is capturing a CUDA graph, a fresh zeroed set for
    this launch instead: its zeroing is captured with the launch and its memory
    belongs to the graph's pool, so a replay never shares counters with another
    graph or with eager launches, and no cached set the graph points to is ever
    replaced and freed."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = _counter_key(device)
    counters = _arrival_counters.get(key)
    if counters is None or counters.numel() < count:
        counters = _arrival_counters[key] = torch.zeros(max(count, 256), dtype=torch.int32, device=device)
    return counters


def drop_arrival_counters(device: torch.device) -> None:
    """Forget the current stream's (thread's) counters, so that the next launch
    gets a zeroed set: after a launch raised, some of its programs may have
    arrived without the last one resetting the counter."""
    _arrival_counters.pop(_counter_key(device), None)


def autotuning() -> bool:
    """Autotune (opt-in: ``DENSENET_FAST_AUTOTUNE=1``), unless deterministic algorithms are on."""
    return os.environ.get(AUTOTUNE_ENV_VAR) == "1" and not torch.are_deterministic_algorithms_enabled()


SharedMemory = Callable[[dict, int, int], int]  # (meta-parameters, num_stages, element size) -> bytes


class Launcher:
    """Launches a kernel on its tensors' device with a configuration chosen
    without timing anything: the first of its candidates (:meth:`candidates_for`)
    whose shared memory (``shared_memory``, an upper bound; ``None``:
    negligible) fits the device and whose grid has a program for every
    multiprocessor, else the fitting one with the most programs.  The choice depends only on the shapes, the dtype and
    the device, so results are reproducible.  With ``DENSENET_FAST_AUTOTUNE=1``
    it autotunes over the fitting candidates instead (``triton.autotune`` with
    ``key`` and ``autotune_kwargs``).  The first argument of every kernel is
    its data tensor (dtype, device).  With ``DENSENET_FAST_CONFIG_LOG=<file>``
    each choice is appended to that file once per kernel, dtype, constexpr
    values and grid (one JSON object per line)."""

    def __init__(self, fn, candidates: list[triton.Config], shared_memory: Optional[SharedMemory] = None,
                 key: Sequence[str] = (), exact_fp32: Optional[list[triton.Config]] = None, **autotune_kwargs):
        self.fn = fn
        self.candidates = candidates
        self.exact_fp32 = exact_fp32 or candidates
        self.shared_memory = shared_memory
        self.tuned = triton.autotune(
            candidates, key=list(key), **autotune_kwargs,
            prune_configs_by={"early_config_prune": lambda _, args, **meta: self.fitting(next(iter(args.values())),
                                                                                         meta)})(fn)
        self._fitting: dict[tuple, list[triton.Config]] = {}
        self._logged: set[tuple] = set()

    def candidates_for(self, dtype: torch.dtype, meta: dict) -> list[triton.Config]:
        """``exact_fp32`` where the kernel's dots are exact fp32 (fp32 data,
        ``DOT_PRECISION="ieee"``, and a GEMM where ``HAS_GEMM`` is given):
        Triton builds those from FMAs that hold their operands in registers,
        where the tiles made for tensor cores spill (docs/triton.md); else
        ``candidates``."""
        exact = dtype == torch.float32 and meta.get("DOT_PRECISION") == "ieee" and meta.get("HAS_GEMM", True)
        return self.exact_fp32 if exact else self.candidates

    def fitting(self, data: Tensor, meta: dict) -> list[triton.Config]:
        """The candidates whose shared memory fits ``data``'s device (or, if none, the smallest)."""
        limit = gpu_limits(data.device).shared_memory
        key = (data.dtype, limit, *meta.items())
        if key not in self._fitting:
            candidates = self.candidates_for(data.dtype, meta)
            need = [self.shared_memory({**meta, **config.kwargs}, config.num_stages, data.element_size())
                    if self.shared_memory else 0 for config in candidates]
            self._fitting[key] = ([config for config, bytes in zip(candidates, need) if bytes <= limit]
                                  or [candidates[need.index(min(need))]])
        return self._fitting[key]

    def usable(self, grid: Callable[[dict], tuple[int, ...]], data: Tensor, meta: dict) -> list[triton.Config]:
        """The configurations a launch may run: the one chosen, or all that autotuning may pick."""
        fitting = self.fitting(data, meta)
        if autotuning():
            return fitting
        multiprocessors = gpu_limits(data.device).multiprocessors
        most_programs, chosen = 0, fitting[0]
        for config in fitting:
            programs = math.prod(grid({**meta, **config.kwargs}))
            if programs >= multiprocessors:
                return [config]
            if programs > most_programs:
                most_programs, chosen = programs, config
        return [chosen]

    def log_choice(self, path: str, grid: Callable[[dict], tuple[int, ...]], data: Tensor, meta: dict,
                   configs: list[triton.Config]) -> None:
        programs = grid({**meta, **configs[0].kwargs})
        key = (str(data.dtype), data.device.type, *meta.items(), programs, len(configs))
        if key in self._logged:
            return
        self._logged.add(key)
        record = {"kernel": self.fn.__name__, "dtype": str(data.dtype), "device": str(data.device),
                  "data_shape": list(data.shape), "meta": meta, "grid": list(programs),
                  "configs": [{**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                              for config in configs],
                  "fitting": len(self.fitting(data, meta)), "autotuning": len(configs) > 1, "pid": os.getpid()}
        with open(path, "a") as log:
            log.write(json.dumps(record) + "\n")

    def __getitem__(self, grid: Callable[[dict], tuple[int, ...]]):
        def launch(*args, **meta):
            data = args[0]
            configs = self.usable(grid, data, meta)
            log_path = os.environ.get(CONFIG_LOG_ENV_VAR)
            if log_path:
                self.log_choice(log_path, grid, data, meta, configs)
            with on_device(data):
                try:
                    if len(configs) > 1:
                        self.tuned[grid](*args, **meta)
                    else:
                        self.fn[grid](*args, **meta, **configs[0].all_kwargs())
                except BaseException:
                    # programs that ran before the error (the interpreter runs them in turn) may have left
                    # arrival counts behind; without this every later launch here would pick a wrong last program
                    drop_arrival_counters(data.device)
                    raise
        return launch


@triton.jit
def arrive_last(counter_ptr,  # () int32
                arrivals):  # scalar: how many programs arrive
    """Whether this program is the last of ``arrivals`` programs to arrive at
    ``counter_ptr`` (an int32 that is 0 before the first arrives; the last sets
    it back to 0).  The arrival is an acquire-release atomic after a barrier, so
    the last program sees every write the others made before arriving (read
    them with ``cache_modifier=".cg"``: L1 is not coherent).  Only completion is
    counted this way; values are still reduced in a fixed order."""
    tl.debug_barrier()  # all of this program's threads have written before the arrival publishes it
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
    return last


@triton.jit
def relu(a):  # any shape
    """``max(a, 0)`` keeping NaN, as ``torch.relu`` does (PTX ``max`` turns NaN into 0)."""
    return tl.where(a < 0, 0.0, a)


@triton.jit
def relu_grad(a, grad):  # both of one shape
    """The gradient through ``relu(a)``: ``grad`` except where ``a <= 0``, so NaN
    lets it through, as torch's ``threshold_backward(grad, relu(a), 0)``."""
    return tl.where(a <= 0, 0.0, grad)


@triton.jit
def aligned(value, ALIGN: tl.constexpr):
    """``value``, a multiple of ALIGN (:func:`vector_alignment`), written so
    that the compiler knows it, and so loads and stores up to ALIGN channels
    per instruction.  (Triton marks only arguments divisible by 16 and ignores
    ``tl.multiple_of`` on scalar arguments.)"""
    return value // ALIGN * ALIGN


@triton.jit
def cell_pixel(cells,  # (BM,) int32 cell indices
               num_cells, cells_h, cells_w, lim_h, lim_w,  # scalars
               SPATIAL: tl.constexpr, STEP: tl.constexpr, DI: tl.constexpr, DJ: tl.constexpr):
    """Pixel ``(n, STEP*i + DI, STEP*j + DJ)`` of each cell ``(n, i, j)`` of a
    ``cells_h x cells_w`` grid, and whether it exists (cell < num_cells, pixel
    inside ``lim_h x lim_w``).  Without SPATIAL a cell is a row: ``(cell, 0, 0)``."""
    if SPATIAL:
        per_image = cells_h * cells_w
        n = cells // per_image
        i = (cells % per_image) // cells_w
        j = cells % cells_w
        h = STEP * i + DI
        w = STEP * j + DJ
        valid = (cells < num_cells) & (h < lim_h) & (w < lim_w)
    else:
        n = cells
        h = cells * 0
        w = cells * 0
        valid = cells < num_cells
    return n, h, w, valid


@triton.jit
def pixel_offsets(n, h, w,  # (BM,) int32 each: image, row, column
                  sn, sh, sw,  # scalar strides in elements
                  SPATIAL: tl.constexpr, ALIGN: tl.constexpr):
    """Element offsets (int64, multiples of ALIGN) of pixels ``(n, h, w)``."""
    offsets = n.to(tl.int64) * aligned(sn, ALIGN)
    if SPATIAL:
        offsets += h.to(tl.int64) * aligned(sh, ALIGN) + w.to(tl.int64) * aligned(sw, ALIGN)
    return offsets
