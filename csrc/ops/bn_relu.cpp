// Schemas, argument checks and Meta (shape-only) kernels of the BatchNorm-ReLU
// ops, and the host side of the two-pass BN backward (see bn_relu.h).
#include "bn_relu.h"
#include "common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace densenet_fast {

at::Tensor bn_backward_sums(at::Tensor centered_sums, const at::Tensor& rstd) {
  centered_sums[1].mul_(rstd.to(at::kDouble));
  return centered_sums.to(rstd.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> finish_coefficients(const at::Tensor& scale, const at::Tensor& rstd,
                                                       const at::Tensor& batch_means) {
  const auto minus_scale = scale.neg();
  return {minus_scale.mul(batch_means[0]).contiguous(), minus_scale.mul(rstd).mul(batch_means[1]).contiguous()};
}

void check_bn_relu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_rows(x, x, "bn_relu", "x");
  check_coefficients(x, {&scale, &shift}, "bn_relu");
  check_rows(out, x, "bn_relu", "out");
  check_shape(out, x.sym_sizes(), "bn_relu", "out");
}

void check_bn_relu_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                            const at::Tensor& grad_x) {
  const char* op = "bn_relu_backward_sums";
  check_rows(x, x, op, "x");
  check_coefficients(x, {&scale, &shift, &mean, &rstd}, op);
  for (const auto& [t, name] : {std::pair{&grad_z, "grad_z"}, std::pair{&grad_x, "grad_x"}}) {
    check_rows(*t, x, op, name);
    check_shape(*t, x.sym_sizes(), op, name);
  }
}

void check_bn_backward_finish(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                              const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x) {
  const char* op = "bn_backward_finish";
  check_rows(x, x, op, "x");
  check_coefficients(x, {&scale, &mean, &rstd}, op);
  TORCH_CHECK(batch_means.scalar_type() == stats_dtype(x) && batch_means.device() == x.device(), op,
              ": batch_means must be ", stats_dtype(x), " on ", x.device(), ", got ", batch_means.scalar_type(),
              " on ", batch_means.device());
  check_shape(batch_means, {2, x.sym_size(1)}, op, "batch_means");
  check_rows(grad_x, x, op, "grad_x");
  check_shape(grad_x, x.sym_sizes(), op, "grad_x");
}

namespace {

void bn_relu_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu(x, scale, shift, out);
}

at::Tensor bn_relu_backward_sums_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                                      const at::Tensor& grad_x) {
  check_bn_relu_backward(x, scale, shift, mean, rstd, grad_z, grad_x);
  return at::empty_symint({2, x.sym_size(1)}, x.options().dtype(stats_dtype(x)));
}

void bn_backward_finish_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                             const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x) {
  check_bn_backward_finish(x, scale, mean, rstd, batch_means, grad_x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift, Tensor(a!) out) -> ()", exact_strides());
  m.def("bn_relu_backward_sums(Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, Tensor grad_z, "
        "Tensor(a!) grad_x) -> Tensor", exact_strides());
  m.def("bn_backward_finish(Tensor x, Tensor scale, Tensor mean, Tensor rstd, Tensor batch_means, "
        "Tensor(a!) grad_x) -> ()", exact_strides());
}

TORCH_LIBRARY_IMPL(densenet_fast, Meta, m) {
  register_bn_relu_kernels(m, &bn_relu_meta, &bn_relu_backward_sums_meta, &bn_backward_finish_meta);
}

}  // namespace densenet_fast
