// See half_convert.h. No torch headers: this unit is compiled for AVX2 through target attributes.
#include "common/half_convert.h"

#include <immintrin.h>

#include <bit>

#include "common/avx2_rows.h"

namespace recsys_kernels {
namespace {

RK_AVX2_INLINE bool is_nan(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// one value, as c10::Half(float): F16C rounds to nearest even; NaN canonical with its sign
RK_AVX2_INLINE uint16_t f16_of(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if (is_nan(u)) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7E00u);
  return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// one value, as c10::BFloat16(float): round to nearest even on the bits; NaN 0x7FC0
RK_AVX2_INLINE uint16_t bf16_of(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if (is_nan(u)) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// 8 lanes with a NaN: the vector result is patched lane by lane (a rare path)
RK_AVX2_INLINE bool any_nan(__m256 x) { return _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)) != 0; }

}  // namespace

RK_AVX2 void f32_to_f16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    if (any_nan(x))
      for (int j = 0; j < 8; ++j) dst[i + j] = f16_of(src[i + j]);
  }
  for (; i < n; ++i) dst[i] = f16_of(src[i]);
}

RK_AVX2 void f32_to_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    // (u + 0x7FFF + bit 16 of u) >> 16: wraps only for NaNs, patched below
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
    // 8 x 32 -> 8 x 16 bits (each value < 2^16, so the unsigned saturation never bites): packus
    // works per 128-bit half, the permute brings the two halves' results together
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
    if (any_nan(x))
      for (int j = 0; j < 8; ++j) dst[i + j] = bf16_of(src[i + j]);
  }
  for (; i < n; ++i) dst[i] = bf16_of(src[i]);
}

}  // namespace recsys_kernels
