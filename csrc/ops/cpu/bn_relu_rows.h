// The BN-ReLU row loops of the CPU kernels: bn_relu_kernel.cpp runs them over
// rows, bn_relu_conv_kernel.cpp over the tiles it feeds to its GEMMs.  T is the
// data type, A = at::opmath_type<T> the type of the BN coefficients and of the
// arithmetic (float for bfloat16 and float16 data).  Each loop is compiled for several
// instruction sets (DENSENET_FAST_SIMD_CLONES, tiling.h).
#pragma once

#include "../bn_relu.h"
#include "../relu.h"
#include "tiling.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace densenet_fast::cpu {

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.const_data_ptr<T>();
}

template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

// Loads of data (T) into the arithmetic type A and stores back.  The bfloat16
// load and both 16-bit stores are c10's conversions written without a branch,
// bit for bit the same, so that GCC vectorises the loops (with c10::BFloat16's
// own they ran 15x slower than float32's); float16's load is c10's own, which
// GCC vectorises as it is.
template <typename A, typename T>
inline A load(T value) {
  return static_cast<A>(value);
}

template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 value) {
  return c10::bit_cast<float>(static_cast<uint32_t>(value.x) << 16);
}

template <typename T, typename A>
inline T store(A value) {
  return static_cast<T>(value);
}

template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float value) {
  const uint32_t bits = c10::bit_cast<uint32_t>(value);
  const uint32_t rounded = (bits + UINT32_C(0x7fff) + ((bits >> 16) & 1)) >> 16;
  const bool nan = (bits & UINT32_C(0x7fffffff)) > UINT32_C(0x7f800000);  // on the bits: safe under -ffast-math
  return c10::BFloat16(nan ? UINT16_C(0x7fc0) : static_cast<uint16_t>(rounded), c10::BFloat16::from_bits());
}

template <>
inline float load<float, c10::Half>(c10::Half value) {
  return static_cast<float>(value);  // c10's is branch-free: GCC vectorises it
}

// c10's fp16_ieee_from_fp32_value (round to nearest even; subnormals, overflow to
// Inf, NaN to 0x7e00) with its one branch as std::max.
template <>
inline c10::Half store<c10::Half, float>(float value) {
  const float scale_to_inf = c10::bit_cast<float>(UINT32_C(239) << 23);   // 2^112
  const float scale_to_zero = c10::bit_cast<float>(UINT32_C(17) << 23);   // 2^-110
  const uint32_t bits = c10::bit_cast<uint32_t>(value);
  const uint32_t shl1 = bits + bits;
  const uint32_t bias = std::max(shl1 & UINT32_C(0xff000000), UINT32_C(0x71000000));
  const float base = c10::bit_cast<float>((bias >> 1) + UINT32_C(0x07800000)) +
                     std::fabs(value) * scale_to_inf * scale_to_zero;
  const uint32_t base_bits = c10::bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((base_bits >> 13) & UINT32_C(0x7c00)) + (base_bits & UINT32_C(0x0fff));
  const uint32_t sign = (bits & UINT32_C(0x80000000)) >> 16;
  const uint32_t half = sign | (shl1 > UINT32_C(0xff000000) ? UINT32_C(0x7e00) : nonsign);  // NaN: 0x7e00
  return c10::Half(static_cast<uint16_t>(half), c10::Half::from_bits());
}

// z[r, c] = relu(x[r, c] * scale[c] + shift[c]) for `rows` rows (row strides ldx, ldz).
template <typename T, typename A>
DENSENET_FAST_SIMD_CLONES void bn_relu_rows(const T* x, int64_t ldx, const A* __restrict__ scale,
                                            const A* __restrict__ shift, int64_t rows, int64_t channels, T* z,
                                            int64_t ldz) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ x_row = x + r * ldx;
    T* __restrict__ z_row = z + r * ldz;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const A a = load<A>(x_row[c]) * scale[c] + shift[c];
      z_row[c] = store<T>(relu(a));
    }
  }
}

// Pass 1 of the BN-ReLU backward for `rows` rows: dA = relu_backward(factor * grad_z, a);
// adds dA and dA * (x - mean) into sums[0:C], sums[C:2C] and writes (or adds)
// scale * dA into grad_x.  grad_x may be grad_z itself (same strides).
template <typename T, typename A, bool kAccumulate>
DENSENET_FAST_SIMD_CLONES void bn_backward_rows(const T* x, int64_t ldx, const A* __restrict__ scale,
                                                const A* __restrict__ shift, const A* __restrict__ mean,
                                                const T* grad_z, int64_t ldg, A factor, int64_t rows,
                                                int64_t channels, A* __restrict__ sums, T* grad_x, int64_t ldgx) {
  A* __restrict__ sum_xhat = sums + channels;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ x_row = x + r * ldx;
    const T* g_row = grad_z + r * ldg;
    T* gx_row = grad_x + r * ldgx;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const A value = load<A>(x_row[c]);
      const A a = value * scale[c] + shift[c];
      const A grad_a = relu_backward(factor * load<A>(g_row[c]), a);
      sums[c] += grad_a;
      sum_xhat[c] += grad_a * (value - mean[c]);
      if constexpr (kAccumulate) {
        gx_row[c] = store<T>(load<A>(gx_row[c]) + scale[c] * grad_a);
      } else {
        gx_row[c] = store<T>(scale[c] * grad_a);
      }
    }
  }
}

// A chunk's pass 1 of a BN backward: its number, and the sums [sum dA, sum dA * (x - mean)]
// (2C, in A) of its current tile, which bn_backward_rows adds into (zeroed per tile by
// start_tile) and ChunkSums::add collects in float64.
template <typename A>
struct BackwardChunk {
  int64_t chunk;
  std::vector<A> tile_sums;

  BackwardChunk(int64_t chunk, int64_t channels) : chunk(chunk), tile_sums(2 * channels) {}

  void start_tile() { std::fill(tile_sums.begin(), tile_sums.end(), A(0)); }
};

// bn_backward_sums (../bn_relu.h) of the chunks' [sum dA, sum dA * (x - mean)].
inline at::Tensor total_bn_backward_sums(const ChunkSums& sums, const at::Tensor& rstd) {
  const std::vector<double> total = sums.total();
  auto centered_sums = at::empty({2, rstd.size(0)}, rstd.options().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), centered_sums.data_ptr<double>());
  return bn_backward_sums(centered_sums, rstd);
}

}  // namespace densenet_fast::cpu
