// densenet_fast's fused BatchNorm-ReLU-Conv1x1 ops: the bottleneck's
// BN-ReLU-Conv1x1 and the transition's BN-ReLU-AvgPool2-Conv1x1, each with pass
// 1 of its backward (pass 2 is bn_backward_finish).  Data, coefficients and
// notation (a, z, xhat, dA) as in bn_relu.h.
//
//   bn_relu_conv1x1(x, scale, shift, weight (K, C), out (M, K)!, with_stats) -> (mean, var)
//       out = z @ weight.T; (mean, var) of out over its rows ((K,), biased) if
//       with_stats, else two empty tensors.
//   bn_relu_conv1x1_backward_sums(x, scale, shift, mean, rstd, weight, grad_out (M, K), grad_x!)
//       -> (grad_weight (K, C), sums (2, C))
//       Pass 1 of the backward: grad_x += scale * dA; sums = [sum dA, sum dA * xhat].
//   transition(x (N, *spatial, C), scale, shift, weight (K, C), out (N, *spatial / 2, K)!) -> ()
//       out = avgpool2(z) @ weight.T, average pooling by 2 along each spatial dimension
//       (2, 2x2 or 2x2x2 windows; odd sizes drop their last pixel).
//   transition_backward_sums(x, scale, shift, mean, rstd, weight, grad_out, grad_x!) -> (grad_weight, sums)
//       Pass 1: grad_x = scale * dA (written, zero where pooling drops pixels).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace densenet_fast {

// The two ops (and pass 1 of their backward), which share their arguments and differ
// in the layout of x and out.
enum class BnReluConvOp {
  kConv1x1,     // bn_relu_conv1x1: x (M, C), out (M, K)
  kTransition,  // transition: x (N, *spatial, C), out (N, *spatial // 2, K)
};

// Argument checks, shared by the CPU and Meta kernels (TORCH_CHECK failures that
// name the op): of the forward op, and of pass 1 of its backward.
void check_bn_relu_conv(BnReluConvOp op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& weight, const at::Tensor& out);
void check_bn_relu_conv_backward(BnReluConvOp op, const at::Tensor& x, const at::Tensor& scale,
                                 const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x);

// Registers the kernels of the four ops for one dispatch key (Meta: bn_relu_conv.cpp,
// CPU: cpu/bn_relu_conv_kernel.cpp; there are no CUDA kernels).
template <typename Conv1x1, typename Conv1x1BackwardSums, typename Transition, typename TransitionBackwardSums>
void register_bn_relu_conv_kernels(torch::Library& m, Conv1x1 conv1x1, Conv1x1BackwardSums conv1x1_backward_sums,
                                   Transition transition, TransitionBackwardSums transition_backward_sums) {
  m.impl("bn_relu_conv1x1", conv1x1);
  m.impl("bn_relu_conv1x1_backward_sums", conv1x1_backward_sums);
  m.impl("transition", transition);
  m.impl("transition_backward_sums", transition_backward_sums);
}

}  // namespace densenet_fast
