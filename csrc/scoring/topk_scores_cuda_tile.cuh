// The score tile of topk_scores' CUDA kernel (topk_scores_cuda.cu, which describes the whole
// algorithm). Only the ranking key comes with it, no torch header, so that
// tests/test_topk_scores_cuda_tile_emulated.py can compile it as plain C++ on a machine without a
// GPU (tests/emulation/cuda_emulation.h: one OS thread per CUDA thread).
//
// Register blocking: a CUDA block of 16 x 16 threads scores 128 users x 128 items, each thread
// 8 users x 8 items with 64 accumulators. Per column of d a thread reads 2 float4 of queries and
// 2 float4 of items from shared memory for its 64 FMAs. (The first version, 4 x 4 per thread
// from scalar shared-memory reads, ran at ~7 TFLOP/s on an H200: one 32-bit read per two FMAs
// kept the load pipe, not the FMA pipe, busy.) A thread's 8 rows of a tile are 4 consecutive at
// 4 t and 4 at 64 + 4 t (t its x or y), so the float4 reads of 8 threads (one shared-memory
// wavefront) cover 32 consecutive floats: no bank conflict.
#pragma once

#include <cstdint>

#include "scoring/scoring_cuda_keys.cuh"

namespace recsys_kernels::scoring_cuda {

constexpr int kTileU = 128;        // users per CUDA block
constexpr int kTileI = 128;        // items per CUDA block
constexpr int kTileK = 16;         // columns of d staged in shared memory at once
constexpr int kTileThreads = 256;  // 16 x 16 threads, each 8 users x 8 items
constexpr int kTileSide = 16;      // threads along each side of the tile
// floats after each staged column: rows stay 16-byte aligned for the float4 reads, and the
// column-wise stores of the staging loop conflict at most 2 ways
constexpr int kTilePad = 4;
static_assert(kTileU == 8 * kTileSide && kTileI == 8 * kTileSide && kTileThreads == kTileSide * kTileSide);
static_assert((kTileU * kTileK) % kTileThreads == 0 && kTileI <= kTileThreads);

// Each user's exclusions sorted ascending, int64, and the offsets as int64 (nullptr: none).
struct Exclusions {
  const int64_t* offsets = nullptr;
  const int64_t* sorted = nullptr;
};

__device__ __forceinline__ bool excluded(const Exclusions& ex, int64_t user, int64_t item) {
  if (ex.offsets == nullptr) return false;
  int64_t lo = ex.offsets[user], hi = ex.offsets[user + 1];  // search [lo, hi)
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t v = ex.sorted[mid];
    if (v == item) return true;
    if (v < item) lo = mid + 1;
    else hi = mid;
  }
  return false;
}

// Row j (0 <= j < 8) of thread t's 8 rows of a 128-row tile.
__device__ __forceinline__ int tile_row(int t, int j) { return (j < 4 ? 0 : 4 * kTileSide) + 4 * t + (j & 3); }

// Scores of users [u0, u0 + n_u) x items [c0, c0 + n_c): grid (ceil(n_c / 128), ceil(n_u / 128)),
// kTileThreads threads. A key above the user's floor (buf[lu * ld + k - 1]) of an item not
// excluded is appended at buf[lu * ld + k + count[lu]++]. Each score is one fma chain over
// d = 0 .. D-1, + the item's bias: the CPU kernels' arithmetic.
template <typename IRows>
__global__ void __launch_bounds__(kTileThreads, 2)
topk_tile_keys_kernel(const float* __restrict__ q, const IRows items, const float* __restrict__ bias,
                      const Exclusions ex, int64_t u0, int64_t n_u, int64_t c0, int64_t n_c, int64_t d, int64_t k,
                      int64_t* __restrict__ buf, int64_t ld, int* __restrict__ count) {
  __shared__ __align__(16) float qs[kTileK][kTileU + kTilePad];
  __shared__ __align__(16) float is[kTileK][kTileI + kTilePad];
  __shared__ float row_scale[kTileI], row_bias[kTileI];  // int8 rows: read once per tile
  const int tx = threadIdx.x % kTileSide, ty = threadIdx.x / kTileSide;
  const int64_t tile_i = static_cast<int64_t>(blockIdx.x) * kTileI;  // within the chunk
  const int64_t tile_u = static_cast<int64_t>(blockIdx.y) * kTileU;  // within the user block
  if constexpr (IRows::kQuant) {
    if (threadIdx.x < kTileI) {
      const int64_t li = tile_i + threadIdx.x;
      float scale = 0.0f, rbias = 0.0f;
      if (li < n_c) items.params(items.w + (c0 + li) * items.cols, scale, rbias);
      row_scale[threadIdx.x] = scale;
      row_bias[threadIdx.x] = rbias;
    }
    __syncthreads();
  }
  float acc[8][8];
#pragma unroll
  for (int a = 0; a < 8; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) acc[a][b] = 0.0f;

  // The staging loop: this thread's column scol and rows srow + 16 r; the tile's rows inside the tables.
  const int scol = threadIdx.x % kTileK, srow = threadIdx.x / kTileK;
  constexpr int kRowStep = kTileThreads / kTileK;
  const int64_t q_rows = n_u - tile_u, i_rows = n_c - tile_i;
  const float* q_tile = q + (u0 + tile_u) * d;
  const int64_t i_tile = c0 + tile_i;  // the tile's first item
  for (int64_t k0 = 0; k0 < d; k0 += kTileK) {
    // stage [128 rows][16 columns] of queries and of items, transposed; zeros outside the tables.
    // 16 consecutive threads read 16 consecutive columns of one row (coalesced).
    const int64_t col = k0 + scol;
#pragma unroll
    for (int r = 0; r < kTileU / kRowStep; ++r) {
      const int row = srow + kRowStep * r;
      qs[scol][row] = (row < q_rows && col < d) ? q_tile[row * d + col] : 0.0f;
      float v = 0.0f;
      if (row < i_rows && col < d) {
        if constexpr (IRows::kQuant) {  // QuantRows::load's arithmetic, the row's scale / bias from shared memory
          v = rowwise::dequant(static_cast<float>(items.w[(i_tile + row) * items.cols + col]), row_scale[row],
                               row_bias[row]);
        } else {
          float x[1];
          items.load(i_tile + row, col, x);
          v = x[0];
        }
      }
      is[scol][row] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 q_lo = *reinterpret_cast<const float4*>(&qs[kk][tile_row(ty, 0)]);
      const float4 q_hi = *reinterpret_cast<const float4*>(&qs[kk][tile_row(ty, 4)]);
      const float4 i_lo = *reinterpret_cast<const float4*>(&is[kk][tile_row(tx, 0)]);
      const float4 i_hi = *reinterpret_cast<const float4*>(&is[kk][tile_row(tx, 4)]);
      const float qv[8] = {q_lo.x, q_lo.y, q_lo.z, q_lo.w, q_hi.x, q_hi.y, q_hi.z, q_hi.w};
      const float iv[8] = {i_lo.x, i_lo.y, i_lo.z, i_lo.w, i_hi.x, i_hi.y, i_hi.z, i_hi.w};
#pragma unroll
      for (int a = 0; a < 8; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b) acc[a][b] = fmaf(qv[a], iv[b], acc[a][b]);
    }
    __syncthreads();
  }
  // Columns past d were zero in both tiles: 0 * 0 adds nothing, so each score is the fma chain
  // over d = 0 .. D-1 (plus exact zeros), whatever the item table's dtype.
  float item_bias[8];
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    const int64_t li = tile_i + tile_row(tx, b);
    item_bias[b] = (bias != nullptr && li < n_c) ? bias[c0 + li] : 0.0f;
  }
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    const int64_t lu = tile_u + tile_row(ty, a);
    if (lu >= n_u) continue;
    int64_t* row = buf + lu * ld;
    const int64_t floor = row[k - 1];
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int64_t li = tile_i + tile_row(tx, b);
      if (li >= n_c) continue;
      const int64_t item = c0 + li;
      const float s = bias != nullptr ? acc[a][b] + item_bias[b] : acc[a][b];
      const int64_t key = rank_key(s, item);
      if (key <= floor || excluded(ex, u0 + lu, item)) continue;
      const int slot = atomicAdd(count + lu, 1);  // < n_c: each item of the chunk once per user
      row[k + slot] = key;
    }
  }
}

}  // namespace recsys_kernels::scoring_cuda
