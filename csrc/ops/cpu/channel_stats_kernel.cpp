// CPU kernel of densenet_fast::channel_stats: the rows are split into tiles and
// chunks (tiling.h), each chunk summed into its own float64 partials, partials
// added in chunk order (the result does not depend on the scheduling).
#include "../channel_stats.h"
#include "tiling.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace densenet_fast {

namespace {

constexpr int64_t kRowsPerTile = 256;

// Adds (x - shift) and (x - shift)^2 of `rows` rows (row stride `ld`) into sum/sumsq.
template <typename T>
DENSENET_FAST_SIMD_CLONES void accumulate_rows(const T* x, int64_t ld, const double* __restrict__ shift,
                                               int64_t rows, int64_t channels, double* __restrict__ sum,
                                               double* __restrict__ sumsq) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ row = x + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const double d = static_cast<double>(row[c]) - shift[c];
      sum[c] += d;
      sumsq[c] += d * d;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_stats_args(x, shift);
  const auto shift_contiguous = shift.contiguous();
  const int64_t rows = x.size(0), channels = x.size(1);
  const int64_t chunks = cpu::chunks_for(rows, kRowsPerTile);
  // Each chunk's sums followed by its sums of squares.
  cpu::ChunkSums partials(chunks, 2 * channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    cpu::for_each_tile(
        rows, kRowsPerTile, chunks, [&](int64_t chunk) { return partials.chunk(chunk); },
        [&](double* chunk_sums, cpu::Tile tile) {
          accumulate_rows(x_data + tile.begin * x.stride(0), x.stride(0), shift_contiguous.const_data_ptr<double>(),
                          tile.size, channels, chunk_sums, chunk_sums + channels);
        });
  });
  const std::vector<double> total = partials.total();
  auto sum = at::empty({channels}, shift.options());
  auto sumsq = at::empty({channels}, shift.options());
  std::copy(total.begin(), total.begin() + channels, sum.data_ptr<double>());
  std::copy(total.begin() + channels, total.end(), sumsq.data_ptr<double>());
  return {sum, sumsq};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
}

}  // namespace densenet_fast
