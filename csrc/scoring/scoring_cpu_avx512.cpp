// AVX-512 kernels of topk_scores (see scoring_cpu_kernels.h): the score tile with the 16 queries of
// a group in one zmm register, and, with AVX512-VNNI, the int8 catalog's prefilter on vpdpbusd.
// Every (query, item) score is the same fma chain as on the AVX2 and scalar paths, and the
// prefilter computes the same exact int32 dot products and the same bound, so the candidates and
// their scores are bit for bit those of the AVX2 path (tested, on emulated instructions where the
// CPU lacks them: tests/test_scoring_avx512_emulated.py). fp-contract=off as on AVX2. The gather-dot
// ops (pair_scores, candidate_*) keep the AVX2 kernel: their fixed 8-lane reduction is part of the
// result's bits, and they are bound by the row gathers, not the arithmetic.
#if defined(RK_EMULATE_WIDE)
#include "wide_emulation.h"
#define RK_AVX512 __attribute__((optimize("fp-contract=off")))
#define RK_AVX512_INLINE __attribute__((optimize("fp-contract=off"))) inline
#define RK_AVX512_NOINLINE __attribute__((optimize("fp-contract=off"), noinline))
#else
#include <immintrin.h>
#define RK_AVX512_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"
#define RK_AVX512 __attribute__((target(RK_AVX512_TARGET), optimize("fp-contract=off")))
#define RK_AVX512_INLINE __attribute__((target(RK_AVX512_TARGET), optimize("fp-contract=off"), always_inline)) inline
// q8_sums is kept out of line (see there).
#define RK_AVX512_NOINLINE __attribute__((target(RK_AVX512_TARGET), optimize("fp-contract=off"), noinline))
#endif

#include <cstdint>
#include <cstring>

#include "scoring/scoring_cpu_kernels.h"

// GCC 12's _mm512_undefined_* (the pass-through of unmasked conversions) trips -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace recsys_kernels::scoring_cpu {
namespace {

constexpr int kTileItems = 12;  // items per fp32 block: 12 accumulators, 1 panel load + 12 broadcasts per d
constexpr int kQ8Items = 8;     // items per prefilter block

// Appends (item, lane, score) for the lanes of `mask`, per lane in increasing item order: the
// masks and scores leave the registers first, in straight-line code (indexing acc[] with a
// run-time item would keep the accumulators in memory during the loop that fills them).
template <int NI>
RK_AVX512_INLINE int64_t emit(const __m512 (&acc)[NI], const uint32_t (&mask)[NI], int64_t i0, Candidate* out) {
  uint32_t any = 0;
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) any |= mask[i];
  if (any == 0) return 0;
  alignas(64) float s[NI][kLanes];
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) _mm512_store_ps(s[i], acc[i]);
  int64_t n = 0;
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i)
    for (uint32_t m = mask[i]; m != 0; m &= m - 1) {
      const int lane = __builtin_ctz(m);
      out[n++] = {static_cast<int32_t>(i0 + i), lane, s[i][lane]};
    }
  return n;
}

// NI items x 16 queries: NI accumulators, each lane an fma chain over d, then + bias.
template <int NI>
RK_AVX512_INLINE int64_t tile_block(const TileArgs& a, int64_t i0, __m512 thr, Candidate* out) {
  __m512 acc[NI];
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) acc[i] = _mm512_setzero_ps();
  const float* x = a.items + i0 * a.dim;
  for (int64_t d = 0; d < a.dim; ++d) {
    const __m512 p = _mm512_loadu_ps(a.panel + d * kLanes);
    #pragma GCC unroll 16
    for (int i = 0; i < NI; ++i) acc[i] = _mm512_fmadd_ps(p, _mm512_set1_ps(x[i * a.dim + d]), acc[i]);
  }
  if (a.bias != nullptr)
    #pragma GCC unroll 16
    for (int i = 0; i < NI; ++i) acc[i] = _mm512_add_ps(acc[i], _mm512_set1_ps(a.bias[i0 + i]));
  uint32_t mask[NI];
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) mask[i] = _mm512_cmp_ps_mask(acc[i], thr, _CMP_NLT_UQ) & a.lane_mask;
  return emit<NI>(acc, mask, i0, out);
}

template <int NI = 1>
RK_AVX512_INLINE int64_t tile_rest(int ni, const TileArgs& a, int64_t i0, __m512 thr, Candidate* out) {
  if constexpr (NI < kTileItems) {
    if (ni != NI) return tile_rest<NI + 1>(ni, a, i0, thr, out);
  }
  return tile_block<NI>(a, i0, thr, out);
}

// ----------------------------------------------------------------------------- few queries
// A group with at most kFewQueries queries (one user's retrieval, the tail of a batch) would leave
// most of the tile's 16 lanes idle: 1 query used 1 lane in 16 and ran at 0.73-0.89x torch's
// mv + topk on 10k-100k items. Here the items take the lanes instead: 16 rows'
// columns d0 .. d0 + 15 transposed in registers (a 16 x 16 shuffle network), then per query and
// column one broadcast and one FMA per 16 items. The fma chain of each (query, item) is the
// tile's, in the same order (d = 0 .. D-1 from 0, then + bias), so the scores are the same bits.
constexpr int kFewBlocks = 4;  // 16-item blocks per pass: 4 independent chains per query
constexpr int64_t kFewAhead = 2 * kFewBlocks * kLanes;  // rows prefetched ahead: two passes

// Columns d0 .. d0 + 15 of `rows` (<= 16) rows from x (stride dim; zero past them and past dim)
// into xt[j * stride], j = 0 .. 15: vector j holds column d0 + j of the 16 rows.
RK_AVX512_INLINE void transpose_16(const float* x, int64_t dim, int64_t rows, int64_t d0, float* xt, int64_t stride) {
  const int64_t cols = dim - d0 < 16 ? dim - d0 : 16;
  const __mmask16 cm = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  __m512 r[16], t[16];
  #pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    // the same line of the rows a pass ahead: 64 rows read a line at a time defeat the hardware's
    // stream prefetchers (1 query over 1M items ran at 2/3 the old tile's speed without this)
    _mm_prefetch(reinterpret_cast<const char*>(x + (i + kFewAhead) * dim + d0), _MM_HINT_T1);
    r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, x + i * dim + d0) : _mm512_setzero_ps();
  }
  // rows a, b, ... p: pairs interleaved, then quads, then 128-bit lanes twice
  #pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5 | ...
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3 | ...
  }
  #pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);          // a0 b0 c0 d0 | a4 .. | a8 .. | a12 ..
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);      // a1 b1 c1 d1 | ...
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // a2 ...
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // a3 ...
  }
  #pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);           // a-d j, a-d j+8, e-h j, e-h j+8
    t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xDD);       // a-d j+4, a-d j+12, e-h j+4, ...
    t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);  // i-p likewise
    t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xDD);
  }
  #pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    _mm512_store_ps(xt + j * stride, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));        // column j
    _mm512_store_ps(xt + (j + 8) * stride, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD));  // column j + 8
  }
}

// Items i0 .. i0 + n - 1 (n <= 16 NB) for the queries in lanes[0 .. nl): their chains kept in
// acc_of between column blocks, then + bias, the threshold and the candidates, lane by lane.
template <int NB>
RK_AVX512_INLINE int64_t few_lanes_block(const TileArgs& a, int64_t i0, int64_t n, const int* lanes, int nl,
                                         Candidate* out) {
  alignas(64) float xt[16][NB * kLanes];
  alignas(64) float acc_of[kFewQueries][NB * kLanes];
  for (int l = 0; l < nl; ++l)
    #pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_store_ps(acc_of[l] + b * kLanes, _mm512_setzero_ps());
  const float* x = a.items + i0 * a.dim;
  for (int64_t d0 = 0; d0 < a.dim; d0 += 16) {
    #pragma GCC unroll 4
    for (int b = 0; b < NB; ++b)
      transpose_16(x + b * kLanes * a.dim, a.dim, n - b * kLanes, d0, xt[0] + b * kLanes, NB * kLanes);
    const int64_t cols = a.dim - d0 < 16 ? a.dim - d0 : 16;
    for (int l = 0; l < nl; ++l) {
      __m512 acc[NB];
      #pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[b] = _mm512_load_ps(acc_of[l] + b * kLanes);
      const float* q = a.panel + d0 * kLanes + lanes[l];
      for (int64_t j = 0; j < cols; ++j) {
        const __m512 qj = _mm512_set1_ps(q[j * kLanes]);
        #pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(qj, _mm512_load_ps(xt[j] + b * kLanes), acc[b]);
      }
      #pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) _mm512_store_ps(acc_of[l] + b * kLanes, acc[b]);
    }
  }
  int64_t found = 0;
  for (int l = 0; l < nl; ++l) {
    const __m512 thr = _mm512_set1_ps(a.threshold[lanes[l]]);
    #pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const int64_t rows = n - b * kLanes < kLanes ? n - b * kLanes : kLanes;
      const __mmask16 valid = static_cast<__mmask16>(rows >= kLanes ? 0xFFFF : (1u << rows) - 1);
      __m512 s = _mm512_load_ps(acc_of[l] + b * kLanes);
      if (a.bias != nullptr) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(valid, a.bias + i0 + b * kLanes));
      _mm512_store_ps(acc_of[l] + b * kLanes, s);
      for (uint32_t m = _mm512_cmp_ps_mask(s, thr, _CMP_NLT_UQ) & valid; m != 0; m &= m - 1) {
        const int i = __builtin_ctz(m);
        out[found++] = {static_cast<int32_t>(i0 + b * kLanes + i), lanes[l], acc_of[l][b * kLanes + i]};
      }
    }
  }
  return found;
}

template <int NB = 1>
RK_AVX512_INLINE int64_t few_lanes_rest(int nb, const TileArgs& a, int64_t i0, int64_t n, const int* lanes, int nl,
                                        Candidate* out) {
  if constexpr (NB < kFewBlocks) {
    if (nb != NB) return few_lanes_rest<NB + 1>(nb, a, i0, n, lanes, nl, out);
  }
  return few_lanes_block<NB>(a, i0, n, lanes, nl, out);
}

RK_AVX512_INLINE int64_t few_lanes_tile(const TileArgs& a, Candidate* out) {
  int lanes[kFewQueries], nl = 0;
  for (uint32_t m = a.lane_mask & 0xFFFFu; m != 0; m &= m - 1) lanes[nl++] = __builtin_ctz(m);
  int64_t found = 0, i0 = 0;
  constexpr int64_t kStep = kFewBlocks * kLanes;
  for (; i0 + kStep <= a.n_items; i0 += kStep) found += few_lanes_block<kFewBlocks>(a, i0, kStep, lanes, nl, out + found);
  const int64_t rest = a.n_items - i0;
  const int blocks = static_cast<int>((rest + kLanes - 1) / kLanes);
  if (rest > 0) found += few_lanes_rest(blocks, a, i0, rest, lanes, nl, out + found);
  return found;
}

}  // namespace

RK_AVX512 int64_t score_tile_avx512(const TileArgs& a, Candidate* out) {
  if (few_queries(a.lane_mask)) return few_lanes_tile(a, out);
  const __m512 thr = _mm512_loadu_ps(a.threshold);
  int64_t n = 0, i0 = 0;
  for (; i0 + kTileItems <= a.n_items; i0 += kTileItems) n += tile_block<kTileItems>(a, i0, thr, out + n);
  if (i0 < a.n_items) n += tile_rest(static_cast<int>(a.n_items - i0), a, i0, thr, out + n);
  return n;
}

namespace {

// The exact int32 dot products of NI items x 16 queries, into sums[NI][16]: per quad of columns,
// one broadcast of the item's 4 codes (u8) and one vpdpbusd against the queries' 4 s8 values (the
// panel's 64 bytes), the integers of the AVX2 route's int16 pair sums. A function of its own that
// ends in stores: with the bound computed from the registers after the loop, GCC copied every
// accumulator in and out of the loop (16 extra register moves per 8 vpdpbusd in the objdump).
template <int NI>
RK_AVX512_NOINLINE void q8_sums(const Q8TileArgs& a, int64_t i0, int32_t* sums) {
  __m512i acc[NI];
#pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) acc[i] = _mm512_setzero_si512();
  const int64_t quads = q8_quads(a.dim);
  const uint8_t* base = a.rows + i0 * a.row_bytes;
  for (int64_t c = 0; c < quads; ++c) {
    const __m512i p = _mm512_loadu_si512(a.qpanel + c * 64);
#pragma GCC unroll 16
    for (int i = 0; i < NI; ++i) {
      int32_t codes;
      std::memcpy(&codes, base + i * a.row_bytes + 4 * c, 4);
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(codes), p);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) _mm512_store_si512(sums + kLanes * i, acc[i]);
}

// The prefilter of NI items x 16 queries: the sums, then the bound in the AVX2 kernel's fused
// steps. Appends the items with a lane that could reach its threshold to `passed`. RESIDUAL: a
// float catalog's rows, whose bound has the residual's term.
template <int NI, bool RESIDUAL>
RK_AVX512_INLINE int64_t q8_block(const Q8TileArgs& a, int64_t i0, int32_t* passed) {
  alignas(64) int32_t sums[NI * kLanes];
  q8_sums<NI>(a, i0, sums);
  const __m512 qscale = _mm512_loadu_ps(a.qscale), qcorr = _mm512_loadu_ps(a.qcorr), qsum = _mm512_loadu_ps(a.qsum);
  const __m512 qerr = _mm512_loadu_ps(a.qerr), qnorm = _mm512_loadu_ps(a.qnorm), qslack = _mm512_loadu_ps(a.qslack);
  const __m512 thr = _mm512_loadu_ps(a.threshold);
  uint32_t mask[NI];
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) {
    const Q8Row& r = a.row_info[i0 + i];
    __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums + kLanes * i)), qscale, qcorr);
    t = _mm512_fmadd_ps(t, _mm512_set1_ps(r.scale), _mm512_set1_ps(r.bias_up));
    t = _mm512_fmadd_ps(_mm512_set1_ps(r.row_bias), qsum, t);
    const __m512 qe = _mm512_min_ps(qerr, _mm512_mul_ps(qnorm, _mm512_set1_ps(r.norm)));
    t = _mm512_fmadd_ps(_mm512_set1_ps(r.abs_scale), qe, t);
    if constexpr (RESIDUAL) t = _mm512_fmadd_ps(_mm512_set1_ps(r.res_norm), _mm512_loadu_ps(a.qnorm_full), t);
    t = _mm512_fmadd_ps(_mm512_set1_ps(r.value_max), qslack, t);
    mask[i] = _mm512_cmp_ps_mask(t, thr, _CMP_NLT_UQ);
  }
  int64_t n = 0;
  #pragma GCC unroll 16
  for (int i = 0; i < NI; ++i) {
    passed[n] = static_cast<int32_t>(i0 + i);
    n += (mask[i] & a.lane_mask) != 0;
  }
  return n;
}

// Exact scores of the NI listed items (q8_rescore_args, shared with the AVX2 prefilter, then the
// fp32 tile). Candidates name the chunk's items.
template <int NI>
RK_AVX512_INLINE int64_t q8_rescore(const Q8TileArgs& a, const int32_t* items, Candidate* out) {
  float bias[NI];
  const TileArgs t = q8_rescore_args(a, items, NI, bias);
  const int64_t n = tile_block<NI>(t, 0, _mm512_loadu_ps(a.threshold), out);
  for (int64_t j = 0; j < n; ++j) out[j].item = items[out[j].item];
  return n;
}

template <int NI = 1>
RK_AVX512_INLINE int64_t q8_rescore_rest(int ni, const Q8TileArgs& a, const int32_t* items, Candidate* out) {
  if constexpr (NI < kQ8RescoreRows) {
    if (ni != NI) return q8_rescore_rest<NI + 1>(ni, a, items, out);
  }
  return q8_rescore<NI>(a, items, out);
}

// The prefilter over the whole chunk: the number of items it let through into a.passed.
template <bool RESIDUAL>
RK_AVX512 int64_t q8_filter(const Q8TileArgs& a) {
  int64_t m = 0, i0 = 0;
  for (; i0 + kQ8Items <= a.n_items; i0 += kQ8Items) m += q8_block<kQ8Items, RESIDUAL>(a, i0, a.passed + m);
  for (; i0 < a.n_items; ++i0) m += q8_block<1, RESIDUAL>(a, i0, a.passed + m);
  return m;
}

}  // namespace

RK_AVX512 int64_t score_tile_q8_vnni(const Q8TileArgs& a, Candidate* out) {
  const int64_t m = a.exact_rows != nullptr ? q8_filter<true>(a) : q8_filter<false>(a);
  int64_t n = 0, j = 0;
  for (; j + kQ8RescoreRows <= m; j += kQ8RescoreRows) n += q8_rescore<kQ8RescoreRows>(a, a.passed + j, out + n);
  if (j < m) n += q8_rescore_rest(static_cast<int>(m - j), a, a.passed + j, out + n);
  return n;
}

}  // namespace recsys_kernels::scoring_cpu
