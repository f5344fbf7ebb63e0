// Helpers shared by the CUDA kernels.  Every kernel walks a channel range of a
// channels-last buffer: (rows, channels) with channel stride 1 and a row stride.
//
// A block is kChannelLanes lanes along the channels (a warp per row: its
// accesses to a row coalesce) by kRowThreads row threads, and the grid is
// (channel blocks, row blocks).  Each lane handles V consecutive channels: one
// vector access of up to 16 bytes per row where the tensors' alignment allows
// it (with_vector_width), else V = 1.  Per-channel sums are reduced per block in shared
// memory in a fixed order and written as per-block partials, which the host
// adds with a torch reduction: no atomics, the same result on every run.
//
// A host function launches its kernel through launch_rows (vector width, launch
// shape, stream, launch check); a kernel walks its thread's rows with for_each_row
// and, if it sums, hands its sums to store_block_sums (partials from block_partials).
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h needs cuBLAS/cuSPARSE headers,
// which a minimal CUDA toolkit does not have.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace densenet_fast::cuda {

constexpr int kChannelLanes = 32;
constexpr int kRowThreads = 8;
constexpr int64_t kMinRowsPerBlock = 128;
constexpr int64_t kBlocksPerSM = 4;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxVectorBytes = 16;
// More channels per lane would cost registers (float64 sums per channel) and
// shared memory enough that fewer than kBlocksPerSM blocks fit on an SM.
constexpr int64_t kMaxVectorChannels = 4;

// ---- host: launch shape ------------------------------------------------------------------

struct RowLaunch {
  dim3 grid;  // (channel blocks, row blocks)
  dim3 block;
  int64_t rows_per_block;
  cudaStream_t stream;  // the current stream
};

// The launch over `rows` x `channels` (both > 0) with `vector` channels per lane:
// enough row blocks to give every SM a few blocks, each at least kMinRowsPerBlock rows.
inline RowLaunch row_launch(int64_t rows, int64_t channels, int64_t vector, c10::DeviceIndex device) {
  TORCH_CHECK(channels <= INT32_MAX, "densenet_fast CUDA kernels: at most 2^31 - 1 channels, got ", channels);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t channel_blocks = (channels + kChannelLanes * vector - 1) / (kChannelLanes * vector);
  const int64_t target = std::clamp<int64_t>(kBlocksPerSM * sm_count / channel_blocks, 1, kMaxGridY);
  const int64_t rows_per_block = std::max(kMinRowsPerBlock, (rows + target - 1) / target);
  const int64_t row_blocks = (rows + rows_per_block - 1) / rows_per_block;  // <= target
  return {dim3(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(row_blocks)),
          dim3(kChannelLanes, kRowThreads), rows_per_block, c10::cuda::getCurrentCUDAStream(device).stream()};
}

// Calls f(std::integral_constant<int, V>{}) with V channels per lane for data of
// type T: a vector of min(16 bytes, 4 channels) when every tensor's data pointer
// and row stride (in bytes) are multiples of the vector's size, so that every
// lane's first channel of every row is aligned to it; else 1.  Tensors are
// (rows, channels) with channel stride 1.
template <typename T, typename F>
void with_vector_width(std::initializer_list<at::Tensor> tensors, const F& f) {
  constexpr int64_t kVector = std::min<int64_t>(kMaxVectorBytes / sizeof(T), kMaxVectorChannels);
  constexpr int64_t kBytes = kVector * sizeof(T);
  const bool aligned = std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kBytes == 0 &&
           (t.size(0) <= 1 || t.stride(0) * static_cast<int64_t>(sizeof(T)) % kBytes == 0);
  });
  if (aligned) {
    f(std::integral_constant<int, static_cast<int>(kVector)>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Launches a kernel over the rows and channels of `tensors` (rows, channels), the first
// of them x: calls launch_kernel(width, launch), width as with_vector_width<T> chooses
// it and launch the row_launch over x for that width, then checks the launch.
template <typename T, typename F>
void launch_rows(std::initializer_list<at::Tensor> tensors, const F& launch_kernel) {
  const at::Tensor& x = *tensors.begin();
  with_vector_width<T>(tensors, [&](auto width) {
    launch_kernel(width, row_launch(x.size(0), x.size(1), decltype(width)::value, x.device().index()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The float64 partials (kSums, row blocks, channels) that store_block_sums writes for `launch`.
inline at::Tensor block_partials(const RowLaunch& launch, int64_t sums, int64_t channels,
                                 const at::TensorOptions& options) {
  return at::empty({sums, static_cast<int64_t>(launch.grid.y), channels}, options.dtype(at::kDouble));
}

// ---- device: indexing and accesses -------------------------------------------------------

// The first of this lane's V channels, computed in 32 bits (row_launch checks that
// channels fit): from a 64-bit product nvcc 13 no longer sees that a lane's V
// element stores are adjacent and emits V scalar stores instead of one vector store.
template <int V>
__device__ inline int64_t lane_channel() {
  return static_cast<int64_t>((blockIdx.x * kChannelLanes + threadIdx.x) * V);
}

// This thread's rows: begin, begin + kRowThreads, ... below end.
struct RowRange {
  int64_t begin;
  int64_t end;
};

__device__ inline RowRange thread_rows(int64_t rows, int64_t rows_per_block) {
  const int64_t block_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  return {block_begin + threadIdx.y, min(rows, block_begin + rows_per_block)};
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vector {
  T values[V];
};

// values[i] = data[c + i] as A for c + i < channels, 0 beyond; one access per channel.
template <int V, typename T, typename A>
__device__ inline void load_each(const T* data, int64_t c, int64_t channels, A (&values)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    values[i] = c + i < channels ? static_cast<A>(data[c + i]) : A(0);
  }
}

// load_each of a row, as one vector access when all V channels are inside it
// (aligned: with_vector_width chose V).
template <int V, typename T, typename A>
__device__ inline void load(const T* row, int64_t c, int64_t channels, A (&values)[V]) {
  if (c + V <= channels) {
    const Vector<T, V> vector = *reinterpret_cast<const Vector<T, V>*>(row + c);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      values[i] = static_cast<A>(vector.values[i]);
    }
  } else {
    load_each(row, c, channels, values);
  }
}

// row[c + i] = values[i] as T for c + i < channels, as one vector access when all
// V channels are inside the row.
template <int V, typename T, typename A>
__device__ inline void store(T* row, int64_t c, int64_t channels, const A (&values)[V]) {
  if (c + V <= channels) {
    Vector<T, V> vector;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      vector.values[i] = static_cast<T>(values[i]);
    }
    *reinterpret_cast<Vector<T, V>*>(row + c) = vector;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (c + i < channels) {
        row[c + i] = static_cast<T>(values[i]);
      }
    }
  }
}

// The row loop of every kernel: calls f(r, values) for each of this thread's rows r
// (thread_rows) of x (row stride ldx), values (A[V]) its V channels from c (load).
template <int V, typename A, typename T, typename F>
__device__ inline void for_each_row(const T* x, int64_t ldx, int64_t c, int64_t channels, int64_t rows,
                                    int64_t rows_per_block, const F& f) {
  const RowRange range = thread_rows(rows, rows_per_block);
  for (int64_t r = range.begin; r < range.end; r += kRowThreads) {
    A values[V];
    load(x + r * ldx, c, channels, values);
    f(r, values);
  }
}

// ---- device: per-block column sums -------------------------------------------------------

// Adds each thread's sums[s][i] (sum s of channel c + i) over the block's row
// threads, in row-thread order, and writes the block's sums of the channels below
// `channels` to partials[s][blockIdx.y][c + i] (partials: (kSums, row blocks,
// channels) float64).  Synchronises the block: every thread must call it.
template <int kSums, int V>
__device__ inline void store_block_sums(const double (&sums)[kSums][V], int64_t c, int64_t channels,
                                        double* __restrict__ partials) {
  __shared__ double row_sums[kSums][V][kRowThreads][kChannelLanes];
#pragma unroll
  for (int s = 0; s < kSums; ++s) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      row_sums[s][i][threadIdx.y][threadIdx.x] = sums[s][i];
    }
  }
  __syncthreads();
  if (threadIdx.y != 0) {
    return;
  }
#pragma unroll
  for (int s = 0; s < kSums; ++s) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (c + i < channels) {
        double block_sum = 0.0;
        for (int row = 0; row < kRowThreads; ++row) {
          block_sum += row_sums[s][i][row][threadIdx.x];
        }
        partials[(s * static_cast<int64_t>(gridDim.y) + blockIdx.y) * channels + c + i] = block_sum;
      }
    }
  }
}

}  // namespace densenet_fast::cuda
