// Scalar versions of the scoring inner kernels: the same float operations in the same order as the
// AVX2 versions (scoring_cpu_kernels.h), so both paths give the same bits. std::fma is correctly
// rounded with or without FMA hardware; the baseline build cannot contract a * b + c on its own.
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "scoring/scoring_cpu_kernels.h"

namespace recsys_kernels::scoring_cpu {
namespace {

inline float value_at(Kind kind, const uint8_t* row, int64_t c, float scale, float bias) {
  switch (kind) {
    case Kind::kF32: {
      float v;
      std::memcpy(&v, row + 4 * c, 4);
      return v;
    }
    case Kind::kF16: {
      c10::Half h;
      std::memcpy(&h, row + 2 * c, 2);
      return static_cast<float>(h);
    }
    case Kind::kBF16: {
      c10::BFloat16 h;
      std::memcpy(&h, row + 2 * c, 2);
      return static_cast<float>(h);
    }
    case Kind::kQ8: {
      const float prod = static_cast<float>(row[c]) * scale;
      return prod + bias;
    }
  }
  return 0.0f;
}

template <typename I>
bool dot_pairs_impl(const DotArgs& a) {
  const int64_t d = a.dim, d8 = d & ~int64_t(7);
  const I* ui = static_cast<const I*>(a.user_idx);
  const I* ii = static_cast<const I*>(a.item_idx);
  bool ok = true;
  for (int64_t p = 0; p < a.n; ++p) {
    const int64_t item = static_cast<int64_t>(ii[p]);
    const uint8_t* q = a.queries + (ui == nullptr ? a.fixed_user : static_cast<int64_t>(ui[p])) * a.q_row_bytes;
    const uint8_t* x = a.items + item * a.item_row_bytes;
    float scale = 1.0f, bias = 0.0f;
    if (a.item_kind == Kind::kQ8) {
      std::memcpy(&scale, x + d, 4);
      std::memcpy(&bias, x + d + 4, 4);
      ok &= std::isfinite(scale) && std::isfinite(bias);
    }
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t c = 0; c < d8; c += 8)
      for (int j = 0; j < 8; ++j)
        acc[j] = std::fma(value_at(a.q_kind, q, c + j, 1.0f, 0.0f), value_at(a.item_kind, x, c + j, scale, bias), acc[j]);
    float s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (int64_t c = d8; c < d; ++c)
      s = std::fma(value_at(a.q_kind, q, c, 1.0f, 0.0f), value_at(a.item_kind, x, c, scale, bias), s);
    if (a.bias != nullptr) s = s + a.bias[item];
    a.out[p] = s;
  }
  return ok;
}

}  // namespace

bool dot_pairs_scalar(const DotArgs& a) {
  return a.idx64 ? dot_pairs_impl<int64_t>(a) : dot_pairs_impl<int32_t>(a);
}

int64_t score_tile_scalar(const TileArgs& a, Candidate* out) {
  int64_t n = 0;
  for (int64_t i = 0; i < a.n_items; ++i) {
    const float* x = a.items + i * a.dim;
    for (int lane = 0; lane < kLanes; ++lane) {
      if (!((a.lane_mask >> lane) & 1u)) continue;
      float acc = 0.0f;
      for (int64_t d = 0; d < a.dim; ++d) acc = std::fma(a.panel[d * kLanes + lane], x[d], acc);
      if (a.bias != nullptr) acc = acc + a.bias[i];
      if (!(acc < a.threshold[lane])) out[n++] = {static_cast<int32_t>(i), lane, acc};
    }
  }
  return n;
}

}  // namespace recsys_kernels::scoring_cpu
