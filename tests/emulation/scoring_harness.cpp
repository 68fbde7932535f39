// C entry points to the score tiles of topk_scores for the emulated tests: the AVX2 kernels (built
// natively) and the AVX-512 / VNNI ones (csrc/scoring/scoring_cpu_avx512.cpp, emulated), on the
// same arguments spelled out in plain values (ctypes).
#include "scoring/scoring_cpu_kernels.h"

using namespace recsys_kernels::scoring_cpu;

extern "C" int64_t rk_score_tile(int avx512, const float* panel, const float* items, const float* bias, int64_t dim,
                                 int64_t n_items, const float* threshold, uint32_t lane_mask, Candidate* out) {
  const TileArgs a{panel, items, bias, dim, n_items, threshold, lane_mask};
  return avx512 ? score_tile_avx512(a, out) : score_tile_avx2(a, out);
}

// q: the query terms qscale, qsum, qcorr, qerr, qnorm, qslack, qnorm_full, 16 floats each, in that
// order. exact_rows: a float catalog's rows (the residual's term), or nullptr.
extern "C" int64_t rk_score_tile_q8(int vnni, const int8_t* qpanel, const float* q, const float* panel,
                                    const uint8_t* rows, const Q8Row* row_info, int64_t row_bytes, int64_t dim,
                                    int64_t n_items, const float* bias, const float* threshold, uint32_t lane_mask,
                                    int32_t* passed, float* scratch, const float* exact_rows, Candidate* out) {
  Q8TileArgs a{};
  a.qpanel = qpanel;
  a.qscale = q;
  a.qsum = q + 16;
  a.qcorr = q + 32;
  a.qerr = q + 48;
  a.qnorm = q + 64;
  a.qslack = q + 80;
  a.qnorm_full = q + 96;
  a.panel = panel;
  a.rows = rows;
  a.row_info = row_info;
  a.row_bytes = row_bytes;
  a.dim = dim;
  a.n_items = n_items;
  a.bias = bias;
  a.threshold = threshold;
  a.lane_mask = lane_mask;
  a.passed = passed;
  a.scratch = scratch;
  a.exact_rows = exact_rows;
  return vnni ? score_tile_q8_vnni(a, out) : score_tile_q8_avx2(a, out);
}

extern "C" int rk_q8_quantize_rows(const float* x, int64_t n, int64_t dim, uint8_t* rows, float* norm,
                                   float* res_norm, float* abs_max) {
  return q8_quantize_rows_avx2(x, n, dim, rows, norm, res_norm, abs_max);
}
