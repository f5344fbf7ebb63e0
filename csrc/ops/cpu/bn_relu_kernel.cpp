// CPU kernels of the BatchNorm-ReLU ops (see ../bn_relu.h): bn_relu, pass 1 of
// its backward (bn_relu_backward_sums) and pass 2 of every BN backward
// (bn_backward_finish).  Elementwise over rows of 256: pass 1 keeps per-chunk
// float64 sums (tiling.h), added in chunk order, so results do not depend on the
// scheduling.
#include "bn_relu_rows.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace densenet_fast {

namespace {

using namespace cpu;

constexpr int64_t kElementwiseRows = 256;

// grad_x[r, c] += offset[c] + slope[c] * (x[r, c] - mean[c]) for `rows` rows.
template <typename T, typename A>
DENSENET_FAST_SIMD_CLONES void affine_add_rows(const T* x, int64_t ldx, const A* __restrict__ offset,
                                               const A* __restrict__ slope, const A* __restrict__ mean, int64_t rows,
                                               int64_t channels, T* grad_x, int64_t ldgx) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ x_row = x + r * ldx;
    T* __restrict__ gx_row = grad_x + r * ldgx;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      gx_row[c] = store<T>(load<A>(gx_row[c]) + offset[c] + slope[c] * (load<A>(x_row[c]) - mean[c]));
    }
  }
}

// ---- bn_relu and its backward ------------------------------------------------------------

void bn_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu(x, scale, shift, out);
  const auto scale_c = scale.contiguous(), shift_c = shift.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    T* out_data = out.data_ptr<T>();
    at::parallel_for(0, x.size(0), kElementwiseRows, [&](int64_t begin, int64_t end) {
      bn_relu_rows(ptr<T>(x) + begin * x.stride(0), x.stride(0), ptr<A>(scale_c), ptr<A>(shift_c), end - begin,
                   x.size(1), out_data + begin * out.stride(0), out.stride(0));
    });
  });
}

template <typename T>
at::Tensor bn_relu_backward_typed(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                  const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                                  const at::Tensor& grad_x) {
  using A = at::opmath_type<T>;
  const int64_t rows = x.size(0), channels = x.size(1);
  const int64_t chunks = chunks_for(rows, kElementwiseRows);
  ChunkSums sums(chunks, 2 * channels);
  for_each_tile(
      rows, kElementwiseRows, chunks, [&](int64_t chunk) { return BackwardChunk<A>(chunk, channels); },
      [&](BackwardChunk<A>& s, Tile tile) {
        s.start_tile();
        bn_backward_rows<T, A, false>(ptr<T>(x) + tile.begin * x.stride(0), x.stride(0), ptr<A>(scale), ptr<A>(shift),
                                      ptr<A>(mean), ptr<T>(grad_z) + tile.begin * grad_z.stride(0), grad_z.stride(0),
                                      A(1), tile.size, channels, s.tile_sums.data(),
                                      mutable_ptr<T>(grad_x) + tile.begin * grad_x.stride(0), grad_x.stride(0));
        sums.add(s.chunk, s.tile_sums);
      });
  return total_bn_backward_sums(sums, rstd);
}

at::Tensor bn_relu_backward_sums_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                     const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                                     const at::Tensor& grad_x) {
  check_bn_relu_backward(x, scale, shift, mean, rstd, grad_z, grad_x);
  at::AutoDispatchBelowADInplaceOrView guard;
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_backward_sums_cpu", [&] {
    return bn_relu_backward_typed<scalar_t>(x, scale.contiguous(), shift.contiguous(), mean.contiguous(), rstd,
                                            grad_z, grad_x);
  });
}

// ---- pass 2 of every BN backward ---------------------------------------------------------

void bn_backward_finish_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                            const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x) {
  check_bn_backward_finish(x, scale, mean, rstd, batch_means, grad_x);
  at::AutoDispatchBelowADInplaceOrView guard;
  at::Tensor offset, slope;
  std::tie(offset, slope) = finish_coefficients(scale, rstd, batch_means);
  const auto mean_c = mean.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward_finish_cpu", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const int64_t channels = x.size(1);
    const A *offset_data = ptr<A>(offset), *slope_data = ptr<A>(slope), *mean_data = ptr<A>(mean_c);
    T* grad_data = grad_x.data_ptr<T>();
    at::parallel_for(0, x.size(0), kElementwiseRows, [&](int64_t begin, int64_t end) {
      affine_add_rows(ptr<T>(x) + begin * x.stride(0), x.stride(0), offset_data, slope_data, mean_data, end - begin,
                      channels, grad_data + begin * grad_x.stride(0), grad_x.stride(0));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  register_bn_relu_kernels(m, &bn_relu_cpu, &bn_relu_backward_sums_cpu, &bn_backward_finish_cpu);
}

}  // namespace densenet_fast
