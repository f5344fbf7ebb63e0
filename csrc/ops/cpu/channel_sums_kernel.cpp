// CPU kernel of densenet_fast::channel_sums: rows split into a fixed number of
// chunks (so the result does not depend on the thread count), each chunk summed
// into its own fp64 partials by at::parallel_for (OpenMP), partials added in order.
#include "../channel_sums.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace densenet_fast {

namespace {

constexpr int64_t kMinRowsPerChunk = 256;
constexpr int64_t kMaxChunks = 64;

// Adds one row's (x - shift) and (x - shift)^2 into sum/sumsq; the loop over
// channels is contiguous and vectorisable.
template <typename scalar_t>
inline void accumulate_row(const scalar_t* __restrict__ row, const double* __restrict__ shift, int64_t channels,
                           double* __restrict__ sum, double* __restrict__ sumsq) {
  for (int64_t c = 0; c < channels; ++c) {
    const double d = static_cast<double>(row[c]) - shift[c];
    sum[c] += d;
    sumsq[c] += d * d;
  }
}

template <typename scalar_t>
void channel_sums_cpu_typed(const at::Tensor& x, const at::Tensor& shift, at::Tensor& sum, at::Tensor& sumsq) {
  const int64_t rows = x.size(0);
  const int64_t channels = x.size(1);
  const int64_t row_stride = x.stride(0);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const double* shift_data = shift.const_data_ptr<double>();

  const int64_t num_chunks = std::clamp<int64_t>((rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk, 1, kMaxChunks);
  // partials[chunk] holds that chunk's sums followed by its sums of squares.
  std::vector<double> partials(num_chunks * 2 * channels, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double* chunk_sum = partials.data() + chunk * 2 * channels;
      double* chunk_sumsq = chunk_sum + channels;
      const int64_t row_end = rows * (chunk + 1) / num_chunks;
      for (int64_t r = rows * chunk / num_chunks; r < row_end; ++r) {
        accumulate_row(x_data + r * row_stride, shift_data, channels, chunk_sum, chunk_sumsq);
      }
    }
  });

  double* sum_data = sum.data_ptr<double>();
  double* sumsq_data = sumsq.data_ptr<double>();
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const double* chunk_sum = partials.data() + chunk * 2 * channels;
    const double* chunk_sumsq = chunk_sum + channels;
    for (int64_t c = 0; c < channels; ++c) {
      sum_data[c] += chunk_sum[c];
      sumsq_data[c] += chunk_sumsq[c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> channel_sums_cpu(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_sums_args(x, shift);
  const auto shift_contiguous = shift.contiguous();
  auto sum = at::zeros({x.size(1)}, shift.options());
  auto sumsq = at::zeros({x.size(1)}, shift.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_sums_cpu", [&] {
    channel_sums_cpu_typed<scalar_t>(x, shift_contiguous, sum, sumsq);
  });
  return {sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_sums", &channel_sums_cpu);
}

}  // namespace densenet_fast
