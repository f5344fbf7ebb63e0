"""How the GPU kernels split a reduction over rows, and so how many partial sums
they allocate: one rule per kernel family, from the shapes and the GPU's
multiprocessor count.  The Triton launchers and the memory model
(:mod:`densenet_fast.memory`, which must not need triton or a GPU) use these
functions; the CUDA kernels' rule is C++ (``row_launch`` in
csrc/ops/cuda/cuda_helpers.h), written again in :func:`cuda_row_blocks`."""

from __future__ import annotations

STATS_GROUP = 64  # Triton statistics: tiles merged by the last of them to finish, and groups by the last group
CUDA_BLOCKS_PER_SM = 4  # row_launch's kBlocksPerSM
CUDA_MIN_ROWS_PER_BLOCK = 128  # kMinRowsPerBlock
CUDA_MAX_GRID_Y = 65535  # kMaxGridY
CUDA_CHANNEL_LANES = 32  # kChannelLanes: lanes of a block, each over a vector of channels
CUDA_MAX_VECTOR = (16, 4)  # kMaxVectorBytes, kMaxVectorChannels: a lane's vector, at most


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def stats_partials(rows: int, block_m: int) -> int:
    """Rows of each of the Triton channel statistics' two fp32 partials ``(P, C)``
    (mean and M2) over ``rows`` rows in tiles of ``block_m``: one per tile and
    one per group of ``STATS_GROUP`` tiles."""
    tiles = cdiv(rows, block_m)
    return tiles + cdiv(tiles, STATS_GROUP)


def backward_splits(cells: int, channels: int, k: int, k_blocks: int, element_size: int,
                    multiprocessors: int) -> int:
    """How many row ranges the Triton backward's reducing pass splits ``cells``
    rows of ``channels`` channels into (its grid: splits x channel blocks of up
    to 64 x ``k_blocks``; ``k`` output channels, ``k = 0`` without a GEMM): two
    programs per multiprocessor, fewer where the fp32 ``dW`` partials (``splits
    * k * channels * 4`` bytes) would pass a quarter of the bytes the pass
    reads, but never fewer than one program per multiprocessor, and at least 64
    rows each.  Its partials: ``(splits, k, channels)`` and ``(splits, 2,
    channels)`` fp32."""
    blocks = cdiv(channels, 64) * k_blocks
    read = cells * (channels + k) * element_size
    partials_cap = read // (16 * k * channels) if k else 2 * multiprocessors
    return max(1, min(max(cdiv(multiprocessors, blocks), min(cdiv(2 * multiprocessors, blocks), partials_cap)),
                      cdiv(cells, 64)))


def cuda_row_blocks(rows: int, channels: int, element_size: int, multiprocessors: int) -> int:
    """Row blocks of the CUDA kernels' launch over ``rows`` x ``channels`` (both
    > 0) of ``element_size``-byte data with the widest vectors (aligned data;
    unaligned data gets 1-channel vectors, more channel blocks and so fewer row
    blocks): the float64 partial sums of ``channel_stats`` and
    ``bn_relu_backward`` are ``(2, row blocks, channels)``."""
    vector = min(CUDA_MAX_VECTOR[0] // element_size, CUDA_MAX_VECTOR[1])
    target = min(max(CUDA_BLOCKS_PER_SM * multiprocessors // cdiv(channels, CUDA_CHANNEL_LANES * vector), 1),
                 CUDA_MAX_GRID_Y)
    return cdiv(rows, max(CUDA_MIN_ROWS_PER_BLOCK, cdiv(rows, target)))
