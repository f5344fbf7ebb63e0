// CUDA kernel of densenet_fast::channel_sums: each block sums its rows of its
// channels in float64 and writes them as per-block partials (cuda_helpers.h),
// which are added in a fixed order: deterministic.
#include "../channel_sums.h"
#include "cuda_helpers.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace densenet_fast {

namespace {

using namespace cuda;

// partials[0 / 1][blockIdx.y][c] = the block's sums of (x - shift) / (x - shift)^2.
template <typename T, int V>
__global__ void channel_sums_kernel(const T* __restrict__ x, int64_t ldx, const double* __restrict__ shift,
                                    int64_t rows, int64_t channels, int64_t rows_per_block,
                                    double* __restrict__ partials) {
  const int64_t c = lane_channel<V>();
  double sums[2][V] = {};
  if (c < channels) {
    double reference[V];
    load_each(shift, c, channels, reference);
    const RowRange range = thread_rows(rows, rows_per_block);
    for (int64_t r = range.begin; r < range.end; r += kRowThreads) {
      double values[V];
      load(x + r * ldx, c, channels, values);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const double d = values[i] - reference[i];
        sums[0][i] += d;
        sums[1][i] += d * d;
      }
    }
  }
  store_block_sums(sums, c, channels, partials);
}

std::tuple<at::Tensor, at::Tensor> channel_sums_cuda(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_sums_args(x, shift);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = x.size(0), channels = x.size(1);
  if (rows == 0 || channels == 0) {
    return {at::zeros({channels}, shift.options()), at::zeros({channels}, shift.options())};
  }
  const auto shift_contiguous = shift.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_sums_cuda", [&] {
    with_vector_width<scalar_t>({x}, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const RowLaunch launch = row_launch(rows, channels, V, x.device().index());
      partials = at::empty({2, static_cast<int64_t>(launch.grid.y), channels}, shift.options());
      channel_sums_kernel<scalar_t, V><<<launch.grid, launch.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), shift_contiguous.const_data_ptr<double>(), rows, channels,
          launch.rows_per_block, partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {partials[0].sum(0), partials[1].sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_sums", &channel_sums_cuda);
}

}  // namespace densenet_fast
