// Schemas, argument checks and Meta (shape-only) kernels of the fused
// BatchNorm-ReLU ops (see fused_bn.h).
#include "fused_bn.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace densenet_fast {

at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor bn_backward_sums(at::Tensor centered_sums, const at::Tensor& rstd) {
  centered_sums[1].mul_(rstd.to(at::kDouble));
  return centered_sums.to(rstd.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> finish_coefficients(const at::Tensor& scale, const at::Tensor& rstd,
                                                       const at::Tensor& batch_means) {
  return {(-scale * batch_means[0]).contiguous(), (-scale * rstd * batch_means[1]).contiguous()};
}

namespace {

void check_data(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16, op,
              ": unsupported dtype ", t.scalar_type(), " of ", name, "; expected float32, float64 or bfloat16");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name, " must be ",
              x.scalar_type(), " on ", x.device(), " like x, got ", t.scalar_type(), " on ", t.device());
}

// (rows, channels) with channel stride 1 and rows that do not overlap.
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, channels), got shape ", t.sym_sizes());
  TORCH_CHECK(t.sym_size(1) <= 1 || t.sym_stride(1) == 1, op, ": ", name,
              " must have channel stride 1 (a channel range of a channels-last buffer), got strides ",
              t.sym_strides());
  TORCH_CHECK(t.sym_size(0) <= 1 || t.sym_stride(0) >= t.sym_size(1), op, ": ", name,
              " rows must not overlap (row stride >= channels), got shape ", t.sym_sizes(), " and strides ",
              t.sym_strides());
  check_data(t, x, op, name);
}

// (N, *spatial, C) with 1 to 3 spatial dimensions and channel stride 1.
void check_pixels(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 3 && t.dim() <= 5, op, ": ", name,
              " must be (N, *spatial, C) with 1 to 3 spatial dimensions (N, L, C), (N, H, W, C) or (N, D, H, W, C), "
              "got shape ", t.sym_sizes());
  TORCH_CHECK(x.dim() == t.dim(), op, ": ", name, " must have as many spatial dimensions as x ", x.sym_sizes(),
              ", got shape ", t.sym_sizes());
  TORCH_CHECK(t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1, op, ": ", name,
              " must have channel stride 1 (channels-last), got strides ", t.sym_strides());
  check_data(t, x, op, name);
}

// (N, *spatial, K) whose pixels are rows of one stride (N and the spatial dimensions merge into one).
void check_pixel_rows(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_pixels(t, x, op, name);
  const int64_t channel_dim = t.dim() - 1;
  c10::SymInt row_stride = t.sym_stride(channel_dim - 1);
  bool mergeable = t.sym_size(channel_dim) <= 1 || t.sym_numel() == 0 || row_stride >= t.sym_size(channel_dim);
  for (int64_t d = channel_dim - 1; d >= 0; --d) {
    if (t.sym_size(d) != 1) {
      mergeable = mergeable && t.sym_stride(d) == row_stride;
      row_stride = row_stride * t.sym_size(d);
    }
  }
  TORCH_CHECK(mergeable, op, ": ", name, " must be rows of one stride (N and the spatial dimensions mergeable), "
              "got shape ", t.sym_sizes(), " and strides ", t.sym_strides());
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

void check_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_data(weight, x, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.sym_size(1) == x.sym_size(-1), op, ": weight must be (K, ",
              x.sym_size(-1), "), got ", weight.sym_sizes());
  TORCH_CHECK(weight.sym_size(1) <= 1 || weight.sym_stride(1) == 1, op, ": weight must have stride 1 along C, got ",
              weight.sym_strides());
}

// (N, *spatial // 2, channels) for x (N, *spatial, C).
std::vector<c10::SymInt> pooled_shape(const at::Tensor& x, const c10::SymInt& channels) {
  std::vector<c10::SymInt> shape{x.sym_size(0)};
  for (int64_t d = 1; d < x.dim() - 1; ++d) {
    shape.push_back(x.sym_size(d) / 2);
  }
  shape.push_back(channels);
  return shape;
}

}  // namespace

void check_bn_relu_conv1x1(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& weight, const at::Tensor& out) {
  const char* op = "bn_relu_conv1x1";
  check_rows(x, x, op, "x");
  check_coefficients(x, {&scale, &shift}, op);
  check_weight(x, weight, op);
  check_rows(out, x, op, "out");
  check_shape(out, {x.sym_size(0), weight.sym_size(0)}, op, "out");
}

void check_bn_relu_conv1x1_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                                    const at::Tensor& grad_out, const at::Tensor& grad_x) {
  const char* op = "bn_relu_conv1x1_backward_sums";
  check_rows(x, x, op, "x");
  check_coefficients(x, {&scale, &shift, &mean, &rstd}, op);
  check_weight(x, weight, op);
  check_rows(grad_out, x, op, "grad_out");
  check_shape(grad_out, {x.sym_size(0), weight.sym_size(0)}, op, "grad_out");
  check_rows(grad_x, x, op, "grad_x");
  check_shape(grad_x, x.sym_sizes(), op, "grad_x");
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

void check_transition(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const at::Tensor& weight, const at::Tensor& out) {
  const char* op = "transition";
  check_pixels(x, x, op, "x");
  check_coefficients(x, {&scale, &shift}, op);
  check_weight(x, weight, op);
  check_pixel_rows(out, x, op, "out");
  check_shape(out, pooled_shape(x, weight.sym_size(0)), op, "out");
}

void check_transition_backward(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                               const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                               const at::Tensor& grad_out, const at::Tensor& grad_x) {
  const char* op = "transition_backward_sums";
  check_pixels(x, x, op, "x");
  check_coefficients(x, {&scale, &shift, &mean, &rstd}, op);
  check_weight(x, weight, op);
  check_pixel_rows(grad_out, x, op, "grad_out");
  check_shape(grad_out, pooled_shape(x, weight.sym_size(0)), op, "grad_out");
  check_pixels(grad_x, x, op, "grad_x");
  check_shape(grad_x, x.sym_sizes(), op, "grad_x");
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

std::tuple<at::Tensor, at::Tensor> bn_relu_conv1x1_meta(const at::Tensor& x, const at::Tensor& scale,
                                                        const at::Tensor& shift, const at::Tensor& weight,
                                                        const at::Tensor& out, bool with_stats) {
  check_bn_relu_conv1x1(x, scale, shift, weight, out);
  const auto options = x.options().dtype(stats_dtype(x));
  const auto k = with_stats ? weight.sym_size(0) : c10::SymInt(0);
  return {at::empty_symint({k}, options), at::empty_symint({k}, options)};
}

std::tuple<at::Tensor, at::Tensor> bn_relu_conv1x1_backward_sums_meta(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x) {
  check_bn_relu_conv1x1_backward(x, scale, shift, mean, rstd, weight, grad_out, grad_x);
  return {at::empty_symint(weight.sym_sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty_symint({2, x.sym_size(1)}, x.options().dtype(stats_dtype(x)))};
}

void bn_relu_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu(x, scale, shift, out);
}

at::Tensor bn_relu_backward_sums_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                      const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_z,
                                      const at::Tensor& grad_x) {
  check_bn_relu_backward(x, scale, shift, mean, rstd, grad_z, grad_x);
  return at::empty_symint({2, x.sym_size(1)}, x.options().dtype(stats_dtype(x)));
}

void transition_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                     const at::Tensor& out) {
  check_transition(x, scale, shift, weight, out);
}

std::tuple<at::Tensor, at::Tensor> transition_backward_sums_meta(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x) {
  check_transition_backward(x, scale, shift, mean, rstd, weight, grad_out, grad_x);
  return {at::empty_symint(weight.sym_sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty_symint({2, x.sym_size(-1)}, x.options().dtype(stats_dtype(x)))};
}

void bn_backward_finish_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                             const at::Tensor& rstd, const at::Tensor& batch_means, const at::Tensor& grad_x) {
  check_bn_backward_finish(x, scale, mean, rstd, batch_means, grad_x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  // Inductor must hand the ops tensors with the strides they were traced with (channel ranges of
  // channels-last buffers), not a layout of its choosing.
  const std::vector<at::Tag> exact_strides{at::Tag::needs_exact_strides};
  m.def("bn_relu_conv1x1(Tensor x, Tensor scale, Tensor shift, Tensor weight, Tensor(a!) out, bool with_stats)"
        " -> (Tensor, Tensor)", exact_strides);
  m.def("bn_relu_conv1x1_backward_sums(Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, "
        "Tensor weight, Tensor grad_out, Tensor(a!) grad_x) -> (Tensor, Tensor)", exact_strides);
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift, Tensor(a!) out) -> ()", exact_strides);
  m.def("bn_relu_backward_sums(Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, Tensor grad_z, "
        "Tensor(a!) grad_x) -> Tensor", exact_strides);
  m.def("transition(Tensor x, Tensor scale, Tensor shift, Tensor weight, Tensor(a!) out) -> ()", exact_strides);
  m.def("transition_backward_sums(Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, Tensor weight, "
        "Tensor grad_out, Tensor(a!) grad_x) -> (Tensor, Tensor)", exact_strides);
  m.def("bn_backward_finish(Tensor x, Tensor scale, Tensor mean, Tensor rstd, Tensor batch_means, "
        "Tensor(a!) grad_x) -> ()", exact_strides);
}

TORCH_LIBRARY_IMPL(densenet_fast, Meta, m) {
  m.impl("bn_relu_conv1x1", &bn_relu_conv1x1_meta);
  m.impl("bn_relu_conv1x1_backward_sums", &bn_relu_conv1x1_backward_sums_meta);
  m.impl("bn_relu", &bn_relu_meta);
  m.impl("bn_relu_backward_sums", &bn_relu_backward_sums_meta);
  m.impl("transition", &transition_meta);
  m.impl("transition_backward_sums", &transition_backward_sums_meta);
  m.impl("bn_backward_finish", &bn_backward_finish_meta);
}

}  // namespace densenet_fast
