"""Helpers shared by the Triton ops: dtype rules, tensor addressing, launching.

Every op sees its activations as *pixels*: a channels-last tensor with ``n``
images of ``h x w`` pixels, channel stride 1.  A row view ``(M, C)`` is the
special case ``n = M``, ``h = w = 1`` (``spatial=False``), so one kernel serves
both the dense layers (row views of a block buffer) and the transitions
(4-D channels-last views).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_data(*tensors: Tensor) -> None:
    """Raise unless all ``tensors`` share one supported dtype and have channel stride 1."""
    dtype = tensors[0].dtype
    if dtype not in DATA_DTYPES:
        raise TypeError(f"the triton backend supports {DATA_DTYPES}, not {dtype}; use backend='torch' for it")
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"the triton backend needs one dtype for data, weights and gradients; got {dtype} "
                            f"and {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"the triton backend needs channel stride 1, got strides {t.stride()}")


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


def rows(t: Tensor) -> Pixels:
    """A row view ``(M, C)``: ``M`` one-pixel images."""
    return Pixels(t, t.shape[0], 1, 1, t.stride(0), 0, 0, False)


def image(t: Tensor) -> Pixels:
    """A channels-last view ``(N, H, W, C)``."""
    return Pixels(t, *t.shape[:3], *t.stride()[:3], True)


def num_splits(cells: int, channels: int, device: torch.device) -> int:
    """How many row ranges the reducing backward pass splits ``cells`` rows into:
    enough programs to fill the GPU, few enough that the fp32 partial sums stay
    a small fraction of the bytes moved."""
    if device.type != "cuda":
        return max(1, min(3, triton.cdiv(cells, 32)))  # small, but > 1 so the tests cover the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(64, triton.cdiv(2 * sms, triton.cdiv(channels, 64)), triton.cdiv(cells, 64)))


def block_size(n: int, cap: int) -> int:
    """A power-of-two block covering ``n`` (at least 16, the smallest ``tl.dot`` size), at most ``cap``."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotuning candidates; a single one under the (slow) interpreter."""
    return [interpreter] if INTERPRET else gpu


class Launcher:
    """An autotuned kernel that runs with its first config when
    ``torch.are_deterministic_algorithms_enabled()``: the reduction order then
    never depends on timing, so results are bit-identical run to run."""

    def __init__(self, fn, candidates: list[triton.Config], key: list[str], **autotune_kwargs):
        self.fn = fn
        self.default = candidates[0]
        self.tuned = triton.autotune(candidates, key=key, **autotune_kwargs)(fn)

    def __getitem__(self, grid):
        if not torch.are_deterministic_algorithms_enabled():
            return self.tuned[grid]
        cfg = self.default

        def run(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return run


@triton.jit
def cell_pixel(cells, num_cells, cells_h, cells_w, lim_h, lim_w,
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
def pixel_offsets(n, h, w, sn, sh, sw, SPATIAL: tl.constexpr):
    """Element offsets (int64) of pixels ``(n, h, w)``."""
    offsets = n.to(tl.int64) * sn
    if SPATIAL:
        offsets += h.to(tl.int64) * sh + w.to(tl.int64) * sw
    return offsets
