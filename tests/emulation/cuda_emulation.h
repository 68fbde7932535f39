// Just enough of CUDA to run a kernel header as plain C++ on a machine without a GPU
// (tests/emulation/topk_tile_harness.cpp, embedding_bag_cuda_harness.cpp): every CUDA thread of a
// block is an OS thread, __syncthreads() a std::barrier, __shared__ arrays function-local statics
// (so blocks run one at a time), atomics std::atomic_ref, and the warp collectives (__shfl_sync,
// __shfl_xor_sync, __ballot_sync) an exchange through the warp's slots between two barriers of its
// 32 threads. It checks a kernel's indexing and synchronisation, not its speed; a __syncthreads()
// or a warp collective that some threads skip hangs, as it may on a GPU. Blocks of a multiple of
// 32 threads.
#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

using std::isfinite;
using std::isnan;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline int32_t __float_as_int(float x) { return std::bit_cast<int32_t>(x); }
inline float __int_as_float(int32_t x) { return std::bit_cast<float>(x); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// One warp: its 32 threads meet at the barrier; slot[lane] carries each lane's value.
struct EmulatedWarp {
  std::barrier<> barrier{32};
  uint64_t slot[32];
};
inline thread_local EmulatedWarp* emulated_warp = nullptr;

// A warp collective: every lane publishes `bits` in its slot, then `read` (the slots) gives its
// result. The second barrier keeps a lane from overwriting its slot (next collective) before every
// lane has read.
template <typename Read>
uint64_t warp_collective(uint64_t bits, Read read) {
  EmulatedWarp& w = *emulated_warp;
  w.slot[threadIdx.x % 32] = bits;
  w.barrier.arrive_and_wait();
  const uint64_t got = read(w.slot);
  w.barrier.arrive_and_wait();
  return got;
}

// Lane src's v.
template <typename T>
T warp_shuffle(T v, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(bits, [src](const uint64_t* slot) { return slot[src % 32]; });
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// (the mask is not emulated: every lane of the warp must take part, as in the kernels here)
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return warp_shuffle(v, src & 31);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return warp_shuffle(v, static_cast<int>(threadIdx.x % 32) ^ (lane_mask & 31));
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  return static_cast<unsigned>(warp_collective(predicate ? 1 : 0, [](const uint64_t* slot) {
    uint64_t bits = 0;
    for (int l = 0; l < 32; ++l) bits |= slot[l] << l;
    return bits;
  }));
}

// kernel<<<grid, block>>>(args...): the blocks in order, each as block.x threads (1-D blocks).
template <typename Kernel, typename... Args>
void emulate_launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> barrier(block.x);
      emulated_block_barrier = &barrier;
      std::deque<EmulatedWarp> warps((block.x + 31) / 32);  // (a barrier cannot be moved)
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([=, &warps] {
          threadIdx = dim3{t, 0, 0};
          blockIdx = dim3{bx, by, 0};
          emulated_warp = &warps[t / 32];
          kernel(args...);
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
