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

from .common import Launcher, block_size, check_data


@triton.jit
def store_tile_stats(y, valid_rows, channels, channel_mask, tile, store_count, count_ptr, mean_ptr, m2_ptr, C):
    """Write the ``(count, mean, M2)`` of tile ``y (BM, BC)`` (fp32; rows
    ``valid_rows (BM,)`` count, at least one) at partial row ``tile`` of
    ``count_ptr (T,)``, ``mean_ptr (T, C)``, ``m2_ptr (T, C)``; the count only if ``store_count``."""
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
def _tile_stats_kernel(x_ptr,  # (M, C), row stride sx
                       count_ptr, mean_ptr, m2_ptr,  # (T,), (T, C), (T, C) fp32 partials, T = cdiv(M, BLOCK_M)
                       M, C, sx,
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
def _merge_stats_kernel(count_ptr, mean_ptr, m2_ptr,  # (T,), (T, C), (T, C) fp32 partials; rows of count 0 unused
                        out_mean_ptr, out_var_ptr,  # (C,) fp32
                        T, C,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    total = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        counts = tl.load(count_ptr + tiles, mask=tiles < T, other=0.0)
        mask = (counts > 0)[:, None] & channel_mask[None, :]  # rows nobody wrote hold garbage: never read them
        counts = counts[:, None]
        offsets = tiles.to(tl.int64)[:, None] * C + channels[None, :]
        tile_means = tl.load(mean_ptr + offsets, mask=mask, other=0.0)
        # this group of tiles: exact parallel formula around its own mean
        group_count = tl.sum(counts, 0)
        group_mean = tl.sum(counts * tile_means, 0) / tl.maximum(group_count, 1.0)
        spread = tile_means - group_mean[None, :]
        group_m2 = tl.sum(tl.load(m2_ptr + offsets, mask=mask, other=0.0) + counts * spread * spread, 0)
        # merge into the running triple (Chan et al.); the mean as a weighted sum
        # keeps an infinite mean infinite, as torch's
        new_total = total + group_count
        delta = group_mean - mean
        m2 += group_m2 + delta * delta * total * (group_count / tl.maximum(new_total, 1.0))
        mean = (mean * total + group_mean * group_count) / tl.maximum(new_total, 1.0)
        total = new_total
    tl.store(out_mean_ptr + channels, mean, mask=channel_mask)
    tl.store(out_var_ptr + channels, m2 / total, mask=channel_mask)


TILE_STATS_BLOCK_M = 128  # rows per partial triple
_tile_stats = Launcher(_tile_stats_kernel, [triton.Config({"BLOCK_M": TILE_STATS_BLOCK_M}, num_warps=4)])
_merge_stats = Launcher(_merge_stats_kernel, [triton.Config({"BLOCK_T": 64}, num_warps=4)])


def stats_buffers(tiles: int, channels: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Partial ``(count, mean, M2)`` buffers for at most ``tiles`` row tiles;
    counts start at zero so that :func:`merge_stats` skips rows no tile wrote."""
    return (torch.zeros(tiles, device=device, dtype=torch.float32),
            torch.empty(tiles, channels, device=device, dtype=torch.float32),
            torch.empty(tiles, channels, device=device, dtype=torch.float32))


def merge_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial triples ``(T,), (T, C), (T, C)`` into ``(mean, biased var)``, each ``(C,)``."""
    tiles, channels = mean.shape
    out_mean = torch.empty(channels, device=mean.device, dtype=torch.float32)
    out_var = torch.empty_like(out_mean)
    block_c = block_size(channels, 64)
    _merge_stats[lambda meta: (triton.cdiv(channels, block_c),)](
        count, mean, m2, out_mean, out_var, tiles, channels, BLOCK_C=block_c)
    return out_mean, out_var


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` (fp32) of a row view ``x (M, C)``."""
    check_data(x)
    m, c = x.shape
    block_c = block_size(c, 64)
    tiles = triton.cdiv(m, TILE_STATS_BLOCK_M)
    count, mean, m2 = stats_buffers(tiles, c, x.device)
    _tile_stats[lambda meta: (tiles, triton.cdiv(c, block_c))](
        x, count, mean, m2, m, c, x.stride(0), BLOCK_C=block_c)
    return merge_stats(count, mean, m2)
