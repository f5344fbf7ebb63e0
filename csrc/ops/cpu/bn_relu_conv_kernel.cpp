// CPU kernels of the fused BatchNorm-ReLU-Conv1x1 ops (see ../bn_relu_conv.h).
//
// The rows (pixels) are split into tiles of up to 1024 rows, run in chunks
// (tiling.h).  For each tile the normalised input z = relu(x * scale + shift)
// is formed in a thread-local buffer of cache size (bn_relu_rows.h) and fed to
// ATen's BLAS (at::mm_out on tile views); z is never written whole.  Every chunk
// keeps its own float64 channel sums, added in chunk order, so results do not
// depend on the scheduling.  The weight gradient is a pass of its own
// (weight_gradient): column blocks of dW in parallel, each summing its rows in
// order, so it needs no per-chunk copies of dW.  BLAS calls run on the worker's
// thread alone (SingleThreadedBlas, tiling.h).
#include "../bn_relu_conv.h"
#include "../common.h"
#include "bn_relu_rows.h"
#include "tiling.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace densenet_fast {

namespace {

using namespace cpu;

constexpr int64_t kTileBytes = 512 * 1024;  // a tile of z or dZ (per thread; stays in L2)
constexpr int64_t kMinTileRows = 32;
constexpr int64_t kMaxTileRows = 1024;

// Rows per tile so that a tile of `channels` values of `element_size` bytes fills kTileBytes.
int64_t tile_rows(int64_t channels, int64_t element_size) {
  return std::clamp<int64_t>(kTileBytes / std::max<int64_t>(1, channels * element_size), kMinTileRows, kMaxTileRows);
}

// A chunk of pass 1 of a GEMM op's backward: BackwardChunk (bn_relu_rows.h) with
// the tile buffer for dZ (rows_per_tile, C) in x's dtype.
template <typename A>
struct GemmBackwardChunk : BackwardChunk<A> {
  at::Tensor grad_z;

  GemmBackwardChunk(int64_t chunk, int64_t rows_per_tile, const at::Tensor& x)
      : BackwardChunk<A>(chunk, x.size(-1)), grad_z(at::empty({rows_per_tile, x.size(-1)}, x.options())) {}
};

// Whether every value of the 16-bit float matrix m (row stride ld, channel
// stride 1 as the ops' checks require) is finite: no exponent of all ones (Inf,
// NaN) among its bits (exponent_mask: 0x7f80 for bfloat16, 0x7c00 for float16).
DENSENET_FAST_SIMD_CLONES bool all_finite(const uint16_t* m, int64_t rows, int64_t columns, int64_t ld,
                                          uint16_t exponent_mask) {
  uint16_t non_finite = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict__ row = m + r * ld;
#pragma omp simd reduction(| : non_finite)
    for (int64_t c = 0; c < columns; ++c) {
      non_finite |= static_cast<uint16_t>((row[c] & exponent_mask) == exponent_mask);
    }
  }
  return non_finite == 0;
}

// For bfloat16 and float16, ATen's gemm is oneDNN's, whose AMX and AVX512-FP16
// kernels (torch 2.14.1) can also make the row before a NaN or Inf row of `a`
// NaN (docs/cpp.md, "A NaN one row early").  Whether the 16-bit `product` of a
// and b holds NaN or Inf; the float32 product that replaces it then is made
// from float32 copies by MKL, as for float32 data (with autocast excluded: it
// would make it 16-bit again).
bool all_finite(const at::Tensor& product) {
  const auto type = product.scalar_type();
  return (type != at::kBFloat16 && type != at::kHalf) ||
         all_finite(static_cast<const uint16_t*>(product.const_data_ptr()), product.size(0), product.size(1),
                    product.stride(0), type == at::kHalf ? 0x7c00 : 0x7f80);
}

at::Tensor float32_product(const at::Tensor& a, const at::Tensor& b) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// out = a @ b through ATen's BLAS (out may be a strided view); a 16-bit product
// that is not all finite is made again in float32 and rounded into out.
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
  if (!all_finite(out)) {
    out.copy_(float32_product(a, b));
  }
}

// partial (K, C) += grad_out_tile.T @ z_tile: in place when partial has the data
// dtype; for 16-bit data (float partials) through a product in the data dtype,
// or, where that is not all finite, in float32 added as it is (a float16 tile
// product can overflow where the float sum of the tiles does not).
void add_weight_gradient(at::Tensor partial, const at::Tensor& grad_out_tile, const at::Tensor& z_tile) {
  if (partial.scalar_type() == z_tile.scalar_type()) {
    partial.addmm_(grad_out_tile.t(), z_tile);
    return;
  }
  const auto product = at::mm(grad_out_tile.t(), z_tile);
  partial.add_(all_finite(product) ? product : float32_product(grad_out_tile.t(), z_tile));
}

// ---- the weight gradient of both ops -----------------------------------------------------

constexpr int64_t kMaxBlockColumns = 256;        // columns of dW per work item
constexpr int64_t kPartialBytes = 4 * 1024 * 1024;  // per-row-group copies of dW, at most

// dW (K, C) = grad_rows.T @ z in the statistics dtype, z (R, C) being formed by
// make_z(tile, first_column, columns, z): the tile's rows of z's columns
// [first_column, first_column + columns), contiguous.
//
// Work items are (row group, column block): the rows are cut into G groups,
// G = kPartialBytes / (K * C * element size of the statistics dtype), clamped to
// [1, kMinChunks] and to at most one group per row tile, and dW's columns into
// blocks of at most kMaxBlockColumns.  An item walks its group's row tiles in
// order and adds into its group's copy of its columns of dW; the G copies are
// added in group order.  G and the blocks depend on the shapes only, so every
// element of dW is summed in the same order whatever the thread count (as
// everywhere in these kernels, every BLAS call runs single-threaded:
// SingleThreadedBlas in each worker, the calling thread's included).  A transition
// (K = C / 2) has G = 1 once C passes 1024 (724 for float64): dW itself, no
// copies (16 copies of a deep DenseNet's transition weight were a quarter of
// its training step's memory).
template <typename T, typename MakeZ>
at::Tensor weight_gradient(const at::Tensor& grad_rows, int64_t channels, const at::Tensor& x, const MakeZ& make_z) {
  const int64_t rows = grad_rows.size(0), out_channels = grad_rows.size(1);
  const auto stats = stats_dtype(x);
  const int64_t copy_bytes = out_channels * channels * static_cast<int64_t>(c10::elementSize(stats));
  const int64_t blocks = std::max<int64_t>(1, ceil_div(channels, kMaxBlockColumns));
  const int64_t block_columns = ceil_div(channels, blocks);
  const int64_t rows_per_tile = tile_rows(block_columns, sizeof(T));
  const int64_t groups = std::clamp<int64_t>(
      std::min(kPartialBytes / std::max<int64_t>(1, copy_bytes), ceil_div(rows, rows_per_tile)), 1, kMinChunks);
  auto partials = at::zeros({groups, out_channels, channels}, x.options().dtype(stats));
  at::parallel_for(0, groups * blocks, 1, [&](int64_t item_begin, int64_t item_end) {
    at::AutoDispatchBelowADInplaceOrView guard;  // thread-local: set in each worker
    SingleThreadedBlas single_threaded_blas;
    auto z = at::empty({rows_per_tile * block_columns}, x.options());
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t group = item / blocks, first_column = item % blocks * block_columns;
      const int64_t columns = std::min(block_columns, channels - first_column);
      const int64_t row_end = rows * (group + 1) / groups;
      auto partial = partials[group].narrow(1, first_column, columns);
      for (int64_t begin = rows * group / groups; begin < row_end; begin += rows_per_tile) {
        const Tile tile{begin, std::min(rows_per_tile, row_end - begin)};
        auto z_tile = z.narrow(0, 0, tile.size * columns).view({tile.size, columns});
        make_z(tile, first_column, columns, mutable_ptr<T>(z_tile));
        add_weight_gradient(partial, grad_rows.narrow(0, tile.begin, tile.size), z_tile);
      }
    }
  });
  return groups == 1 ? partials[0] : partials.sum(0);
}

// ---- bn_relu_conv1x1 ---------------------------------------------------------------------

template <typename T>
std::tuple<at::Tensor, at::Tensor> bn_relu_conv1x1_typed(const at::Tensor& x, const at::Tensor& scale,
                                                         const at::Tensor& shift, const at::Tensor& weight,
                                                         const at::Tensor& out, bool with_stats) {
  using A = at::opmath_type<T>;
  const int64_t rows = x.size(0), channels = x.size(1), out_channels = weight.size(0);
  const int64_t rows_per_tile = tile_rows(channels, sizeof(T));
  const int64_t chunks = chunks_for(rows, rows_per_tile);
  const auto weight_t = weight.t();
  Moments moments(with_stats ? chunks : 0, out_channels);
  struct State {
    int64_t chunk;
    at::Tensor z;
    std::vector<double> tile_mean, tile_m2;
  };
  for_each_tile(
      rows, rows_per_tile, chunks,
      [&](int64_t chunk) {
        return State{chunk, at::empty({rows_per_tile, channels}, x.options()), std::vector<double>(out_channels),
                     std::vector<double>(out_channels)};
      },
      [&](State& s, Tile tile) {
        bn_relu_rows(ptr<T>(x) + tile.begin * x.stride(0), x.stride(0), ptr<A>(scale), ptr<A>(shift), tile.size,
                     channels, mutable_ptr<T>(s.z), channels);
        auto out_tile = out.narrow(0, tile.begin, tile.size);
        mm_into(out_tile, s.z.narrow(0, 0, tile.size), weight_t);
        if (with_stats) {
          moments.add(s.chunk, ptr<T>(out_tile), out.stride(0), tile.size, s.tile_mean, s.tile_m2);
        }
      });
  if (!with_stats) {
    const auto empty = at::empty({0}, scale.options());
    return {empty, empty.clone()};
  }
  return moments.result(scale.options());
}

std::tuple<at::Tensor, at::Tensor> bn_relu_conv1x1_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                       const at::Tensor& shift, const at::Tensor& weight,
                                                       const at::Tensor& out, bool with_stats) {
  check_bn_relu_conv(BnReluConvOp::kConv1x1, x, scale, shift, weight, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_conv1x1_cpu", [&] {
    return bn_relu_conv1x1_typed<scalar_t>(x, scale.contiguous(), shift.contiguous(), weight, out, with_stats);
  });
}

// ---- bn_relu_conv1x1_backward_sums -------------------------------------------------------

template <typename T>
std::tuple<at::Tensor, at::Tensor> bn_relu_conv1x1_backward_typed(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x) {
  using A = at::opmath_type<T>;
  const int64_t rows = x.size(0), channels = x.size(1);
  const int64_t rows_per_tile = tile_rows(channels, sizeof(T));
  const int64_t chunks = chunks_for(rows, rows_per_tile);
  ChunkSums sums(chunks, 2 * channels);
  for_each_tile(
      rows, rows_per_tile, chunks, [&](int64_t chunk) { return GemmBackwardChunk<A>(chunk, rows_per_tile, x); },
      [&](GemmBackwardChunk<A>& s, Tile tile) {
        mm_into(s.grad_z.narrow(0, 0, tile.size), grad_out.narrow(0, tile.begin, tile.size), weight);
        s.start_tile();
        bn_backward_rows<T, A, true>(ptr<T>(x) + tile.begin * x.stride(0), x.stride(0), ptr<A>(scale), ptr<A>(shift),
                                     ptr<A>(mean), ptr<T>(s.grad_z), channels, A(1), tile.size, channels,
                                     s.tile_sums.data(), mutable_ptr<T>(grad_x) + tile.begin * grad_x.stride(0),
                                     grad_x.stride(0));
        sums.add(s.chunk, s.tile_sums);
      });
  const auto z_columns = [&](Tile tile, int64_t first, int64_t columns, T* z) {
    bn_relu_rows(ptr<T>(x) + tile.begin * x.stride(0) + first, x.stride(0), ptr<A>(scale) + first,
                 ptr<A>(shift) + first, tile.size, columns, z, columns);
  };
  const auto grad_weight = weight_gradient<T>(grad_out, channels, x, z_columns);
  return {grad_weight.to(weight.scalar_type()), total_bn_backward_sums(sums, rstd)};
}

// ---- transition --------------------------------------------------------------------------

// Average pooling by 2 along each spatial dimension of t (N, *spatial, C), 1 to 3
// of them, seen as (N, D, H, W, C): the missing leading dimensions have size 1
// and are not pooled.  A window holds 2, 4 or 8 pixels.
struct Pooling {
  static constexpr int kDims = 3;  // D, H, W
  int64_t stride_n;
  std::array<int64_t, kDims> sizes, strides, factors, pooled;  // factors: 2 where pooled, else 1
  int window;                                                     // pixels per window
  std::array<int64_t, 8> offsets;  // of a window's pixels from its first one, W fastest

  explicit Pooling(const at::Tensor& t) : stride_n(t.stride(0)), window(1) {
    const int64_t spatial = t.dim() - 2;
    for (int64_t d = 0; d < kDims; ++d) {
      const int64_t dim = d - (kDims - spatial) + 1;  // t's dimension, < 1 where inserted
      const bool real = dim >= 1;
      sizes[d] = real ? t.size(dim) : 1;
      strides[d] = real ? t.stride(dim) : 0;
      factors[d] = real ? 2 : 1;
      pooled[d] = sizes[d] / factors[d];
      window *= factors[d];
    }
    int i = 0;
    for (int64_t d = 0; d < factors[0]; ++d) {
      for (int64_t h = 0; h < factors[1]; ++h) {
        for (int64_t w = 0; w < factors[2]; ++w) {
          offsets[i++] = d * strides[0] + h * strides[1] + w * strides[2];
        }
      }
    }
  }

  int64_t pooled_pixels_per_image() const { return pooled[0] * pooled[1] * pooled[2]; }

  // Offset of the first pixel of the window of pooled pixel p.
  int64_t offset(int64_t p) const {
    const int64_t n = p / pooled_pixels_per_image();
    const int64_t i = p / (pooled[1] * pooled[2]) % pooled[0];
    const int64_t j = p / pooled[2] % pooled[1];
    const int64_t k = p % pooled[2];
    return n * stride_n + factors[0] * i * strides[0] + factors[1] * j * strides[1] + factors[2] * k * strides[2];
  }

  // Extent along dimension d that the windows cover (an odd size drops its last pixel).
  int64_t covered(int64_t d) const { return pooled[d] * factors[d]; }
};

// Returns f(std::integral_constant<int, window>) for the window sizes the kernels are compiled for.
template <typename F>
auto with_window(int window, const F& f) {
  switch (window) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// The rows view (N * prod(spatial / 2), K) of a pooled tensor whose pixels have one row stride.
at::Tensor pooled_rows(const at::Tensor& t) {
  return t.view({c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1), t.size(-1)});
}

// z[c] = mean of relu(x * scale + shift) over the kWindow pixels at first + offsets[i].
template <typename T, typename A, int kWindow>
DENSENET_FAST_SIMD_CLONES void window_bn_relu_mean(const T* __restrict__ first, const int64_t* offsets,
                                                   const A* __restrict__ scale, const A* __restrict__ shift,
                                                   int64_t channels, T* __restrict__ z) {
  int64_t o[kWindow];
  for (int i = 0; i < kWindow; ++i) {
    o[i] = offsets[i];
  }
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    A sum = relu(load<A>(first[c]) * scale[c] + shift[c]);
    for (int i = 1; i < kWindow; ++i) {
      sum += relu(load<A>(first[o[i] + c]) * scale[c] + shift[c]);
    }
    z[c] = store<T>(A(1.0 / kWindow) * sum);
  }
}

// Pooled z rows: z[r] = mean of relu(x * scale + shift) over the window of pooled pixel
// begin + r, for `columns` channels from `first` (scale and shift start there too).
template <typename T, typename A, int kWindow>
void pooled_bn_relu(const at::Tensor& x, const Pooling& pooling, const A* scale, const A* shift, Tile tile,
                    int64_t first, int64_t columns, T* z) {
  for (int64_t r = 0; r < tile.size; ++r) {
    window_bn_relu_mean<T, A, kWindow>(ptr<T>(x) + pooling.offset(tile.begin + r) + first, pooling.offsets.data(),
                                       scale, shift, columns, z + r * columns);
  }
}

template <typename T, int kWindow>
void transition_typed(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                      const at::Tensor& out) {
  using A = at::opmath_type<T>;
  const int64_t channels = x.size(-1);
  const auto out_rows = pooled_rows(out);
  const Pooling pooling(x);
  const int64_t rows_per_tile = tile_rows(channels, sizeof(T));
  const auto weight_t = weight.t();
  struct State {
    at::Tensor z;
  };
  for_each_tile(
      out_rows.size(0), rows_per_tile, chunks_for(out_rows.size(0), rows_per_tile),
      [&](int64_t) { return State{at::empty({rows_per_tile, channels}, x.options())}; },
      [&](State& s, Tile tile) {
        pooled_bn_relu<T, A, kWindow>(x, pooling, ptr<A>(scale), ptr<A>(shift), tile, 0, channels, mutable_ptr<T>(s.z));
        auto out_tile = out_rows.narrow(0, tile.begin, tile.size);
        mm_into(out_tile, s.z.narrow(0, 0, tile.size), weight_t);
      });
}

void transition_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                    const at::Tensor& out) {
  check_bn_relu_conv(BnReluConvOp::kTransition, x, scale, shift, weight, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "transition_cpu", [&] {
    with_window(Pooling(x).window, [&](auto window) {
      transition_typed<scalar_t, decltype(window)::value>(x, scale.contiguous(), shift.contiguous(), weight, out);
    });
  });
}

// Pass 1 at the pixels that floor pooling drops (the last pixel along each odd
// spatial dimension): dA = 0, so grad_x = scale * 0 and `sums` add 0 and
// 0 * (x - mean), as in torch's BN backward (not 0 where x or a coefficient is not finite).
template <typename T, typename A>
void dropped_pixels_backward(const at::Tensor& x, const A* scale, const A* shift, const A* mean,
                             const at::Tensor& grad_x, std::vector<A>& sums) {
  const Pooling in(x), grad(grad_x);
  const int64_t channels = x.size(-1);
  const std::vector<T> zero_grad(channels, T(0));
  // A run of `pixels` pixels from (n, d, h, w), `step` (a spatial dimension, 0 to 2) apart.
  const auto backward = [&](int64_t n, int64_t d, int64_t h, int64_t w, int64_t pixels, int step) {
    const auto position = [&](const Pooling& p) {
      return n * p.stride_n + d * p.strides[0] + h * p.strides[1] + w * p.strides[2];
    };
    bn_backward_rows<T, A, false>(ptr<T>(x) + position(in), in.strides[step], scale, shift, mean, zero_grad.data(),
                                  0, A(0), pixels, channels, sums.data(), mutable_ptr<T>(grad_x) + position(grad),
                                  grad.strides[step]);
  };
  const int64_t depth = in.sizes[0], height = in.sizes[1], width = in.sizes[2];
  for (int64_t n = 0; n < x.size(0); ++n) {
    if (in.covered(0) < depth) {  // the last plane
      for (int64_t h = 0; h < height; ++h) {
        backward(n, depth - 1, h, 0, width, 2);
      }
    }
    for (int64_t d = 0; d < in.covered(0); ++d) {
      if (in.covered(1) < height) {  // the last row of the plane
        backward(n, d, height - 1, 0, width, 2);
      }
      if (in.covered(2) < width) {  // the last column above it
        backward(n, d, 0, width - 1, in.covered(1), 1);
      }
    }
  }
}

template <typename T, int kWindow>
std::tuple<at::Tensor, at::Tensor> transition_backward_typed(const at::Tensor& x, const at::Tensor& scale,
                                                             const at::Tensor& shift, const at::Tensor& mean,
                                                             const at::Tensor& rstd, const at::Tensor& weight,
                                                             const at::Tensor& grad_out, const at::Tensor& grad_x) {
  using A = at::opmath_type<T>;
  const int64_t channels = x.size(-1);
  const Pooling pooling(x), grad_pooling(grad_x);
  const auto grad_rows = pooled_rows(grad_out);
  const int64_t pooled = grad_rows.size(0);
  const int64_t rows_per_tile = tile_rows(channels, sizeof(T));
  const int64_t chunks = chunks_for(pooled, rows_per_tile);
  ChunkSums sums(chunks + 1, 2 * channels);  // the last: the pixels that pooling drops
  for_each_tile(
      pooled, rows_per_tile, chunks, [&](int64_t chunk) { return GemmBackwardChunk<A>(chunk, rows_per_tile, x); },
      [&](GemmBackwardChunk<A>& s, Tile tile) {
        mm_into(s.grad_z.narrow(0, 0, tile.size), grad_rows.narrow(0, tile.begin, tile.size), weight);
        s.start_tile();
        for (int64_t r = 0; r < tile.size; ++r) {
          const T* x_first = ptr<T>(x) + pooling.offset(tile.begin + r);
          T* grad_first = grad_x.data_ptr<T>() + grad_pooling.offset(tile.begin + r);
          const T* grad_pooled = ptr<T>(s.grad_z) + r * channels;
          // The window as pairs of pixels along W, each as 2 rows (row stride: the W stride) that
          // share the pooled gradient (its row stride 0).
          for (int pair = 0; pair < kWindow; pair += 2) {
            bn_backward_rows<T, A, false>(x_first + pooling.offsets[pair], pooling.strides[2], ptr<A>(scale),
                                          ptr<A>(shift), ptr<A>(mean), grad_pooled, 0, A(1.0 / kWindow), 2,
                                          channels, s.tile_sums.data(), grad_first + grad_pooling.offsets[pair],
                                          grad_pooling.strides[2]);
          }
        }
        sums.add(s.chunk, s.tile_sums);
      });
  std::vector<A> dropped_sums(2 * channels, A(0));
  dropped_pixels_backward<T, A>(x, ptr<A>(scale), ptr<A>(shift), ptr<A>(mean), grad_x, dropped_sums);
  sums.add(chunks, dropped_sums);
  const auto z_columns = [&](Tile tile, int64_t first, int64_t columns, T* z) {
    pooled_bn_relu<T, A, kWindow>(x, pooling, ptr<A>(scale) + first, ptr<A>(shift) + first, tile, first, columns, z);
  };
  const auto grad_weight = weight_gradient<T>(grad_rows, channels, x, z_columns);
  return {grad_weight.to(weight.scalar_type()), total_bn_backward_sums(sums, rstd)};
}

// ---- pass 1 of the backward of both ops -------------------------------------------------

// The CPU kernel of bn_relu_conv1x1_backward_sums (kConv1x1) and of
// transition_backward_sums (kTransition).
template <BnReluConvOp kOp>
std::tuple<at::Tensor, at::Tensor> backward_sums_cpu(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& grad_out, const at::Tensor& grad_x) {
  check_bn_relu_conv_backward(kOp, x, scale, shift, mean, rstd, weight, grad_out, grad_x);
  at::AutoDispatchBelowADInplaceOrView guard;
  constexpr bool kConv1x1 = kOp == BnReluConvOp::kConv1x1;
  constexpr const char* name = kConv1x1 ? "bn_relu_conv1x1_backward_sums_cpu" : "transition_backward_sums_cpu";
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), name, [&] {
    const auto scale_c = scale.contiguous(), shift_c = shift.contiguous(), mean_c = mean.contiguous();
    if constexpr (kConv1x1) {
      return bn_relu_conv1x1_backward_typed<scalar_t>(x, scale_c, shift_c, mean_c, rstd, weight, grad_out, grad_x);
    } else {
      return with_window(Pooling(x).window, [&](auto window) {
        return transition_backward_typed<scalar_t, decltype(window)::value>(x, scale_c, shift_c, mean_c, rstd,
                                                                            weight, grad_out, grad_x);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  register_bn_relu_conv_kernels(m, &bn_relu_conv1x1_cpu, &backward_sums_cpu<BnReluConvOp::kConv1x1>, &transition_cpu,
                                &backward_sums_cpu<BnReluConvOp::kTransition>);
}

}  // namespace densenet_fast
