// CUDA kernels of the elementwise fused BatchNorm-ReLU ops (see ../fused_bn.h):
// bn_relu, pass 1 of its backward (bn_relu_backward_sums) and pass 2 of every
// BN backward (bn_backward_finish).  The GEMM ops stay on the torch backend on
// CUDA.  Launch shape, vector accesses and the deterministic per-block sums:
// cuda_helpers.h.  T is the data type, A = at::opmath_type<T> the type of the
// BN coefficients and of the arithmetic (float for bfloat16 data).
#include "../fused_bn.h"
#include "../relu.h"
#include "cuda_helpers.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace densenet_fast {

namespace {

using namespace cuda;

// out = relu(x * scale + shift).
template <typename T, int V, typename A = at::opmath_type<T>>
__global__ void bn_relu_kernel(const T* __restrict__ x, int64_t ldx, const A* __restrict__ scale,
                               const A* __restrict__ shift, int64_t rows, int64_t channels, int64_t rows_per_block,
                               T* __restrict__ out, int64_t ldo) {
  const int64_t c = lane_channel<V>();
  if (c >= channels) {
    return;
  }
  A s[V], b[V];
  load_each(scale, c, channels, s);
  load_each(shift, c, channels, b);
  const RowRange range = thread_rows(rows, rows_per_block);
  for (int64_t r = range.begin; r < range.end; r += kRowThreads) {
    A z[V];
    load(x + r * ldx, c, channels, z);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      z[i] = relu(z[i] * s[i] + b[i]);
    }
    store(out + r * ldo, c, channels, z);
  }
}

// dA = relu_backward(grad_z, a); grad_x = scale * dA (grad_x may be grad_z: each
// thread reads a row's values before it writes them); partials[0 / 1][blockIdx.y][c]
// = the block's sums of dA and of dA * (x - mean).
template <typename T, int V, typename A = at::opmath_type<T>>
__global__ void bn_relu_backward_sums_kernel(const T* __restrict__ x, int64_t ldx, const A* __restrict__ scale,
                                             const A* __restrict__ shift, const A* __restrict__ mean,
                                             const T* grad_z, int64_t ldg, int64_t rows, int64_t channels,
                                             int64_t rows_per_block, T* grad_x, int64_t ldgx,
                                             double* __restrict__ partials) {
  const int64_t c = lane_channel<V>();
  double sums[2][V] = {};
  if (c < channels) {
    A s[V], b[V], mu[V];
    load_each(scale, c, channels, s);
    load_each(shift, c, channels, b);
    load_each(mean, c, channels, mu);
    const RowRange range = thread_rows(rows, rows_per_block);
    for (int64_t r = range.begin; r < range.end; r += kRowThreads) {
      A value[V], grad[V];
      load(x + r * ldx, c, channels, value);
      load(grad_z + r * ldg, c, channels, grad);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A grad_a = relu_backward(grad[i], value[i] * s[i] + b[i]);
        sums[0][i] += static_cast<double>(grad_a);
        sums[1][i] += static_cast<double>(grad_a) * static_cast<double>(value[i] - mu[i]);
        grad[i] = s[i] * grad_a;
      }
      store(grad_x + r * ldgx, c, channels, grad);
    }
  }
  store_block_sums(sums, c, channels, partials);
}

// grad_x += offset + slope * (x - mean).
template <typename T, int V, typename A = at::opmath_type<T>>
__global__ void bn_backward_finish_kernel(const T* __restrict__ x, int64_t ldx, const A* __restrict__ offset,
                                          const A* __restrict__ slope, const A* __restrict__ mean, int64_t rows,
                                          int64_t channels, int64_t rows_per_block, T* __restrict__ grad_x,
                                          int64_t ldgx) {
  const int64_t c = lane_channel<V>();
  if (c >= channels) {
    return;
  }
  A o[V], k[V], mu[V];
  load_each(offset, c, channels, o);
  load_each(slope, c, channels, k);
  load_each(mean, c, channels, mu);
  const RowRange range = thread_rows(rows, rows_per_block);
  for (int64_t r = range.begin; r < range.end; r += kRowThreads) {
    A value[V], grad[V];
    load(x + r * ldx, c, channels, value);
    load(grad_x + r * ldgx, c, channels, grad);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      grad[i] += o[i] + k[i] * (value[i] - mu[i]);
    }
    store(grad_x + r * ldgx, c, channels, grad);
  }
}

template <typename T>
const at::opmath_type<T>* coefficients(const at::Tensor& t) {
  return t.const_data_ptr<at::opmath_type<T>>();
}

void bn_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu(x, scale, shift, out);
  if (x.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto scale_c = scale.contiguous(), shift_c = shift.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_relu_cuda", [&] {
    with_vector_width<scalar_t>({x, out}, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const RowLaunch launch = row_launch(x.size(0), x.size(1), V, x.device().index());
      bn_relu_kernel<scalar_t, V><<<launch.grid, launch.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), coefficients<scalar_t>(scale_c), coefficients<scalar_t>(shift_c),
          x.size(0), x.size(1), launch.rows_per_block, out.data_ptr<scalar_t>(), out.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor bn_relu_backward_sums_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                                      const at::Tensor& grad_x) {
  check_bn_relu_backward(x, scale, shift, mean, rstd, grad_z, grad_x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.numel() == 0) {
    return at::zeros({2, x.size(1)}, scale.options());
  }
  const auto scale_c = scale.contiguous(), shift_c = shift.contiguous(), mean_c = mean.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_relu_backward_sums_cuda", [&] {
    with_vector_width<scalar_t>({x, grad_z, grad_x}, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const RowLaunch launch = row_launch(x.size(0), x.size(1), V, x.device().index());
      partials = at::empty({2, static_cast<int64_t>(launch.grid.y), x.size(1)}, x.options().dtype(at::kDouble));
      bn_relu_backward_sums_kernel<scalar_t, V><<<launch.grid, launch.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), coefficients<scalar_t>(scale_c), coefficients<scalar_t>(shift_c),
          coefficients<scalar_t>(mean_c), grad_z.const_data_ptr<scalar_t>(), grad_z.stride(0), x.size(0), x.size(1),
          launch.rows_per_block, grad_x.data_ptr<scalar_t>(), grad_x.stride(0), partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return bn_backward_sums(partials.sum(1), rstd);
}

void bn_backward_finish_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                             const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x) {
  check_bn_backward_finish(x, scale, mean, rstd, batch_means, grad_x);
  if (x.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor offset, slope;
  std::tie(offset, slope) = finish_coefficients(scale, rstd, batch_means);
  const auto mean_c = mean.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_backward_finish_cuda", [&] {
    with_vector_width<scalar_t>({x, grad_x}, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const RowLaunch launch = row_launch(x.size(0), x.size(1), V, x.device().index());
      bn_backward_finish_kernel<scalar_t, V><<<launch.grid, launch.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), coefficients<scalar_t>(offset), coefficients<scalar_t>(slope),
          coefficients<scalar_t>(mean_c), x.size(0), x.size(1), launch.rows_per_block, grad_x.data_ptr<scalar_t>(),
          grad_x.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("bn_relu", &bn_relu_cuda);
  m.impl("bn_relu_backward_sums", &bn_relu_backward_sums_cuda);
  m.impl("bn_backward_finish", &bn_backward_finish_cuda);
}

}  // namespace densenet_fast
