// The AVX-512 (F/BW/DQ/VL) pooling kernel of embedding_bag: the 16-float vector layer for the
// shared kernel code in embedding_bag_cpu_pool.h, included by its two translation units (one per
// index dtype) and, with AVX512_VBMI for the 4-bit rows, by embedding_bag_cpu_avx512_vbmi.cpp.
// Taken for tables whose D is a multiple of 16 when cpu_isa() >= avx512 (other widths keep the
// AVX2 kernel, whose 8-column vectors leave fewer columns to the scalar tail).
// The readers keep the AVX2 readers' scalar parts (avx2_rows.h) and load 16 columns; per column
// the float operations are those of the AVX2 and scalar paths, so all three give the same bits.
// No torch headers; fp-contract=off as on AVX2.
//
// Built with -DRK_EMULATE_WIDE by tests/test_embedding_bag_avx512_emulated.py, where SIMDe's
// AVX-512 stands in for the instructions on CPUs without them.
#pragma once

#if defined(RK_EMULATE_WIDE)
#include "wide_emulation.h"
#define RK_AVX512 __attribute__((optimize("fp-contract=off")))
#define RK_AVX512_INLINE __attribute__((optimize("fp-contract=off"))) inline
#else
#include <immintrin.h>
// RK_AVX512_VBMI (embedding_bag_cpu_avx512_vbmi.cpp): the same kernel with AVX512_VBMI, for the
// 4-bit rows alone (see Q4)
#if defined(RK_AVX512_VBMI)
#define RK_AVX512_ISA "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi"
#else
#define RK_AVX512_ISA "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl"
#endif
#define RK_AVX512 __attribute__((target(RK_AVX512_ISA), optimize("fp-contract=off")))
#define RK_AVX512_INLINE __attribute__((target(RK_AVX512_ISA), optimize("fp-contract=off"), always_inline)) inline
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/avx2_rows.h"
#include "embedding_bag/embedding_bag_cpu_kernels.h"

#define RK_POOL RK_AVX512
#define RK_POOL_INLINE RK_AVX512_INLINE

// GCC 12's _mm512_undefined_* (the pass-through of unmasked conversions) trips -Wmaybe-uninitialized
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace recsys_kernels::embedding_bag_cpu::avx512_kernel {
namespace {

using Vec = __m512;
constexpr int kLanes = 16;

RK_AVX512_INLINE Vec vzero() { return _mm512_setzero_ps(); }
RK_AVX512_INLINE Vec vset1(float x) { return _mm512_set1_ps(x); }
RK_AVX512_INLINE Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
RK_AVX512_INLINE Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
RK_AVX512_INLINE Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
RK_AVX512_INLINE Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
RK_AVX512_INLINE void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }

// max that propagates NaN, as the AVX2 max_nan: maxps gives acc where either is NaN, then a NaN
// value wins.
RK_AVX512_INLINE Vec max_nan(Vec acc, Vec v) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_max_ps(v, acc), v);
}

using avx2::prefetch_line;
using avx2::prefetch_lines;
using avx2::RowParams;

RK_AVX512_INLINE Vec dequantize(__m512i codes, const RowParams& p) {
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(p.scale)), _mm512_set1_ps(p.bias));
}

// Readers: 16 columns from column c (a multiple of 16); the rest is the AVX2 reader's.
struct F32 : avx2::F32 {
  RK_AVX512_INLINE static Vec load(const uint8_t* row, int64_t c, const RowParams&) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + c);
  }
};

struct F16 : avx2::F16 {
  RK_AVX512_INLINE static Vec load(const uint8_t* row, int64_t c, const RowParams&) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * c)));
  }
};

struct BF16 : avx2::BF16 {
  RK_AVX512_INLINE static Vec load(const uint8_t* row, int64_t c, const RowParams&) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * c)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  }
};

struct Q8 : avx2::Q8 {
  RK_AVX512_INLINE static Vec load(const uint8_t* row, int64_t c, const RowParams& p) {
    return dequantize(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c))), p);
  }
  RK_AVX512_INLINE static Vec codes(const uint8_t* row, int64_t c) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c))));
  }
};

// 4-bit rows: a row's 16 possible values, code * scale + bias (the same two roundings), are one
// vector, and a permute by the codes reads them (vpermps looks at the low 4 bits of each lane):
// per 16 columns a broadcast load of their 8 bytes, a byte shuffle putting byte j / 2 in lane j,
// a shift of the odd lanes by 4, the permute and the sum. Converting the codes took three
// shuffles, a conversion and a product per vector. With AVX512_VBMI one vpmultishiftqb puts bits
// 4j .. 4j + 7 of the 8 bytes into lane j's low byte, i.e. code j into its low 4 bits, in place
// of the shuffle and the masked shift: 7.8 -> 5.6 ns per 128-column row with the rows in L1 (Zen 4).
struct Q4Params : RowParams {
  Vec value;  // value[c] for the codes c = 0 .. 15
};

struct Q4 : avx2::Q4 {
  RK_AVX512_INLINE static Q4Params params(const uint8_t* row, int64_t dim, bool& ok) {
    Q4Params p;
    static_cast<RowParams&>(p) = avx2::Q4::params(row, dim, ok);
    const Vec codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    p.value = _mm512_add_ps(_mm512_mul_ps(codes, _mm512_set1_ps(p.scale)), _mm512_set1_ps(p.bias));
    return p;
  }
  // columns c .. c + 15 (c a multiple of 16): bytes c / 2 .. c / 2 + 7, low nibble first
  RK_AVX512_INLINE static Vec load(const uint8_t* row, int64_t c, const Q4Params& p) {
    int64_t bytes;
    std::memcpy(&bytes, row + c / 2, 8);
#if defined(RK_AVX512_VBMI)
    // lane j's low byte: bits 4 j .. 4 j + 7 of the 8 bytes (the higher nibble is ignored)
    const __m512i nibble_at = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
    const __m512i code = _mm512_multishift_epi64_epi8(nibble_at, _mm512_set1_epi64(bytes));
#else
    // lane j of 128-bit block L (column 4L + j) takes byte 2L + j / 2 into its low byte
    const __m512i spread = _mm512_set_epi8(
        -128, -128, -128, 7, -128, -128, -128, 7, -128, -128, -128, 6, -128, -128, -128, 6,
        -128, -128, -128, 5, -128, -128, -128, 5, -128, -128, -128, 4, -128, -128, -128, 4,
        -128, -128, -128, 3, -128, -128, -128, 3, -128, -128, -128, 2, -128, -128, -128, 2,
        -128, -128, -128, 1, -128, -128, -128, 1, -128, -128, -128, 0, -128, -128, -128, 0);
    const __m512i b = _mm512_shuffle_epi8(_mm512_set1_epi64(bytes), spread);
    const __m512i code = _mm512_mask_srli_epi32(b, 0xAAAA, b, 4);  // odd columns: the high nibble
#endif
    return _mm512_permutexvar_ps(code, p.value);
  }
  RK_AVX512_INLINE static Vec load_of_4(const uint8_t* row, int k, const Q4Params& p) {
    return load(row, kLanes * k, p);  // no shared decode to gain from
  }
};

#include "embedding_bag/embedding_bag_cpu_pool.h"

}  // namespace
}  // namespace recsys_kernels::embedding_bag_cpu::avx512_kernel

#pragma GCC diagnostic pop
#undef RK_POOL
#undef RK_POOL_INLINE
