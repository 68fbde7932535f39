// The AVX2+FMA+F16C pooling kernel of embedding_bag (see embedding_bag_cpu_kernels.h), included
// only by its two translation units, one per index dtype (embedding_bag_cpu_avx2_i32.cpp and
// _i64.cpp: one unit took 80 s to compile). Every function here carries the target attribute (the
// build has no -mavx2); the forward calls pool_bags_avx2 only after recsys_kernels::cpu_isa() said
// AVX2 is there. No torch headers: nothing from this file may be picked by the linker for the
// baseline-ISA code.
//
// Per bag, the columns go in blocks of up to kMaxVecs vectors of 8 floats: the block's fp32
// accumulators stay in registers while the kernel walks the bag's rows in index order; the first
// block prefetches the whole row kPrefetch indices ahead (running on into the next bags). Columns
// past the last full vector go through a scalar loop with the same operations. fp-contract=off:
// a * b + c must stay two roundings, as in the reference.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/avx2_rows.h"
#include "embedding_bag/embedding_bag_cpu_kernels.h"

// Internal linkage in each including unit: as external (interposable) symbols of the shared
// library the kernels were called through the PLT and lost GCC's inter-procedural clones.
namespace recsys_kernels::embedding_bag_cpu::avx2_kernel {
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
    uint32_t bits;  // fp16 scale in the low half, fp16 bias in the high half (x86: little endian)
    std::memcpy(&bits, row + dim / 2, 4);
    ok &= avx2::both_finite<uint32_t, 0x7C007C00u>(bits);
    return {half_to_float(static_cast<uint16_t>(bits)), half_to_float(static_cast<uint16_t>(bits >> 16))};
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
  // Vector k of a group of 4 (32 columns from one 16-byte load; GCC merges the shared part of the
  // decode across the unrolled k): 11 vector ops per 4 vectors before the dequantization, against
  // 6 per vector for load(). FBGEMM's 4-bit kernel decodes 32 codes per load the same way.
  RK_AVX2_INLINE static __m256 load_of_4(const uint8_t* row, int k, const RowParams& p) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * (k / 4)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(x, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), mask);
    const __m128i cols = (k & 2) ? _mm_unpackhi_epi8(lo, hi) : _mm_unpacklo_epi8(lo, hi);
    const __m128i nib = (k & 1) ? _mm_srli_si128(cols, 8) : cols;
    const __m256 codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nib));
    return _mm256_add_ps(_mm256_mul_ps(codes, _mm256_set1_ps(p.scale)), _mm256_set1_ps(p.bias));
  }
  static constexpr int64_t byte_of(int64_t c) { return c / 2; }
};

// Vector k (0 <= k < NV) of a column block: 4-bit rows decode 4 vectors per load where the block
// holds the whole group (never reading past it, so never past the row).
template <class L, int NV>
RK_AVX2_INLINE __m256 load_vector(const uint8_t* block, int k, const RowParams& p) {
  if constexpr (std::is_same_v<L, Q4>) {
    if ((k / 4 + 1) * 4 <= NV) return L::load_of_4(block, k, p);
  }
  return L::load(block, 8 * k, p);
}

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

// Which lines of a row to prefetch, past the `known` first ones: `extra` more lines, and the line
// of its last byte when the row may span one line more than ceil(row_bytes / 64). The same number
// of prefetches for every row, and none outside the row (a quantized D = 128 row is 136 bytes:
// rounding up to whole lines would fetch a fourth).
struct RowLines {
  int64_t extra;
  bool last_byte;
  bool any() const { return extra > 0 || last_byte; }
};

RK_AVX2_INLINE RowLines row_lines(const PoolArgs& a, int64_t known) {
  const int64_t lines = (a.row_bytes + 63) / 64;
  // In a 64-byte aligned table every row starts at a multiple of g = gcd(row_bytes, 64) within its
  // line, at most 64 - g in, so its last byte is in its line `lines - 1` when row_bytes - 64 *
  // (lines - 1) <= g (true for the quantized rows at D = 128: 68 and 136 bytes).
  const int64_t g = a.row_bytes & -a.row_bytes;  // the lowest set bit: gcd with 64 when < 64
  const bool fits = reinterpret_cast<uintptr_t>(a.table) % 64 == 0 &&
                    a.row_bytes - 64 * (lines - 1) <= (g < 64 ? g : 64);
  return {lines - known, !fits};
}

// At index position p: prefetch every line of the row kPrefetch positions ahead (running on into
// the next bags, as FBGEMM does). Measured on the DRAM-bound gather (1M x 128 fp32), this code
// must not branch per row: a loop over the lines, a switch (an indirect jump) or a chain of ifs on
// the line count each cost 10-50%. So the KNOWN lines the first column block covers (a
// compile-time count) go in straight-line code, and rows with MORE lines (later blocks, a
// quantized row's scale and bias, a row that may end in a further line) get the rest from a
// switch that falls through; the look-ahead position is clamped to idx_end, and an index out of
// range prefetches row 0 (the pooling pass deals with such indices; a prefetch only has to stay in
// the table).
template <int64_t KNOWN, bool MORE, class I>
RK_AVX2_INLINE void prefetch_ahead(const PoolArgs& a, const I* idx, int64_t p, RowLines more) {
  const int64_t q = p + kPrefetch < a.idx_end ? p + kPrefetch : a.idx_end - 1;
  int64_t r = idx[q];
  // r, or 0 when out of range, without a branch (as a branch GCC kept one address register per
  // prefetched line, for the shared row-0 path, and the 16-accumulator loop spilled)
  r &= -static_cast<int64_t>(static_cast<uint64_t>(r) < static_cast<uint64_t>(a.n_rows));
  const char* row = reinterpret_cast<const char*>(a.table + r * a.row_bytes);
#pragma GCC unroll 16
  for (int64_t l = 0; l < KNOWN; ++l) _mm_prefetch(row + 64 * l, _MM_HINT_T0);
  if constexpr (MORE) {
    avx2::prefetch_lines(row + 64 * KNOWN, more.extra);
    if (more.last_byte) _mm_prefetch(row + a.row_bytes - 1, _MM_HINT_T0);
  }
}

// The bag [s, e) of idx (s < e) and where its D results go.
template <class I>
struct Bag {
  const I* idx;
  int64_t s, e;
  float* out;
};

RK_AVX2_INLINE bool out_of_range(int64_t r, const PoolArgs& a) {
  return static_cast<uint64_t>(r) >= static_cast<uint64_t>(a.n_rows);
}

// One column block [c0, c0 + 8 * NV) of a bag (see pool_block); MORE: prefetch the row's further
// lines too.
template <class L, int NV, bool MAX, bool W, bool FIRST, bool MORE, class I>
RK_AVX2_INLINE int64_t pool_rows(const PoolArgs& a, const Bag<I>& bag, int64_t c0, RowLines more, bool& ok) {
  constexpr int64_t kKnown = (L::byte_of(8 * NV) + 63) / 64;
  __m256 acc[NV];
  const __m256 init = MAX ? _mm256_set1_ps(-INFINITY) : _mm256_setzero_ps();
  // unrolled: as a loop GCC turned it into a memset of the array on the stack (a microcoded
  // `rep stos` per bag) before the accumulators went into registers
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) acc[k] = init;
  bool finite = true;  // a local: through the reference GCC stored it on every row
  for (int64_t p = bag.s; p < bag.e; ++p) {
    const int64_t r = bag.idx[p];
    if constexpr (FIRST) {
      prefetch_ahead<kKnown, MORE>(a, bag.idx, p, more);
      if (out_of_range(r, a)) return p;
    }
    const uint8_t* row = a.table + r * a.row_bytes;
    const RowParams prm = L::params(row, a.dim, finite);
    const uint8_t* block = row + L::byte_of(c0);  // constant offsets below (c0 is a multiple of 8)
    __m256 w;
    if constexpr (W) w = _mm256_set1_ps(a.weights[p]);
#pragma GCC unroll 16  // k must be a constant in load_vector
    for (int k = 0; k < NV; ++k) {
      __m256 v = load_vector<L, NV>(block, k, prm);
      if constexpr (W) v = _mm256_mul_ps(v, w);
      acc[k] = MAX ? max_nan(acc[k], v) : _mm256_add_ps(acc[k], v);
    }
  }
  ok &= finite;
  if (a.is_mean) {
    const __m256 count = _mm256_set1_ps(static_cast<float>(bag.e - bag.s));
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) acc[k] = _mm256_div_ps(acc[k], count);
  }
  // unrolled too: as loops (indexing acc by a variable) GCC kept a copy of acc on the stack and
  // stored every accumulator to it on every row
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) _mm256_storeu_ps(bag.out + c0 + 8 * k, acc[k]);
  return -1;
}

// One column block [c0, c0 + 8 * NV) of a bag. FIRST: the bag's first block, which prefetches
// the whole row ahead (the later blocks find it in L1/L2) and checks each index before it reads
// the row. Returns the position of an index out of range, else -1.
template <class L, int NV, bool MAX, bool W, bool FIRST, class I>
RK_AVX2 int64_t pool_block(const PoolArgs& a, const Bag<I>& bag, int64_t c0, bool& ok) {
  // the lines the block's own columns span in a 64-byte aligned row, known at compile time
  constexpr int64_t kKnown = (L::byte_of(8 * NV) + 63) / 64;
  const RowLines more = row_lines(a, kKnown);
  // one loop with and one without the further lines, not a branch per row: that branch, though
  // predicted, cost 7% on the cache-resident shape B (the row loop is ~25 instructions)
  if (!FIRST) return pool_rows<L, NV, MAX, W, false, false>(a, bag, c0, more, ok);
  return more.any() ? pool_rows<L, NV, MAX, W, FIRST, true>(a, bag, c0, more, ok)
                    : pool_rows<L, NV, MAX, W, FIRST, false>(a, bag, c0, more, ok);
}

// Columns [c0, dim), fewer than 8; FIRST as in pool_block (c0 == 0: the row has no full vector).
template <class L, bool MAX, bool W, bool FIRST, class I>
RK_AVX2 int64_t pool_tail(const PoolArgs& a, const Bag<I>& bag, int64_t c0, bool& ok) {
  float acc[8];
  const int64_t nc = a.dim - c0;
  for (int64_t c = 0; c < nc; ++c) acc[c] = MAX ? -INFINITY : 0.0f;
  const RowLines all = row_lines(a, 0);
  for (int64_t p = bag.s; p < bag.e; ++p) {
    const int64_t r = bag.idx[p];
    if constexpr (FIRST) {
      prefetch_ahead<0, true>(a, bag.idx, p, all);
      if (out_of_range(r, a)) return p;
    }
    const uint8_t* row = a.table + r * a.row_bytes;
    const RowParams prm = L::params(row, a.dim, ok);
    for (int64_t c = 0; c < nc; ++c) {
      float v = L::scalar(row, c0 + c, prm);
      if constexpr (W) v = v * a.weights[p];
      acc[c] = MAX ? max_nan(acc[c], v) : acc[c] + v;
    }
  }
  const float count = static_cast<float>(bag.e - bag.s);
  for (int64_t c = 0; c < nc; ++c) bag.out[c0 + c] = a.is_mean ? acc[c] / count : acc[c];
  return -1;
}

// pool_block for a block of nv (1..kMaxVecs) vectors: the template instance with NV == nv.
template <class L, bool MAX, bool W, bool FIRST, class I, int NV = 1>
RK_AVX2_INLINE int64_t pool_block_n(int nv, const PoolArgs& a, const Bag<I>& bag, int64_t c0, bool& ok) {
  if constexpr (NV < kMaxVecs<L, MAX>) {
    if (nv != NV) return pool_block_n<L, MAX, W, FIRST, I, NV + 1>(nv, a, bag, c0, ok);
  }
  return pool_block<L, NV, MAX, W, FIRST>(a, bag, c0, ok);
}

// Every bag of the run, bag by bag (one pass over a bag's rows per column block).
template <class L, class I, bool MAX, bool W>
RK_AVX2 PoolResult pool_run(const PoolArgs& a) {
  constexpr int kBlock = kMaxVecs<L, MAX>;
  const I* idx = static_cast<const I*>(a.idx);
  const I* off = static_cast<const I*>(a.off);
  const int64_t nvec = a.dim / 8;
  const int64_t n_full = nvec / kBlock;  // full blocks
  const int rest = static_cast<int>(nvec % kBlock);
  bool ok = true;
  // each offset is read once, as a scalar: reading off[b] and off[b + 1] per bag, GCC loaded the
  // pair as one 8-byte word, spilled it and reloaded it as a vector (a failed store forwarding,
  // which waits for all older stores to commit: the previous bag's misses), and the kernel ran at
  // half FBGEMM's speed on the cache-resident shape B
  int64_t next = off[0];
  for (int64_t b = 0; b < a.n_bags; ++b) {
    const int64_t s = next;
    next = off[b + 1];
    const Bag<I> bag{idx, s, next, a.out + b * a.out_stride};
    if (bag.s == bag.e) {
      for (int64_t c = 0; c < a.dim; ++c) bag.out[c] = 0.0f;
      continue;
    }
    int64_t bad = -1;
    for (int64_t v = 0; v < n_full && bad < 0; ++v) {
      bad = v == 0 ? pool_block<L, kBlock, MAX, W, true>(a, bag, 0, ok)
                   : pool_block<L, kBlock, MAX, W, false>(a, bag, 8 * kBlock * v, ok);
    }
    if (rest > 0 && bad < 0) {
      bad = n_full == 0 ? pool_block_n<L, MAX, W, true, I>(rest, a, bag, 0, ok)
                        : pool_block_n<L, MAX, W, false, I>(rest, a, bag, 8 * kBlock * n_full, ok);
    }
    if (8 * nvec < a.dim && bad < 0) {
      bad = nvec == 0 ? pool_tail<L, MAX, W, true>(a, bag, 0, ok) : pool_tail<L, MAX, W, false>(a, bag, 8 * nvec, ok);
    }
    if (bad >= 0) return {bad, ok};
  }
  return {-1, ok};
}

template <class L, class I>
RK_AVX2 PoolResult pool_kind(const PoolArgs& a) {
  const bool w = a.weights != nullptr;
  if (a.is_max) return w ? pool_run<L, I, true, true>(a) : pool_run<L, I, true, false>(a);
  return w ? pool_run<L, I, false, true>(a) : pool_run<L, I, false, false>(a);
}

template <class I>
RK_AVX2 PoolResult pool_index(const PoolArgs& a) {
  switch (a.kind) {
    case TableKind::kF32: return pool_kind<F32, I>(a);
    case TableKind::kF16: return pool_kind<F16, I>(a);
    case TableKind::kBF16: return pool_kind<BF16, I>(a);
    case TableKind::kQ8: return pool_kind<Q8, I>(a);
    case TableKind::kQ4: return pool_kind<Q4, I>(a);
  }
  return {};
}

}  // namespace
}  // namespace recsys_kernels::embedding_bag_cpu::avx2_kernel
