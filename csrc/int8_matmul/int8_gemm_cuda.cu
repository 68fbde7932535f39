// The int8 tensor-core GEMM of int8_matmul / int8_linear: out[M, N] = epilogue(A[M, K] @ B[N, K]^T).
//
// B in nn.Linear layout ([N, K], K contiguous) is exactly the "col" operand of
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, so neither operand is transposed anywhere.
//
// Block tile 128 x 128 x 64 bytes, 8 warps as 2 (M) x 4 (N), each warp 64 x 32 = 4 x 4 mma tiles.
// A 4-stage cp.async pipeline (16 KB a stage) feeds shared memory; fragments come from ldmatrix.x4.
// Tile rows are 64 bytes (four 16-byte chunks); chunk c of row r is stored at chunk c ^ ((r >> 1) & 3),
// so the 8 row addresses of one 8x8 ldmatrix matrix (8 consecutive rows, one chunk) fall into 8
// different 16-byte bank groups: conflict-free.
//
// Edges: rows past M / N and k past K are zero-filled in shared memory (cp.async src-size 0), and
// zeros add nothing to a dot product. The loader copies 16 bytes (K % 16 == 0, 16-byte aligned
// operands), 4 bytes (K % 4 == 0) or single bytes through registers (any K, synchronous).
//
// Exactness: an int32 accumulator of int8 products cannot wrap for K <= 131071 (kMaxExactK). Longer
// K is split over gridDim.z into slices of at most 2047 k-tiles (131008 products), each slice's
// exact int32 partial goes to a workspace, and a second kernel sums the slices in int64 and applies
// the epilogue (int32 output: with the overflow check of the reference). The same split-K path is
// used when the output has too few tiles to fill the GPU and K is long.
#include <algorithm>

#include <ATen/ATen.h>

#include "int8_matmul/int8_cuda_common.cuh"

namespace recsys_kernels::int8mm {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kWarpsN = 4;
constexpr int kWM = 64, kWN = 32;              // warp tile
constexpr int kMT = kWM / 16, kNT = kWN / 8;   // mma tiles per warp: 4 x 4
constexpr int kTileBytes = kBM * kBK;          // one operand's stage tile (kBN == kBM)
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kSmemBytes = kStages * kStageBytes;  // 64 KB: needs the opt-in dynamic limit
constexpr int kChunksPerThread = kTileBytes / 16 / kThreads;  // 16-byte chunks a thread loads per tile
constexpr int kMaxTilesPerSplit = static_cast<int>(kMaxExactK / kBK);  // 2047 tiles = 131008 products
static_assert(kBM == kBN, "A and B stage tiles share one loader");
static_assert(kChunksPerThread * 16 * kThreads == kTileBytes, "the loader covers the tile exactly");
static_assert(kWM * 2 == kBM && kWN * kWarpsN == kBN, "8 warps cover the block tile");

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row` (kBK = 64 bytes a row).
__device__ __forceinline__ int swizzle(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 4); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(__cvta_generic_to_global(src)),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(__cvta_generic_to_global(src)),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a (16 x 32, row) * b (32 x 8, col), s8 x s8 -> s32.
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copy the [128 rows, 64 k] tile at (row0, k0) of the row-major [rows, K] int8 matrix g into the
// swizzled shared tile; out-of-range bytes become zeros. VEC: bytes a global access moves.
template <int VEC>
__device__ __forceinline__ void load_tile(uint8_t* tile, const int8_t* __restrict__ g, int64_t rows, int64_t K,
                                          int64_t row0, int64_t k0, int tid) {
#pragma unroll
  for (int i = 0; i < kChunksPerThread; ++i) {
    const int id = tid + i * kThreads;
    const int r = id >> 2, c = id & 3;  // 4 chunks a row: consecutive threads read consecutive bytes
    const int64_t gr = row0 + r;
    const int64_t gk = k0 + c * 16;
    const bool row_ok = gr < rows;
    uint8_t* dst = tile + swizzle(r, c);
    if constexpr (VEC == 16) {
      const bool ok = row_ok && gk < K;  // K % 16 == 0: a chunk is all in or all out
      cp_async16(smem_u32(dst), ok ? g + gr * K + gk : g, ok ? 16 : 0);
    } else if constexpr (VEC == 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool ok = row_ok && gk + 4 * j < K;  // K % 4 == 0
        cp_async4(smem_u32(dst + 4 * j), ok ? g + gr * K + gk + 4 * j : g, ok ? 4 : 0);
      }
    } else {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t v = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int64_t kk = gk + 4 * j + b;
          if (row_ok && kk < K) v |= static_cast<uint32_t>(static_cast<uint8_t>(g[gr * K + kk])) << (8 * b);
        }
        w[j] = v;
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// partial == nullptr: apply the epilogue. Otherwise write this K slice's exact int32 partial sums to
// partial[blockIdx.z][M][N] (the split-K path; each slice has at most kMaxTilesPerSplit tiles).
template <int VEC>
__global__ void __launch_bounds__(kThreads)
gemm_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B, int64_t M, int64_t N, int64_t K,
            int tiles_per_split, Epilogue ep, int32_t* __restrict__ partial) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;

  // Grouped rasterization: 8 block rows sweep the block columns together, so the B tiles they share
  // are still in L2 when the next row asks.
  constexpr int64_t kGroup = 8;
  const int64_t grid_m = (M + kBM - 1) / kBM, grid_n = (N + kBN - 1) / kBN;
  const int64_t pid = blockIdx.x;
  const int64_t per_group = kGroup * grid_n;
  const int64_t first_m = (pid / per_group) * kGroup;
  const int64_t group_rows = min(grid_m - first_m, kGroup);
  const int64_t m0 = (first_m + (pid % per_group) % group_rows) * kBM;
  const int64_t n0 = ((pid % per_group) / group_rows) * kBN;

  const int64_t k_tiles = (K + kBK - 1) / kBK;
  const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * tiles_per_split;
  const int nk = static_cast<int>(max(min(k_tiles - kt0, static_cast<int64_t>(tiles_per_split)), int64_t(0)));

  int acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  auto load_stage = [&](int stage, int64_t kt) {
    uint8_t* sa = smem + stage * kStageBytes;
    load_tile<VEC>(sa, A, M, K, m0, kt * kBK, tid);
    load_tile<VEC>(sa + kTileBytes, B, N, K, n0, kt * kBK, tid);
  };

  // Prologue: tiles 0 .. kStages-2 in flight, one commit group each (empty groups past the end keep
  // the count uniform).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(s, kt0 + s);
    cp_async_commit();
  }

  // ldmatrix lane roles: lanes 8j..8j+7 give the row addresses of 8x8 matrix j.
  const int lrow = lane & 7, lmat = lane >> 3;
  for (int i = 0; i < nk; ++i) {
    // Groups committed so far: kStages - 1 + i; allowing kStages - 2 pending means group i (tile i)
    // has landed for this thread; the barrier makes every thread's copies visible, and also tells
    // that every warp is done reading stage (i - 1) % kStages, which the next load overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = i + kStages - 1;
    if (next < nk) load_stage(next % kStages, kt0 + next);
    cp_async_commit();

    const uint8_t* sa = smem + (i % kStages) * kStageBytes;
    const uint8_t* sb = sa + kTileBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      uint32_t af[kMT][4], bf[kNT][2];
      // A: matrices (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31)
      // = the a0..a3 registers of the m16n8k32 A fragment.
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int row = warp_m * kWM + mt * 16 + lrow + (lmat & 1) * 8;
        ldmatrix_x4(af[mt], smem_u32(sa + swizzle(row, ks * 2 + (lmat >> 1))));
      }
      // B (rows are n): matrices (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
      // = b0, b1 of n-tile 2p and b0, b1 of n-tile 2p + 1.
#pragma unroll
      for (int p = 0; p < kNT / 2; ++p) {
        const int row = warp_n * kWN + p * 16 + lrow + (lmat >> 1) * 8;
        uint32_t r[4];
        ldmatrix_x4(r, smem_u32(sb + swizzle(row, ks * 2 + (lmat & 1))));
        bf[2 * p][0] = r[0];
        bf[2 * p][1] = r[1];
        bf[2 * p + 1][0] = r[2];
        bf[2 * p + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mma_s8(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending here; leave none behind

  // C fragment: c0, c1 at (g, 2t), (g, 2t + 1); c2, c3 at (g + 8, 2t), (g + 8, 2t + 1).
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int64_t col = n0 + warp_n * kWN + nt * 8 + 2 * t;
      if (col >= N) continue;
      const bool has1 = col + 1 < N;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + warp_m * kWM + mt * 16 + g + 8 * h;
        if (row >= M) continue;
        const int v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
        if (partial != nullptr) {
          int32_t* p = partial + (static_cast<int64_t>(blockIdx.z) * M + row) * N + col;
          p[0] = v0;
          if (has1) p[1] = v1;
        } else {
          finish_pair(ep, row, col, N, v0, v1, has1);
        }
      }
    }
  }
}

// Sum the split-K partials in int64 (exact) and apply the epilogue.
__global__ void splitk_reduce_kernel(const int32_t* __restrict__ partial, int splits, int64_t M, int64_t N,
                                     Epilogue ep) {
  const int64_t total = M * N;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    long long s = 0;
    for (int z = 0; z < splits; ++z) s += partial[z * total + idx];
    finish(ep, idx / N, idx % N, N, s);
  }
}

template <int VEC>
void launch_typed(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, int64_t tiles, int splits,
                  int tiles_per_split, const Epilogue& ep, int32_t* partial, cudaStream_t stream) {
  RK_CUDA_CHECK(cudaFuncSetAttribute(gemm_kernel<VEC>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
  gemm_kernel<VEC><<<grid, kThreads, kSmemBytes, stream>>>(a, b, M, N, K, tiles_per_split, ep, partial);
  RK_CUDA_LAUNCH_CHECK();
}

}  // namespace

void launch_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& ep,
                 cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  TORCH_CHECK_VALUE(tiles <= INT32_MAX, "int8_matmul: the output is too large (", M, " x ", N, ")");
  const int64_t k_tiles = (K + kBK - 1) / kBK;

  // Split K: needed when an int32 accumulator could wrap; also worth it when the output tiles
  // cannot fill the GPU and each tile has a long K loop (at least 8 k-tiles a slice).
  int64_t splits = K > kMaxExactK ? (k_tiles + kMaxTilesPerSplit - 1) / kMaxTilesPerSplit : 1;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (tiles < sms && k_tiles >= 16) {
    const int64_t want = std::min<int64_t>({(sms + tiles - 1) / tiles, k_tiles / 8, 32});
    splits = std::max(splits, want);
  }
  const int64_t tiles_per_split = k_tiles > 0 ? (k_tiles + splits - 1) / splits : 1;
  splits = k_tiles > 0 ? (k_tiles + tiles_per_split - 1) / tiles_per_split : 1;  // no empty slices
  TORCH_CHECK_VALUE(splits <= 65535, "int8_matmul: K = ", K, " is too large");

  at::Tensor workspace;
  int32_t* partial = nullptr;
  if (splits > 1) {
    int device = 0;
    RK_CUDA_CHECK(cudaGetDevice(&device));
    workspace = at::empty({splits, M, N}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
    partial = workspace.data_ptr<int32_t>();
  }

  const bool aligned16 = cuda::aligned(a, 16) && cuda::aligned(b, 16);
  const bool aligned4 = cuda::aligned(a, 4) && cuda::aligned(b, 4);
  const int tps = static_cast<int>(tiles_per_split), sp = static_cast<int>(splits);
  if (K % 16 == 0 && aligned16)
    launch_typed<16>(a, b, M, N, K, tiles, sp, tps, ep, partial, stream);
  else if (K % 4 == 0 && aligned4)
    launch_typed<4>(a, b, M, N, K, tiles, sp, tps, ep, partial, stream);
  else
    launch_typed<1>(a, b, M, N, K, tiles, sp, tps, ep, partial, stream);

  if (splits > 1) {
    splitk_reduce_kernel<<<cuda::grid_for(M * N, kThreads), kThreads, 0, stream>>>(partial, sp, M, N, ep);
    RK_CUDA_LAUNCH_CHECK();
  }
  // `workspace` is freed here; the caching allocator reuses it only after this stream's kernels.
}

}  // namespace recsys_kernels::int8mm
