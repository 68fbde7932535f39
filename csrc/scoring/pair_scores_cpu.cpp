// C++ CPU kernels of pair_scores, pair_scores_backward, candidate_scores and candidate_topk
// (semantics and messages: recsys_kernels/ops/scoring.py). The scores are a fused gather + dot per
// pair (scoring_cpu_kernels.h), prefetching the rows of pairs a few ahead, in parallel over pairs
// (users for the candidate ops). The backward sorts the pairs by user and by item (stable) and
// lets each thread own whole gradient rows: deterministic, no atomics.
#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/fresh_memory.h"
#include "scoring/scoring_cpu_common.h"

namespace recsys_kernels {
namespace {

using namespace scoring_cpu;

// Runs the gather-dot of a.n pairs in parallel chunks; a's index pointers are the chunk bases.
void dot_pairs_parallel(const DotArgs& a, int64_t idx_bytes) {
  std::atomic<bool> ok{true};
  const bool avx2 = use_avx2();
  at::parallel_for(0, a.n, 8192, [&](int64_t p0, int64_t p1) {
    DotArgs c = a;
    c.n = p1 - p0;
    c.out = a.out + p0;
    c.item_idx = static_cast<const uint8_t*>(a.item_idx) + p0 * idx_bytes;
    if (a.user_idx != nullptr) c.user_idx = static_cast<const uint8_t*>(a.user_idx) + p0 * idx_bytes;
    if (!(avx2 ? dot_pairs_avx2(c) : dot_pairs_scalar(c))) ok = false;
  });
  if (!ok) raise_non_finite();
}

// Two index tensors of one dtype (int64 when they differ), contiguous.
DotArgs dot_args(const at::Tensor& queries, const Table& items, const at::Tensor& bias, const at::Tensor& item_idx) {
  DotArgs a{};
  a.q_kind = float_kind(queries.scalar_type());
  a.queries = static_cast<const uint8_t*>(queries.const_data_ptr());
  a.q_row_bytes = queries.size(1) * queries.element_size();
  a.item_kind = items.kind;
  a.items = items.data;
  a.item_row_bytes = items.row_bytes;
  a.dim = items.dim;
  a.idx64 = item_idx.scalar_type() == at::kLong;
  a.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  // both tables are gathered
  a.rows_from_dram = static_cast<int64_t>(queries.nbytes()) + items.rows * items.row_bytes > l2_prefetch_bytes();
  return a;
}

// ----------------------------------------------------------------------------- pair_scores
at::Tensor pair_scores_cpu(const at::Tensor& user_emb_in, const at::Tensor& item_emb_in, const at::Tensor& user_idx_in,
                           const at::Tensor& item_idx_in, const std::optional<at::Tensor>& item_bias) {
  const auto [user_emb, item_emb, user_idx, item_idx, items] = pair_inputs(user_emb_in, item_emb_in, user_idx_in,
                                                                          item_idx_in);
  const at::Tensor bias = bias_f32(item_bias, items.rows);
  check_index_range(user_idx, user_emb.size(0), "user_idx");
  check_index_range(item_idx, items.rows, "item_idx");
  at::Tensor out = at::empty({user_idx.size(0)}, user_emb.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  DotArgs a = dot_args(user_emb, items, bias, item_idx);
  a.user_idx = user_idx.const_data_ptr();
  a.item_idx = item_idx.const_data_ptr();
  a.n = out.numel();
  a.out = out.data_ptr<float>();
  dot_pairs_parallel(a, item_idx.element_size());
  return out;
}

// Stable order of the pairs by row, as CSR: pairs order[start[r] .. start[r + 1]) have row r.
struct RowGroups {
  std::vector<int64_t> start, order;
};

RowGroups group_by_row(const at::Tensor& idx64, int64_t n_rows) {
  const int64_t* idx = idx64.const_data_ptr<int64_t>();
  const int64_t n = idx64.numel();
  RowGroups g;
  g.start.assign(n_rows + 1, 0);
  for (int64_t p = 0; p < n; ++p) ++g.start[idx[p] + 1];
  for (int64_t r = 0; r < n_rows; ++r) g.start[r + 1] += g.start[r];
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  g.order.resize(n);
  for (int64_t p = 0; p < n; ++p) g.order[fill[idx[p]]++] = p;
  return g;
}

// out[r] = sum over the pairs p of row r, in pair order, of g[p] * other[other_idx[p]] (fp32).
// Returns false when an int8 row of `other` had a non-finite scale or bias.
bool accumulate_rows(const RowGroups& groups, const float* g, const Table& other, const int64_t* other_idx,
                     float* out, int64_t n_rows, float* bias_out) {
  std::atomic<bool> ok{true};
  const int64_t d = other.dim;
  at::parallel_for(0, n_rows, grain_rows(std::max<int64_t>(1, d) * 4), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(d);
    bool fine = true;
    for (int64_t r = r0; r < r1; ++r) {
      float* acc = out + r * d;
      std::fill(acc, acc + d, 0.0f);
      float bsum = 0.0f;
      for (int64_t j = groups.start[r]; j < groups.start[r + 1]; ++j) {
        const int64_t p = groups.order[j];
        fine &= row_to_f32(other, other_idx[p], row.data());
        const float gp = g[p];
        for (int64_t c = 0; c < d; ++c) {
          const float prod = gp * row[c];
          acc[c] = acc[c] + prod;
        }
        bsum = bsum + gp;
      }
      if (bias_out != nullptr) bias_out[r] = bsum;
    }
    if (!fine) ok = false;
  });
  return ok;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_scores_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& user_emb_in, const at::Tensor& item_emb_in,
    const at::Tensor& user_idx_in, const at::Tensor& item_idx_in, const std::optional<at::Tensor>& item_bias) {
  const auto [user_emb, item_emb, user_idx, item_idx, items] = pair_inputs(user_emb_in, item_emb_in, user_idx_in,
                                                                          item_idx_in);
  const Table users = table_view(user_emb, "user_emb", false);
  check_pair_grad(grad_output, user_idx.size(0), item_bias, items.rows);
  check_index_range(user_idx, users.rows, "user_idx");
  check_index_range(item_idx, items.rows, "item_idx");
  const at::Tensor g = grad_output.to(at::kFloat).contiguous();
  const at::Tensor ui = user_idx.to(at::kLong).contiguous(), ii = item_idx.to(at::kLong).contiguous();
  const auto f32 = user_emb.options().dtype(at::kFloat);

  at::Tensor grad_user = empty_for_writing({users.rows, users.dim}, f32);
  bool ok = accumulate_rows(group_by_row(ui, users.rows), g.const_data_ptr<float>(), items,
                            ii.const_data_ptr<int64_t>(), grad_user.data_ptr<float>(), users.rows, nullptr);
  if (!ok) raise_non_finite();

  at::Tensor grad_item = at::empty({0}, f32), grad_bias = at::empty({0}, f32);
  const bool want_bias = item_bias.has_value();
  if (items.kind != Kind::kQ8 || want_bias) {
    const RowGroups by_item = group_by_row(ii, items.rows);
    at::Tensor bias_f = want_bias ? at::empty({items.rows}, f32) : at::Tensor();
    float* bias_out = want_bias ? bias_f.data_ptr<float>() : nullptr;
    if (items.kind != Kind::kQ8) {
      grad_item = empty_for_writing({items.rows, items.dim}, f32);
      accumulate_rows(by_item, g.const_data_ptr<float>(), users, ui.const_data_ptr<int64_t>(),
                      grad_item.data_ptr<float>(), items.rows, bias_out);
      grad_item = grad_item.to(item_emb.scalar_type());
    } else {
      const float* gp = g.const_data_ptr<float>();
      for (int64_t r = 0; r < items.rows; ++r) {
        float s = 0.0f;
        for (int64_t j = by_item.start[r]; j < by_item.start[r + 1]; ++j) s = s + gp[by_item.order[j]];
        bias_out[r] = s;
      }
    }
    if (want_bias) grad_bias = bias_f.to(item_bias->scalar_type());
  }
  return {grad_user.to(user_emb.scalar_type()), grad_item, grad_bias};
}

// ----------------------------------------------------------------------------- candidates
struct Candidates {
  at::Tensor queries, items_t, offsets, cand, bias;
  Table items;
};

Candidates check_candidates(const at::Tensor& queries, const at::Tensor& items, const at::Tensor& cand_offsets,
                            const at::Tensor& cand_items, const std::optional<at::Tensor>& item_bias) {
  const CandidateInputs in = candidate_inputs(queries, items, cand_offsets, cand_items);
  Candidates c;
  c.items_t = in.items_t;
  c.items = in.items;
  c.queries = queries.contiguous();
  c.bias = bias_f32(item_bias, c.items.rows);
  c.offsets = check_offsets(in.offsets, in.cand.size(0), "cand_offsets");
  check_index_range(in.cand, c.items.rows, "cand_items");
  c.cand = in.cand;
  return c;
}

// Scores of users [u0, u1)'s candidates into out[p - out_start] for p in the users' CSR ranges.
// False: an int8 row had a non-finite scale or bias.
bool score_candidates(const Candidates& c, int64_t u0, int64_t u1, float* out, int64_t out_start, bool avx2) {
  const int64_t* off = c.offsets.const_data_ptr<int64_t>();
  DotArgs a = dot_args(c.queries, c.items, c.bias, c.cand);
  bool ok = true;
  for (int64_t u = u0; u < u1; ++u) {
    a.fixed_user = u;
    a.item_idx = static_cast<const uint8_t*>(c.cand.const_data_ptr()) + off[u] * c.cand.element_size();
    a.n = off[u + 1] - off[u];
    a.out = out + (off[u] - out_start);
    if (a.n > 0) ok &= avx2 ? dot_pairs_avx2(a) : dot_pairs_scalar(a);
  }
  return ok;
}

// Users per parallel chunk: about 8192 candidates.
int64_t user_grain(const Candidates& c) {
  const int64_t users = std::max<int64_t>(1, c.queries.size(0));
  return std::max<int64_t>(1, 8192 * users / std::max<int64_t>(1, c.cand.size(0)));
}

at::Tensor candidate_scores_cpu(const at::Tensor& queries, const at::Tensor& items, const at::Tensor& cand_offsets,
                                const at::Tensor& cand_items, const std::optional<at::Tensor>& item_bias) {
  const Candidates c = check_candidates(queries, items, cand_offsets, cand_items, item_bias);
  at::Tensor out = at::empty({c.cand.size(0)}, queries.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  std::atomic<bool> ok{true};
  const bool avx2 = use_avx2();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, c.queries.size(0), user_grain(c), [&](int64_t u0, int64_t u1) {
    if (!score_candidates(c, u0, u1, o, 0, avx2)) ok = false;
  });
  if (!ok) raise_non_finite();
  return out;
}

std::tuple<at::Tensor, at::Tensor> candidate_topk_cpu(const at::Tensor& queries, const at::Tensor& items,
                                                      const at::Tensor& cand_offsets, const at::Tensor& cand_items,
                                                      int64_t k, const std::optional<at::Tensor>& item_bias) {
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  check_item_count(items.size(0));
  const Candidates c = check_candidates(queries, items, cand_offsets, cand_items, item_bias);
  const int64_t n_users = c.queries.size(0);
  at::Tensor values = at::empty({n_users, k}, queries.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({n_users, k}, queries.options().dtype(at::kLong));
  if (n_users == 0) return {values, ids};
  std::atomic<bool> ok{true};
  const bool avx2 = use_avx2();
  const int64_t* off = c.offsets.const_data_ptr<int64_t>();
  float* vo = values.data_ptr<float>();
  int64_t* io = ids.data_ptr<int64_t>();
  const bool i64 = c.cand.scalar_type() == at::kLong;
  at::parallel_for(0, n_users, user_grain(c), [&](int64_t u0, int64_t u1) {
    std::vector<float> scores;
    std::vector<int64_t> keys;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = off[u + 1] - off[u];
      scores.resize(n);
      keys.resize(n);
      if (!score_candidates(c, u, u + 1, scores.data(), off[u], avx2)) ok = false;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = off[u] + j;
        const int64_t id = i64 ? c.cand.const_data_ptr<int64_t>()[p] : c.cand.const_data_ptr<int32_t>()[p];
        keys[j] = rank_key(scores[j], id);
      }
      write_top(keys.data(), n, k, vo + u * k, io + u * k);
    }
  });
  if (!ok) raise_non_finite();
  return {values, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) {
  m.impl("pair_scores", &pair_scores_cpu);
  m.impl("pair_scores_backward", &pair_scores_backward_cpu);
  m.impl("candidate_scores", &candidate_scores_cpu);
  m.impl("candidate_topk", &candidate_topk_cpu);
}

}  // namespace recsys_kernels
