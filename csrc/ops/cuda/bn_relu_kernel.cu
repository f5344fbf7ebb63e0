// CUDA kernels of the BatchNorm-ReLU ops (see ../bn_relu.h): bn_relu, pass 1
// of its backward (bn_relu_backward_sums) and pass 2 of every BN backward
// (bn_backward_finish).  The GEMM ops (../bn_relu_conv.h) have no CUDA kernels:
// on CUDA they run on the torch backend.  Launch shape, vector accesses, the row
// loop and the deterministic per-block sums: cuda_helpers.h.  T is the data type,
// A = at::opmath_type<T> the type of the BN coefficients and of the arithmetic
// (float for bfloat16 data).
#include "../bn_relu.h"
#include "../relu.h"
#include "cuda_helpers.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
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
  for_each_row<V, A>(x, ldx, c, channels, rows, rows_per_block, [&](int64_t r, A (&z)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      z[i] = relu(z[i] * s[i] + b[i]);
    }
    store(out + r * ldo, c, channels, z);
  });
}

// The row loop both BN backward passes share, at this lane's channels from c: with
// per-channel u, v (the lane's channels of the vectors `first` and `second`) and mu
// (of mean), for each of this thread's rows, grad_out = update(i, value, grad, u, v, mu)
// channel by channel (i: the channel's index in the lane) from value (x) and grad
// (grad_in).  grad_out may be grad_in: each thread reads a row's values before it
// writes them.
template <int V, typename T, typename A, typename F>
__device__ inline void bn_backward_rows(const T* __restrict__ x, int64_t ldx, const A* __restrict__ first,
                                        const A* __restrict__ second, const A* __restrict__ mean, const T* grad_in,
                                        int64_t ldg, int64_t c, int64_t channels, int64_t rows,
                                        int64_t rows_per_block, T* grad_out, int64_t ldgo, const F& update) {
  A u[V], v[V], mu[V];
  load_each(first, c, channels, u);
  load_each(second, c, channels, v);
  load_each(mean, c, channels, mu);
  for_each_row<V, A>(x, ldx, c, channels, rows, rows_per_block, [&](int64_t r, const A (&value)[V]) {
    A grad[V];
    load(grad_in + r * ldg, c, channels, grad);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      grad[i] = update(i, value[i], grad[i], u[i], v[i], mu[i]);
    }
    store(grad_out + r * ldgo, c, channels, grad);
  });
}

// Pass 1: dA = relu_backward(grad_z, a); grad_x = scale * dA (grad_x may be grad_z);
// partials[0 / 1][blockIdx.y][c] = the block's sums of dA and of dA * (x - mean).
template <typename T, int V, typename A = at::opmath_type<T>>
__global__ void bn_relu_backward_sums_kernel(const T* __restrict__ x, int64_t ldx, const A* __restrict__ scale,
                                             const A* __restrict__ shift, const A* __restrict__ mean,
                                             const T* grad_z, int64_t ldg, int64_t rows, int64_t channels,
                                             int64_t rows_per_block, T* grad_x, int64_t ldgx,
                                             double* __restrict__ partials) {
  const int64_t c = lane_channel<V>();
  double sums[2][V] = {};
  if (c < channels) {
    bn_backward_rows<V>(x, ldx, scale, shift, mean, grad_z, ldg, c, channels, rows, rows_per_block, grad_x, ldgx,
                        [&](int i, A value, A grad, A s, A b, A mu) {
                          const A grad_a = relu_backward(grad, value * s + b);
                          sums[0][i] += static_cast<double>(grad_a);
                          sums[1][i] += static_cast<double>(grad_a) * static_cast<double>(value - mu);
                          return s * grad_a;
                        });
  }
  store_block_sums(sums, c, channels, partials);
}

// Pass 2: grad_x += offset + slope * (x - mean).
template <typename T, int V, typename A = at::opmath_type<T>>
__global__ void bn_backward_finish_kernel(const T* __restrict__ x, int64_t ldx, const A* __restrict__ offset,
                                          const A* __restrict__ slope, const A* __restrict__ mean, int64_t rows,
                                          int64_t channels, int64_t rows_per_block, T* __restrict__ grad_x,
                                          int64_t ldgx) {
  const int64_t c = lane_channel<V>();
  if (c >= channels) {
    return;
  }
  bn_backward_rows<V>(x, ldx, offset, slope, mean, grad_x, ldgx, c, channels, rows, rows_per_block, grad_x, ldgx,
                      [](int, A value, A grad, A o, A k, A mu) { return grad + (o + k * (value - mu)); });
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_relu_cuda", [&] {
    launch_rows<scalar_t>({x, out}, [&](auto width, const RowLaunch& launch) {
      bn_relu_kernel<scalar_t, decltype(width)::value><<<launch.grid, launch.block, 0, launch.stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), coefficients<scalar_t>(scale_c), coefficients<scalar_t>(shift_c),
          x.size(0), x.size(1), launch.rows_per_block, out.data_ptr<scalar_t>(), out.stride(0));
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
  at::Tensor partials;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_relu_backward_sums_cuda", [&] {
    launch_rows<scalar_t>({x, grad_z, grad_x}, [&](auto width, const RowLaunch& launch) {
      partials = block_partials(launch, 2, x.size(1), x.options());
      bn_relu_backward_sums_kernel<scalar_t, decltype(width)::value><<<launch.grid, launch.block, 0, launch.stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), coefficients<scalar_t>(scale_c), coefficients<scalar_t>(shift_c),
          coefficients<scalar_t>(mean_c), grad_z.const_data_ptr<scalar_t>(), grad_z.stride(0), x.size(0), x.size(1),
          launch.rows_per_block, grad_x.data_ptr<scalar_t>(), grad_x.stride(0), partials.data_ptr<double>());
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_backward_finish_cuda", [&] {
    launch_rows<scalar_t>({x, grad_x}, [&](auto width, const RowLaunch& launch) {
      bn_backward_finish_kernel<scalar_t, decltype(width)::value><<<launch.grid, launch.block, 0, launch.stream>>>(
          x.const_data_ptr<scalar_t>(), x.stride(0), coefficients<scalar_t>(offset), coefficients<scalar_t>(slope),
          coefficients<scalar_t>(mean_c), x.size(0), x.size(1), launch.rows_per_block, grad_x.data_ptr<scalar_t>(),
          grad_x.stride(0));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  register_bn_relu_kernels(m, &bn_relu_cuda, &bn_relu_backward_sums_cuda, &bn_backward_finish_cuda);
}

}  // namespace densenet_fast
