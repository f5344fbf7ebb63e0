// Schema, argument checks and Meta (shape-only) kernel of densenet_fast::channel_sums.
#include "channel_sums.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace densenet_fast {

void check_channel_sums_args(const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK(x.dim() == 2, "channel_sums: x must be 2-D (rows, channels), got shape ", x.sym_sizes());
  const auto& rows = x.sym_size(0);
  const auto& channels = x.sym_size(1);
  TORCH_CHECK(channels <= 1 || x.sym_stride(1) == 1,
              "channel_sums: x must have channel stride 1 (a channel range of a channels-last buffer), got strides ",
              x.sym_strides());
  TORCH_CHECK(rows <= 1 || x.sym_stride(0) >= channels,
              "channel_sums: x rows must not overlap (row stride >= channels), got shape ", x.sym_sizes(),
              " and strides ", x.sym_strides());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "channel_sums: unsupported dtype ", dtype, " of x; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(shift.dim() == 1 && shift.sym_size(0) == channels && shift.scalar_type() == at::kDouble,
              "channel_sums: shift must be a (", channels, ",) float64 tensor, got shape ", shift.sym_sizes(),
              " and dtype ", shift.scalar_type());
  TORCH_CHECK(shift.device() == x.device(), "channel_sums: x is on ", x.device(), " but shift is on ",
              shift.device());
}

namespace {

std::tuple<at::Tensor, at::Tensor> channel_sums_meta(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_sums_args(x, shift);
  const auto options = x.options().dtype(at::kDouble);
  return {at::empty_symint({x.sym_size(1)}, options), at::empty_symint({x.sym_size(1)}, options)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  // Inductor must hand the ops tensors with the strides they were traced with (channel ranges of
  // channels-last buffers), not a layout of its choosing.
  const std::vector<at::Tag> exact_strides{at::Tag::needs_exact_strides};
  m.def("channel_sums(Tensor x, Tensor shift) -> (Tensor, Tensor)", exact_strides);
}

TORCH_LIBRARY_IMPL(densenet_fast, Meta, m) {
  m.impl("channel_sums", &channel_sums_meta);
}

}  // namespace densenet_fast
