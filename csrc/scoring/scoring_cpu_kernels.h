// What the translation units of the scoring CPU kernels share: the two inner kernels, each in an
// AVX2+FMA+F16C version (scoring_cpu_avx2.cpp, chosen at run time) and a scalar version
// (scoring_cpu_scalar.cpp, RECSYS_KERNELS_CPU_ISA=scalar forces it); the score tile and the int8
// prefilter also in AVX-512 / AVX512-VNNI versions (scoring_cpu_avx512.cpp). Both versions perform the
// same float operations in the same order, so the two paths give bit-identical scores:
//
//  * gather-dot (pair_scores, candidate_*): per pair, 8 lane sums acc[j] = fma chain over the
//    columns d = j, j + 8, ... below D rounded down to 8, then
//    s = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)), then an fma chain over
//    the remaining columns onto s, then s + bias.
//  * score tile (topk_scores): per (query, item) one fma chain over d = 0 .. D-1 from 0, then
//    s + bias. Items are fp32 rows here: other tables are converted / dequantized per chunk.
//
// An item value of an int8 row is code * scale + bias, a rounded product then a rounded sum (never
// one FMA), like the reference's dequantization, so an int8 table scores exactly like its
// dequantized fp32 table.
//
// Kept free of torch headers on purpose: the AVX2 translation unit must not instantiate any inline
// function that the rest of the library could link against.
#pragma once

#include <cmath>
#include <cstdint>

namespace recsys_kernels::scoring_cpu {

enum class Kind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kQ8 = 3 };

// scores[p] = <queries[user(p)], items[item_idx[p]]> (+ bias[item_idx[p]]) for p in [0, n).
struct DotArgs {
  Kind q_kind;
  const uint8_t* queries;
  int64_t q_row_bytes;
  Kind item_kind;
  const uint8_t* items;
  int64_t item_row_bytes;
  int64_t dim;
  const void* user_idx;  // [n] indices (in range), or nullptr: every pair uses row `fixed_user`
  const void* item_idx;  // [n] indices (in range)
  bool idx64;            // both index arrays int64 (else int32)
  int64_t fixed_user;
  const float* bias;     // fp32 [I] or nullptr
  int64_t n;
  float* out;
  bool rows_from_dram;   // tables beyond l2_prefetch_bytes(): rows ahead prefetched into L2 only
};

// Return false when an int8 row had a non-finite scale or bias (its score is then meaningless).
bool dot_pairs_avx2(const DotArgs& a);
bool dot_pairs_scalar(const DotArgs& a);

// Scores of one group of 16 queries against a chunk of fp32 item rows, and the candidates among
// them: (lane, item) with !(score < threshold[lane]) (so NaN scores, and every score when the
// threshold is NaN, are candidates) for lanes set in lane_mask.
constexpr int kLanes = 16;

struct TileArgs {
  const float* panel;      // [dim][16] the group's queries, lane = query
  const float* items;      // [n_items][dim] fp32 rows
  const float* bias;       // [n_items] or nullptr
  int64_t dim, n_items;
  const float* threshold;  // [16]
  uint32_t lane_mask;
};

struct Candidate {
  int32_t item;  // within the chunk
  int32_t lane;
  float score;
};

// A group with at most kFewQueries queries in lane_mask is scored with the items in the lanes
// instead (few_lanes_tile in the AVX2 and AVX-512 units: the same fma chains, so the same scores).
constexpr int kFewQueries = 4;
inline bool few_queries(uint32_t lane_mask) { return __builtin_popcount(lane_mask & 0xFFFFu) <= kFewQueries; }

// Writes at most 16 * n_items candidates, per lane in increasing item order; returns the count.
int64_t score_tile_avx2(const TileArgs& a, Candidate* out);
int64_t score_tile_scalar(const TileArgs& a, Candidate* out);
int64_t score_tile_avx512(const TileArgs& a, Candidate* out);  // scoring_cpu_avx512.cpp; cpu_isa() >= avx512

// int8 catalogs, AVX2 and VNNI only: an integer prefilter, then exact rescoring of what passes. Queries
// are quantized per query, q_d = qscale * q8_d + e_d with |q8_d| <= kQ8QueryMax = 32 on AVX2, so
// that two of vpmaddubsw's u8 x s8 pair sums add in int16 without saturating (2 * 2 * 255 * 32 <
// 2^15), and |q8_d| <= kQ8QueryMaxVnni = 127 on VNNI, whose vpdpbusd adds in int32 (a 4x finer
// query: the bound's error terms shrink 4x, fewer items are rescored; measured 4% faster at the
// retrieval shape; the sums stay exact in int32 for D < 2^31 / (255 * 127) = 66 000). With
// value_d = code_d * scale + row_bias, a row's exact score is
//   qscale * scale * sum_d q8_d code_d + scale * sum_d e_d code_d + row_bias * sum_d q_d,
// and writing code_d = 127.5 + c_d (|c_d| <= 127.5) the approximation is
//   a = (float(sum_d q8_d * code_d) * qscale + qcorr) * scale + row_bias * qsum (+ item bias),
//   qcorr = 127.5 * sum_d e_d,
// whose error scale * sum_d e_d c_d is at most |scale| * min(qerr, qnorm * row_norm) (L1 / L-inf
// and Cauchy-Schwarz), plus (255 * |scale| + |row_bias|) * qslack + |item bias| * 2^-20 for every
// fp32 rounding of both sides. qerr = 127.5 * sum_d |e_d|, qnorm = ||e||_2, row_norm = ||c||_2,
// each rounded up. A (lane, item) whose upper bound is not below the lane's threshold is rescored
// exactly (the items with such a lane dequantized, then the fp32 tile kernel), so the candidates
// and their scores are exactly those of the fp32 path on the dequantized table.
//
// Float catalogs (fp32, fp16, bf16) take the same prefilter on a copy of each chunk quantized
// row-wise on the fly (q8_quantize_rows_avx2), rescoring their own fp32 rows. The rows then differ
// from their int8 values by a residual r (x = value + r), so the bound gains ||q||_2 * ||r||_2
// (Cauchy-Schwarz; qnorm_full and Q8Row::res_norm, rounded up), the roundings of the fp32 score on
// x are covered by adding max |x| + ||r||_2 to value_max (qslack's 2D + 48 roundings cover the D + 2
// of that chain), and bias_up takes |item bias| * 2^-19. The candidates and scores are then exactly
// those of the fp32 tile on the catalog's own rows: the quantization only decides what to rescore.
constexpr int kQ8QueryMax = 32;
constexpr int kQ8QueryMaxVnni = 127;
// Queries, rows and int8 rows (255 |scale| + |bias|) whose magnitude is below 2^-60 (not 0) take
// the fp32 tile: the bound's slack is relative, and its roundings must stay in the normal range
// (in the subnormal one a score's roundings exceed it).
inline bool too_small_for_prefilter(float magnitude) { return magnitude > 0.0f && magnitude < 0x1p-60f; }
// Quads (4 columns) of a q8 query panel: ceil(D / 4) rounded up to even, the kernel's step. The
// codes read past D are the row's scale and bias bytes (row_bytes = D + 8 > 4 * quads - 1),
// multiplied by zero queries.
inline int64_t q8_quads(int64_t dim) { return ((dim + 7) / 8) * 2; }
constexpr int kQ8RescoreRows = 6;  // rows dequantized and rescored together (the fp32 tile's width)

// ||code - 127.5||_2 of a row, rounded up, from the sum of the odd integers (2 code - 255)^2 (exact
// in int64): Q8Row::norm, for packed rows (topk_scores_cpu.cpp) and quantized ones alike.
inline float q8_code_norm(int64_t sum_sq) {
  return static_cast<float>(0.5 * std::sqrt(static_cast<double>(sum_sq)) * (1.0 + 0x1p-20));
}

// A packed row's terms in the prefilter's bound, computed once per chunk (shared by every group
// of queries).
struct Q8Row {
  float scale, row_bias, abs_scale;
  float value_max;  // 255 * |scale| + |row_bias|
  float norm;       // ||code - 127.5||_2, rounded up
  float bias_up;    // item bias + |item bias| * 2^-20 (2^-19 for float catalogs)
  float res_norm;   // float catalogs: ||x - value||_2 of the row, rounded up; 0 for int8 catalogs
};

struct Q8TileArgs {
  const int8_t* qpanel;   // [q8_quads(D)][16][4] q8, zero past D
  const float* qscale;    // [16]
  const float* qsum;      // [16] sum_d q_d
  const float* qcorr;     // [16]
  const float* qerr;      // [16]
  const float* qnorm;     // [16]
  const float* qslack;    // [16]
  const float* qnorm_full;  // [16] ||q||_2 rounded up (float catalogs)
  const float* panel;     // [D][16] fp32 queries (exact rescoring)
  const uint8_t* rows;    // [n_items] packed rows of the chunk
  const Q8Row* row_info;  // [n_items]
  int64_t row_bytes, dim, n_items;
  const float* bias;      // [n_items] or nullptr
  const float* threshold;
  uint32_t lane_mask;
  int32_t* passed;        // [n_items] scratch: the items to rescore
  float* scratch;         // [kQ8RescoreRows][dim] scratch: dequantized rows
  const float* exact_rows;  // float catalogs: the chunk's fp32 rows [n_items][dim], which
                            // `rows` quantizes and the rescoring reads; nullptr for int8 catalogs
};

int64_t score_tile_q8_avx2(const Q8TileArgs& a, Candidate* out);
// n rows of a table (any Kind, row stride row_bytes) as fp32 [n][dim]: the scalar conversions'
// values (int8: code * scale + bias, two roundings), 8 columns at a time.
void rows_to_f32_avx2(Kind kind, const uint8_t* rows, int64_t row_bytes, int64_t dim, int64_t n, float* out);
// The rescoring step both prefilters share (scoring_cpu_avx2.cpp): the n listed items' rows
// dequantized into a.scratch (code * scale + bias, two roundings) and their biases into bias[n];
// returns the fp32 tile's arguments over them (Candidate::item then indexes `items`).
TileArgs q8_rescore_args(const Q8TileArgs& a, const int32_t* items, int n, float* bias);
// The same prefilter on AVX512-VNNI (vpdpbusd; the same int32 sums and bound, the same result).
int64_t score_tile_q8_vnni(const Q8TileArgs& a, Candidate* out);

// Quantizes n fp32 rows x[n][dim] (dim >= 1) into packed int8 rows (dim codes, fp32 scale, fp32 bias; row
// stride dim + 8) for the prefilter: scale = (max - min) / 255, bias = min, code = the nearest
// step. Per row, norm = ||code - 127.5||_2 and res_norm = ||x - value||_2, both rounded up (value =
// code * scale + bias, two roundings), and abs_max = max |x|. Returns false, leaving the rest unspecified, when a row is outside the
// bound's range (a non-finite value, |x| > 2^96, or 0 < max |x| < 2^-60, where roundings of the
// bound's terms could leave the normal range): the chunk then takes the fp32 tile.
bool q8_quantize_rows_avx2(const float* x, int64_t n, int64_t dim, uint8_t* rows, float* norm, float* res_norm,
                           float* abs_max);

}  // namespace recsys_kernels::scoring_cpu
