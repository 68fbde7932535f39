// AVX2+FMA+F16C inner kernels of the scoring ops (see scoring_cpu_kernels.h for the arithmetic
// they share with the scalar versions). Every function carries the target attribute (the build has
// no -mavx2); callers check recsys_kernels::cpu_isa() first. fp-contract=off: only the explicit
// _mm256_fmadd_ps calls fuse; the int8 dequantization stays a rounded product plus a rounded sum.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/avx2_rows.h"
#include "scoring/scoring_cpu_kernels.h"

namespace recsys_kernels::scoring_cpu {
namespace {

using avx2::BF16;
using avx2::F16;
using avx2::F32;
using avx2::Q8;
using avx2::RowParams;

RK_AVX2_INLINE float hsum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a_j + a_{j+4}
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                               // (0+4)+(2+6), (1+5)+(3+7)
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x55));
  return _mm_cvtss_f32(s1);
}

template <typename I>
RK_AVX2_INLINE int64_t idx_at(const void* p, int64_t i) {
  return static_cast<int64_t>(static_cast<const I*>(p)[i]);
}

// Pairs ahead whose rows are prefetched. A 1M-pair microbenchmark (fp32, D = 64: 8 lines a pair)
// ran 5-25% faster with 8 than with 12 in 6 of 7 interleaved runs; 4 was close to 8, 16 and 24 slower.
constexpr int64_t kPrefetch = 8;

// Every line of the row of `bytes` bytes at p: one prefetch per 64 bytes from its first byte
// (lines = ceil(bytes / 64) of them) and one at its last byte (a row that does not start a line
// may reach one line further). With a loop over the lines per row instead of the straight-line
// prefetch_lines, the 1M-pair fp32 D = 64 benchmark ran 1.2x slower (2 threads, 77-79 ms against
// 54-67 ms).
// L2: into L2 only (DotArgs::rows_from_dram).
template <bool L2>
RK_AVX2_INLINE void prefetch_row(const uint8_t* p, int64_t lines, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  avx2::prefetch_lines<L2>(c, lines);
  avx2::prefetch_line<L2>(c + bytes - 1);
}

template <typename QL, typename IL, typename I, bool L2>
RK_AVX2 bool dot_pairs_impl(const DotArgs& a) {
  const int64_t d = a.dim, d8 = d & ~int64_t(7);
  bool ok = true;
  const bool fixed = a.user_idx == nullptr;
  const int64_t item_lines = (a.item_row_bytes + 63) / 64, q_lines = (a.q_row_bytes + 63) / 64;
  for (int64_t p = 0; p < a.n; ++p) {
    if (p + kPrefetch < a.n) {
      prefetch_row<L2>(a.items + idx_at<I>(a.item_idx, p + kPrefetch) * a.item_row_bytes, item_lines,
                       a.item_row_bytes);
      if (!fixed) {
        prefetch_row<L2>(a.queries + idx_at<I>(a.user_idx, p + kPrefetch) * a.q_row_bytes, q_lines, a.q_row_bytes);
      }
    }
    const int64_t item = idx_at<I>(a.item_idx, p);
    const uint8_t* q = a.queries + (fixed ? a.fixed_user : idx_at<I>(a.user_idx, p)) * a.q_row_bytes;
    const uint8_t* x = a.items + item * a.item_row_bytes;
    const RowParams rp = IL::params(x, d, ok);
    __m256 acc = _mm256_setzero_ps();
    // Unrolled, so a pair is half the instructions and the reorder window holds twice as many
    // pairs' loads in flight: with the plain loop, 2 threads ran 1.3x a fixed-D loop, unrolled 1.1x.
#pragma GCC unroll 8
    for (int64_t c = 0; c < d8; c += 8) acc = _mm256_fmadd_ps(QL::load(q, c, {}), IL::load(x, c, rp), acc);
    float s = hsum(acc);
    for (int64_t c = d8; c < d; ++c) s = std::fma(QL::scalar(q, c, {}), IL::scalar(x, c, rp), s);
    if (a.bias != nullptr) s = s + a.bias[item];
    a.out[p] = s;
  }
  return ok;
}

template <typename QL, typename IL, bool L2>
RK_AVX2 bool dot_pairs_idx(const DotArgs& a) {
  return a.idx64 ? dot_pairs_impl<QL, IL, int64_t, L2>(a) : dot_pairs_impl<QL, IL, int32_t, L2>(a);
}

template <typename QL, typename IL>
RK_AVX2 bool dot_pairs_far(const DotArgs& a) {
  return a.rows_from_dram ? dot_pairs_idx<QL, IL, true>(a) : dot_pairs_idx<QL, IL, false>(a);
}

template <typename QL>
RK_AVX2 bool dot_pairs_q(const DotArgs& a) {
  switch (a.item_kind) {
    case Kind::kF32: return dot_pairs_far<QL, F32>(a);
    case Kind::kF16: return dot_pairs_far<QL, F16>(a);
    case Kind::kBF16: return dot_pairs_far<QL, BF16>(a);
    case Kind::kQ8: return dot_pairs_far<QL, Q8>(a);
  }
  return true;
}

// ----------------------------------------------------------------------------- score tile
// NI items x 16 queries: 2 * NI accumulators (queries in lanes), each an fma chain over d.
template <int NI>
RK_AVX2_INLINE int64_t tile_block(const TileArgs& a, int64_t i0, __m256 thr0, __m256 thr1, Candidate* out) {
  __m256 acc[NI][2];
  for (int i = 0; i < NI; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const float* x = a.items + i0 * a.dim;
  const float* panel = a.panel;
  for (int64_t d = 0; d < a.dim; ++d) {
    const __m256 p0 = _mm256_loadu_ps(panel + d * kLanes), p1 = _mm256_loadu_ps(panel + d * kLanes + 8);
    for (int i = 0; i < NI; ++i) {
      const __m256 b = _mm256_broadcast_ss(x + i * a.dim + d);
      acc[i][0] = _mm256_fmadd_ps(p0, b, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(p1, b, acc[i][1]);
    }
  }
  if (a.bias != nullptr) {
    for (int i = 0; i < NI; ++i) {
      const __m256 b = _mm256_set1_ps(a.bias[i0 + i]);
      acc[i][0] = _mm256_add_ps(acc[i][0], b);
      acc[i][1] = _mm256_add_ps(acc[i][1], b);
    }
  }
  // Masks and scores leave the registers in straight-line code: indexing acc[] with a run-time i
  // (the candidate loop below) would keep the accumulators in memory during the fma loop above.
  uint32_t mask[NI];
  uint32_t any = 0;
  alignas(32) float s[NI][kLanes];
  for (int i = 0; i < NI; ++i) {
    mask[i] = (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[i][0], thr0, _CMP_NLT_UQ))) |
               (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(acc[i][1], thr1, _CMP_NLT_UQ))) << 8)) &
              a.lane_mask;
    any |= mask[i];
    _mm256_store_ps(s[i], acc[i][0]);
    _mm256_store_ps(s[i] + 8, acc[i][1]);
  }
  if (any == 0) return 0;
  int64_t n = 0;
  for (int i = 0; i < NI; ++i) {
    for (uint32_t m = mask[i]; m != 0; m &= m - 1) {
      const int lane = __builtin_ctz(m);
      out[n++] = {static_cast<int32_t>(i0 + i), lane, s[i][lane]};
    }
  }
  return n;
}

// ----------------------------------------------------------------------------- int8 prefilter
// NI items x 16 queries of int32 sums. Per 8 columns (two quads): per item, two broadcasts of
// its 4 codes; per 8 queries, two vpmaddubsw (u8 codes x s8 queries, pair sums in int16), their
// int16 sum (no saturation: |q8| <= 32), one vpmaddwd by 1 into int32. Measured on Zen 3: 1.5x
// the throughput of one vpmaddwd per vpmaddubsw; four per vpmaddwd (|q8| <= 16) ran 17% slower in
// the kernel (eight panel registers do not fit, the loads set the pace). Blocks of 3 items: at 4
// GCC spilled accumulators. Appends the items with a lane that could reach its threshold to
// `passed`. RESIDUAL: a float catalog's rows, whose bound has the residual's term.
template <int NI, bool RESIDUAL>
RK_AVX2_INLINE int64_t q8_block(const Q8TileArgs& a, int64_t i0, int32_t* passed) {
  __m256i acc[NI][2];
  for (int i = 0; i < NI; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t quads = q8_quads(a.dim);
  const uint8_t* base = a.rows + i0 * a.row_bytes;
  for (int64_t c = 0; c < quads; c += 2) {
    const int8_t* p = a.qpanel + c * 64;
    const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    const __m256i p2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
    const __m256i p3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96));
    for (int i = 0; i < NI; ++i) {
      int32_t codes[2];
      std::memcpy(codes, base + i * a.row_bytes + 4 * c, 8);
      const __m256i b0 = _mm256_set1_epi32(codes[0]), b1 = _mm256_set1_epi32(codes[1]);
      const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(b0, p0), _mm256_maddubs_epi16(b1, p2));
      const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(b0, p1), _mm256_maddubs_epi16(b1, p3));
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(s0, ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(s1, ones));
    }
  }
  // The upper bound of each (lane, item) in fused steps (each rounding is covered by qslack);
  // the per-query terms are loaded here, not held across the loop above, where ten more live
  // registers spilled accumulators. The masks leave the registers in straight-line code (see
  // tile_block).
  uint32_t mask[NI];
  for (int i = 0; i < NI; ++i) {
    const Q8Row& r = a.row_info[i0 + i];
    const __m256 scale = _mm256_set1_ps(r.scale), row_bias = _mm256_set1_ps(r.row_bias);
    const __m256 abs_scale = _mm256_set1_ps(r.abs_scale), value_max = _mm256_set1_ps(r.value_max);
    const __m256 norm = _mm256_set1_ps(r.norm), bias_up = _mm256_set1_ps(r.bias_up);
    mask[i] = 0;
    for (int h = 0; h < 2; ++h) {
      const int o = 8 * h;
      __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][h]), _mm256_loadu_ps(a.qscale + o), _mm256_loadu_ps(a.qcorr + o));
      t = _mm256_fmadd_ps(t, scale, bias_up);
      t = _mm256_fmadd_ps(row_bias, _mm256_loadu_ps(a.qsum + o), t);
      const __m256 qe = _mm256_min_ps(_mm256_loadu_ps(a.qerr + o), _mm256_mul_ps(_mm256_loadu_ps(a.qnorm + o), norm));
      t = _mm256_fmadd_ps(abs_scale, qe, t);
      if constexpr (RESIDUAL) t = _mm256_fmadd_ps(_mm256_set1_ps(r.res_norm), _mm256_loadu_ps(a.qnorm_full + o), t);
      t = _mm256_fmadd_ps(value_max, _mm256_loadu_ps(a.qslack + o), t);
      mask[i] |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(t, _mm256_loadu_ps(a.threshold + o), _CMP_NLT_UQ))) << o;
    }
  }
  int64_t n = 0;
  for (int i = 0; i < NI; ++i) {
    passed[n] = static_cast<int32_t>(i0 + i);
    n += (mask[i] & a.lane_mask) != 0;
  }
  return n;
}

// Exact scores of the NI listed items of the chunk (q8_rescore_args, then the fp32 tile).
// Candidates name the chunk's items.
template <int NI>
RK_AVX2_INLINE int64_t q8_rescore(const Q8TileArgs& a, const int32_t* items, Candidate* out) {
  float bias[NI];
  const TileArgs t = q8_rescore_args(a, items, NI, bias);
  const int64_t n = tile_block<NI>(t, 0, _mm256_loadu_ps(a.threshold), _mm256_loadu_ps(a.threshold + 8), out);
  for (int64_t j = 0; j < n; ++j) out[j].item = items[out[j].item];
  return n;
}

// n rows of a table as fp32 (see rows_to_f32_avx2; also the int8 rescoring's dequantization)
template <typename L>
RK_AVX2_INLINE void rows_to_f32(const uint8_t* rows, int64_t row_bytes, int64_t dim, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = rows + i * row_bytes;
    bool finite = true;  // int8 rows: the caller checked every scale and bias
    const RowParams p = L::params(row, dim, finite);
    float* o = out + i * dim;
    int64_t c = 0;
    for (; c + 8 <= dim; c += 8) _mm256_storeu_ps(o + c, L::load(row, c, p));
    for (; c < dim; ++c) o[c] = L::scalar(row, c, p);
  }
}

}  // namespace

RK_AVX2 TileArgs q8_rescore_args(const Q8TileArgs& a, const int32_t* items, int n, float* bias) {
  for (int i = 0; i < n; ++i) {
    float* x = a.scratch + i * a.dim;
    if (a.exact_rows != nullptr) {  // a float catalog: its own row
      std::memcpy(x, a.exact_rows + items[i] * a.dim, 4 * a.dim);
    } else {
      rows_to_f32<Q8>(a.rows + items[i] * a.row_bytes, a.row_bytes, a.dim, 1, x);
    }
    bias[i] = a.bias != nullptr ? a.bias[items[i]] : 0.0f;
  }
  TileArgs t{};
  t.panel = a.panel;
  t.items = a.scratch;
  t.bias = a.bias != nullptr ? bias : nullptr;
  t.dim = a.dim;
  t.n_items = n;
  t.lane_mask = a.lane_mask;
  return t;
}

RK_AVX2 bool dot_pairs_avx2(const DotArgs& a) {
  switch (a.q_kind) {
    case Kind::kF32: return dot_pairs_q<F32>(a);
    case Kind::kF16: return dot_pairs_q<F16>(a);
    case Kind::kBF16: return dot_pairs_q<BF16>(a);
    case Kind::kQ8: break;  // queries are never quantized
  }
  return true;
}

namespace {

// ----------------------------------------------------------------------------- few queries
// As in scoring_cpu_avx512.cpp: a group of at most kFewQueries queries scores 8 items per vector
// (the items' columns transposed 8 x 8 in registers), the same fma chain per (query, item).
constexpr int kFewBlocks = 8;                       // 8-item blocks per pass: 8 chains per query
constexpr int64_t kFewAhead = 2 * kFewBlocks * 8;  // rows prefetched ahead (into L2): two passes

// Columns d0 .. d0 + 7 of `rows` (<= 8) rows from x (stride dim; zero past them and past dim) into
// xt[j * stride], j = 0 .. 7: vector j holds column d0 + j of the 8 rows.
RK_AVX2_INLINE void transpose_8(const float* x, int64_t dim, int64_t rows, int64_t d0, float* xt, int64_t stride) {
  const int64_t cols = dim - d0 < 8 ? dim - d0 : 8;
  const __m256i cm = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) {
    // 64 rows read a line at a time defeat the hardware's stream prefetchers
    if ((d0 & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(x + (i + kFewAhead) * dim + d0), _MM_HINT_T1);
    r[i] = i >= rows ? _mm256_setzero_ps() : cols == 8 ? _mm256_loadu_ps(x + i * dim + d0)
                                                       : _mm256_maskload_ps(x + i * dim + d0, cm);
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);          // a0 b0 c0 d0 | a4 b4 c4 d4
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);      // a1 .. | a5 ..
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // a2 .. | a6 ..
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // a3 .. | a7 ..
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_store_ps(xt + j * stride, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));        // column j
    _mm256_store_ps(xt + (j + 4) * stride, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));  // column j + 4
  }
}

// Items i0 .. i0 + n - 1 (n <= 8 NB) for the queries in lanes[0 .. nl): their chains kept in
// acc_of between column blocks, then + bias, the threshold and the candidates, lane by lane.
template <int NB>
RK_AVX2_INLINE int64_t few_lanes_block(const TileArgs& a, int64_t i0, int64_t n, const int* lanes, int nl,
                                       Candidate* out) {
  alignas(32) float xt[8][NB * 8];
  alignas(32) float acc_of[kFewQueries][NB * 8];
  for (int l = 0; l < nl; ++l)
    for (int b = 0; b < NB; ++b) _mm256_store_ps(acc_of[l] + b * 8, _mm256_setzero_ps());
  const float* x = a.items + i0 * a.dim;
  for (int64_t d0 = 0; d0 < a.dim; d0 += 8) {
    for (int b = 0; b < NB; ++b) transpose_8(x + b * 8 * a.dim, a.dim, n - b * 8, d0, xt[0] + b * 8, NB * 8);
    const int64_t cols = a.dim - d0 < 8 ? a.dim - d0 : 8;
    for (int l = 0; l < nl; ++l) {
      __m256 acc[NB];
      for (int b = 0; b < NB; ++b) acc[b] = _mm256_load_ps(acc_of[l] + b * 8);
      const float* q = a.panel + d0 * kLanes + lanes[l];
      for (int64_t j = 0; j < cols; ++j) {
        const __m256 qj = _mm256_broadcast_ss(q + j * kLanes);
        for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(qj, _mm256_load_ps(xt[j] + b * 8), acc[b]);
      }
      for (int b = 0; b < NB; ++b) _mm256_store_ps(acc_of[l] + b * 8, acc[b]);
    }
  }
  int64_t found = 0;
  for (int l = 0; l < nl; ++l) {
    const __m256 thr = _mm256_set1_ps(a.threshold[lanes[l]]);
    for (int b = 0; b < NB; ++b) {
      const int64_t rows = n - b * 8 < 8 ? n - b * 8 : 8;
      __m256 s = _mm256_load_ps(acc_of[l] + b * 8);
      if (a.bias != nullptr) {
        const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rows)),
                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        s = _mm256_add_ps(s, _mm256_maskload_ps(a.bias + i0 + b * 8, valid));
      }
      _mm256_store_ps(acc_of[l] + b * 8, s);
      const uint32_t valid_bits = (1u << rows) - 1u;
      for (uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, thr, _CMP_NLT_UQ))) & valid_bits;
           m != 0; m &= m - 1) {
        const int i = __builtin_ctz(m);
        out[found++] = {static_cast<int32_t>(i0 + b * 8 + i), lanes[l], acc_of[l][b * 8 + i]};
      }
    }
  }
  return found;
}

template <int NB = 1>
RK_AVX2_INLINE int64_t few_lanes_rest(int nb, const TileArgs& a, int64_t i0, int64_t n, const int* lanes, int nl,
                                      Candidate* out) {
  if constexpr (NB < kFewBlocks) {
    if (nb != NB) return few_lanes_rest<NB + 1>(nb, a, i0, n, lanes, nl, out);
  }
  return few_lanes_block<NB>(a, i0, n, lanes, nl, out);
}

RK_AVX2_INLINE int64_t few_lanes_tile(const TileArgs& a, Candidate* out) {
  int lanes[kFewQueries], nl = 0;
  for (uint32_t m = a.lane_mask & 0xFFFFu; m != 0; m &= m - 1) lanes[nl++] = __builtin_ctz(m);
  int64_t found = 0, i0 = 0;
  constexpr int64_t kStep = kFewBlocks * 8;
  for (; i0 + kStep <= a.n_items; i0 += kStep) found += few_lanes_block<kFewBlocks>(a, i0, kStep, lanes, nl, out + found);
  const int64_t rest = a.n_items - i0;
  if (rest > 0) found += few_lanes_rest(static_cast<int>((rest + 7) / 8), a, i0, rest, lanes, nl, out + found);
  return found;
}

}  // namespace

RK_AVX2 void rows_to_f32_avx2(Kind kind, const uint8_t* rows, int64_t row_bytes, int64_t dim, int64_t n, float* out) {
  switch (kind) {
    case Kind::kF32: rows_to_f32<F32>(rows, row_bytes, dim, n, out); break;
    case Kind::kF16: rows_to_f32<F16>(rows, row_bytes, dim, n, out); break;
    case Kind::kBF16: rows_to_f32<BF16>(rows, row_bytes, dim, n, out); break;
    case Kind::kQ8: rows_to_f32<Q8>(rows, row_bytes, dim, n, out); break;
  }
}

RK_AVX2 int64_t score_tile_avx2(const TileArgs& a, Candidate* out) {
  if (few_queries(a.lane_mask)) return few_lanes_tile(a, out);
  const __m256 thr0 = _mm256_loadu_ps(a.threshold), thr1 = _mm256_loadu_ps(a.threshold + 8);
  int64_t n = 0, i0 = 0;
  for (; i0 + 6 <= a.n_items; i0 += 6) n += tile_block<6>(a, i0, thr0, thr1, out + n);
  switch (a.n_items - i0) {
    case 5: n += tile_block<5>(a, i0, thr0, thr1, out + n); break;
    case 4: n += tile_block<4>(a, i0, thr0, thr1, out + n); break;
    case 3: n += tile_block<3>(a, i0, thr0, thr1, out + n); break;
    case 2: n += tile_block<2>(a, i0, thr0, thr1, out + n); break;
    case 1: n += tile_block<1>(a, i0, thr0, thr1, out + n); break;
    default: break;
  }
  return n;
}

namespace {

// The prefilter over the whole chunk: the number of items it let through into a.passed.
template <bool RESIDUAL>
RK_AVX2 int64_t q8_filter(const Q8TileArgs& a) {
  int64_t m = 0, i0 = 0;
  for (; i0 + 3 <= a.n_items; i0 += 3) m += q8_block<3, RESIDUAL>(a, i0, a.passed + m);
  for (; i0 < a.n_items; ++i0) m += q8_block<1, RESIDUAL>(a, i0, a.passed + m);
  return m;
}

}  // namespace

// The prefilter, then the items it let through rescored six at a time (the fp32 tile at full
// width, whatever the items' positions in the chunk).
RK_AVX2 int64_t score_tile_q8_avx2(const Q8TileArgs& a, Candidate* out) {
  const int64_t m = a.exact_rows != nullptr ? q8_filter<true>(a) : q8_filter<false>(a);
  static_assert(kQ8RescoreRows == 6);
  int64_t n = 0, j = 0;
  for (; j + 6 <= m; j += 6) n += q8_rescore<6>(a, a.passed + j, out + n);
  switch (m - j) {
    case 5: n += q8_rescore<5>(a, a.passed + j, out + n); break;
    case 4: n += q8_rescore<4>(a, a.passed + j, out + n); break;
    case 3: n += q8_rescore<3>(a, a.passed + j, out + n); break;
    case 2: n += q8_rescore<2>(a, a.passed + j, out + n); break;
    case 1: n += q8_rescore<1>(a, a.passed + j, out + n); break;
    default: break;
  }
  return n;
}

// One pass per row for min and max (and NaN), one for the codes, their values, the codes' norm
// (int32 lanes: each adds at most D / 8 squares of at most 255^2, exact for any D the prefilter
// takes) and the residual. The residual adds up in steps (r / scale in [-1/2, 1/2], so its squares
// cannot underflow into a loss that matters), and its sum is inflated by (D + 10) 2^-23 for the
// roundings of r, of r / scale, of the D additions and of the result; + 2^-149 covers a subnormal
// result's rounding.
RK_AVX2 bool q8_quantize_rows_avx2(const float* x, int64_t n, int64_t dim, uint8_t* rows, float* norm,
                                   float* res_norm, float* abs_max) {
  const int64_t vec_end = dim - dim % 8;
  const double inflate = 1.0 + static_cast<double>(dim + 10) * 0x1p-23;
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * dim;
    uint8_t* out = rows + i * (dim + 8);
    __m256 vmin = _mm256_set1_ps(INFINITY), vmax = _mm256_set1_ps(-INFINITY), vnan = _mm256_setzero_ps();
    for (int64_t c = 0; c < vec_end; c += 8) {
      const __m256 v = _mm256_loadu_ps(xr + c);
      vmin = _mm256_min_ps(vmin, v);
      vmax = _mm256_max_ps(vmax, v);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    alignas(32) float lo[8], hi[8];
    _mm256_store_ps(lo, vmin);
    _mm256_store_ps(hi, vmax);
    bool nan = _mm256_movemask_ps(vnan) != 0;
    float mn = INFINITY, mx = -INFINITY;
    for (int j = 0; j < 8; ++j) mn = std::min(mn, lo[j]), mx = std::max(mx, hi[j]);
    for (int64_t c = vec_end; c < dim; ++c) {
      nan |= std::isnan(xr[c]);
      mn = std::min(mn, xr[c]);
      mx = std::max(mx, xr[c]);
    }
    const float amax = std::max(-mn, mx);
    if (nan || !(amax <= 0x1p96f) || too_small_for_prefilter(amax)) return false;
    // with max |x| >= 2^-60 a row that is not constant has max - min >= 2^-83: scale >= 2^-91 and
    // 1 / scale is finite; a constant row gets scale 0, every code 0 and no residual
    const float scale = (mx - mn) / 255.0f, inv = mx > mn ? 1.0f / scale : 0.0f;
    const __m256 vscale = _mm256_set1_ps(scale), vinv = _mm256_set1_ps(inv), vmn = _mm256_set1_ps(mn);
    __m256 sq = _mm256_setzero_ps();
    __m256i code_sq = _mm256_setzero_si256();
    for (int64_t c = 0; c < vec_end; c += 8) {
      const __m256 v = _mm256_loadu_ps(xr + c);
      __m256i code = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(v, vmn), vinv));  // nearest, ties even
      code = _mm256_min_epi32(_mm256_max_epi32(code, _mm256_setzero_si256()), _mm256_set1_epi32(255));
      const __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + c), _mm_packus_epi16(c16, c16));
      const __m256i t = _mm256_sub_epi32(_mm256_add_epi32(code, code), _mm256_set1_epi32(255));
      code_sq = _mm256_add_epi32(code_sq, _mm256_mullo_epi32(t, t));
      const __m256 value = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(code), vscale), vmn);
      const __m256 r = _mm256_mul_ps(_mm256_sub_ps(v, value), vinv);  // in steps
      sq = _mm256_fmadd_ps(r, r, sq);
    }
    alignas(32) float sqs[8];
    _mm256_store_ps(sqs, sq);
    alignas(32) int32_t code_sqs[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(code_sqs), code_sq);
    double sum = 0.0;
    int64_t code_sum = 0;
    for (int j = 0; j < 8; ++j) sum += sqs[j], code_sum += code_sqs[j];
    for (int64_t c = vec_end; c < dim; ++c) {
      const float code = std::min(255.0f, std::max(0.0f, std::nearbyint((xr[c] - mn) * inv)));
      out[c] = static_cast<uint8_t>(code);
      code_sum += static_cast<int64_t>(2 * code - 255) * static_cast<int64_t>(2 * code - 255);
      const float r = (xr[c] - (code * scale + mn)) * inv;
      sum += static_cast<double>(r) * r;
    }
    std::memcpy(out + dim, &scale, 4);
    std::memcpy(out + dim + 4, &mn, 4);
    norm[i] = q8_code_norm(code_sum);
    res_norm[i] = static_cast<float>(std::sqrt(sum) * inflate * scale) + 0x1p-149f;
    abs_max[i] = amax;
  }
  return true;
}

}  // namespace recsys_kernels::scoring_cpu
