// What the AVX2+FMA+F16C translation units share (embedding_bag_cpu_avx2.h, scoring_cpu_avx2.cpp,
// int8_gemm_avx2.cpp): the function attributes, and the readers of one table row (fp32, fp16, bf16,
// int8 and 4-bit row-wise) into 8-float vectors (their scalar parts also serve the AVX-512 readers
// of embedding_bag_cpu_avx512.h). Include it only from those files: the build has no -mavx2,
// every function here carries the target attribute, and callers check cpu_isa() first.
// fp-contract=off: a * b + c stays two roundings (an int8 value is code * scale + bias, as in the
// reference), only explicit _mm256_fmadd_ps calls fuse. No torch headers.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define RK_AVX2 __attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off")))
#define RK_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off"), always_inline)) inline

namespace recsys_kernels::avx2 {

RK_AVX2_INLINE float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Whether both halves of `bits` (two floats or two halves; kExp: their exponent fields) are finite,
// without a branch: an all-ones exponent plus its lowest bit carries into the sign bit. The gathers
// test every row's scale and bias; this is one integer test where isfinite() made GCC emit two
// compare-and-branch pairs per row.
template <class U, U kExp>
RK_AVX2_INLINE bool both_finite(U bits) {
  constexpr U kLow = kExp & ~(kExp << 1);             // the lowest exponent bit of each half
  constexpr U kSign = (kExp + kLow) & ~kExp;           // the sign bit of each half
  return (((bits & kExp) + kLow) & kSign) == 0;
}

// Prefetch the line of p. L2: into L2 only (prefetcht1), for rows that come from DRAM (see
// embedding_bag_cpu_pool.h, Ahead), else into L1 (prefetcht0).
template <bool L2>
RK_AVX2_INLINE void prefetch_line(const char* p) {
  _mm_prefetch(p, L2 ? _MM_HINT_T1 : _MM_HINT_T0);
}

// Prefetch n lines from p (one every 64 bytes), in straight-line code up to 8 lines: a switch that
// falls through (the gathers prefetch every row ahead, and a loop over its lines per row ran
// 1.2-1.9x slower there). L2 as in prefetch_line.
template <bool L2>
RK_AVX2_INLINE void prefetch_lines(const char* p, int64_t n) {
  switch (n) {
    case 8: prefetch_line<L2>(p + 448); [[fallthrough]];
    case 7: prefetch_line<L2>(p + 384); [[fallthrough]];
    case 6: prefetch_line<L2>(p + 320); [[fallthrough]];
    case 5: prefetch_line<L2>(p + 256); [[fallthrough]];
    case 4: prefetch_line<L2>(p + 192); [[fallthrough]];
    case 3: prefetch_line<L2>(p + 128); [[fallthrough]];
    case 2: prefetch_line<L2>(p + 64); [[fallthrough]];
    case 1: prefetch_line<L2>(p); [[fallthrough]];
    case 0: break;
    default:
      for (int64_t l = 0; l < n; ++l) prefetch_line<L2>(p + 64 * l);
  }
}

struct RowParams {
  float scale = 1.0f, bias = 0.0f;
};

// Loaders: vector of 8 columns from column c (a multiple of 8), scalar column c, the row's scale
// and bias, and where a column's byte is.
struct F32 {
  static constexpr int64_t kTailBytes = 0;  // after the codes: nothing
  static constexpr bool kQuant = false;
  static constexpr bool kFusedSum = false;
  RK_AVX2_INLINE static RowParams params(const uint8_t*, int64_t, bool&) { return {}; }
  RK_AVX2_INLINE static __m256 load(const uint8_t* row, int64_t c, const RowParams&) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + c);
  }
  RK_AVX2_INLINE static float scalar(const uint8_t* row, int64_t c, const RowParams&) {
    float v;
    std::memcpy(&v, row + 4 * c, 4);
    return v;
  }
  static constexpr int64_t byte_of(int64_t c) { return 4 * c; }
};

struct F16 {
  static constexpr int64_t kTailBytes = 0;  // after the codes: nothing
  static constexpr bool kQuant = false;
  static constexpr bool kFusedSum = false;
  RK_AVX2_INLINE static RowParams params(const uint8_t*, int64_t, bool&) { return {}; }
  RK_AVX2_INLINE static __m256 load(const uint8_t* row, int64_t c, const RowParams&) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * c)));
  }
  RK_AVX2_INLINE static float scalar(const uint8_t* row, int64_t c, const RowParams&) {
    uint16_t h;
    std::memcpy(&h, row + 2 * c, 2);
    return half_to_float(h);
  }
  static constexpr int64_t byte_of(int64_t c) { return 2 * c; }
};

struct BF16 {
  static constexpr int64_t kTailBytes = 0;  // after the codes: nothing
  static constexpr bool kQuant = false;
  static constexpr bool kFusedSum = false;
  RK_AVX2_INLINE static RowParams params(const uint8_t*, int64_t, bool&) { return {}; }
  RK_AVX2_INLINE static __m256 load(const uint8_t* row, int64_t c, const RowParams&) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * c)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  }
  RK_AVX2_INLINE static float scalar(const uint8_t* row, int64_t c, const RowParams&) {
    uint16_t h;
    std::memcpy(&h, row + 2 * c, 2);
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
  }
  static constexpr int64_t byte_of(int64_t c) { return 2 * c; }
};

// 8-bit: D codes, fp32 scale, fp32 bias.
struct Q8 {
  static constexpr int64_t kTailBytes = 8;  // after the codes: fp32 scale, fp32 bias
  static constexpr bool kQuant = true;
  // embedding_bag's sums take code * scale in one fma and the biases apart
  // (embedding_bag_cpu_kernels.h, kBiasFoldRows); codes() and code() are the codes as floats
  static constexpr bool kFusedSum = true;
  RK_AVX2_INLINE static RowParams params(const uint8_t* row, int64_t dim, bool& ok) {
    RowParams p;
    std::memcpy(&p.scale, row + dim, 4);
    std::memcpy(&p.bias, row + dim + 4, 4);
    uint64_t bits;
    std::memcpy(&bits, row + dim, 8);
    ok &= both_finite<uint64_t, 0x7F8000007F800000u>(bits);
    return p;
  }
  RK_AVX2_INLINE static __m256 load(const uint8_t* row, int64_t c, const RowParams& p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c));
    const __m256 codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    return _mm256_add_ps(_mm256_mul_ps(codes, _mm256_set1_ps(p.scale)), _mm256_set1_ps(p.bias));
  }
  RK_AVX2_INLINE static float scalar(const uint8_t* row, int64_t c, const RowParams& p) {
    return static_cast<float>(row[c]) * p.scale + p.bias;
  }
  RK_AVX2_INLINE static __m256 codes(const uint8_t* row, int64_t c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c))));
  }
  RK_AVX2_INLINE static float code(const uint8_t* row, int64_t c) { return static_cast<float>(row[c]); }
  static constexpr int64_t byte_of(int64_t c) { return c; }
};

// 4-bit: D/2 bytes of codes (low nibble first), fp16 scale, fp16 bias.
struct Q4 {
  static constexpr int64_t kTailBytes = 4;  // after the codes: fp16 scale, fp16 bias
  static constexpr bool kQuant = true;
  static constexpr bool kFusedSum = false;  // its values come from a per-row table (the AVX-512 reader)
  RK_AVX2_INLINE static RowParams params(const uint8_t* row, int64_t dim, bool& ok) {
    uint32_t bits;  // fp16 scale in the low half, fp16 bias in the high half (x86: little endian)
    std::memcpy(&bits, row + dim / 2, 4);
    ok &= both_finite<uint32_t, 0x7C007C00u>(bits);
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

}  // namespace recsys_kernels::avx2
