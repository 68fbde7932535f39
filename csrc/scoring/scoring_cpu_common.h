// What the scoring CPU ops share: argument and value checks with the reference's messages
// (recsys_kernels/ops/scoring.py), table views, and the ranking key. The CUDA kernels use its
// metadata checks too (scoring_cuda_common.cuh), so every device raises the same errors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "scoring/scoring_cpu_kernels.h"

namespace recsys_kernels::scoring_cpu {

// ----------------------------------------------------------------------------- checks
// IndexError naming the smallest index when it is negative, else the largest (as the reference).
inline void check_index_range(const at::Tensor& idx, int64_t n, const char* name) {
  if (idx.numel() == 0) return;
  const auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  if (lo < 0 || hi >= n) {
    const int64_t bad = lo < 0 ? lo : hi;
    TORCH_CHECK_INDEX(false, name, ": index ", bad, " out of range [0, ", n, ")");
  }
}

// A CSR offsets array over nnz listed entries; returns it as a contiguous int64 tensor.
inline at::Tensor check_offsets(const at::Tensor& offsets, int64_t nnz, const char* name) {
  RK_CHECK_VALUE(offsets.numel() > 0, name, "must have at least one element (offsets[0] = 0)");
  const at::Tensor off = offsets.to(at::kLong).contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t n = off.numel();
  TORCH_CHECK_VALUE(o[0] == 0, name, "[0] must be 0, got ", o[0]);
  for (int64_t i = 1; i < n; ++i) RK_CHECK_VALUE(o[i] >= o[i - 1], name, "must be non-decreasing");
  TORCH_CHECK_VALUE(o[n - 1] == nnz, name, "[-1] must equal the number of items listed (", nnz, "), got ", o[n - 1]);
  return off;
}

inline void check_index_tensor(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kInt, at::kLong});
  check_dim(t, name, 1);
}

inline void check_item_count(int64_t n_items) {
  TORCH_CHECK_VALUE(n_items <= (int64_t(1) << 32), "items: top-k ranks at most 2^32 items, got ", n_items);
}

// ----------------------------------------------------------------------------- tables
struct Table {
  Kind kind;
  const uint8_t* data;
  int64_t rows, dim, row_bytes;
};

inline Kind float_kind(at::ScalarType t) {
  return t == at::kFloat ? Kind::kF32 : t == at::kHalf ? Kind::kF16 : Kind::kBF16;
}

// A float [N, D] table, or (allow_packed) an int8 fused row-wise table uint8 [N, D + 8].
inline Table table_view(const at::Tensor& t, const char* name, bool allow_packed) {
  if (allow_packed) check_dtype(t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kByte});
  else check_float_dtype(t, name);
  check_dim(t, name, 2);
  Table tab;
  tab.data = static_cast<const uint8_t*>(t.const_data_ptr());
  tab.rows = t.size(0);
  if (t.scalar_type() == at::kByte) {
    RK_CHECK_VALUE(t.size(1) >= 9, name, "needs at least 9 bytes per row (an 8-bit row-wise table), got ", t.size(1));
    tab.kind = Kind::kQ8;
    tab.dim = t.size(1) - 8;
    tab.row_bytes = t.size(1);
  } else {
    tab.kind = float_kind(t.scalar_type());
    tab.dim = t.size(1);
    tab.row_bytes = t.size(1) * t.element_size();
  }
  return tab;
}

inline void check_queries(const at::Tensor& q, const char* name, int64_t dim, const char* items_name) {
  check_float_dtype(q, name);
  check_dim(q, name, 2);
  TORCH_CHECK_VALUE(q.size(1) == dim, name, " has dim ", q.size(1), " but ", items_name, " has dim ", dim);
}

// Two index tensors of one dtype (int64 when they differ), contiguous.
inline std::pair<at::Tensor, at::Tensor> index_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                                    const char* b_name) {
  check_index_tensor(a, a_name);
  check_index_tensor(b, b_name);
  if (a.scalar_type() != b.scalar_type()) return {a.to(at::kLong).contiguous(), b.to(at::kLong).contiguous()};
  return {a.contiguous(), b.contiguous()};
}

// The metadata checks that open pair_scores and its backward, on every device (the reference's
// messages and order); the tensors come back contiguous.
struct PairInputs {
  at::Tensor user_emb, item_emb, user_idx, item_idx;
  Table items;
};

inline PairInputs pair_inputs(const at::Tensor& user_emb, const at::Tensor& item_emb, const at::Tensor& user_idx,
                              const at::Tensor& item_idx) {
  PairInputs p;
  p.item_emb = item_emb.contiguous();
  p.items = table_view(p.item_emb, "item_emb", true);
  check_queries(user_emb, "user_emb", p.items.dim, "item_emb");
  p.user_emb = user_emb.contiguous();
  std::tie(p.user_idx, p.item_idx) = index_pair(user_idx, "user_idx", item_idx, "item_idx");
  TORCH_CHECK_VALUE(p.user_idx.size(0) == p.item_idx.size(0), "user_idx and item_idx must have the same length, got ",
                    p.user_idx.size(0), " and ", p.item_idx.size(0));
  return p;
}

// pair_scores_backward's grad_output [P] and item_bias [I] metadata.
inline void check_pair_grad(const at::Tensor& grad_output, int64_t n_pairs, const std::optional<at::Tensor>& item_bias,
                            int64_t n_items) {
  check_float_dtype(grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad_output.size(0) == n_pairs, "grad_output must have shape [",
                    n_pairs, "], got ", grad_output.sizes());
  if (item_bias.has_value()) {
    check_float_dtype(*item_bias, "item_bias");
    TORCH_CHECK_VALUE(item_bias->dim() == 1 && item_bias->size(0) == n_items, "item_bias must have one value per item (",
                      n_items, "), got ", item_bias->sizes());
  }
}

// The metadata checks that open candidate_scores / candidate_topk: the item table, the queries and
// the CSR candidate lists (offsets [U + 1], items) in one index dtype.
struct CandidateInputs {
  at::Tensor items_t, offsets, cand;
  Table items;
};

inline CandidateInputs candidate_inputs(const at::Tensor& queries, const at::Tensor& items,
                                        const at::Tensor& cand_offsets, const at::Tensor& cand_items) {
  CandidateInputs c;
  c.items_t = items.contiguous();
  c.items = table_view(c.items_t, "items", true);
  check_queries(queries, "queries", c.items.dim, "items");
  std::tie(c.offsets, c.cand) = index_pair(cand_offsets, "cand_offsets", cand_items, "cand_items");
  TORCH_CHECK_VALUE(c.offsets.size(0) == queries.size(0) + 1, "cand_offsets must have U + 1 = ", queries.size(0) + 1,
                    " elements, got ", c.offsets.size(0));
  return c;
}

// fp32 item bias [I] (converted once), or an undefined tensor.
inline at::Tensor bias_f32(const std::optional<at::Tensor>& item_bias, int64_t n_items) {
  if (!item_bias.has_value()) return {};
  check_float_dtype(*item_bias, "item_bias");
  check_dim(*item_bias, "item_bias", 1);
  TORCH_CHECK_VALUE(item_bias->size(0) == n_items, "item_bias must have one value per item (", n_items, "), got ",
                    item_bias->size(0));
  return item_bias->to(at::kFloat).contiguous();
}

inline void raise_non_finite() {
  TORCH_CHECK_VALUE(false, "packed table has non-finite scales or biases");
}

inline bool use_avx2() { return cpu_isa() >= CpuIsa::kAvx2; }

// ----------------------------------------------------------------------------- ranking key
// The reference's key (scoring.py _rank_key): int64, larger = ranked first,
// (score ordinal << 32) | (2^32 - 1 - item id); the ordinal is the fp32 bit pattern made monotone,
// NaN just below -inf, "not an item" (padding) below that.
constexpr int64_t kOrdNegInf = -2139095041;
constexpr int64_t kOrdNan = kOrdNegInf - 1;
constexpr int64_t kKeyInvalid = static_cast<int64_t>(static_cast<uint64_t>(kOrdNegInf - 2) << 32);
constexpr uint64_t kIdMask = 0xFFFFFFFFull;

inline int64_t score_ordinal(float s) {
  if (std::isnan(s)) return kOrdNan;
  if (s == 0.0f) s = 0.0f;  // -0.0 ties +0.0
  int32_t bits;
  std::memcpy(&bits, &s, 4);
  return bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
}

inline int64_t rank_key(float s, int64_t id) {
  return static_cast<int64_t>((static_cast<uint64_t>(score_ordinal(s)) << 32) |
                              (kIdMask - static_cast<uint64_t>(id)));
}

// The score of a key's ordinal (NaN for the NaN ordinal).
inline float ordinal_value(int64_t ord) {
  if (ord == kOrdNan) return std::numeric_limits<float>::quiet_NaN();
  const int32_t bits = static_cast<int32_t>(ord >= 0 ? ord : (ord ^ 0x7FFFFFFF));
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline void decode_key(int64_t key, float& value, int64_t& id) {
  if (key == kKeyInvalid) {
    value = -std::numeric_limits<float>::infinity();
    id = -1;
    return;
  }
  id = static_cast<int64_t>(kIdMask - (static_cast<uint64_t>(key) & kIdMask));
  value = ordinal_value(key >> 32);
}

// Sorts keys[0, n) so that its min(k, n) largest come first in descending order, then writes k
// decoded (value, id) pairs, padding past n.
inline void write_top(int64_t* keys, int64_t n, int64_t k, float* values, int64_t* ids) {
  const int64_t m = std::min(k, n);
  if (m < n) std::nth_element(keys, keys + m, keys + n, std::greater<int64_t>());
  std::sort(keys, keys + m, std::greater<int64_t>());
  for (int64_t j = 0; j < k; ++j) decode_key(j < m ? keys[j] : kKeyInvalid, values[j], ids[j]);
}

}  // namespace recsys_kernels::scoring_cpu

namespace recsys_kernels::scoring_cpu {

// fp32 values of one table row (int8: code * scale + bias, two roundings). Returns false when an
// int8 row's scale or bias is not finite.
inline bool row_to_f32(const Table& t, int64_t row, float* out) {
  const uint8_t* r = t.data + row * t.row_bytes;
  switch (t.kind) {
    case Kind::kF32:
      std::memcpy(out, r, t.dim * 4);
      return true;
    case Kind::kF16: {
      const c10::Half* h = reinterpret_cast<const c10::Half*>(r);
      for (int64_t c = 0; c < t.dim; ++c) out[c] = static_cast<float>(h[c]);
      return true;
    }
    case Kind::kBF16: {
      const c10::BFloat16* h = reinterpret_cast<const c10::BFloat16*>(r);
      for (int64_t c = 0; c < t.dim; ++c) out[c] = static_cast<float>(h[c]);
      return true;
    }
    case Kind::kQ8: {
      float scale, bias;
      std::memcpy(&scale, r + t.dim, 4);
      std::memcpy(&bias, r + t.dim + 4, 4);
      for (int64_t c = 0; c < t.dim; ++c) {
        const float prod = static_cast<float>(r[c]) * scale;
        out[c] = prod + bias;
      }
      return std::isfinite(scale) && std::isfinite(bias);
    }
  }
  return true;
}

}  // namespace recsys_kernels::scoring_cpu
