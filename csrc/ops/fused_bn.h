// densenet_fast's fused BatchNorm-ReLU ops (the Python side is
// densenet_fast/backends/cpp_backend.py, the contract backends/interface.py).
//
// Data: x is a channel range of a channels-last buffer, (M, C) rows with channel
// stride 1 ((N, *spatial, C) for the transition, 1 to 3 spatial dimensions);
// float32, float64 or bfloat16.  BN coefficients scale/shift/mean/rstd are (C,)
// in the statistics dtype (float64 for float64 data, else float32).
// a = x * scale + shift, z = relu(a), xhat = (x - mean) * rstd, dA = dL/da;
// NaN and Inf propagate as in torch (relu.h).
//
//   bn_relu_conv1x1(x, scale, shift, weight (K, C), out (M, K)!, with_stats) -> (mean, var)
//       out = z @ weight.T; (mean, var) of out over its rows ((K,), biased) if
//       with_stats, else two empty tensors.
//   bn_relu_conv1x1_backward_sums(x, scale, shift, mean, rstd, weight, grad_out (M, K), grad_x!)
//       -> (grad_weight (K, C), sums (2, C))
//       Pass 1 of the backward: grad_x += scale * dA; sums = [sum dA, sum dA * xhat].
//   bn_relu(x, scale, shift, out (M, C)!) -> ()                out = z.
//   bn_relu_backward_sums(x, scale, shift, mean, rstd, grad_z, grad_x!) -> sums (2, C)
//       Pass 1: grad_x = scale * dA (grad_x may be grad_z itself).
//   transition(x (N, *spatial, C), scale, shift, weight (K, C), out (N, *spatial / 2, K)!) -> ()
//       out = avgpool2(z) @ weight.T, average pooling by 2 along each spatial dimension
//       (2, 2x2 or 2x2x2 windows; odd sizes drop their last pixel).
//   transition_backward_sums(x, scale, shift, mean, rstd, weight, grad_out, grad_x!) -> (grad_weight, sums)
//       Pass 1: grad_x = scale * dA (written, zero where pooling drops pixels).
//   bn_backward_finish(x (M, C), scale, mean, rstd, batch_means (2, C), grad_x!) -> ()
//       Pass 2, after the batch_mean hook turned sums into means [mean dA, mean dA * xhat]:
//       grad_x -= scale * (mean_dA + xhat * mean_dA_xhat).
#pragma once

#include <ATen/core/Tensor.h>

namespace densenet_fast {

// Argument checks of each op, shared by its CPU and Meta kernels (TORCH_CHECK failures).
void check_bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& weight, const at::Tensor& out);
void check_bn_relu_conv1x1_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                                    const at::Tensor& grad_out, const at::Tensor& grad_x);
void check_bn_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
void check_bn_relu_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                            const at::Tensor& grad_x);
void check_transition(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const at::Tensor& weight, const at::Tensor& out);
void check_transition_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                               const at::Tensor& grad_out, const at::Tensor& grad_x);
void check_bn_backward_finish(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                              const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x);

// The dtype of statistics and BN coefficients for data x: float64 for float64, else float32.
at::ScalarType stats_dtype(const at::Tensor& x);

// The sums pass 1 returns, [sum dA, sum dA * xhat] (2, C) in rstd's dtype, from the
// float64 sums [sum dA, sum dA * (x - mean)] (2, C) of its kernels (scaled in place).
at::Tensor bn_backward_sums(at::Tensor centered_sums, const at::Tensor& rstd);

// Pass 2 of the BN backward as grad_x += offset + slope * (x - mean): returns the
// contiguous (C,) (offset, slope) = (-scale * mean_dA, -scale * rstd * mean_dA_xhat).
std::tuple<at::Tensor, at::Tensor> finish_coefficients(const at::Tensor& scale, const at::Tensor& rstd,
                                                       const at::Tensor& batch_means);

}  // namespace densenet_fast
