"""Fused BN-ReLU-[2x2 avg-pool]-Conv1x1 (docs/triton.md; the maths in docs/engine.md).

Forward: ``out = pool(relu(x * scale + shift)) @ weight.T``.  The BN-ReLU (and
the pooling, for the transition) is applied to each input tile as it is
loaded; the activation never reaches memory.  The output tile is written once
and, optionally, the statistics of its channels for the next BatchNorm,
merged over the tiles by the last ones to finish (:mod:`.channel_stats`).

Backward, two passes over ``x`` (the BN statistics terms need the complete
channel sums before ``dx`` can be formed):

1. *reduce*: programs own a channel block and every ``S``-th row tile; each
   recomputes ``a``, ``z`` and the ReLU mask, forms ``dZ = dOut @ W`` (or takes
   ``dZ`` as given: the GEMM-free BN-ReLU backward), and accumulates
   ``dbeta = sum dA``, ``dgamma = sum dA * xhat`` and ``dW = dOut.T @ z`` in
   registers and writes them per split; the last split of each channel block
   to finish (an arrival counter, :func:`.common.arrive_last`) sums the
   splits' ``dbeta, dgamma`` in split order.  Values are never added
   atomically, so results are deterministic.
2. *dx*: recomputes ``dA`` per tile and writes (or adds) ``dx`` into
   ``grad_x``; its programs also sum the splits' ``dW`` (in split order, a
   slab of elements each).

The transition is the ``POOL == 2`` case: a *cell* is a 2x2 pixel window
(avg-pool floors odd sizes); its four pixels are loaded, normalised and
averaged before the GEMM.  The backward passes walk the ceil-sized cell grid,
so that the pixels the pooling dropped (zero ``dA``) still take part in the
statistics terms, as in torch (where ``0 * xhat`` is NaN for an infinite ``x``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .channel_stats import MERGE_BLOCK, STATS_GROUP, StatsScratch, reduce_tile_stats
from .common import (Launcher, Pixels, SharedMemory, aligned, arrival_counters, arrive_last, block_size, cdiv,
                     cell_pixel, check_data, check_pixels, custom_op, dot_precision, image, nan_stats, next_power_of_2,
                     num_splits, pixel_offsets, relu, relu_grad, rows, vector_alignment)


def _config(block_m: int, block_c: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=warps, num_stages=stages)


def _shared_memory(per_stage: Callable[[dict, int], int], once: Callable[[dict, int], int]) -> SharedMemory:
    """An upper bound of a kernel's shared memory: every buffer its TTGIR shows
    (Triton 3.6 and 3.8), counted as if none reused another's memory.
    ``num_stages`` copies of what its loops load (``per_stage(meta, size)``
    bytes, for data of ``size`` bytes per element; Triton keeps ``num_stages -
    1`` or ``num_stages`` of each) and what it stages once (``once``: the
    operands a dot takes from registers, tiles kept for all row tiles, the
    largest fp32 tile converted between layouts).
    benchmarks/triton_compile_check.py checks it against the compiled kernels."""
    return lambda meta, num_stages, size: num_stages * per_stage(meta, size) + once(meta, size)


# forward, per input-channel block: POOL^2 x tiles (BM, BC), a weight tile (BC, BK), scale and shift (BC,) fp32;
# once: z (BM, BC), the dot's operand from registers, and the fp32 accumulator (BM, BK) converted for the store
FORWARD_SHARED_MEMORY = _shared_memory(
    lambda m, size: (m["POOL"] ** 2 * m["BLOCK_M"] + m["BLOCK_K"]) * m["BLOCK_C"] * size + 8 * m["BLOCK_C"],
    lambda m, size: m["BLOCK_M"] * m["BLOCK_C"] * size + 4 * m["BLOCK_M"] * max(m["BLOCK_K"], m["BLOCK_C"]))
# reduce, per row tile: POOL^2 x tiles (BM, BC) and the dOut columns (BM, BK) (without HAS_GEMM the dZ tile
# (BM, BC)), and per step of the dZ loop (not ONE_K_BLOCK) a dOut tile and a weight tile (BK, BC); once: z (BM, BC)
# and dOut^T (BK, BM), the dW dot's operands from registers, the weight tile that ONE_K_BLOCK keeps, and the fp32
# dW (BK, BC) or dZ (BM, BC) converted
REDUCE_SHARED_MEMORY = _shared_memory(
    lambda m, size: (m["POOL"] ** 2 * m["BLOCK_M"] * m["BLOCK_C"] + (
        m["BLOCK_M"] * m["BLOCK_K"] + (0 if m["ONE_K_BLOCK"] else (m["BLOCK_M"] + m["BLOCK_C"]) * m["BLOCK_K"])
        if m["HAS_GEMM"] else m["BLOCK_M"] * m["BLOCK_C"])) * size,
    lambda m, size: (m["BLOCK_M"] * (m["BLOCK_C"] + m["BLOCK_K"])
                     + (m["BLOCK_K"] * m["BLOCK_C"] if m["ONE_K_BLOCK"] else 0) if m["HAS_GEMM"] else 0) * size
    + 4 * max(m["BLOCK_M"], m["BLOCK_K"]) * m["BLOCK_C"])
# dx: a dOut tile (BM, BK) and a weight tile (BK, BC), per step of the dZ loop or, with ONE_K_BLOCK, once; and the
# fp32 dZ (BM, BC) converted
DX_SHARED_MEMORY = _shared_memory(
    lambda m, size: (m["BLOCK_M"] + m["BLOCK_C"]) * m["BLOCK_K"] * size if m["HAS_GEMM"] and not m["ONE_K_BLOCK"]
    else 0,
    lambda m, size: ((m["BLOCK_M"] + m["BLOCK_C"]) * m["BLOCK_K"] * size if m["HAS_GEMM"] and m["ONE_K_BLOCK"] else 0)
    + 4 * m["BLOCK_M"] * max(m["BLOCK_C"], m["BLOCK_K"]))

# Candidates per POOL (1: dense layer, 2: transition, four pixels per cell), in
# order of preference; each list has one that fits 99 KiB of shared memory in
# fp32 (every sm_8x and sm_90 part has at least that).
FORWARD_CONFIGS = {
    1: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(64, 32, 4, 4), _config(128, 64, 8, 4),
        _config(64, 128, 8, 3), _config(64, 32, 4, 2)],
    2: [_config(32, 64, 4, 2), _config(64, 32, 8, 3), _config(32, 32, 4, 3), _config(64, 64, 8, 2),
        _config(32, 32, 4, 2)],
}
# (the unpipelined last ones: TF32 with several K blocks on an sm_86/sm_89.) Not 64x32 with 8 warps: on an
# H200 (Triton 3.6) its dW came out wrong in fp16 with two K blocks, for both pools (docs/gpu.md)
REDUCE_CONFIGS = {
    1: [_config(64, 64, 8, 2), _config(64, 64, 8, 3), _config(32, 32, 4, 2), _config(32, 32, 4, 1)],
    2: [_config(32, 32, 4, 2), _config(32, 64, 8, 2), _config(32, 32, 4, 1), _config(16, 32, 4, 1)],
}
DX_CONFIGS = {
    1: [_config(64, 64, 8, 3), _config(32, 64, 4, 3), _config(64, 32, 4, 3), _config(32, 32, 4, 2)],
    2: [_config(32, 32, 4, 2), _config(32, 64, 8, 2), _config(64, 32, 8, 2), _config(16, 64, 4, 2)],
}
# Exact fp32 (TF32 off; common.Launcher.candidates_for): FMA dots hold their operands in registers, where the
# dense forward's and the reduce pass's candidates above spill (sm_90, Triton 3.6 and 3.8); the first of
# each list here does not, the others at most 64 B (docs/performance.md). The transition forward's and the
# dx pass's candidates do not spill and serve exact fp32 too.
EXACT_FP32_FORWARD_CONFIGS = [_config(64, 64, 8, 3), _config(64, 64, 8, 2), _config(64, 32, 8, 2),
                              _config(32, 64, 8, 2)]  # dense layers
EXACT_FP32_REDUCE_CONFIGS = {
    1: [_config(16, 64, 8, 2), _config(32, 32, 8, 1), _config(16, 32, 8, 2), _config(16, 32, 4, 1)],
    2: [_config(32, 32, 8, 1), _config(16, 32, 8, 2), _config(16, 64, 8, 2), _config(16, 32, 4, 1)],
}
MAX_BLOCK_K = 128
SPLITS_BLOCK = 16  # rows of split partials summed per step
DW_SLAB = 256  # dW elements each program of pass 2 sums over the splits
# autotuning keys: sizes rounded to powers of two (cells_key, c_key), so that the
# dozens of channel counts of a network share a few tunings, and every constexpr
# that selects a kernel variant (BLOCK_K follows K; the other constexprs are
# module constants or the configurations' own)
COMMON_KEY = ["cells_key", "c_key", "K", "POOL", "SPATIAL", "DOT_PRECISION", "ALIGN"]
FORWARD_KEY = COMMON_KEY + ["WITH_STATS"]
# (ONE_K_BLOCK changes what the backward kernels hold in shared memory, and it follows the TF32 switch)
BACKWARD_KEY = COMMON_KEY + ["HAS_GEMM", "ONE_K_BLOCK"]


@triton.jit
def _load_pixels(ptr,  # (N, H, W, C), strides sn, sh, sw, 1
                 sn, sh, sw,
                 n, h, w,  # (BM,) int32 each: the pixels
                 mask,  # (BM, BC) bool
                 channels,  # (BC,) int32
                 SPATIAL: tl.constexpr, ALIGN: tl.constexpr):
    """Channels ``channels`` of pixels ``(n, h, w)`` as fp32 ``(BM, BC)``, 0 outside ``mask``."""
    offsets = pixel_offsets(n, h, w, sn, sh, sw, SPATIAL, ALIGN)
    return tl.load(ptr + offsets[:, None] + channels[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_weight(w_ptr,  # (K, C), strides swk, swc
                 swk, swc,
                 ks, k_mask,  # (BK,) int32, bool
                 channels, channel_mask):  # (BC,) int32, bool
    """``W[ks, channels]`` ``(BK, BC)``, 0 outside the masks."""
    return tl.load(w_ptr + ks[:, None] * swk + channels[None, :] * swc, mask=k_mask[:, None] & channel_mask[None, :],
                   other=0.0)


@triton.jit
def _grad_z(dout_ptr,  # (N, out_h, out_w, K) (without HAS_GEMM: dZ (N, H, W, C)), channel stride 1
            out_offsets, out_valid,  # (BM,) int64, bool: the cells' output pixels
            d,  # (BM, BLOCK_K) dOut tile; ONE_K_BLOCK only
            wt,  # (BLOCK_K, BC) weight tile; ONE_K_BLOCK only
            w_ptr,  # (K, C), strides swk, swc
            swk, swc,
            channels, channel_mask,  # (BC,) int32, bool
            K,
            POOL: tl.constexpr, HAS_GEMM: tl.constexpr, ONE_K_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dL/dz`` (fp32 ``(BM, BC)``) of each pixel of the cells whose output
    pixels are at ``out_offsets`` (``out_valid``): ``dOut @ W`` shared out by
    the pooling (with ONE_K_BLOCK, ``d @ wt`` of the caller's dOut tile ``d
    (BM, BLOCK_K)`` and weight tile ``wt (BLOCK_K, BC)``), or (without
    HAS_GEMM) the given gradient itself; 0 where ``out_valid`` is false."""
    if HAS_GEMM:
        if ONE_K_BLOCK:
            grad = tl.dot(d, wt, input_precision=DOT_PRECISION)
        else:
            grad = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < K
                d_k = tl.load(dout_ptr + out_offsets[:, None] + ks[None, :], mask=out_valid[:, None] & k_mask[None, :],
                              other=0.0)
                grad = tl.dot(d_k, _load_weight(w_ptr, swk, swc, ks, k_mask, channels, channel_mask), grad,
                              input_precision=DOT_PRECISION)
    else:
        grad = tl.load(dout_ptr + out_offsets[:, None] + channels[None, :],
                       mask=out_valid[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
    if POOL > 1:
        grad = grad * (1.0 / (POOL * POOL))
    return grad


@triton.jit
def _forward_kernel(x_ptr,  # (N, H, W, C), strides sxn, sxh, sxw, 1
                    scale_ptr, shift_ptr,  # (C,) fp32
                    w_ptr,  # (K, C), strides swk, swc
                    out_ptr,  # (N, cells_h, cells_w, K), strides son, soh, sow, 1
                    # WITH_STATS only: channel_stats.reduce_tile_stats's scratch, T >= cdiv(num_cells, BLOCK_M):
                    part_mean_ptr, part_m2_ptr,  # (T + cdiv(T, STATS_GROUP), K) fp32
                    counter_ptr,  # (cdiv(K, BLOCK_K), cdiv(T, STATS_GROUP) + 1) int32, 0
                    stats_mean_ptr, stats_var_ptr,  # (K,) fp32 out: (mean, biased var) of out
                    # scalars: sizes (cells_key, c_key: autotuning keys only) and strides in elements
                    num_cells, C, K, cells_key, c_key, H, W, cells_h, cells_w,
                    sxn, sxh, sxw, swk, swc, son, soh, sow,
                    SPATIAL: tl.constexpr, POOL: tl.constexpr, WITH_STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    ALIGN: tl.constexpr,  # divides C, K and the row strides (common.vector_alignment)
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    STATS_GROUP: tl.constexpr, MERGE_BLOCK: tl.constexpr):
    C, K, swk = aligned(C, ALIGN), aligned(K, ALIGN), aligned(swk, ALIGN)
    # one dimension, output-channel blocks fastest: the programs that share a cell tile (and its x) run together
    k_blocks = tl.cdiv(K, BLOCK_K)
    pid_m = tl.program_id(0) // k_blocks
    pid_k = tl.program_id(0) % k_blocks
    cells = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0)[None, :]
        z = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for q in tl.static_range(POOL * POOL):
            n, h, w, valid = cell_pixel(cells, num_cells, cells_h, cells_w, H, W, SPATIAL, POOL, q // POOL, q % POOL)
            mask = valid[:, None] & channel_mask[None, :]
            x = _load_pixels(x_ptr, sxn, sxh, sxw, n, h, w, mask, channels, SPATIAL, ALIGN)
            z += tl.where(mask, relu(x * scale + shift), 0.0)
        if POOL > 1:
            z = z * (1.0 / (POOL * POOL))
        wt = tl.load(w_ptr + ks[None, :] * swk + channels[:, None] * swc,
                     mask=channel_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(z.to(w_ptr.dtype.element_ty), wt, acc, input_precision=DOT_PRECISION)
    n, h, w, valid = cell_pixel(cells, num_cells, cells_h, cells_w, cells_h, cells_w, SPATIAL, 1, 0, 0)
    out = acc.to(out_ptr.dtype.element_ty)
    out_offsets = pixel_offsets(n, h, w, son, soh, sow, SPATIAL, ALIGN)
    tl.store(out_ptr + out_offsets[:, None] + ks[None, :], out, mask=valid[:, None] & k_mask[None, :])
    if WITH_STATS:  # statistics of the stored (rounded) values
        counters = counter_ptr + pid_k * (tl.cdiv(tl.cdiv(num_cells, BLOCK_M), STATS_GROUP) + 1)
        reduce_tile_stats(out.to(tl.float32), valid, ks, k_mask, pid_m, num_cells, K, part_mean_ptr, part_m2_ptr,
                          counters, stats_mean_ptr, stats_var_ptr, BLOCK_M, STATS_GROUP, MERGE_BLOCK)


@triton.jit
def _reduce_kernel(x_ptr,  # (N, H, W, C), strides sxn, sxh, sxw, 1
                   scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # (C,) fp32
                   w_ptr,  # (K, C), strides swk, swc; unused without HAS_GEMM
                   dout_ptr,  # (N, out_h, out_w, K), strides sdn, sdh, sdw, 1; dZ (N, H, W, C) without HAS_GEMM
                   dw_part_ptr,  # (num_splits, K, C) fp32; unused without HAS_GEMM
                   sum_part_ptr,  # (num_splits, 2, C) fp32: [sum dA, sum dA * xhat] of each split
                   sums_ptr,  # (2, C) fp32 out: [sum dA, sum dA * xhat]
                   counter_ptr,  # (cdiv(C, BLOCK_C),) int32, 0 (arrive_last)
                   # scalars: sizes (cells_key, c_key: autotuning keys only) and strides in elements
                   num_cells, C, K, cells_key, c_key, H, W, cells_h, cells_w, out_h, out_w, num_splits,
                   sxn, sxh, sxw, swk, swc, sdn, sdh, sdw,
                   SPATIAL: tl.constexpr, POOL: tl.constexpr, HAS_GEMM: tl.constexpr, ONE_K_BLOCK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    C, K, swk = aligned(C, ALIGN), aligned(K, ALIGN), aligned(swk, ALIGN)
    split = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    # dbeta and dgamma (which need all of dZ) come from the first K block's programs; each program owns
    # rows own_ks of dW, for which it needs only dOut[:, own_ks] and z
    if ONE_K_BLOCK:
        stats_program = True  # the only K block (a constant: no branches below)
    else:
        stats_program = tl.program_id(2) == 0
    own_ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    own_k_mask = own_ks < K
    w_all = _load_weight(w_ptr, swk, swc, own_ks, own_k_mask, channels, channel_mask) if HAS_GEMM and ONE_K_BLOCK \
        else 0.0  # loaded once for every tile
    dw = tl.zeros([BLOCK_K, BLOCK_C], tl.float32)
    dgamma = tl.zeros([BLOCK_C], tl.float32)
    dbeta = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(split, tl.cdiv(num_cells, BLOCK_M), num_splits):
        cells = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        on, oh, ow, out_valid = cell_pixel(cells, num_cells, cells_h, cells_w, out_h, out_w, SPATIAL, 1, 0, 0)
        out_offsets = pixel_offsets(on, oh, ow, sdn, sdh, sdw, SPATIAL, ALIGN)
        d_own = tl.load(dout_ptr + out_offsets[:, None] + own_ks[None, :],
                        mask=out_valid[:, None] & own_k_mask[None, :], other=0.0) if HAS_GEMM else 0.0
        grad_z = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)  # (never read by the other K blocks' programs)
        if stats_program:
            grad_z = _grad_z(dout_ptr, out_offsets, out_valid, d_own, w_all, w_ptr, swk, swc, channels, channel_mask,
                             K, POOL, HAS_GEMM, ONE_K_BLOCK, DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
        z = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for q in tl.static_range(POOL * POOL):
            n, h, w, valid = cell_pixel(cells, num_cells, cells_h, cells_w, H, W, SPATIAL, POOL, q // POOL, q % POOL)
            mask = valid[:, None] & channel_mask[None, :]
            x = _load_pixels(x_ptr, sxn, sxh, sxw, n, h, w, mask, channels, SPATIAL, ALIGN)
            a = x * scale + shift
            if stats_program:
                grad_a = tl.where(mask, relu_grad(a, grad_z), 0.0)
                dbeta += tl.sum(grad_a, 0)
                dgamma += tl.sum(grad_a * ((x - mean) * rstd), 0)
            z += tl.where(mask, relu(a), 0.0)
        if HAS_GEMM:
            z = tl.where(out_valid[:, None], z, 0.0)  # cells the pooling drops have no output
            if POOL > 1:
                z = z * (1.0 / (POOL * POOL))
            dw = tl.dot(tl.trans(d_own), z.to(dout_ptr.dtype.element_ty), dw, input_precision=DOT_PRECISION)
    if HAS_GEMM:  # pass 2 sums the splits' dW
        dw_offsets = (split * K + own_ks).to(tl.int64)[:, None] * C + channels[None, :]
        tl.store(dw_part_ptr + dw_offsets, dw, mask=own_k_mask[:, None] & channel_mask[None, :])
    if stats_program:
        tl.store(sum_part_ptr + split * 2 * C + channels, dbeta, mask=channel_mask)
        tl.store(sum_part_ptr + (split * 2 + 1) * C + channels, dgamma, mask=channel_mask)
        if arrive_last(counter_ptr + tl.program_id(1), num_splits):  # the last split sums all, in split order
            dbeta = tl.zeros([BLOCK_C], tl.float32)
            dgamma = tl.zeros([BLOCK_C], tl.float32)
            for s0 in range(0, num_splits, BLOCK_S):
                splits = s0 + tl.arange(0, BLOCK_S)
                part_offsets = (splits * 2 * C)[:, None] + channels[None, :]
                part_mask = (splits < num_splits)[:, None] & channel_mask[None, :]
                dbeta += tl.sum(tl.load(sum_part_ptr + part_offsets, mask=part_mask, other=0.0,
                                        cache_modifier=".cg"), 0)
                dgamma += tl.sum(tl.load(sum_part_ptr + C + part_offsets, mask=part_mask, other=0.0,
                                         cache_modifier=".cg"), 0)
            tl.store(sums_ptr + channels, dbeta, mask=channel_mask)
            tl.store(sums_ptr + C + channels, dgamma, mask=channel_mask)


@triton.jit
def _dx_kernel(x_ptr,  # (N, H, W, C), strides sxn, sxh, sxw, 1
               scale_ptr, shift_ptr, mean_ptr, rstd_ptr,  # (C,) fp32
               w_ptr,  # (K, C), strides swk, swc; unused without HAS_GEMM
               dout_ptr,  # (N, out_h, out_w, K), strides sdn, sdh, sdw, 1; dZ (N, H, W, C) without HAS_GEMM
               grad_means_ptr,  # (2, C) fp32 [mean(dA), mean(dA * xhat)]; BATCH_STATS only
               gx_ptr,  # (N, H, W, C), strides sgn, sgh, sgw, 1
               dw_part_ptr,  # (num_splits, K * C) fp32: pass 1's dW of each split; HAS_GEMM only
               dw_ptr,  # (K * C,) fp32 out: their sum; HAS_GEMM only
               # scalars: sizes (cells_key, c_key: autotuning keys only) and strides in elements
               num_cells, C, K, cells_key, c_key, H, W, cells_h, cells_w, out_h, out_w, num_splits,
               sxn, sxh, sxw, swk, swc, sdn, sdh, sdw, sgn, sgh, sgw,
               SPATIAL: tl.constexpr, POOL: tl.constexpr, HAS_GEMM: tl.constexpr, ONE_K_BLOCK: tl.constexpr,
               BATCH_STATS: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
               SLAB: tl.constexpr):
    C, K, swk = aligned(C, ALIGN), aligned(K, ALIGN), aligned(swk, ALIGN)
    if HAS_GEMM:  # first (while pass 1's partials are likely in L2): dW, the splits' partials summed in split
        # order, SLAB elements per program
        dw_numel = K * C
        for slab in range(tl.program_id(0), tl.cdiv(dw_numel, SLAB), tl.num_programs(0)):
            elements = slab * SLAB + tl.arange(0, SLAB)
            dw = tl.zeros([SLAB], tl.float32)
            for s0 in range(0, num_splits, BLOCK_S):
                splits = s0 + tl.arange(0, BLOCK_S)
                part_offsets = splits.to(tl.int64)[:, None] * dw_numel + elements[None, :]
                part_mask = (splits < num_splits)[:, None] & (elements < dw_numel)[None, :]
                dw += tl.sum(tl.load(dw_part_ptr + part_offsets, mask=part_mask, other=0.0), 0)
            tl.store(dw_ptr + elements, dw, mask=elements < dw_numel)
    # one dimension, channel blocks fastest: the programs that share a cell tile (and its dOut rows) run together
    channel_blocks = tl.cdiv(C, BLOCK_C)
    cells = (tl.program_id(0) // channel_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    channels = (tl.program_id(0) % channel_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + channels, mask=channel_mask, other=0.0)[None, :]
    if BATCH_STATS:
        mean_grad_a = tl.load(grad_means_ptr + channels, mask=channel_mask, other=0.0)[None, :]
        mean_grad_a_xhat = tl.load(grad_means_ptr + C + channels, mask=channel_mask, other=0.0)[None, :]
    on, oh, ow, out_valid = cell_pixel(cells, num_cells, cells_h, cells_w, out_h, out_w, SPATIAL, 1, 0, 0)
    out_offsets = pixel_offsets(on, oh, ow, sdn, sdh, sdw, SPATIAL, ALIGN)
    ks = tl.arange(0, BLOCK_K)
    d = tl.load(dout_ptr + out_offsets[:, None] + ks[None, :], mask=out_valid[:, None] & (ks < K)[None, :],
                other=0.0) if HAS_GEMM and ONE_K_BLOCK else 0.0
    wt = _load_weight(w_ptr, swk, swc, ks, ks < K, channels, channel_mask) if HAS_GEMM and ONE_K_BLOCK else 0.0
    grad_z = _grad_z(dout_ptr, out_offsets, out_valid, d, wt, w_ptr, swk, swc, channels, channel_mask, K,
                     POOL, HAS_GEMM, ONE_K_BLOCK, DOT_PRECISION, BLOCK_M, BLOCK_C, BLOCK_K)
    for q in tl.static_range(POOL * POOL):
        n, h, w, valid = cell_pixel(cells, num_cells, cells_h, cells_w, H, W, SPATIAL, POOL, q // POOL, q % POOL)
        mask = valid[:, None] & channel_mask[None, :]
        x = _load_pixels(x_ptr, sxn, sxh, sxw, n, h, w, mask, channels, SPATIAL, ALIGN)
        grad_a = relu_grad(x * scale + shift, grad_z)
        if BATCH_STATS:
            grad_a = grad_a - mean_grad_a - (x - mean) * rstd * mean_grad_a_xhat
        dx = grad_a * scale
        gx_ptrs = gx_ptr + pixel_offsets(n, h, w, sgn, sgh, sgw, SPATIAL, ALIGN)[:, None] + channels[None, :]
        if ACCUMULATE:
            dx += tl.load(gx_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx_ptrs, dx.to(gx_ptr.dtype.element_ty), mask=mask)


def one_k_block(has_gemm: bool, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The backward's ``ONE_K_BLOCK``: ``K`` fits one block, so the reduce pass
    keeps one ``W`` tile for all its row tiles and forms ``dZ`` and ``dW`` from
    one ``dOut`` tile (and dx loads both once).  Not for exact fp32 dots on a
    GPU, which take their operands from registers, where a kept ``W`` tile
    spills; those take the K loop (one step).  Always without a GEMM."""
    exact_fp32 = dtype == torch.float32 and dot_precision(dtype) == "ieee" and device.type == "cuda"
    return not has_gemm or (k <= MAX_BLOCK_K and not exact_fp32)


def tuning_key(cells: int, channels: int) -> tuple[int, int]:
    return next_power_of_2(cells), next_power_of_2(channels)


_forward = {pool: Launcher(_forward_kernel, FORWARD_CONFIGS[pool], FORWARD_SHARED_MEMORY, FORWARD_KEY,
                          exact_fp32=EXACT_FP32_FORWARD_CONFIGS if pool == 1 else None)
            for pool in (1, 2)}
_reduce = {pool: Launcher(_reduce_kernel, REDUCE_CONFIGS[pool], REDUCE_SHARED_MEMORY, BACKWARD_KEY,
                          exact_fp32=EXACT_FP32_REDUCE_CONFIGS[pool])
           for pool in (1, 2)}
_dx = {pool: Launcher(_dx_kernel, DX_CONFIGS[pool], DX_SHARED_MEMORY, BACKWARD_KEY + ["BATCH_STATS", "ACCUMULATE"],
                      restore_value=["gx_ptr"])
       for pool in (1, 2)}


def forward(x: Pixels, scale: Tensor, shift: Tensor, weight: Tensor, out: Pixels, pool: int,
            with_stats: bool) -> Optional[tuple[Tensor, Tensor]]:
    """``out = avgpool_pool(relu(x * scale + shift)) @ weight.T``; returns the
    ``(mean, var)`` of ``out`` if ``with_stats``."""
    check_data(x.tensor, weight, out.tensor)
    c = x.tensor.shape[-1]
    k = weight.shape[0]
    cells_h, cells_w = x.h // pool, x.w // pool
    num_cells = x.n * cells_h * cells_w
    check_pixels(x.n * x.h * x.w)
    if num_cells == 0:  # no output; an empty grid would leave the statistics unwritten
        return nan_stats(k, x.tensor.device) if with_stats else None
    block_k = block_size(k, MAX_BLOCK_K)
    align = vector_alignment(x.tensor.element_size(), c, k, *x.strides, weight.stride(0), *out.strides)
    meta = dict(SPATIAL=x.spatial, POOL=pool, WITH_STATS=with_stats, DOT_PRECISION=dot_precision(x.tensor.dtype),
                ALIGN=align, BLOCK_K=block_k, STATS_GROUP=STATS_GROUP, MERGE_BLOCK=MERGE_BLOCK)
    grid = lambda meta: (cdiv(num_cells, meta["BLOCK_M"]) * cdiv(k, block_k),)  # noqa: E731
    stats = None
    if with_stats:  # partials for every row tile of the configuration that runs (the smallest, when autotuning)
        block_m = min(config.kwargs["BLOCK_M"] for config in _forward[pool].usable(grid, x.tensor, meta))
        stats = StatsScratch(num_cells, block_m, k, cdiv(k, block_k), x.tensor.device)
    _forward[pool][grid](x.tensor, scale, shift, weight, out.tensor, *(stats.args() if stats else (out.tensor,) * 5),
                         num_cells, c, k, *tuning_key(num_cells, c), x.h, x.w, cells_h, cells_w,
                         *x.strides, *weight.stride(), *out.strides, **meta)
    return (stats.mean, stats.var) if stats else None


class BackwardGrid(NamedTuple):
    """The cells both backward passes walk (the ceil-sized grid, so that the
    pixels the pooling dropped take part in the statistics terms) and the row
    splits of the reduce pass."""
    c: int  # input channels
    k: int  # output channels (K); C without a GEMM
    num_cells: int
    cells_h: int
    cells_w: int
    k_blocks: int  # blocks of K (BLOCK_K covers K up to MAX_BLOCK_K); 1 without a GEMM
    splits: int


def backward_grid(x: Pixels, weight: Optional[Tensor], pool: int) -> BackwardGrid:
    """The :class:`BackwardGrid` of the backward of ``x`` (``weight (K, C)``, or
    None for BN-ReLU alone): shapes only, so that the fake ops size pass 1's
    outputs with it."""
    c = x.tensor.shape[-1]
    k = weight.shape[0] if weight is not None else c
    cells_h, cells_w = cdiv(x.h, pool), cdiv(x.w, pool)
    num_cells = x.n * cells_h * cells_w
    check_pixels(x.n * x.h * x.w)
    k_blocks = cdiv(k, MAX_BLOCK_K) if weight is not None else 1
    splits = num_splits(num_cells, c, k if weight is not None else 0, k_blocks, x.tensor.element_size(),
                        x.tensor.device)
    return BackwardGrid(c, k, num_cells, cells_h, cells_w, k_blocks, splits)


class _BackwardLaunch(NamedTuple):
    grid: BackwardGrid
    weight: Tensor  # the weight, or (without a GEMM) a stand-in pointer
    sizes: tuple  # the size and stride arguments both kernels take (num_cells ... sdw)
    meta: dict  # the constexprs both kernels take


def _backward_launch(x: Pixels, weight: Optional[Tensor], grad_out: Pixels, pool: int,
                     grad_x: Optional[Pixels] = None) -> _BackwardLaunch:
    """What a backward pass launches with (pass 2 also writes ``grad_x``); checks the tensors."""
    has_gemm = weight is not None
    check_data(x.tensor, grad_out.tensor, *([grad_x.tensor] if grad_x else []), *([weight] if has_gemm else []))
    grid = backward_grid(x, weight, pool)
    dtype = x.tensor.dtype
    gemm_weight, swk, swc = (weight, *weight.stride()) if has_gemm else (grad_out.tensor, 0, 0)
    align = vector_alignment(x.tensor.element_size(), grid.c, grid.k, *x.strides, swk, *grad_out.strides,
                             *(grad_x.strides if grad_x else ()))
    meta = dict(SPATIAL=x.spatial, POOL=pool, HAS_GEMM=has_gemm,
                ONE_K_BLOCK=one_k_block(has_gemm, grid.k, dtype, x.tensor.device),
                DOT_PRECISION=dot_precision(dtype), ALIGN=align,
                BLOCK_K=block_size(grid.k, MAX_BLOCK_K) if has_gemm else 16, BLOCK_S=SPLITS_BLOCK)
    sizes = (grid.num_cells, grid.c, grid.k, *tuning_key(grid.num_cells, grid.c), x.h, x.w, grid.cells_h,
             grid.cells_w, x.h // pool, x.w // pool, grid.splits, *x.strides, swk, swc, *grad_out.strides)
    return _BackwardLaunch(grid, gemm_weight, sizes, meta)


def sums_outputs(x: Tensor, grid: BackwardGrid, has_gemm: bool) -> tuple[Optional[Tensor], Tensor]:
    """The (empty, or fake for a fake ``x``) outputs of :func:`backward_sums`."""
    dw_part = x.new_empty(grid.splits, grid.k, grid.c, dtype=torch.float32) if has_gemm else None
    return dw_part, x.new_empty(2, grid.c, dtype=torch.float32)


def backward_sums(x: Pixels, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                  grad_out: Pixels, pool: int) -> tuple[Optional[Tensor], Tensor]:
    """Pass 1 of the backward of :func:`forward` (``weight=None``: of BN-ReLU
    alone, ``grad_out`` being ``dL/dz``): returns the ``dW`` partials of its row
    splits, ``(splits, K, C)`` fp32 (None without ``weight``), and the sums
    ``(2, C)`` fp32 ``[sum dA, sum dA * xhat]`` that ``batch_mean`` takes."""
    launch = _backward_launch(x, weight, grad_out, pool)
    grid = launch.grid
    dw_part, sums = sums_outputs(x.tensor, grid, weight is not None)
    sum_part = x.tensor.new_empty(grid.splits, 2, grid.c, dtype=torch.float32)
    _reduce[pool][lambda meta: (grid.splits, cdiv(grid.c, meta["BLOCK_C"]), grid.k_blocks)](
        x.tensor, scale, shift, mean, rstd, launch.weight, grad_out.tensor, sum_part if dw_part is None else dw_part,
        sum_part, sums, arrival_counters(x.tensor.device, cdiv(grid.c, 16)), *launch.sizes, **launch.meta)
    return dw_part, sums


def backward_finish(x: Pixels, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                    grad_out: Pixels, dw_part: Optional[Tensor], batch_means: Optional[Tensor], grad_x: Pixels,
                    pool: int, accumulate: bool) -> Optional[Tensor]:
    """Pass 2: writes, or with ``accumulate`` adds, ``dL/dx`` into ``grad_x``
    (``batch_means (2, C) = [mean(dA), mean(dA * xhat)]`` over the batch, from
    ``batch_mean`` of pass 1's sums; None with running statistics) and returns
    ``dW (K, C)`` fp32, pass 1's partials ``dw_part`` summed (None without ``weight``)."""
    launch = _backward_launch(x, weight, grad_out, pool, grad_x)
    grid = launch.grid
    if weight is not None and (dw_part is None or dw_part.shape != (grid.splits, grid.k, grid.c)):
        raise ValueError(f"dw_partials must be the ({grid.splits}, {grid.k}, {grid.c}) partials of pass 1, "
                         f"not {None if dw_part is None else tuple(dw_part.shape)}")
    grad_weight = x.tensor.new_empty(grid.k, grid.c, dtype=torch.float32) if weight is not None else None
    unused = scale  # for the pointers the kernel variant does not read
    # at least one program: it also sums dW (zero without pixels)
    _dx[pool][lambda meta: (max(1, cdiv(grid.num_cells, meta["BLOCK_M"])
                                * cdiv(grid.c, meta["BLOCK_C"])),)](
        x.tensor, scale, shift, mean, rstd, launch.weight, grad_out.tensor,
        unused if batch_means is None else batch_means.contiguous(), grad_x.tensor,
        unused if dw_part is None else dw_part, unused if grad_weight is None else grad_weight,
        *launch.sizes, *grad_x.strides,
        BATCH_STATS=batch_means is not None, ACCUMULATE=accumulate, **launch.meta, SLAB=DW_SLAB)
    return grad_weight


# -- the torch ops (docs/triton.md) ---------------------------------------------------------------------

def _empty_stats(x: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(channels, dtype=torch.float32), x.new_empty(channels, dtype=torch.float32)


@custom_op("bn_relu_conv1x1", mutates_args=("out",))
def bn_relu_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor, with_stats: bool
                    ) -> tuple[Tensor, Tensor]:
    """``out (M, K) = relu(x * scale + shift) @ weight.T`` for row views ``x (M, C)``
    and ``out``, ``weight (K, C)``; returns ``(mean, var)`` ``(K,)`` fp32 of
    ``out`` if ``with_stats``, else two empty tensors."""
    stats = forward(rows(x), scale, shift, weight, rows(out), pool=1, with_stats=with_stats)
    return stats if stats is not None else _empty_stats(x, 0)


@bn_relu_conv1x1.register_fake
def _(x, scale, shift, weight, out, with_stats):
    check_data(x, weight, out)
    return _empty_stats(x, weight.shape[0] if with_stats else 0)


@custom_op("transition", mutates_args=("out",))
def transition(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor) -> None:
    """``out (N, H // 2, W // 2, K) = avgpool2(relu(x * scale + shift)) @ weight.T``
    for channels-last views ``x (N, H, W, C)`` and ``out``, ``weight (K, C)``."""
    forward(image(x), scale, shift, weight, image(out), pool=2, with_stats=False)


@transition.register_fake
def _(x, scale, shift, weight, out):
    check_data(x, weight, out)


def _backward_ops(primitive: str, pixels: Callable[[Tensor], Pixels], pool: int, accumulate: bool):
    """The backward of op ``primitive`` (its tensors seen through ``pixels``) as
    the ops ``<primitive>_backward_sums`` and ``<primitive>_backward_finish``,
    between which the caller turns the sums into batch means (``batch_mean``)."""

    @custom_op(f"{primitive}_backward_sums")
    def backward_sums_op(x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                         grad_out: Tensor) -> tuple[Tensor, Tensor]:
        """Pass 1: ``(dW partials (splits, K, C), sums (2, C) = [sum dA, sum dA * xhat])``, fp32."""
        return backward_sums(pixels(x), scale, shift, mean, rstd, weight, pixels(grad_out), pool)

    @backward_sums_op.register_fake
    def _(x, scale, shift, mean, rstd, weight, grad_out):
        check_data(x, grad_out, weight)
        return sums_outputs(x, backward_grid(pixels(x), weight, pool), has_gemm=True)

    @custom_op(f"{primitive}_backward_finish", mutates_args=("grad_x",))
    def backward_finish_op(x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                           grad_out: Tensor, dw_partials: Tensor, batch_means: Optional[Tensor], grad_x: Tensor
                           ) -> Tensor:
        """Pass 2: ``dL/dx`` into ``grad_x`` (shaped as ``x``; added with
        ``accumulate``, else written), with ``batch_means (2, C)`` or None
        (running statistics); returns ``dW (K, C)`` fp32."""
        return backward_finish(pixels(x), scale, shift, mean, rstd, weight, pixels(grad_out), dw_partials,
                               batch_means, pixels(grad_x), pool, accumulate)

    @backward_finish_op.register_fake
    def _(x, scale, shift, mean, rstd, weight, grad_out, dw_partials, batch_means, grad_x):
        check_data(x, grad_out, grad_x, weight)
        return x.new_empty(weight.shape[0], x.shape[-1], dtype=torch.float32)

    return backward_sums_op, backward_finish_op


# the dense layer's 1x1 convolution: row views, dL/dx added into grad_x; the transition: (N, H, W, C) views, written
bn_relu_conv1x1_backward_sums, bn_relu_conv1x1_backward_finish = _backward_ops("bn_relu_conv1x1", rows, 1, True)
transition_backward_sums, transition_backward_finish = _backward_ops("transition", image, 2, False)
