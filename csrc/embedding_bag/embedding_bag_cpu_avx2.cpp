// The AVX2+FMA+F16C pooling kernel of embedding_bag (see embedding_bag_cpu_kernels.h). Every
// function here carries the target attribute (the build has no -mavx2); embedding_bag_cpu.cpp
// calls pool_bag_avx2 only after recsys_kernels::cpu_isa() said AVX2 is there. No torch headers:
// nothing from this file may be picked by the linker for the baseline-ISA code.
//
// Per bag, the columns go in blocks of up to kMaxVecs vectors of 8 floats: the block's fp32
// accumulators stay in registers while the kernel walks the bag's rows in index order; the first
// block prefetches the whole row kPrefetch indices ahead (running on into the next bags). Columns
// past the last full vector go through a scalar loop with the same operations. fp-contract=off:
// a * b + c must stay two roundings, as in the reference.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/avx2_rows.h"
#include "embedding_bag/embedding_bag_cpu_kernels.h"

namespace recsys_kernels::embedding_bag_cpu {
namespace {

constexpr int64_t kPrefetch = 16;  // indices ahead (8..16 measured best; 32 and more lose)

using avx2::BF16;
using avx2::F16;
using avx2::F32;
using avx2::half_to_float;
using avx2::Q8;
using avx2::RowParams;

// 4-bit: D/2 bytes of codes (low nibble first), fp16 scale, fp16 bias.
struct Q4 {
  static constexpr bool kQuant = true;
  RK_AVX2_INLINE static RowParams params(const uint8_t* row, int64_t dim, bool& ok) {
    uint16_t h[2];
    std::memcpy(h, row + dim / 2, 4);
    RowParams p{half_to_float(h[0]), half_to_float(h[1])};
    ok &= std::isfinite(p.scale) && std::isfinite(p.bias);
    return p;
  }
  RK_AVX2_INLINE static __m256 load(const uint8_t* row, int64_t c, const RowParams& p) {
    int32_t packed;
    std::memcpy(&packed, row + c / 2, 4);
    const __m128i x = _mm_cvtsi32_si128(packed);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(x, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), mask);
    const __m128i nib = _mm_unpacklo_epi8(lo, hi);  // lo0 hi0 lo1 hi1 ...: column order
    const __m256 codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nib));
    return _mm256_add_ps(_mm256_mul_ps(codes, _mm256_set1_ps(p.scale)), _mm256_set1_ps(p.bias));
  }
  RK_AVX2_INLINE static float scalar(const uint8_t* row, int64_t c, const RowParams& p) {
    const uint8_t b = row[c / 2];
    const uint8_t code = (c & 1) ? (b >> 4) : (b & 0x0F);
    return static_cast<float>(code) * p.scale + p.bias;
  }
  static constexpr int64_t byte_of(int64_t c) { return c / 2; }
};

// max that propagates NaN (as amax does): a NaN value wins, a NaN accumulator stays.
RK_AVX2_INLINE __m256 max_nan(__m256 acc, __m256 v) {
  const __m256 m = _mm256_max_ps(v, acc);  // acc where either is NaN
  return _mm256_blendv_ps(m, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

RK_AVX2_INLINE float max_nan(float acc, float v) { return (std::isnan(v) || v > acc) ? v : acc; }

// Accumulator vectors of 8 floats per column block, i.e. the columns one pass over a bag's rows
// covers. One pass per row matters on DRAM-bound gathers: while a second block walks the bag's rows
// again (from cache) no new misses are issued (two blocks of 8 measured 1.2x slower than one of 16
// at D = 128). A float sum keeps all 16 ymm registers as accumulators (with weights GCC spills
// one or two, which still measured 0-12% faster); max and dequantization need more temporaries,
// and 16 there measured up to 30% slower than blocks of 8.
template <class L, bool MAX>
constexpr int kMaxVecs = (MAX || L::kQuant) ? 8 : 16;

// Which lines of a row to prefetch, past the `known` first ones: `extra` more lines, and for a row
// not aligned to 64 bytes also the line of its last byte, since it may span one line more than
// ceil(row_bytes / 64). The same number of prefetches for every row, and none outside the row
// (a quantized D = 128 row is 136 bytes: rounding up to whole lines would fetch a fourth).
struct RowLines {
  int64_t extra;
  bool unaligned;
  bool any() const { return extra > 0 || unaligned; }
};

RK_AVX2_INLINE RowLines row_lines(const PoolArgs& a, int64_t known) {
  const bool aligned = a.row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(a.table) % 64 == 0;
  return {(a.row_bytes + 63) / 64 - known, !aligned};
}

// At position p of the bag: prefetch every line of the row kPrefetch raw indices ahead (running on
// into the next bags, as FBGEMM does). Measured on the DRAM-bound gather (1M x 128 fp32), this
// code must not branch per row: a loop over the lines, a switch (an indirect jump) or a chain of
// ifs on the line count each cost 10-50%. So the KNOWN lines the first column block covers (a
// compile-time count) go in straight-line code, and only a row with more lines (later blocks, a
// quantized row's scale and bias, a row not aligned to 64 bytes) takes the one branch to the rest;
// the look-ahead position is clamped to the batch, and an index out of range prefetches row 0 (the
// pooling pass deals with such indices; a prefetch only has to stay in the table).
template <int64_t KNOWN>
RK_AVX2_INLINE void prefetch_ahead(const PoolArgs& a, int64_t p, RowLines more) {
  const int64_t q = p + kPrefetch < a.raw_left ? p + kPrefetch : a.raw_left - 1;
  // the low 32 bits of the index, without a branch on its dtype (an int64 is two int32 words, low
  // first, on x86; that branch, laid out of line, cost two taken jumps per row): an index of 2^31
  // or more then prefetches the wrong row, which costs only time
  int64_t r = static_cast<const int32_t*>(a.raw_idx)[q << a.raw_is_int64];
  r = static_cast<uint64_t>(r) < static_cast<uint64_t>(a.n_rows) ? r : 0;
  const char* row = reinterpret_cast<const char*>(a.table + r * a.row_bytes);
#pragma GCC unroll 16
  for (int64_t l = 0; l < KNOWN; ++l) _mm_prefetch(row + 64 * l, _MM_HINT_T0);
  if (more.any()) {
    const char* b = row + 64 * KNOWN;
    switch (more.extra) {  // straight-line again for up to 8 lines
      case 8: _mm_prefetch(b + 448, _MM_HINT_T0); [[fallthrough]];
      case 7: _mm_prefetch(b + 384, _MM_HINT_T0); [[fallthrough]];
      case 6: _mm_prefetch(b + 320, _MM_HINT_T0); [[fallthrough]];
      case 5: _mm_prefetch(b + 256, _MM_HINT_T0); [[fallthrough]];
      case 4: _mm_prefetch(b + 192, _MM_HINT_T0); [[fallthrough]];
      case 3: _mm_prefetch(b + 128, _MM_HINT_T0); [[fallthrough]];
      case 2: _mm_prefetch(b + 64, _MM_HINT_T0); [[fallthrough]];
      case 1: _mm_prefetch(b, _MM_HINT_T0); [[fallthrough]];
      case 0: break;
      default:
        for (int64_t l = 0; l < more.extra; ++l) _mm_prefetch(b + 64 * l, _MM_HINT_T0);
    }
    if (more.unaligned) _mm_prefetch(row + a.row_bytes - 1, _MM_HINT_T0);
  }
}

// One column block [c0, c0 + 8 * NV) of a bag. PF: the block prefetches (the first block of each
// row does, for the whole row: the later blocks find it in L1/L2).
template <class L, int NV, bool MAX, bool W, bool PF>
RK_AVX2 bool pool_block(const PoolArgs& a, int64_t c0) {
  __m256 acc[NV];
  const __m256 init = MAX ? _mm256_set1_ps(-INFINITY) : _mm256_setzero_ps();
  for (int k = 0; k < NV; ++k) acc[k] = init;
  bool ok = true;
  // the lines the block's own columns span in a 64-byte aligned row, known at compile time
  constexpr int64_t kKnown = (L::byte_of(8 * NV) + 63) / 64;
  const RowLines more = row_lines(a, kKnown);
  for (int64_t p = 0; p < a.n; ++p) {
    if constexpr (PF) prefetch_ahead<kKnown>(a, p, more);
    const uint8_t* row = a.table + a.rows[p] * a.row_bytes;
    const RowParams prm = L::params(row, a.dim, ok);
    const uint8_t* block = row + L::byte_of(c0);  // constant offsets below (c0 is a multiple of 8)
    __m256 w;
    if constexpr (W) w = _mm256_set1_ps(a.weights[p]);
    for (int k = 0; k < NV; ++k) {
      __m256 v = L::load(block, 8 * k, prm);
      if constexpr (W) v = _mm256_mul_ps(v, w);
      acc[k] = MAX ? max_nan(acc[k], v) : _mm256_add_ps(acc[k], v);
    }
  }
  for (int k = 0; k < NV; ++k) _mm256_storeu_ps(a.out + c0 + 8 * k, acc[k]);
  return ok;
}

// Columns [c0, dim), fewer than 8.
template <class L, bool MAX, bool W>
RK_AVX2 bool pool_tail(const PoolArgs& a, int64_t c0) {
  float acc[8];
  const int64_t nc = a.dim - c0;
  for (int64_t c = 0; c < nc; ++c) acc[c] = MAX ? -INFINITY : 0.0f;
  bool ok = true;
  const RowLines all = row_lines(a, 0);
  for (int64_t p = 0; p < a.n; ++p) {
    if (c0 == 0) prefetch_ahead<0>(a, p, all);
    const uint8_t* row = a.table + a.rows[p] * a.row_bytes;
    const RowParams prm = L::params(row, a.dim, ok);
    for (int64_t c = 0; c < nc; ++c) {
      float v = L::scalar(row, c0 + c, prm);
      if constexpr (W) v = v * a.weights[p];
      acc[c] = MAX ? max_nan(acc[c], v) : acc[c] + v;
    }
  }
  for (int64_t c = 0; c < nc; ++c) a.out[c0 + c] = acc[c];
  return ok;
}

// pool_block for a block of nv (1..kMaxVecs) vectors: the template instance with NV == nv.
template <class L, bool MAX, bool W, int NV = 1>
RK_AVX2_INLINE bool pool_block_n(int nv, bool first, const PoolArgs& a, int64_t c0) {
  if constexpr (NV < kMaxVecs<L, MAX>) {
    if (nv != NV) return pool_block_n<L, MAX, W, NV + 1>(nv, first, a, c0);
  }
  return first ? pool_block<L, NV, MAX, W, true>(a, c0) : pool_block<L, NV, MAX, W, false>(a, c0);
}

template <class L, bool MAX, bool W>
RK_AVX2 bool pool(const PoolArgs& a) {
  constexpr int kBlock = kMaxVecs<L, MAX>;
  bool ok = true;
  const int64_t nvec = a.dim / 8;
  for (int64_t v0 = 0; v0 < nvec; v0 += kBlock) {
    const int nv = static_cast<int>(nvec - v0 < kBlock ? nvec - v0 : kBlock);
    ok &= pool_block_n<L, MAX, W>(nv, v0 == 0, a, 8 * v0);
  }
  if (8 * nvec < a.dim) ok &= pool_tail<L, MAX, W>(a, 8 * nvec);
  return ok;
}

template <class L>
RK_AVX2 bool pool_kind(const PoolArgs& a) {
  const bool w = a.weights != nullptr;
  if (a.is_max) return w ? pool<L, true, true>(a) : pool<L, true, false>(a);
  return w ? pool<L, false, true>(a) : pool<L, false, false>(a);
}

}  // namespace

RK_AVX2 bool pool_bag_avx2(const PoolArgs& a) {
  switch (a.kind) {
    case TableKind::kF32: return pool_kind<F32>(a);
    case TableKind::kF16: return pool_kind<F16>(a);
    case TableKind::kBF16: return pool_kind<BF16>(a);
    case TableKind::kQ8: return pool_kind<Q8>(a);
    case TableKind::kQ4: return pool_kind<Q4>(a);
  }
  return true;
}

}  // namespace recsys_kernels::embedding_bag_cpu
