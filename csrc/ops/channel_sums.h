// densenet_fast::channel_sums(Tensor x, Tensor shift) -> (Tensor sum, Tensor sumsq):
// per-channel sums over the rows of a channel range of a channels-last buffer.
// x is (M, C), sum and sumsq are (C,) float64 sums of (x - shift) and
// (x - shift)^2, accumulated in float64 in a fixed order.
#pragma once

#include <ATen/core/Tensor.h>

namespace densenet_fast {

// Checks the arguments of channel_sums (shared by the CPU, CUDA and Meta kernels):
// x is (M, C) with channel stride 1, shift is (C,) float64 on x's device.
void check_channel_sums_args(const at::Tensor& x, const at::Tensor& shift);

}  // namespace densenet_fast
