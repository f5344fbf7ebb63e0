// CUDA kernel of densenet_fast::channel_stats: each block sums its rows of its
// channels in float64 and writes them as per-block partials (cuda_helpers.h),
// which are added in a fixed order: deterministic.
#include "../channel_stats.h"
#include "cuda_helpers.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace densenet_fast {

namespace {

using namespace cuda;

// partials[0 / 1][blockIdx.y][c] = the block's sums of (x - shift) / (x - shift)^2.
template <typename T, int V>
__global__ void channel_stats_kernel(const T* __restrict__ x, int64_t ldx, const double* __restrict__ shift,
                                     int64_t rows, int64_t channels, int64_t rows_per_block,
                                     double* __restrict__ partials) {
  const int64_t c = lane_channel<V>();
  double sums[2][V] = {};
  if (c < channels) {
    double reference[V];
    load_each(shift, c, channels, reference);
    for_each_row<V, double>(x, ldx, c, channels, rows, rows_per_block, [&](int64_t, const double (&values)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const double d = values[i] - reference[i];
        sums[0][i] += d;
        sums[1][i] += d * d;
      }
    });
  }
  store_block_sums(sums, c, channels, partials);
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_stats_args(x, shift);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = x.size(0), channels = x.size(1);
  if (rows == 0 || channels == 0) {
    return {at::zeros({channels}, shift.options()), at::zeros({channels}, shift.options())};
  }
  const auto shift_contiguous = shift.contiguous();
  at::Tensor partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    launch_rows<scalar_t>({x}, [&](auto width, const RowLaunch& launch) {
      partials = block_partials(launch, 2, channels, shift.options());
      channel_stats_kernel<scalar_t, decltype(width)::value><<<launch.grid, launch.block, 0, launch.stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), shift_contiguous.const_data_ptr<double>(), rows, channels,
          launch.rows_per_block, partials.data_ptr<double>());
    });
  });
  return {partials[0].sum(0), partials[1].sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_stats", &channel_stats_cuda);
}

}  // namespace densenet_fast
