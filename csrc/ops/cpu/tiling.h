// Row tiling and per-chunk partial results, shared by the CPU kernels.
//
// An op's rows (pixels) are cut into tiles, and the tiles into a fixed number
// of contiguous chunks run by at::parallel_for.  Every chunk keeps its own
// partial results (float64 sums, moments) and the partials are added in chunk
// order, so results do not depend on the scheduling, nor, up to kMinChunks
// threads, on the thread count.  (The weight gradient has its own split:
// weight_gradient in bn_relu_conv_kernel.cpp.)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__GNUC__)
// MKL's thread-local thread count (C interface; absent where torch has no MKL,
// so weak: then null).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace densenet_fast::cpu {

// Makes the BLAS calls of this thread single-threaded while it lives.  Each
// at::parallel_for worker of these kernels runs its BLAS calls alone: ATen
// turns MKL's dynamic threading off, so MKL would start threads of its own
// inside a worker (or in the calling thread when an op has one work item), and
// its summation order, so the result's last bits, would depend on the thread
// count (seen with MKL 2024.2 on AVX-512: dW differed between 1 and 2 threads).
class SingleThreadedBlas {
 public:
#if defined(__GNUC__)
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) {
      MKL_Set_Num_Threads_Local(previous_);
    }
  }
#endif
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

// The elementwise loops of the CPU kernels are compiled for AVX-512, AVX2 and
// baseline x86-64 and chosen at load time (GCC function multi-versioning): the
// extension is built without -march flags.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DENSENET_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DENSENET_FAST_SIMD_CLONES
#endif

constexpr int64_t kMinChunks = 16;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Rows [begin, begin + size) of a tile.
struct Tile {
  int64_t begin;
  int64_t size;
};

// At least kMinChunks chunks (or one per thread), at most one per tile.
inline int64_t chunks_for(int64_t rows, int64_t rows_per_tile) {
  const int64_t tiles = ceil_div(rows, rows_per_tile);
  return std::max<int64_t>(1, std::min(tiles, std::max<int64_t>(kMinChunks, at::get_num_threads())));
}

// Splits `rows` into tiles of `rows_per_tile` rows and the tiles into `chunks`
// contiguous chunks, run in parallel: state = start(chunk), then fn(state, tile)
// for each tile of the chunk in order.
template <typename Start, typename F>
void for_each_tile(int64_t rows, int64_t rows_per_tile, int64_t chunks, const Start& start, const F& fn) {
  const int64_t tiles = ceil_div(rows, rows_per_tile);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    // The tiles' ATen calls skip autograd and run their BLAS on this thread (both thread-local:
    // set in each worker).
    at::AutoDispatchBelowADInplaceOrView guard;
    SingleThreadedBlas single_threaded_blas;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      auto state = start(chunk);
      for (int64_t t = tiles * chunk / chunks; t < tiles * (chunk + 1) / chunks; ++t) {
        const int64_t begin = t * rows_per_tile;
        fn(state, Tile{begin, std::min(rows_per_tile, rows - begin)});
      }
    }
  });
}

// Per-chunk float64 sums of `width` values each, added up in chunk order.
class ChunkSums {
 public:
  ChunkSums(int64_t chunks, int64_t width) : width_(width), data_(chunks * width, 0.0) {}

  double* chunk(int64_t chunk) {
    return data_.data() + chunk * width_;
  }

  template <typename T>
  void add(int64_t chunk, const std::vector<T>& values) {
    double* out = this->chunk(chunk);
    for (int64_t i = 0; i < width_; ++i) {
      out[i] += values[i];
    }
  }

  std::vector<double> total() const {
    std::vector<double> sums(width_, 0.0);
    for (size_t offset = 0; offset < data_.size(); offset += width_) {
      for (int64_t i = 0; i < width_; ++i) {
        sums[i] += data_[offset + i];
      }
    }
    return sums;
  }

 private:
  int64_t width_;
  std::vector<double> data_;
};

// Per-chunk (count, mean, M2) of the rows of tiles, merged with Chan's formula.
// NaN and Inf come out as in torch's two-pass mean and variance: the mean is
// +-Inf or NaN where the sum is, the variance NaN wherever a value is not finite.
class Moments {
 public:
  Moments(int64_t chunks, int64_t channels)
      : channels_(channels), counts_(chunks, 0), mean_(chunks * channels, 0.0), m2_(chunks * channels, 0.0) {}

  // Adds `rows` rows of `data` (row stride `ld`) to chunk `chunk`.
  template <typename T>
  void add(int64_t chunk, const T* data, int64_t ld, int64_t rows, std::vector<double>& tile_mean,
           std::vector<double>& tile_m2) {
    std::fill(tile_mean.begin(), tile_mean.end(), 0.0);
    std::fill(tile_m2.begin(), tile_m2.end(), 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < channels_; ++c) {
        tile_mean[c] += static_cast<double>(data[r * ld + c]);
      }
    }
    for (int64_t c = 0; c < channels_; ++c) {
      tile_mean[c] /= static_cast<double>(rows);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < channels_; ++c) {
        const double d = static_cast<double>(data[r * ld + c]) - tile_mean[c];
        tile_m2[c] += d * d;
      }
    }
    merge(counts_[chunk], mean_.data() + chunk * channels_, m2_.data() + chunk * channels_, rows, tile_mean.data(),
          tile_m2.data());
  }

  // (mean, biased var) over all chunks, merged in chunk order, as `options`' dtype.
  std::tuple<at::Tensor, at::Tensor> result(const at::TensorOptions& options) const {
    int64_t count = 0;
    std::vector<double> mean(channels_, 0.0), m2(channels_, 0.0);
    for (size_t chunk = 0; chunk < counts_.size(); ++chunk) {
      merge(count, mean.data(), m2.data(), counts_[chunk], mean_.data() + chunk * channels_,
            m2_.data() + chunk * channels_);
    }
    auto mean_t = at::empty({channels_}, options.dtype(at::kDouble));
    auto var_t = at::empty({channels_}, options.dtype(at::kDouble));
    for (int64_t c = 0; c < channels_; ++c) {
      mean_t.data_ptr<double>()[c] = mean[c];
      var_t.data_ptr<double>()[c] = count > 0 ? m2[c] / static_cast<double>(count) : 0.0;
    }
    return {mean_t.to(options.dtype()), var_t.to(options.dtype())};
  }

 private:
  void merge(int64_t& count, double* mean, double* m2, int64_t other_count, const double* other_mean,
             const double* other_m2) const {
    if (other_count == 0) {
      return;
    }
    const int64_t total = count + other_count;
    const double weight = static_cast<double>(count) / static_cast<double>(total);
    const double other_weight = static_cast<double>(other_count) / static_cast<double>(total);
    for (int64_t c = 0; c < channels_; ++c) {
      const double delta = other_mean[c] - mean[c];
      // The weighted mean, not mean + delta * other_weight: an infinite mean stays infinite.
      mean[c] = mean[c] * weight + other_mean[c] * other_weight;
      m2[c] += other_m2[c] + delta * delta * static_cast<double>(count) * other_weight;
    }
    count = total;
  }

  int64_t channels_;
  std::vector<int64_t> counts_;
  std::vector<double> mean_, m2_;
};

}  // namespace densenet_fast::cpu
