// The torch-free device helpers of the CUDA kernels: warp size and reductions, packed
// (vectorised) loads and stores, and the report of a bad position into a device error flag. Apart
// from cuda_utils.cuh (host side: launch geometry, error checks, DeviceFlag) so that a kernel
// header built on these alone also compiles as plain C++ for the emulated tests
// (tests/emulation/cuda_emulation.h).
#pragma once

#include <cstdint>

namespace recsys_kernels::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

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

// The value of a device error flag that no position was reported into (DeviceFlag::kNone).
constexpr int64_t kNoPosition = INT64_MAX;

// Record `position` (>= 0) into a device error flag, which keeps the smallest (see DeviceFlag).
__device__ __forceinline__ void report_bad(unsigned long long* flag, int64_t position) {
  atomicMin(flag, static_cast<unsigned long long>(position));
}

}  // namespace recsys_kernels::cuda
