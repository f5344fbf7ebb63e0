"""Stable per-channel statistics.

Each tile of rows yields a ``(count, mean, M2)`` triple per channel, computed in
two passes over the tile held in registers (exact, no cancellation); the
triples are then merged with Chan's parallel formula in a fixed order
(:func:`merge_stats`).  The fused forward (:mod:`.bn_relu_conv`) produces the
same triples for its output in its epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import INTERPRET, block_size, check_data

STATS_BLOCK_M = 32 if INTERPRET else 128  # rows per partial triple


@triton.jit
def store_tile_stats(y, valid_rows, channels, channel_mask, tile, store_count, count_ptr, mean_ptr, m2_ptr, C):
    """Write the ``(count, mean, M2)`` of tile ``y (BM, BC)`` (fp32; rows
    ``valid_rows`` count) at partial row ``tile``."""
    valid = valid_rows[:, None]
    count = tl.sum(valid_rows.to(tl.float32), 0)
    mean = tl.sum(tl.where(valid, y, 0.0), 0) / count
    centred = tl.where(valid, y - mean[None, :], 0.0)
    m2 = tl.sum(centred * centred, 0)
    base = tile.to(tl.int64) * C + channels
    tl.store(mean_ptr + base, mean, mask=channel_mask)
    tl.store(m2_ptr + base, m2, mask=channel_mask)
    if store_count:
        tl.store(count_ptr + tile, count)


@triton.jit
def _tile_stats_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, M, C, sx,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < M
    channel_mask = channels < C
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sx + channels[None, :],
                mask=row_mask[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
    store_tile_stats(x, row_mask, channels, channel_mask, tile, pid_c == 0, count_ptr, mean_ptr, m2_ptr, C)


@triton.jit
def _merge_stats_kernel(count_ptr, mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, T, C,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    total = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        tile_mask = tiles < T
        mask = tile_mask[:, None] & channel_mask[None, :]
        offsets = tiles.to(tl.int64)[:, None] * C + channels[None, :]
        counts = tl.load(count_ptr + tiles, mask=tile_mask, other=0.0)[:, None]  # 0 for unused partial rows
        tile_means = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        # this group of tiles: exact parallel formula around its own mean
        group_count = tl.sum(counts, 0)
        group_mean = tl.sum(counts * tile_means, 0) / tl.maximum(group_count, 1.0)
        spread = tile_means - group_mean[None, :]
        group_m2 = tl.sum(tl.load(m2_ptr + offsets, mask=mask, other=0.0) + counts * spread * spread, 0)
        # merge into the running triple (Chan et al.)
        new_total = total + group_count
        weight = group_count / tl.maximum(new_total, 1.0)
        delta = group_mean - mean
        mean += delta * weight
        m2 += group_m2 + delta * delta * total * weight
        total = new_total
    tl.store(out_mean_ptr + channels, mean, mask=channel_mask)
    tl.store(out_var_ptr + channels, m2 / total, mask=channel_mask)


def stats_buffers(tiles: int, channels: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Partial ``(count, mean, M2)`` buffers for ``tiles`` row tiles; counts start at
    zero so that rows no tile wrote are ignored by :func:`merge_stats`."""
    return (torch.zeros(tiles, device=device, dtype=torch.float32),
            torch.empty(tiles, channels, device=device, dtype=torch.float32),
            torch.empty(tiles, channels, device=device, dtype=torch.float32))


def merge_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial triples ``(T,), (T, C), (T, C)`` into ``(mean, biased var)``, each ``(C,)``."""
    tiles, channels = mean.shape
    out_mean = torch.empty(channels, device=mean.device, dtype=torch.float32)
    out_var = torch.empty_like(out_mean)
    block_c = block_size(channels, 64)
    _merge_stats_kernel[(triton.cdiv(channels, block_c),)](
        count, mean, m2, out_mean, out_var, tiles, channels, BLOCK_T=64, BLOCK_C=block_c)
    return out_mean, out_var


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` (fp32) of a row view ``x (M, C)``."""
    check_data(x)
    m, c = x.shape
    block_c = block_size(c, 64)
    tiles = triton.cdiv(m, STATS_BLOCK_M)
    count, mean, m2 = stats_buffers(tiles, c, x.device)
    _tile_stats_kernel[(tiles, triton.cdiv(c, block_c))](
        x, count, mean, m2, m, c, x.stride(0), BLOCK_M=STATS_BLOCK_M, BLOCK_C=block_c)
    return merge_stats(count, mean, m2)
