// Just enough of CUDA to run a torch-free kernel header as plain C++ on a machine without a GPU
// (tests/emulation/topk_tile_harness.cpp): every CUDA thread of a block is an OS thread,
// __syncthreads() a std::barrier, __shared__ arrays function-local statics (so blocks run one
// at a time), atomics std::atomic_ref. It checks a kernel's indexing and synchronisation, not its
// speed; a __syncthreads() that some threads of a block skip hangs, as it may on a GPU.
#pragma once

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <thread>
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
struct alignas(16) float4 {
  float x, y, z, w;
};

using std::isnan;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline int32_t __float_as_int(float x) { return std::bit_cast<int32_t>(x); }
inline float __int_as_float(int32_t x) { return std::bit_cast<float>(x); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }

// kernel<<<grid, block>>>(args...): the blocks in order, each as block.x threads (1-D blocks).
template <typename Kernel, typename... Args>
void emulate_launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> barrier(block.x);
      emulated_block_barrier = &barrier;
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([=] {
          threadIdx = dim3{t, 0, 0};
          blockIdx = dim3{bx, by, 0};
          kernel(args...);
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
