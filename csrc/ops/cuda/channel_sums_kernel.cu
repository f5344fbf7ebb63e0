// CUDA kernel of densenet_fast::channel_sums.  The grid covers channel blocks
// (x, 32 channels, one per lane: coalesced loads along a row) and row tiles (y);
// each block sums its tile in float64, reduces over its row threads in shared
// memory and adds the result into the output with atomicAdd (double, sm_60+).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h needs cuBLAS/cuSPARSE headers,
// which a minimal CUDA toolkit does not have.
#include "../channel_sums.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace densenet_fast {

namespace {

constexpr int kChannelsPerBlock = 32;
constexpr int kRowThreads = 8;
constexpr int64_t kMinRowsPerBlock = 128;
constexpr int64_t kBlocksPerSM = 4;

template <typename scalar_t>
__global__ void channel_sums_kernel(const scalar_t* __restrict__ x, const double* __restrict__ shift, int64_t rows,
                                    int64_t channels, int64_t row_stride, int64_t rows_per_block,
                                    double* __restrict__ sum, double* __restrict__ sumsq) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = min(rows, row_begin + rows_per_block);
  double thread_sum = 0.0;
  double thread_sumsq = 0.0;
  if (c < channels) {
    const double reference = shift[c];
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kRowThreads) {
      const double d = static_cast<double>(x[r * row_stride + c]) - reference;
      thread_sum += d;
      thread_sumsq += d * d;
    }
  }
  __shared__ double block_sum[kRowThreads][kChannelsPerBlock];
  __shared__ double block_sumsq[kRowThreads][kChannelsPerBlock];
  block_sum[threadIdx.y][threadIdx.x] = thread_sum;
  block_sumsq[threadIdx.y][threadIdx.x] = thread_sumsq;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int i = 1; i < kRowThreads; ++i) {
      thread_sum += block_sum[i][threadIdx.x];
      thread_sumsq += block_sumsq[i][threadIdx.x];
    }
    atomicAdd(sum + c, thread_sum);
    atomicAdd(sumsq + c, thread_sumsq);
  }
}

std::tuple<at::Tensor, at::Tensor> channel_sums_cuda(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_sums_args(x, shift);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto shift_contiguous = shift.contiguous();
  auto sum = at::zeros({x.size(1)}, shift.options());
  auto sumsq = at::zeros({x.size(1)}, shift.options());
  const int64_t rows = x.size(0);
  const int64_t channels = x.size(1);
  if (rows == 0 || channels == 0) {
    return {sum, sumsq};
  }
  // Enough row tiles to give every SM a few blocks, each tile at least kMinRowsPerBlock rows.
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t channel_blocks = (channels + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const int64_t target_row_tiles = std::max<int64_t>(1, kBlocksPerSM * sm_count / channel_blocks);
  const int64_t rows_per_block = std::max(kMinRowsPerBlock, (rows + target_row_tiles - 1) / target_row_tiles);
  const int64_t row_tiles = (rows + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(row_tiles));
  const dim3 block(kChannelsPerBlock, kRowThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_sums_cuda", [&] {
    channel_sums_kernel<scalar_t><<<grid, block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), shift_contiguous.const_data_ptr<double>(), rows, channels, x.stride(0),
        rows_per_block, sum.data_ptr<double>(), sumsq.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_sums", &channel_sums_cuda);
}

}  // namespace densenet_fast
