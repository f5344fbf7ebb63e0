// Schema, argument checks and Meta (shape-only) kernel of densenet_fast::channel_stats.
#include "channel_stats.h"
#include "common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace densenet_fast {

void check_channel_stats_args(const at::Tensor& x, const at::Tensor& shift) {
  check_row_layout(x, "channel_stats", "x");
  const auto& channels = x.sym_size(1);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "channel_stats: unsupported dtype ", dtype, " of x; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(shift.dim() == 1 && shift.sym_size(0) == channels && shift.scalar_type() == at::kDouble,
              "channel_stats: shift must be a (", channels, ",) float64 tensor, got shape ", shift.sym_sizes(),
              " and dtype ", shift.scalar_type());
  TORCH_CHECK(shift.device() == x.device(), "channel_stats: x is on ", x.device(), " but shift is on ",
              shift.device());
}

namespace {

std::tuple<at::Tensor, at::Tensor> channel_stats_meta(const at::Tensor& x, const at::Tensor& shift) {
  check_channel_stats_args(x, shift);
  const auto options = x.options().dtype(at::kDouble);
  return {at::empty_symint({x.sym_size(1)}, options), at::empty_symint({x.sym_size(1)}, options)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("channel_stats(Tensor x, Tensor shift) -> (Tensor, Tensor)", exact_strides());
}

TORCH_LIBRARY_IMPL(densenet_fast, Meta, m) {
  m.impl("channel_stats", &channel_stats_meta);
}

}  // namespace densenet_fast
