// Schemas, argument checks and Meta (shape-only) kernels of the fused
// BatchNorm-ReLU-Conv1x1 ops (see bn_relu_conv.h).
#include "bn_relu_conv.h"
#include "common.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace densenet_fast {

namespace {

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
  // N and the spatial dimensions merge into rows as view() merges them: each dimension of more than one
  // element steps over the ones inside it, the innermost over the channels; a dimension of size 1 takes no
  // step, so its stride can be anything (a 1x1 output's gradient)
  const int64_t channel_dim = t.dim() - 1;
  bool mergeable = true;
  bool inner_seen = false;
  c10::SymInt step_over = t.sym_size(channel_dim);  // the least stride of the innermost row dimension
  for (int64_t d = channel_dim - 1; d >= 0; --d) {
    if (t.sym_size(d) == 1) {
      continue;
    }
    mergeable = mergeable && (inner_seen ? t.sym_stride(d) == step_over
                                         : t.sym_size(channel_dim) <= 1 || t.sym_stride(d) >= step_over);
    inner_seen = true;
    step_over = t.sym_stride(d) * t.sym_size(d);
  }
  TORCH_CHECK(mergeable || t.sym_numel() == 0, op, ": ", name, " must be rows of one stride (N and the spatial "
              "dimensions mergeable), got shape ", t.sym_sizes(), " and strides ", t.sym_strides());
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

// (M, channels) for x (M, C).
std::vector<c10::SymInt> rows_shape(const at::Tensor& x, const c10::SymInt& channels) {
  return {x.sym_size(0), channels};
}

using LayoutCheck = void (*)(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name);

// What tells the two ops apart: their names and the layouts of their tensors.
struct Layout {
  const char* op;        // the forward op
  const char* backward;  // pass 1 of its backward
  LayoutCheck check_input;   // of x and grad_x
  LayoutCheck check_output;  // of out and grad_out
  std::vector<c10::SymInt> (*output_shape)(const at::Tensor& x, const c10::SymInt& out_channels);
};

const Layout& layout(BnReluConvOp op) {
  static const Layout conv1x1{"bn_relu_conv1x1", "bn_relu_conv1x1_backward_sums", &check_rows, &check_rows,
                              &rows_shape};
  static const Layout transition{"transition", "transition_backward_sums", &check_pixels, &check_pixel_rows,
                                 &pooled_shape};
  return op == BnReluConvOp::kConv1x1 ? conv1x1 : transition;
}

// The arguments the forward and pass 1 of the backward share (for op `name`): x, BN
// `coefficients`, weight, and `out` (the output, or its gradient).
void check_shared_args(const Layout& layout, const char* name, const at::Tensor& x,
                       std::initializer_list<const at::Tensor*> coefficients, const at::Tensor& weight,
                       const at::Tensor& out, const char* out_name) {
  layout.check_input(x, x, name, "x");
  check_coefficients(x, coefficients, name);
  check_weight(x, weight, name);
  layout.check_output(out, x, name, out_name);
  check_shape(out, layout.output_shape(x, weight.sym_size(0)), name, out_name);
}

}  // namespace

void check_bn_relu_conv(BnReluConvOp op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                        const at::Tensor& weight, const at::Tensor& out) {
  check_shared_args(layout(op), layout(op).op, x, {&scale, &shift}, weight, out, "out");
}

void check_bn_relu_conv_backward(BnReluConvOp op, const at::Tensor& x, const at::Tensor& scale,
                                 const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x) {
  const Layout& l = layout(op);
  check_shared_args(l, l.backward, x, {&scale, &shift, &mean, &rstd}, weight, grad_out, "grad_out");
  l.check_input(grad_x, x, l.backward, "grad_x");
  check_shape(grad_x, x.sym_sizes(), l.backward, "grad_x");
}

namespace {

std::tuple<at::Tensor, at::Tensor> bn_relu_conv1x1_meta(const at::Tensor& x, const at::Tensor& scale,
                                                        const at::Tensor& shift, const at::Tensor& weight,
                                                        const at::Tensor& out, bool with_stats) {
  check_bn_relu_conv(BnReluConvOp::kConv1x1, x, scale, shift, weight, out);
  const auto options = x.options().dtype(stats_dtype(x));
  const auto k = with_stats ? weight.sym_size(0) : c10::SymInt(0);
  return {at::empty_symint({k}, options), at::empty_symint({k}, options)};
}

void transition_meta(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                     const at::Tensor& out) {
  check_bn_relu_conv(BnReluConvOp::kTransition, x, scale, shift, weight, out);
}

// Pass 1 of the backward: grad_weight like weight (contiguous) and the sums (2, C) in
// the statistics dtype.
template <BnReluConvOp kOp>
std::tuple<at::Tensor, at::Tensor> backward_sums_meta(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x) {
  check_bn_relu_conv_backward(kOp, x, scale, shift, mean, rstd, weight, grad_out, grad_x);
  return {at::empty_symint(weight.sym_sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty_symint({2, x.sym_size(-1)}, x.options().dtype(stats_dtype(x)))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("bn_relu_conv1x1(Tensor x, Tensor scale, Tensor shift, Tensor weight, Tensor(a!) out, bool with_stats)"
        " -> (Tensor, Tensor)", exact_strides());
  m.def("bn_relu_conv1x1_backward_sums(Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, "
        "Tensor weight, Tensor grad_out, Tensor(a!) grad_x) -> (Tensor, Tensor)", exact_strides());
  m.def("transition(Tensor x, Tensor scale, Tensor shift, Tensor weight, Tensor(a!) out) -> ()", exact_strides());
  m.def("transition_backward_sums(Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, Tensor weight, "
        "Tensor grad_out, Tensor(a!) grad_x) -> (Tensor, Tensor)", exact_strides());
}

TORCH_LIBRARY_IMPL(densenet_fast, Meta, m) {
  register_bn_relu_conv_kernels(m, &bn_relu_conv1x1_meta, &backward_sums_meta<BnReluConvOp::kConv1x1>,
                                &transition_meta, &backward_sums_meta<BnReluConvOp::kTransition>);
}

}  // namespace densenet_fast
