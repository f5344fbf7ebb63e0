// CUDA kernels of the elementwise fused BatchNorm-ReLU ops (see ../fused_bn.h):
// bn_relu, pass 1 of its backward (bn_relu_backward_sums) and pass 2 of every
// BN backward (bn_backward_finish).  The GEMM ops stay on the torch backend on
// CUDA.  Blocks are 32 channels (one per lane: coalesced loads along a row) by
// kRowThreads row threads.  The backward's per-channel sums are reduced per
// block in shared memory, written as per-block partials and added in a fixed
// order (no atomics: deterministic).
#include "../fused_bn.h"

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
constexpr int64_t kMaxGridY = 65535;

// The grid over (channel blocks, row blocks): enough row blocks to give every
// SM a few blocks, each at least kMinRowsPerBlock rows.
struct Launch {
  dim3 grid;
  int64_t rows_per_block;
};

Launch launch_for(const at::Tensor& x) {
  const int64_t rows = x.size(0), channels = x.size(1);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t channel_blocks = (channels + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const int64_t target = std::clamp<int64_t>(kBlocksPerSM * sm_count / channel_blocks, 1, kMaxGridY);
  const int64_t rows_per_block = std::max(kMinRowsPerBlock, (rows + target - 1) / target);
  const int64_t row_blocks = std::max<int64_t>(1, (rows + rows_per_block - 1) / rows_per_block);
  return {dim3(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(row_blocks)), rows_per_block};
}

template <typename T>
__global__ void bn_relu_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ scale,
                               const T* __restrict__ shift, int64_t rows, int64_t channels, int64_t rows_per_block,
                               T* __restrict__ out, int64_t ldo) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x;
  if (c >= channels) {
    return;
  }
  const T s = scale[c], b = shift[c];
  const int64_t row_end = min(rows, (static_cast<int64_t>(blockIdx.y) + 1) * rows_per_block);
  for (int64_t r = blockIdx.y * rows_per_block + threadIdx.y; r < row_end; r += kRowThreads) {
    const T a = x[r * ldx + c] * s + b;
    out[r * ldo + c] = a > T(0) ? a : T(0);
  }
}

// grad_x = scale * dA (grad_x may be grad_z); partials[block_row][0 or 1][c] =
// the block's sum of dA and of dA * (x - mean).
template <typename T>
__global__ void bn_relu_backward_sums_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ scale,
                                             const T* __restrict__ shift, const T* __restrict__ mean,
                                             const T* grad_z, int64_t ldg, int64_t rows, int64_t channels,
                                             int64_t rows_per_block, T* grad_x, int64_t ldgx,
                                             double* __restrict__ partials) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x;
  double sum = 0.0, sum_centered = 0.0;
  if (c < channels) {
    const T s = scale[c], b = shift[c], mu = mean[c];
    const int64_t row_end = min(rows, (static_cast<int64_t>(blockIdx.y) + 1) * rows_per_block);
    for (int64_t r = blockIdx.y * rows_per_block + threadIdx.y; r < row_end; r += kRowThreads) {
      const T value = x[r * ldx + c];
      const T a = value * s + b;
      const T grad_a = a > T(0) ? grad_z[r * ldg + c] : T(0);
      grad_x[r * ldgx + c] = s * grad_a;
      sum += static_cast<double>(grad_a);
      sum_centered += static_cast<double>(grad_a) * static_cast<double>(value - mu);
    }
  }
  __shared__ double block_sum[kRowThreads][kChannelsPerBlock];
  __shared__ double block_centered[kRowThreads][kChannelsPerBlock];
  block_sum[threadIdx.y][threadIdx.x] = sum;
  block_centered[threadIdx.y][threadIdx.x] = sum_centered;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int i = 1; i < kRowThreads; ++i) {
      sum += block_sum[i][threadIdx.x];
      sum_centered += block_centered[i][threadIdx.x];
    }
    partials[(2 * blockIdx.y) * channels + c] = sum;
    partials[(2 * blockIdx.y + 1) * channels + c] = sum_centered;
  }
}

// grad_x += offset + slope * (x - mean).
template <typename T>
__global__ void bn_backward_finish_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ offset,
                                          const T* __restrict__ slope, const T* __restrict__ mean, int64_t rows,
                                          int64_t channels, int64_t rows_per_block, T* __restrict__ grad_x,
                                          int64_t ldgx) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x;
  if (c >= channels) {
    return;
  }
  const T o = offset[c], s = slope[c], mu = mean[c];
  const int64_t row_end = min(rows, (static_cast<int64_t>(blockIdx.y) + 1) * rows_per_block);
  for (int64_t r = blockIdx.y * rows_per_block + threadIdx.y; r < row_end; r += kRowThreads) {
    grad_x[r * ldgx + c] += o + s * (x[r * ldx + c] - mu);
  }
}

const dim3 kBlock(kChannelsPerBlock, kRowThreads);

void bn_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu(x, scale, shift, out);
  if (x.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto scale_c = scale.contiguous(), shift_c = shift.contiguous();
  const Launch launch = launch_for(x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_cuda", [&] {
    bn_relu_kernel<scalar_t><<<launch.grid, kBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), scale_c.const_data_ptr<scalar_t>(),
        shift_c.const_data_ptr<scalar_t>(), x.size(0), x.size(1), launch.rows_per_block, out.data_ptr<scalar_t>(),
        out.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const Launch launch = launch_for(x);
  auto partials = at::empty({static_cast<int64_t>(launch.grid.y), 2, x.size(1)}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_backward_sums_cuda", [&] {
    bn_relu_backward_sums_kernel<scalar_t><<<launch.grid, kBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), scale_c.const_data_ptr<scalar_t>(),
        shift_c.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<scalar_t>(), grad_z.const_data_ptr<scalar_t>(),
        grad_z.stride(0), x.size(0), x.size(1), launch.rows_per_block, grad_x.data_ptr<scalar_t>(), grad_x.stride(0),
        partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto sums = partials.sum(0);
  sums[1].mul_(rstd.to(at::kDouble));
  return sums.to(scale.scalar_type());
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
  const Launch launch = launch_for(x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_backward_finish_cuda", [&] {
    bn_backward_finish_kernel<scalar_t><<<launch.grid, kBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x.stride(0), offset.const_data_ptr<scalar_t>(),
        slope.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<scalar_t>(), x.size(0), x.size(1),
        launch.rows_per_block, grad_x.data_ptr<scalar_t>(), grad_x.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("bn_relu", &bn_relu_cuda);
  m.impl("bn_relu_backward_sums", &bn_relu_backward_sums_cuda);
  m.impl("bn_backward_finish", &bn_backward_finish_cuda);
}

}  // namespace densenet_fast
