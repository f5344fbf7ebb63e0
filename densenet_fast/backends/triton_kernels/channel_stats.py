"""Stable per-channel statistics.

Each tile of rows yields a ``(mean, M2)`` pair per channel, computed in two
passes over the tile held in registers (exact, no cancellation), and the
kernel that made the tiles merges them itself, in two levels and in a fixed
order: the last tile of each group of ``STATS_GROUP`` tiles to finish merges
its group (an arrival counter, :func:`.common.arrive_last`), and the last
group to finish merges the groups (a single group's merge is the result), so
no program merges more than ``STATS_GROUP`` tiles or groups' worth of rows at
a time and no second launch is needed.  Merging: the exact parallel formula
around the mean of a chunk of ``MERGE_BLOCK`` partials, chunks combined by
Chan's update.  No ``E[x^2] - E[x]^2`` anywhere.  A tile's count is known from
its index (rows ``[t * BLOCK_M, (t + 1) * BLOCK_M)`` of ``rows_total``), so
only means and ``M2`` are stored.  The fused forward (:mod:`.bn_relu_conv`)
produces and merges the same partials for its output in its epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..gpu_partials import STATS_GROUP, stats_partials
from .common import (Launcher, aligned, arrival_counters, arrive_last, block_size, cdiv, check_data, check_pixels,
                     custom_op, nan_stats, vector_alignment)

MERGE_BLOCK = 32  # partials merged by the exact formula at once


@triton.jit
def _merge_partials(mean_ptr, m2_ptr,  # (R, C) fp32 partials
                    first_row, num_rows, first_index, span, rows_total, C,  # scalars
                    channels, channel_mask,  # (BC,) int32, bool: this program's channels
                    MERGE_BLOCK: tl.constexpr):
    """``(count, mean, M2)`` per channel ``(BC,)`` of partial rows
    ``[first_row, first_row + num_rows)``, row ``first_row + i`` standing for
    data rows ``[(first_index + i) * span, (first_index + i + 1) * span)`` of
    ``rows_total``.  Reads with ``.cg``: other programs wrote the partials."""
    total = tl.zeros(channels.shape, tl.float32)
    mean = tl.zeros(channels.shape, tl.float32)
    m2 = tl.zeros(channels.shape, tl.float32)
    for r0 in range(0, num_rows, MERGE_BLOCK):
        r = r0 + tl.arange(0, MERGE_BLOCK)
        row_valid = r < num_rows
        counts = tl.where(row_valid, tl.minimum(tl.maximum(rows_total - (first_index + r) * span, 0), span), 0)
        counts = counts.to(tl.float32)[:, None]
        mask = row_valid[:, None] & channel_mask[None, :]
        offsets = (first_row + r).to(tl.int64)[:, None] * C + channels[None, :]
        part_means = tl.load(mean_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        # this chunk: exact parallel formula around its own mean
        chunk_count = tl.sum(counts, 0)
        chunk_mean = tl.sum(counts * part_means, 0) / tl.maximum(chunk_count, 1.0)
        # padding rows (count 0) and the first chunk (running count 0) add exactly 0: a mean above 1.8e19
        # squares to Inf, and 0 * Inf is NaN
        spread = tl.where(counts > 0, part_means - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(tl.load(m2_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                          + counts * spread * spread, 0)
        # into the running triple (Chan et al.); the mean as a weighted sum keeps an infinite mean infinite, as torch's
        new_total = total + chunk_count
        delta = tl.where(total > 0, chunk_mean - mean, 0.0)
        m2 += chunk_m2 + delta * delta * total * (chunk_count / tl.maximum(new_total, 1.0))
        mean = (mean * total + chunk_mean * chunk_count) / tl.maximum(new_total, 1.0)
        total = new_total
    return total, mean, m2


@triton.jit
def reduce_tile_stats(y,  # (BM, BC) fp32: the tile
                      valid_rows,  # (BM,) bool
                      channels, channel_mask,  # (BC,) int32, bool
                      tile, rows_total, C,  # scalars
                      part_mean_ptr, part_m2_ptr,  # (T + cdiv(T, STATS_GROUP), C) fp32 scratch, T = tiles
                      counter_ptr,  # (cdiv(T, STATS_GROUP) + 1,) int32, 0: this channel block's arrival counters
                      out_mean_ptr, out_var_ptr,  # (C,) fp32: (mean, biased var) of all rows_total rows
                      BLOCK_M: tl.constexpr, STATS_GROUP: tl.constexpr, MERGE_BLOCK: tl.constexpr):
    """Statistics of tile ``y (BM, BC)`` (fp32; its rows ``valid_rows``, at
    least one, are rows ``[tile * BLOCK_M, ...)``), merged with every other
    tile's by the last tiles to finish (module docstring)."""
    valid = valid_rows[:, None]
    mean = tl.sum(tl.where(valid, y, 0.0), 0) / tl.sum(valid_rows.to(tl.float32), 0)
    centred = tl.where(valid, y - mean[None, :], 0.0)
    base = tile.to(tl.int64) * C + channels
    tl.store(part_mean_ptr + base, mean, mask=channel_mask)
    tl.store(part_m2_ptr + base, tl.sum(centred * centred, 0), mask=channel_mask)
    tiles = tl.cdiv(rows_total, BLOCK_M)
    groups = tl.cdiv(tiles, STATS_GROUP)
    group = tile // STATS_GROUP
    first = group * STATS_GROUP
    if arrive_last(counter_ptr + group, tl.minimum(STATS_GROUP, tiles - first)):
        total, mean, m2 = _merge_partials(part_mean_ptr, part_m2_ptr, first, tl.minimum(STATS_GROUP, tiles - first),
                                          first, BLOCK_M, rows_total, C, channels, channel_mask, MERGE_BLOCK)
        last = groups == 1  # one group: its merge is the result
        if not last:
            base = (tiles + group).to(tl.int64) * C + channels
            tl.store(part_mean_ptr + base, mean, mask=channel_mask)
            tl.store(part_m2_ptr + base, m2, mask=channel_mask)
            last = arrive_last(counter_ptr + groups, groups)
            if last:
                total, mean, m2 = _merge_partials(part_mean_ptr, part_m2_ptr, tiles, groups, 0,
                                                  STATS_GROUP * BLOCK_M, rows_total, C, channels, channel_mask,
                                                  MERGE_BLOCK)
        if last:
            tl.store(out_mean_ptr + channels, mean, mask=channel_mask)
            tl.store(out_var_ptr + channels, m2 / total, mask=channel_mask)


@triton.jit
def _tile_stats_kernel(x_ptr,  # (M, C), row stride sx
                       part_mean_ptr, part_m2_ptr,  # (T + cdiv(T, STATS_GROUP), C) fp32 scratch, T = cdiv(M, BLOCK_M)
                       counter_ptr,  # (cdiv(C, BLOCK_C), cdiv(T, STATS_GROUP) + 1) int32, 0
                       mean_ptr, var_ptr,  # (C,) fp32 out
                       M, C, sx,  # scalars: sizes, row stride in elements
                       ALIGN: tl.constexpr,  # divides C and sx (common.vector_alignment)
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STATS_GROUP: tl.constexpr,
                       MERGE_BLOCK: tl.constexpr):
    C, sx = aligned(C, ALIGN), aligned(sx, ALIGN)
    tile = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < M
    channel_mask = channels < C
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sx + channels[None, :],
                mask=row_mask[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
    counters = counter_ptr + pid_c * (tl.cdiv(tl.cdiv(M, BLOCK_M), STATS_GROUP) + 1)
    reduce_tile_stats(x, row_mask, channels, channel_mask, tile, M, C, part_mean_ptr, part_m2_ptr, counters,
                      mean_ptr, var_ptr, BLOCK_M, STATS_GROUP, MERGE_BLOCK)


TILE_STATS_BLOCK_M = 128  # rows per partial
_tile_stats = Launcher(_tile_stats_kernel, [triton.Config({"BLOCK_M": TILE_STATS_BLOCK_M}, num_warps=4)])


class StatsScratch:
    """The partials and arrival counters of :func:`reduce_tile_stats` for
    ``rows`` rows in tiles of at least ``block_m`` rows and ``channel_blocks``
    channel blocks of ``channels`` channels, and the ``(mean, var)`` outputs."""

    def __init__(self, rows: int, block_m: int, channels: int, channel_blocks: int, device: torch.device) -> None:
        tiles = cdiv(rows, block_m)
        self.part_mean = torch.empty(stats_partials(rows, block_m), channels, device=device, dtype=torch.float32)
        self.part_m2 = torch.empty_like(self.part_mean)
        self.counters = arrival_counters(device, channel_blocks * (cdiv(tiles, STATS_GROUP) + 1))
        self.mean = torch.empty(channels, device=device, dtype=torch.float32)
        self.var = torch.empty_like(self.mean)

    def args(self) -> tuple[Tensor, ...]:
        return self.part_mean, self.part_m2, self.counters, self.mean, self.var


@custom_op("channel_stats")
def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` ``(C,)`` (fp32) of a row view ``x (M, C)``
    (NaN for ``M = 0``, as the torch backend's)."""
    check_data(x)
    m, c = x.shape
    check_pixels(m)
    if m == 0:  # an empty grid would leave the outputs unwritten
        return nan_stats(c, x.device)
    block_c = block_size(c, 64)
    scratch = StatsScratch(m, TILE_STATS_BLOCK_M, c, cdiv(c, block_c), x.device)
    _tile_stats[lambda meta: (cdiv(m, TILE_STATS_BLOCK_M), cdiv(c, block_c))](
        x, *scratch.args(), m, c, x.stride(0), ALIGN=vector_alignment(x.element_size(), c, x.stride(0)),
        BLOCK_C=block_c, STATS_GROUP=STATS_GROUP, MERGE_BLOCK=MERGE_BLOCK)
    return scratch.mean, scratch.var


@channel_stats.register_fake
def _(x):
    check_data(x)
    return x.new_empty(x.shape[1], dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)
