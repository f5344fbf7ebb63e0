// densenet_fast's BatchNorm-ReLU ops and the two-pass BN backward that every
// fused op shares (the Python side is densenet_fast/backends/extension_backend.py, the
// contract backends/interface.py; the ops that add a 1x1 convolution are in
// bn_relu_conv.h).
//
// Data: x is a channel range of a channels-last buffer, (M, C) rows with channel
// stride 1 ((N, *spatial, C) for the transition, 1 to 3 spatial dimensions);
// float32, float64 or bfloat16, and on the CPU float16.  BN coefficients scale/shift/mean/rstd are (C,)
// in the statistics dtype (float64 for float64 data, else float32; common.h).
// a = x * scale + shift, z = relu(a), xhat = (x - mean) * rstd, dA = dL/da;
// NaN and Inf propagate as in torch (relu.h).
//
// Every BN backward is two passes with the batch_mean hook (synchronised BN) in
// Python between them: pass 1 (the *_backward_sums ops) writes or adds
// scale * dA into grad_x and returns the sums [sum dA, sum dA * xhat]; pass 2
// (bn_backward_finish) adds the statistics terms.
//
//   bn_relu(x, scale, shift, out (M, C)!) -> ()                out = z.
//   bn_relu_backward_sums(x, scale, shift, mean, rstd, grad_z, grad_x!) -> sums (2, C)
//       Pass 1: grad_x = scale * dA (grad_x may be grad_z itself).
//   bn_backward_finish(x (M, C), scale, mean, rstd, batch_means (2, C), grad_x!) -> ()
//       Pass 2, after the batch_mean hook turned sums into means [mean dA, mean dA * xhat]:
//       grad_x -= scale * (mean_dA + xhat * mean_dA_xhat).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace densenet_fast {

// Argument checks of each op, shared by its CPU, CUDA and Meta kernels (TORCH_CHECK failures).
void check_bn_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
void check_bn_relu_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                            const at::Tensor& grad_x);
void check_bn_backward_finish(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                              const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x);

// The sums pass 1 returns, [sum dA, sum dA * xhat] (2, C) in rstd's dtype, from the
// float64 sums [sum dA, sum dA * (x - mean)] (2, C) of its kernels (scaled in place).
at::Tensor bn_backward_sums(at::Tensor centered_sums, const at::Tensor& rstd);

// Pass 2 of the BN backward as grad_x += offset + slope * (x - mean): returns the
// contiguous (C,) (offset, slope) = (-scale * mean_dA, -scale * rstd * mean_dA_xhat).
std::tuple<at::Tensor, at::Tensor> finish_coefficients(const at::Tensor& scale, const at::Tensor& rstd,
                                                       const at::Tensor& batch_means);

// Registers the kernels of the three ops for one dispatch key (Meta: bn_relu.cpp,
// CPU: cpu/bn_relu_kernel.cpp, CUDA: cuda/bn_relu_kernel.cu).
template <typename BnRelu, typename BnReluBackwardSums, typename BnBackwardFinish>
void register_bn_relu_kernels(torch::Library& m, BnRelu bn_relu, BnReluBackwardSums bn_relu_backward_sums,
                              BnBackwardFinish bn_backward_finish) {
  m.impl("bn_relu", bn_relu);
  m.impl("bn_relu_backward_sums", bn_relu_backward_sums);
  m.impl("bn_backward_finish", bn_backward_finish);
}

}  // namespace densenet_fast
