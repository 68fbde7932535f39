// C++ CPU kernel of topk_scores: fused score + top-k over the whole catalog, never materialising
// [U, I] (semantics and messages: recsys_kernels/ops/scoring.py).
//
// Queries are packed once into panels of 16 ([D][16] fp32, zero-padded). The work is split into
// units (a slab of up to 1024 queries) x (a range of items), enough for every thread. A unit walks
// its items in chunks that fit L1 (fp16/bf16/int8 chunks are converted to fp32 rows first, int8 as
// code * scale + bias) and, per chunk, scores every panel of the slab with the register-tile
// kernel (scoring_cpu_kernels.h: 16 queries x 6 items, fma over d), which only reports the scores
// not below the query's running threshold. Each query keeps a buffer of ranking keys (the
// reference's int64 key: score ordinal, then lower id first, so ties and NaN rank exactly as the
// reference does, whatever order the candidates come in) with a floor: when the buffer is full it
// is cut to its k largest keys (nth_element), the k-th becomes the floor, and its score the
// threshold the tile kernel compares with. Excluded items (per-query sorted CSR lists) are
// dropped when they are offered: a query's candidates come in increasing item order, so a cursor
// walks its sorted list once. Units over different item ranges are merged per query at the end.
// On the AVX2 and VNNI paths, catalogs of 65536 items or more go through the integer prefilter
// (scoring_cpu_kernels.h) instead of the tile: int8 catalogs as they are (for 17 queries or more),
// float catalogs (for 64 queries or more) quantized chunk by chunk; what it lets through is
// rescored exactly. Other catalogs' chunks are converted to fp32 rows for the tile.
#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "scoring/scoring_cpu_common.h"

namespace recsys_kernels {
namespace {

using namespace scoring_cpu;

constexpr int64_t kMaxSlabGroups = 64;  // 1024 queries per unit at most
constexpr int64_t kChunkBytes = 24 << 10;  // fp32 item rows per chunk: L1-sized
constexpr int64_t kMinRangeItems = 2048;
constexpr int64_t kPrefilterMinItems = 65536;  // the integer prefilter from this catalog size
constexpr int64_t kFloatPrefilterMinUsers = 64;   // float catalogs: and this many queries (see there)
constexpr int64_t kInt8PrefilterMinUsers = kLanes + 1;  // int8 catalogs: more than one group (see there)

float threshold_of(int64_t floor_key) {
  const int64_t ord = floor_key >> 32;
  return ord <= kOrdNan ? std::numeric_limits<float>::quiet_NaN() : ordinal_value(ord);
}

// The AVX2 / VNNI paths on catalogs of kPrefilterMinItems or more: the queries quantized for the
// integer prefilter (scoring_cpu_kernels.h, Q8TileArgs), per group of 16 queries.
struct Q8Queries {
  std::vector<int8_t> panels;  // [groups][q8_quads(D)][16][4]
  std::vector<float> scale, sum, corr, err, norm, slack, norm_full;  // [groups * 16]
  std::vector<uint8_t> exact_only;  // [groups]: a non-finite or tiny query, use the fp32 path
};

Q8Queries quantize_queries(const float* q, int64_t n_users, int64_t d, int64_t groups, int query_max) {
  Q8Queries r;
  const int64_t quads = q8_quads(d);
  const float qmax = static_cast<float>(query_max);
  r.panels.assign(groups * quads * kLanes * 4, 0);
  r.scale.assign(groups * kLanes, 1.0f);
  for (auto* v : {&r.sum, &r.corr, &r.err, &r.norm, &r.slack, &r.norm_full}) v->assign(groups * kLanes, 0.0f);
  r.exact_only.assign(groups, 0);
  for (int64_t u = 0; u < n_users; ++u) {
    const float* row = q + u * d;
    const int64_t g = u / kLanes, lane = u % kLanes;
    float maxabs = 0.0f;
    bool finite = true;
    for (int64_t c = 0; c < d; ++c) {
      finite &= std::isfinite(row[c]);
      maxabs = std::max(maxabs, std::fabs(row[c]));
    }
    // (tiny queries too: the bound's roundings must stay in the normal range, see q8_quantize_rows)
    if (!finite || !std::isfinite(maxabs / qmax) || too_small_for_prefilter(maxabs)) {
      r.exact_only[g] = 1;
      continue;
    }
    const float qs = maxabs > 0.0f ? maxabs / qmax : 1.0f;
    // the error sums in double: their own rounding stays far below the bound's 2^-10 inflation
    double sum = 0.0, l1 = 0.0, sq = 0.0, err = 0.0, abs_err = 0.0, sq_err = 0.0;
    for (int64_t c = 0; c < d; ++c) {
      const float q8 = std::min(qmax, std::max(-qmax, std::nearbyint(row[c] / qs)));
      r.panels[((g * quads + c / 4) * kLanes + lane) * 4 + c % 4] = static_cast<int8_t>(q8);
      const double e = static_cast<double>(row[c]) - static_cast<double>(qs) * q8;  // qs * q8 exact
      err += e;
      abs_err += std::fabs(e);
      sq_err += e * e;
      sum += row[c];
      l1 += std::fabs(row[c]);
      sq += static_cast<double>(row[c]) * row[c];
    }
    r.scale[u] = qs;
    r.sum[u] = static_cast<float>(sum);
    r.corr[u] = static_cast<float>(127.5 * err);
    r.err[u] = static_cast<float>(127.5 * abs_err * (1.0 + 0x1p-10));
    r.norm[u] = static_cast<float>(std::sqrt(sq_err) * (1.0 + 0x1p-10));
    r.slack[u] = static_cast<float>(static_cast<double>(2 * d + 48) * 0x1p-24 * l1 * 1.25);
    r.norm_full[u] = static_cast<float>(std::sqrt(sq) * (1.0 + 0x1p-10));
  }
  return r;
}

// q8_code_norm of a packed row (q8_quantize_rows_avx2 computes it for the rows it makes).
float code_norm(const uint8_t* row, int64_t d) {
  int64_t sq = 0;
  for (int64_t c = 0; c < d; ++c) {
    const int64_t t = 2 * static_cast<int64_t>(row[c]) - 255;
    sq += t * t;
  }
  return q8_code_norm(sq);
}

// A packed row's terms in the prefilter's bound (Q8Row), given its code_norm.
Q8Row q8_row(const uint8_t* row, int64_t d, float item_bias, float norm) {
  Q8Row r;
  std::memcpy(&r.scale, row + d, 4);
  std::memcpy(&r.row_bias, row + d + 4, 4);
  r.abs_scale = std::fabs(r.scale);
  r.value_max = 255.0f * r.abs_scale + std::fabs(r.row_bias);
  r.norm = norm;
  r.bias_up = item_bias + std::fabs(item_bias) * 0x1p-20f;
  r.res_norm = 0.0f;
  return r;
}

// The same for a row of a float catalog's chunk quantized by q8_quantize_rows_avx2: the residual's
// term and the roundings of the fp32 score on the row itself (scoring_cpu_kernels.h). The sum of
// three non-negative floats * (1 + 2^-20) rounds up past their three roundings.
Q8Row q8_row_of_floats(const uint8_t* row, int64_t d, float item_bias, float norm, float res_norm, float abs_max) {
  Q8Row r = q8_row(row, d, item_bias, norm);
  r.res_norm = res_norm;
  r.value_max = (r.value_max + abs_max + res_norm) * (1.0f + 0x1p-20f);
  r.bias_up = item_bias + std::fabs(item_bias) * 0x1p-19f;
  return r;
}

struct Problem {
  Table items;
  const Q8Queries* q8 = nullptr;  // the int8 prefilter on (AVX2 or VNNI, a large catalog)
  int64_t n_users, k;
  const float* panels;   // [groups][D][16]
  const float* bias;     // [I] fp32 or nullptr
  const int64_t* ex_off;  // [U + 1] or nullptr
  const int64_t* ex_sorted;  // each user's exclusions, sorted
  int64_t (*tile)(const TileArgs&, Candidate*);       // the fp32 tile of the CPU's path
  int64_t (*tile_q8)(const Q8TileArgs&, Candidate*);  // the int8 prefilter (with q8)
  bool avx2;  // chunks of other dtypes converted to fp32 by rows_to_f32_avx2
};

// One unit: queries [u0, u1) (whole groups from g0) against items [i0, i1). Writes each query's
// top min(k, found) keys, descending, padded with kKeyInvalid, to out_keys[(u - u0) * k ...].
void run_unit(const Problem& P, int64_t g0, int64_t g1, int64_t i0, int64_t i1, int64_t* out_keys) {
  const int64_t d = P.items.dim, k = P.k;
  const int64_t u0 = g0 * kLanes, u1 = std::min(P.n_users, g1 * kLanes), n_local = u1 - u0;
  const int64_t range = i1 - i0;
  const int64_t cap = range <= k ? range : std::min(range, 2 * k + 64);
  // a float catalog through the prefilter: its chunks quantized here, the prefilter's rows
  const bool quantize_chunks = P.q8 != nullptr && P.items.kind != Kind::kQ8;
  const int64_t chunk_row_bytes = P.q8 == nullptr ? 4 * d : quantize_chunks ? d + 8 : P.items.row_bytes;
  int64_t chunk = std::max<int64_t>(12, std::min<int64_t>(1020, kChunkBytes / std::max<int64_t>(1, chunk_row_bytes)));
  chunk -= chunk % 12;

  std::vector<int64_t> buf(n_local * cap), size(n_local, 0),
      floor(n_local, std::numeric_limits<int64_t>::min());
  std::vector<float> thr((g1 - g0) * kLanes, std::numeric_limits<float>::quiet_NaN());
  std::vector<Candidate> cands(kLanes * chunk);
  // per query: the first of its sorted exclusions not below the items offered so far
  std::vector<int64_t> ex_at(P.ex_off != nullptr ? n_local : 0);
  for (int64_t lu = 0; lu < static_cast<int64_t>(ex_at.size()); ++lu) {
    const int64_t u = u0 + lu;
    ex_at[lu] = std::lower_bound(P.ex_sorted + P.ex_off[u], P.ex_sorted + P.ex_off[u + 1], i0) - P.ex_sorted;
  }
  std::vector<float> rows(P.items.kind == Kind::kF32 ? 0 : chunk * d);
  std::vector<float> q8_scratch(kQ8RescoreRows * d);  // the int8 prefilter's
  std::vector<Q8Row> row_info(chunk);
  std::vector<int32_t> passed(chunk);
  std::vector<uint8_t> q8_rows(quantize_chunks ? chunk * (d + 8) : 0);
  std::vector<float> norm(quantize_chunks ? chunk : 0), res_norm(norm.size()), abs_max(norm.size());

  for (int64_t c0 = i0; c0 < i1; c0 += chunk) {
    const int64_t n = std::min(chunk, i1 - c0);
    const float* x = nullptr;  // the chunk's fp32 rows, made when a group needs them
    auto fp32_rows = [&]() -> const float* {
      if (x == nullptr) {
        if (P.items.kind == Kind::kF32) {
          x = reinterpret_cast<const float*>(P.items.data + c0 * P.items.row_bytes);
        } else if (P.avx2) {
          rows_to_f32_avx2(P.items.kind, P.items.data + c0 * P.items.row_bytes, P.items.row_bytes, d, n, rows.data());
          x = rows.data();
        } else {
          for (int64_t i = 0; i < n; ++i) row_to_f32(P.items, c0 + i, rows.data() + i * d);
          x = rows.data();
        }
      }
      return x;
    };
    // the prefilter's bound needs rows of moderate size (packed: 2^-60 <= 255 |scale| + |bias| <=
    // 1e30 or 0, as the quantizer checks the rows it makes): its slack is relative, so scores in
    // the subnormal range could round past it (a tiny-scaled int8 catalog lost its top item)
    bool chunk_q8 = P.q8 != nullptr;
    if (quantize_chunks) {
      chunk_q8 = q8_quantize_rows_avx2(fp32_rows(), n, d, q8_rows.data(), norm.data(), res_norm.data(), abs_max.data());
    } else {
      for (int64_t i = 0; chunk_q8 && i < n; ++i) {
        float sb[2];
        std::memcpy(sb, P.items.data + (c0 + i) * P.items.row_bytes + d, 8);
        const float magnitude = 255.0f * std::fabs(sb[0]) + std::fabs(sb[1]);
        chunk_q8 = magnitude <= 1e30f && !too_small_for_prefilter(magnitude);
      }
    }
    TileArgs a{};
    a.bias = P.bias != nullptr ? P.bias + c0 : nullptr;
    a.dim = d;
    a.n_items = n;
    Q8TileArgs qa{};
    if (chunk_q8) {
      qa.rows = quantize_chunks ? q8_rows.data() : P.items.data + c0 * P.items.row_bytes;
      qa.row_bytes = quantize_chunks ? d + 8 : P.items.row_bytes;
      qa.exact_rows = quantize_chunks ? fp32_rows() : nullptr;
      qa.dim = d;
      qa.n_items = n;
      qa.bias = a.bias;
      qa.row_info = row_info.data();
      qa.passed = passed.data();
      qa.scratch = q8_scratch.data();
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = qa.rows + i * qa.row_bytes;
        const float item_bias = a.bias ? a.bias[i] : 0.0f;
        row_info[i] = quantize_chunks ? q8_row_of_floats(row, d, item_bias, norm[i], res_norm[i], abs_max[i])
                                      : q8_row(row, d, item_bias, code_norm(row, d));
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t valid = std::min<int64_t>(kLanes, P.n_users - g * kLanes);
      const uint32_t lane_mask = valid >= 32 ? 0xFFFFFFFFu : ((1u << valid) - 1u);
      const float* threshold = thr.data() + (g - g0) * kLanes;
      int64_t found;
      if (chunk_q8 && !P.q8->exact_only[g]) {
        const Q8Queries& Q = *P.q8;
        qa.qpanel = Q.panels.data() + g * q8_quads(d) * kLanes * 4;
        qa.qscale = Q.scale.data() + g * kLanes;
        qa.qsum = Q.sum.data() + g * kLanes;
        qa.qcorr = Q.corr.data() + g * kLanes;
        qa.qnorm = Q.norm.data() + g * kLanes;
        qa.qerr = Q.err.data() + g * kLanes;
        qa.qslack = Q.slack.data() + g * kLanes;
        qa.qnorm_full = Q.norm_full.data() + g * kLanes;
        qa.panel = P.panels + g * d * kLanes;
        qa.threshold = threshold;
        qa.lane_mask = lane_mask;
        found = P.tile_q8(qa, cands.data());
      } else {
        a.items = fp32_rows();
        a.panel = P.panels + g * d * kLanes;
        a.threshold = threshold;
        a.lane_mask = lane_mask;
        found = P.tile(a, cands.data());
      }
      for (int64_t j = 0; j < found; ++j) {
        const Candidate& cd = cands[j];
        const int64_t u = g * kLanes + cd.lane, lu = u - u0, id = c0 + cd.item;
        const int64_t key = rank_key(cd.score, id);
        if (key <= floor[lu]) continue;
        if (P.ex_off != nullptr) {  // a lane's candidates come in increasing id order: walk its list once
          const int64_t* ex = P.ex_sorted;
          int64_t& at = ex_at[lu];
          while (at < P.ex_off[u + 1] && ex[at] < id) ++at;
          if (at < P.ex_off[u + 1] && ex[at] == id) continue;
        }
        int64_t* b = buf.data() + lu * cap;
        if (size[lu] == cap) {  // cut to the k best; the k-th becomes the floor
          std::nth_element(b, b + (k - 1), b + cap, std::greater<int64_t>());
          floor[lu] = b[k - 1];
          size[lu] = k;
          thr[(g - g0) * kLanes + cd.lane] = threshold_of(floor[lu]);
          if (key <= floor[lu]) continue;
        }
        b[size[lu]++] = key;
      }
    }
  }
  for (int64_t lu = 0; lu < n_local; ++lu) {
    int64_t* b = buf.data() + lu * cap;
    const int64_t m = std::min(k, size[lu]);
    if (m < size[lu]) std::nth_element(b, b + m, b + size[lu], std::greater<int64_t>());
    std::sort(b, b + m, std::greater<int64_t>());
    int64_t* o = out_keys + lu * k;
    std::copy(b, b + m, o);
    std::fill(o + m, o + k, kKeyInvalid);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_scores_cpu(const at::Tensor& queries_in, const at::Tensor& items_in, int64_t k,
                                                   const std::optional<at::Tensor>& exclude_offsets,
                                                   const std::optional<at::Tensor>& exclude_items,
                                                   const std::optional<at::Tensor>& item_bias) {
  const at::Tensor items_t = items_in.contiguous();
  Problem P{};
  P.items = table_view(items_t, "items", true);
  check_queries(queries_in, "queries", P.items.dim, "items");
  const int64_t n_users = queries_in.size(0), n_items = P.items.rows, d = P.items.dim;
  TORCH_CHECK_VALUE(k >= 0 && k <= n_items, "k must be in [0, ", n_items, "] (the number of items), got ", k);
  check_item_count(n_items);
  TORCH_CHECK_VALUE(exclude_offsets.has_value() == exclude_items.has_value(),
                    "exclude_offsets and exclude_items must be given together");
  at::Tensor ex_off, ex_items;
  if (exclude_offsets.has_value()) {
    check_index_tensor(*exclude_offsets, "exclude_offsets");
    check_index_tensor(*exclude_items, "exclude_items");
    TORCH_CHECK_VALUE(exclude_offsets->size(0) == n_users + 1, "exclude_offsets must have U + 1 = ", n_users + 1,
                      " elements, got ", exclude_offsets->size(0));
  }
  const at::Tensor bias = bias_f32(item_bias, n_items);  // metadata before values, as the front door
  if (exclude_offsets.has_value()) {
    ex_off = check_offsets(*exclude_offsets, exclude_items->size(0), "exclude_offsets");
    check_index_range(*exclude_items, n_items, "exclude_items");
    ex_items = exclude_items->to(at::kLong).contiguous().clone();
  }
  at::Tensor values = at::empty({n_users, k}, queries_in.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({n_users, k}, queries_in.options().dtype(at::kLong));
  if (n_users == 0) return {values, ids};
  if (P.items.kind == Kind::kQ8) {  // the reference dequantizes (and checks) every row
    std::atomic<bool> ok{true};
    at::parallel_for(0, n_items, 65536, [&](int64_t r0, int64_t r1) {
      bool fine = true;
      for (int64_t r = r0; r < r1; ++r) {
        float sb[2];
        std::memcpy(sb, P.items.data + r * P.items.row_bytes + d, 8);
        fine &= std::isfinite(sb[0]) && std::isfinite(sb[1]);
      }
      if (!fine) ok = false;
    });
    if (!ok) raise_non_finite();
  }
  if (k == 0) return {values, ids};

  // query panels [groups][D][16]
  const int64_t groups = ceil_div(n_users, kLanes);
  at::Tensor panels = at::zeros({groups, d, kLanes}, queries_in.options().dtype(at::kFloat));
  const at::Tensor qf = queries_in.to(at::kFloat).contiguous();
  {
    const float* q = qf.const_data_ptr<float>();
    float* p = panels.data_ptr<float>();
    for (int64_t u = 0; u < n_users; ++u)
      for (int64_t c = 0; c < d; ++c) p[((u / kLanes) * d + c) * kLanes + u % kLanes] = q[u * d + c];
  }
  P.n_users = n_users;
  P.k = k;
  P.panels = panels.const_data_ptr<float>();
  P.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const CpuIsa isa = cpu_isa();
  P.tile = isa >= CpuIsa::kAvx512 ? score_tile_avx512 : isa >= CpuIsa::kAvx2 ? score_tile_avx2 : score_tile_scalar;
  P.avx2 = isa >= CpuIsa::kAvx2;
  const bool vnni = isa >= CpuIsa::kAvx512Vnni;  // the prefilter's kernel and its query range
  P.tile_q8 = vnni ? score_tile_q8_vnni : score_tile_q8_avx2;
  Q8Queries q8;
  // The prefilter pays on catalogs that stream from memory; on a small one every item of the
  // first chunks passes it (the thresholds start empty) and is rescored one by one, measured 3x
  // slower than dequantizing each chunk once for the fp32 tiles (1500 items, 256 queries, k=10).
  // A float catalog's chunks are quantized once per slab of queries, which must be large enough
  // to repay it; an int8 catalog's row terms (Q8Row) are computed once per chunk for all groups,
  // which one group does not repay: 1 query over 1M int8 rows 17.9 ms through the prefilter, 11.2
  // ms dequantized for the fp32 tile (8 and 16 queries even, 32 queries 22.7 against 27.7 ms).
  // The int32 sums stay exact while D * 255 * query_max < 2^31.
  const auto exact_sums = [d](int query_max) { return d * 255 * query_max < (int64_t{1} << 31); };
  if (isa >= CpuIsa::kAvx2 && d > 0 && n_items >= kPrefilterMinItems && exact_sums(kQ8QueryMax) &&
      n_users >= (P.items.kind == Kind::kQ8 ? kInt8PrefilterMinUsers : kFloatPrefilterMinUsers)) {
    const int query_max = vnni && exact_sums(kQ8QueryMaxVnni) ? kQ8QueryMaxVnni : kQ8QueryMax;
    q8 = quantize_queries(qf.const_data_ptr<float>(), n_users, d, groups, query_max);
    P.q8 = &q8;
  }
  if (ex_off.defined()) {
    P.ex_off = ex_off.const_data_ptr<int64_t>();
    int64_t* ex = ex_items.data_ptr<int64_t>();
    at::parallel_for(0, n_users, 256, [&](int64_t a, int64_t b) {
      for (int64_t u = a; u < b; ++u) std::sort(ex + P.ex_off[u], ex + P.ex_off[u + 1]);
    });
    P.ex_sorted = ex;
  }

  // units: slabs of query groups x item ranges, balanced over the threads
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t n_slabs = ceil_div(groups, kMaxSlabGroups);
  const int64_t slab_groups = ceil_div(groups, n_slabs);
  n_slabs = ceil_div(groups, slab_groups);
  int64_t n_ranges = n_slabs % threads == 0 ? 1 : threads;
  n_ranges = std::max<int64_t>(1, std::min(n_ranges, n_items / kMinRangeItems));
  const int64_t range_items = ceil_div(n_items, n_ranges);
  n_ranges = ceil_div(n_items, range_items);

  float* vo = values.data_ptr<float>();
  int64_t* io = ids.data_ptr<int64_t>();
  // per range: [U][k] keys
  std::vector<int64_t> part(checked_mul(checked_mul(n_ranges, n_users, "topk_scores buffer"), k, "topk_scores buffer"));
  at::parallel_for(0, n_slabs * n_ranges, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / n_ranges, r = t % n_ranges;
      const int64_t g0 = s * slab_groups, g1 = std::min(groups, g0 + slab_groups);
      const int64_t i0 = r * range_items, i1 = std::min(n_items, i0 + range_items);
      run_unit(P, g0, g1, i0, i1, part.data() + (r * n_users + g0 * kLanes) * k);
    }
  });
  at::parallel_for(0, n_users, 64, [&](int64_t a, int64_t b) {
    std::vector<int64_t> merged(n_ranges * k);
    for (int64_t u = a; u < b; ++u) {
      for (int64_t r = 0; r < n_ranges; ++r) {
        const int64_t* src = part.data() + (r * n_users + u) * k;
        std::copy(src, src + k, merged.begin() + r * k);
      }
      write_top(merged.data(), n_ranges * k, k, vo + u * k, io + u * k);
    }
  });
  return {values, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) { m.impl("topk_scores", &topk_scores_cpu); }

}  // namespace recsys_kernels
