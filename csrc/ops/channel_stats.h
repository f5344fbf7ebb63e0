// densenet_fast::channel_stats(Tensor x, Tensor shift) -> (Tensor sum, Tensor sumsq):
// the per-channel sums that channel statistics are formed from (the Python side,
// densenet_fast/backends/extension_backend.py, turns them into mean and variance), over
// the rows of a channel range of a channels-last buffer.  x is (M, C), sum and
// sumsq are (C,) float64 sums of (x - shift) and (x - shift)^2, accumulated in
// float64 in a fixed order.
#pragma once

#include <ATen/core/Tensor.h>

namespace densenet_fast {

// Checks the arguments of channel_stats (shared by the CPU, CUDA and Meta kernels):
// x is (M, C) rows (common.h), shift is (C,) float64 on x's device.
void check_channel_stats_args(const at::Tensor& x, const at::Tensor& shift);

}  // namespace densenet_fast
