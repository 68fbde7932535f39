// C entry points for tests/test_topk_scores_cuda_tile_emulated.py: topk_scores' CUDA score tile
// (csrc/scoring/topk_scores_cuda_tile.cuh) run on emulated CUDA threads, and the fma chain it must
// compute, in plain C++.
#include <cstring>

#include "cuda_emulation.h"

// What the tile needs of the row readers (csrc/embedding_bag/embedding_bag_cuda_common.cuh) and of
// rowwise_common.h, without their torch headers: fp32 rows, and 8-bit rows (D codes, fp32 scale,
// fp32 bias).
namespace recsys_kernels::rowwise {
inline float dequant(float code, float scale, float bias) {
  const volatile float product = code * scale;  // a rounded product, then a rounded sum
  return product + bias;
}
}  // namespace recsys_kernels::rowwise

#include "scoring/topk_scores_cuda_tile.cuh"

namespace {

using namespace recsys_kernels::scoring_cuda;

struct F32Rows {
  static constexpr bool kQuant = false;
  const float* w;
  int64_t d;
  void load(int64_t row, int64_t col, float (&v)[1]) const { v[0] = w[row * d + col]; }
};

struct Q8Rows {
  static constexpr bool kQuant = true;
  const uint8_t* w;
  int64_t d;
  int64_t cols;
  void params(const uint8_t* r, float& scale, float& bias) const {
    std::memcpy(&scale, r + d, sizeof(float));
    std::memcpy(&bias, r + d + sizeof(float), sizeof(float));
  }
};

template <typename Rows>
void launch(const float* q, const Rows& rows, const float* bias, const int64_t* ex_offsets, const int64_t* ex_sorted,
            int64_t u0, int64_t n_u, int64_t c0, int64_t n_c, int64_t d, int64_t k, int64_t* buf, int64_t ld,
            int* count) {
  const Exclusions ex{ex_offsets, ex_sorted};
  const dim3 grid{static_cast<unsigned>((n_c + kTileI - 1) / kTileI), static_cast<unsigned>((n_u + kTileU - 1) / kTileU),
                  1};
  emulate_launch(grid, dim3{kTileThreads, 1, 1}, topk_tile_keys_kernel<Rows>, q, rows, bias, ex, u0, n_u, c0, n_c, d,
                 k, buf, ld, count);
}

}  // namespace

extern "C" {

// topk_tile_keys_kernel over users [u0, u0 + n_u) x items [c0, c0 + n_c). items: fp32 [N, d]
// (q8 == 0) or 8-bit row-wise [N, d + 8] (q8 == 1). ex_offsets / ex_sorted may be null.
void rk_topk_tile(int q8, const float* q, const void* items, const float* bias, const int64_t* ex_offsets,
                  const int64_t* ex_sorted, int64_t u0, int64_t n_u, int64_t c0, int64_t n_c, int64_t d, int64_t k,
                  int64_t* buf, int64_t ld, int* count) {
  if (q8) {
    launch(q, Q8Rows{static_cast<const uint8_t*>(items), d, d + 8}, bias, ex_offsets, ex_sorted, u0, n_u, c0, n_c, d,
           k, buf, ld, count);
  } else {
    launch(q, F32Rows{static_cast<const float*>(items), d}, bias, ex_offsets, ex_sorted, u0, n_u, c0, n_c, d, k, buf,
           ld, count);
  }
}

// The scores the tile must compute: per (user, item) one fma chain over d, then + bias.
// values: fp32 [n_users, d] and [n_items, d] (dequantized), out [n_users, n_items].
void rk_fma_chain_scores(const float* q, const float* items, const float* bias, int64_t n_users, int64_t n_items,
                         int64_t d, float* out) {
  for (int64_t u = 0; u < n_users; ++u) {
    for (int64_t i = 0; i < n_items; ++i) {
      float acc = 0.0f;
      for (int64_t c = 0; c < d; ++c) acc = std::fma(q[u * d + c], items[i * d + c], acc);
      out[u * n_items + i] = bias != nullptr ? acc + bias[i] : acc;
    }
  }
}

}  // extern "C"
