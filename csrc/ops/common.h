// What every op shares: the data conventions, the schema tag that keeps them
// under torch.compile, and the argument checks built on them, used by each op's
// checks (channel_stats.cpp, bn_relu.cpp, bn_relu_conv.cpp), which the CPU,
// CUDA and Meta kernels all run before anything else.  A failed check is a
// TORCH_CHECK (RuntimeError in Python) that names the op, the argument, what
// was expected and what was given.
//
// Rows: a channel range of a channels-last buffer seen as (rows, channels) with
// channel stride 1 and a row stride >= channels (rows that do not overlap).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/enum_tag.h>

#include <initializer_list>
#include <vector>

namespace densenet_fast {

// The tags of every op's schema: Inductor must hand the ops tensors with the strides
// they were traced with (channel ranges of channels-last buffers), not a layout of
// its choosing.
// (A const lvalue: torch::Library::def would take an rvalue there for the kernel.)
inline const std::vector<at::Tag>& exact_strides() {
  static const std::vector<at::Tag> tags{at::Tag::needs_exact_strides};
  return tags;
}

// The dtype of statistics and BN coefficients for data x: float64 for float64, else float32.
at::ScalarType stats_dtype(const at::Tensor& x);

// t is data of the fused ops (float32, float64, bfloat16; float16 but on CUDA) of x's dtype, on x's device.
void check_data(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name);

// t is rows: 2-D (rows, channels), channel stride 1, rows that do not overlap.
void check_row_layout(const at::Tensor& t, const char* op, const char* name);

// t is rows of data (check_row_layout and check_data).
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name);

// Each of `coefficients` is (C,) in stats_dtype(x) on x's device, C = x's last dimension.
void check_coefficients(const at::Tensor& x, std::initializer_list<const at::Tensor*> coefficients, const char* op);

// t has shape `expected`.
void check_shape(const at::Tensor& t, c10::SymIntArrayRef expected, const char* op, const char* name);

}  // namespace densenet_fast
