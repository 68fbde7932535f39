// Shared helpers of the CUDA kernels: error checks, launch geometry, warp reductions, packed
// (vectorised) loads and stores, and the device error flag of the bad-input policy.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

// Check a CUDA runtime call / the last kernel launch; both raise a C++ error with the CUDA message.
#define RK_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define RK_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace recsys_kernels::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks for a grid-stride loop over `work_items` items of which a block takes `per_block`: enough
// to fill the GPU (`blocks_per_sm` resident blocks on every multiprocessor), never more than needed.
inline unsigned grid_for(int64_t work_items, int64_t per_block, int blocks_per_sm = 8) {
  const int64_t needed = (work_items + per_block - 1) / per_block;
  const int64_t full = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * blocks_per_sm;
  const int64_t blocks = needed < full ? needed : full;
  return static_cast<unsigned>(blocks > 0 ? blocks : 1);
}

// True when p is aligned to `bytes` (for choosing a vectorised kernel at launch).
inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Warp-wide reductions (every lane of the warp must call them).
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = fminf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// N consecutive elements as one aligned access (16 bytes for 4 floats or 8 halves): with
// ALIGNED the address must be a multiple of sizeof(T) * N, otherwise N scalar accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, bool ALIGNED, typename T>
__device__ __forceinline__ void load_pack(const T* p, T (&v)[N]) {
  if constexpr (ALIGNED) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = pk.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = p[k];
  }
}

template <int N, bool ALIGNED, typename T>
__device__ __forceinline__ void store_pack(T* p, const T (&v)[N]) {
  if constexpr (ALIGNED) {
    Pack<T, N> pk;
#pragma unroll
    for (int k = 0; k < N; ++k) pk.v[k] = v[k];
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = v[k];
  }
}

// A device-side error flag: kernels that find a bad value (non-finite scale, index out of range)
// report the position (row, index number; >= 0) where they found it; the flag keeps the smallest,
// and the host reads it back after the launch and raises the Python error, so the message can
// name the same position the CPU kernel names. Reading it waits for the stream, the price of a
// precise error (DESIGN.md §5).
class DeviceFlag {
 public:
  static constexpr int64_t kNone = INT64_MAX;
  explicit DeviceFlag(const at::Tensor& like) : flag_(at::full({1}, kNone, like.options().dtype(at::kLong))) {}
  unsigned long long* ptr() { return reinterpret_cast<unsigned long long*>(flag_.data_ptr<int64_t>()); }
  // The smallest position reported, or kNone; synchronises with the current stream.
  int64_t read() const { return flag_.item<int64_t>(); }

 private:
  at::Tensor flag_;
};

__device__ __forceinline__ void report_bad(unsigned long long* flag, int64_t position) {
  atomicMin(flag, static_cast<unsigned long long>(position));
}

}  // namespace recsys_kernels::cuda
