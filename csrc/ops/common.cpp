// The shared data conventions and argument checks (see common.h).
#include "common.h"

#include <c10/util/Exception.h>

namespace densenet_fast {

at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_data(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  const auto type = t.scalar_type();
  const bool cuda = t.is_cuda();  // the CUDA kernels lack float16; the CPU and Meta kernels take it
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || (type == at::kHalf && !cuda), op,
              ": unsupported dtype ", type, " of ", name,
              cuda ? " on CUDA; expected float32, float64 or bfloat16"
                   : "; expected float32, float64, bfloat16 or float16");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name, " must be ",
              x.scalar_type(), " on ", x.device(), " like x, got ", t.scalar_type(), " on ", t.device());
}

void check_row_layout(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, channels), got shape ", t.sym_sizes());
  TORCH_CHECK(t.sym_size(1) <= 1 || t.sym_stride(1) == 1, op, ": ", name,
              " must have channel stride 1 (a channel range of a channels-last buffer), got strides ",
              t.sym_strides());
  TORCH_CHECK(t.sym_size(0) <= 1 || t.sym_stride(0) >= t.sym_size(1), op, ": ", name,
              " rows must not overlap (row stride >= channels), got shape ", t.sym_sizes(), " and strides ",
              t.sym_strides());
}

void check_rows(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_row_layout(t, op, name);
  check_data(t, x, op, name);
}

void check_coefficients(const at::Tensor& x, std::initializer_list<const at::Tensor*> coefficients, const char* op) {
  const auto channels = x.sym_size(-1);
  for (const at::Tensor* c : coefficients) {
    TORCH_CHECK(c->dim() == 1 && c->sym_size(0) == channels && c->scalar_type() == stats_dtype(x), op,
                ": BN coefficients must be (", channels, ",) ", stats_dtype(x), " tensors for ", x.scalar_type(),
                " data, got shape ", c->sym_sizes(), " and dtype ", c->scalar_type());
    TORCH_CHECK(c->device() == x.device(), op, ": x is on ", x.device(), " but a BN coefficient is on ",
                c->device());
  }
}

void check_shape(const at::Tensor& t, c10::SymIntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sym_sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sym_sizes());
}

}  // namespace densenet_fast
