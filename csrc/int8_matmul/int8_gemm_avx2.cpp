// The AVX2 + FMA + F16C kernels of the int8 GEMM family (see int8_gemm_kernels.h). Every function
// carries the target attribute (the build has no -mavx2); int8_matmul_cpu.cpp calls them only after
// recsys_kernels::cpu_isa() said AVX2 is there. No torch headers here.
//
// Int8 micro-kernel: a 6 x 16 tile of int32 accumulators (12 ymm) over K-pairs. Per pair: two
// 16-byte loads of the packed B panel sign-extended to int16 (vpmovsxbw), and per row a broadcast
// of the row's (a[2p], a[2p+1]) int16 pair and two vpmaddwd + vpaddd. vpmaddwd of int8-range
// values is exact (no saturation: |a0 b0 + a1 b1| <= 2^15 fits its int32 result), so the int32 sums
// are the exact integer dot products, -128 included. On Zen 3 vpmaddwd issues on two pipes, twice
// the int8 MACs per cycle of fp32 FMA's.
// fp-contract=off: the epilogue's (acc * sa) * sb + bias must round like the reference.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/avx2_rows.h"  // RK_AVX2, RK_AVX2_INLINE
#include "int8_matmul/int8_gemm_kernels.h"

namespace recsys_kernels::int8_gemm {
namespace {

// ----------------------------------------------------------------------------- math
// exp(x) for fp32 (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp), 0 below
// -104 and inf above 88.8.
RK_AVX2_INLINE __m256 exp_ps(__m256 x) {
  // Clamped to [-104, 88.8]: exp(-104) rounds to 0 and exp(88.8) overflows to inf, as std::exp
  // does (the 2^fx split below takes fx in [-150, 128]). A narrower clamp (+-88.38) saturated:
  // silu(-1e38) came out -0.53 and silu(-inf) -inf (F.silu: -0.0 and NaN), gelu(-100) -6e-39.
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(88.8f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // 2^fx: fx in [-150, 128]; split in two factors so that neither exponent field overflows
  const __m256i n = _mm256_cvtps_epi32(fx);
  const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
}

// erfc(z) for z >= 0 with a relative error below ~2e-7 (the Chebyshev fit of Numerical Recipes'
// erfcc, fractional error < 1.2e-7, in fp32): relative accuracy also where erfc is tiny.
RK_AVX2_INLINE __m256 erfc_nonneg_ps(__m256 z) {
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(0.17087277f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.82215223f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.48851587f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.13520398f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.27886807f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.18628806f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.09678418f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.37409196f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.00002368f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.26551223f));
  const __m256 e = _mm256_sub_ps(p, _mm256_mul_ps(z, z));
  return _mm256_mul_ps(t, exp_ps(e));
}

RK_AVX2_INLINE __m256 activate(__m256 v, Act act) {
  switch (act) {
    case Act::kNone: return v;
    case Act::kRelu: return _mm256_max_ps(_mm256_setzero_ps(), v);  // NaN (2nd operand) stays NaN
    case Act::kGelu: {  // 0.5 x erfc(-x / sqrt 2)
      const __m256 sign = _mm256_set1_ps(-0.0f);
      const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(0.70710678118654752f));
      const __m256 e = erfc_nonneg_ps(z);                                  // erfc(|x| / sqrt 2)
      const __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
      const __m256 c = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), e), e, neg);
      return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), c);
    }
    case Act::kSilu:  // x / (1 + exp(-x))
      return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), v))));
  }
  return v;
}

// fp32 -> bf16 bits, round to nearest even, NaN -> 0x7fc0 (c10::BFloat16's rule); 8 lanes -> 8 x u16.
RK_AVX2_INLINE __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_packus_epi32(r, r);  // [0-3, 0-3, 4-7, 4-7] per 128-bit lane
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

// Stores 16 fp32 results of one output row, columns [col, col + ncols).
RK_AVX2_INLINE void store_row(const Epilogue& e, int64_t row, int64_t col, int ncols, __m256 v0, __m256 v1) {
  const int64_t off = row * e.ldc + col;
  alignas(32) uint8_t tmp[64];
  const bool full = ncols == kNR;
  switch (e.out_kind) {
    case OutKind::kF32: {
      float* dst = full ? static_cast<float*>(e.out) + off : reinterpret_cast<float*>(tmp);
      _mm256_storeu_ps(dst, v0);
      _mm256_storeu_ps(dst + 8, v1);
      if (!full) std::memcpy(static_cast<float*>(e.out) + off, tmp, 4 * ncols);
      return;
    }
    case OutKind::kF16:
    case OutKind::kBF16: {
      uint16_t* dst = full ? static_cast<uint16_t*>(e.out) + off : reinterpret_cast<uint16_t*>(tmp);
      __m128i h0, h1;
      if (e.out_kind == OutKind::kF16) {
        h0 = _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        h1 = _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        h0 = to_bf16(v0);
        h1 = to_bf16(v1);
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8), h1);
      if (!full) std::memcpy(static_cast<uint16_t*>(e.out) + off, tmp, 2 * ncols);
      return;
    }
    case OutKind::kI32: return;  // not a float output
  }
}

RK_AVX2_INLINE void store_row_i32(const Epilogue& e, int64_t row, int64_t col, int ncols, __m256i c0, __m256i c1) {
  int32_t* out = static_cast<int32_t*>(e.out) + row * e.ldc + col;
  if (ncols == kNR) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), c1);
  } else {
    alignas(32) int32_t tmp[kNR];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), c1);
    std::memcpy(out, tmp, 4 * ncols);
  }
}

// Per-column vectors of a tile (b_scale, bias), zero past ncols.
struct ColumnVectors {
  __m256 scale[2], bias[2];
  bool has_scale, has_bias;
};

RK_AVX2_INLINE __m256 load_cols(const float* p, int64_t col, int ncols, int half) {
  if (ncols == kNR) return _mm256_loadu_ps(p + col + 8 * half);
  alignas(32) float tmp[kNR] = {};
  std::memcpy(tmp, p + col, 4 * ncols);
  return _mm256_load_ps(tmp + 8 * half);
}

RK_AVX2_INLINE ColumnVectors column_vectors(const Epilogue& e, int64_t col, int ncols) {
  ColumnVectors v;
  v.has_scale = e.b_scale != nullptr;
  v.has_bias = e.bias != nullptr;
  for (int h = 0; h < 2; ++h) {
    v.scale[h] = v.has_scale ? load_cols(e.b_scale, col, ncols, h) : _mm256_set1_ps(1.0f);
    v.bias[h] = v.has_bias ? load_cols(e.bias, col, ncols, h) : _mm256_setzero_ps();
  }
  return v;
}

// acc (fp32, already converted) -> (acc * sa) * sb + bias -> activation -> store.
RK_AVX2_INLINE void finish_row(const Epilogue& e, const ColumnVectors& cv, const float* a_scale, int r,
                               int64_t row, int64_t col, int ncols, __m256 f0, __m256 f1) {
  if (a_scale != nullptr) {
    const __m256 sa = _mm256_set1_ps(a_scale[r]);
    f0 = _mm256_mul_ps(f0, sa);
    f1 = _mm256_mul_ps(f1, sa);
  }
  if (cv.has_scale) {
    f0 = _mm256_mul_ps(f0, cv.scale[0]);
    f1 = _mm256_mul_ps(f1, cv.scale[1]);
  }
  if (cv.has_bias) {
    f0 = _mm256_add_ps(f0, cv.bias[0]);
    f1 = _mm256_add_ps(f1, cv.bias[1]);
  }
  f0 = activate(f0, e.act);
  f1 = activate(f1, e.act);
  store_row(e, row, col, ncols, f0, f1);
}

// ----------------------------------------------------------------------------- int8 tile
// The K loop, accumulators as named variables (an array of __m256i makes GCC keep them on the
// stack). c[r][h] += madd(a[r] pair broadcast, b half h) for rows r < MR.
#define RK_I8_ROW(r)                                                         \
  if constexpr (MR > r) {                                                    \
    const __m256i av = _mm256_set1_epi32(a##r[p]);                           \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(av, b0));          \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(av, b1));          \
  }

template <int MR>
RK_AVX2_INLINE void int8_loop(const Tile& t, __m256i (&c)[kMR][2]) {
  __m256i c00 = c[0][0], c01 = c[0][1], c10 = c[1][0], c11 = c[1][1], c20 = c[2][0], c21 = c[2][1];
  __m256i c30 = c[3][0], c31 = c[3][1], c40 = c[4][0], c41 = c[4][1], c50 = c[5][0], c51 = c[5][1];
  const int32_t* a0 = t.a;
  const int32_t* a1 = a0 + (MR > 1 ? t.lda : 0);
  const int32_t* a2 = a1 + (MR > 2 ? t.lda : 0);
  const int32_t* a3 = a2 + (MR > 3 ? t.lda : 0);
  const int32_t* a4 = a3 + (MR > 4 ? t.lda : 0);
  const int32_t* a5 = a4 + (MR > 5 ? t.lda : 0);
  const int8_t* b = t.b;
  for (int64_t p = 0; p < t.kp; ++p) {
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kPanelPairBytes * p)));
    const __m256i b1 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kPanelPairBytes * p + 16)));
    RK_I8_ROW(0)
    RK_I8_ROW(1)
    RK_I8_ROW(2)
    RK_I8_ROW(3)
    RK_I8_ROW(4)
    RK_I8_ROW(5)
  }
  c[0][0] = c00; c[0][1] = c01; c[1][0] = c10; c[1][1] = c11; c[2][0] = c20; c[2][1] = c21;
  c[3][0] = c30; c[3][1] = c31; c[4][0] = c40; c[4][1] = c41; c[5][0] = c50; c[5][1] = c51;
}
#undef RK_I8_ROW

template <int MR>
RK_AVX2_INLINE void int8_tile(const Tile& t, const Epilogue& e, const ColumnVectors& cv) {
  __m256i c[kMR][2];
  for (int r = 0; r < kMR; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
  if (t.load_partial) {
    for (int r = 0; r < MR; ++r) {
      c[r][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.partial + r * kNR));
      c[r][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.partial + r * kNR + 8));
    }
  }
  int8_loop<MR>(t, c);
  if (!t.finish) {
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.partial + r * kNR), c[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.partial + r * kNR + 8), c[r][1]);
    }
    return;
  }
  if (e.out_kind == OutKind::kI32) {
    for (int r = 0; r < MR; ++r) store_row_i32(e, t.row0 + r, t.col0, t.ncols, c[r][0], c[r][1]);
    return;
  }
  for (int r = 0; r < MR; ++r)
    finish_row(e, cv, t.a_scale, r, t.row0 + r, t.col0, t.ncols, _mm256_cvtepi32_ps(c[r][0]),
               _mm256_cvtepi32_ps(c[r][1]));
}

// ----------------------------------------------------------------------------- fp32 tile
template <int MR>
RK_AVX2_INLINE void float_tile(const FloatTile& t, const Epilogue& e) {
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  const float* x = t.x;
  const int64_t ldx = t.ldx;
  for (int64_t k = 0; k < t.k; ++k) {
    const __m256 w0 = _mm256_loadu_ps(t.w + kNR * k), w1 = _mm256_loadu_ps(t.w + kNR * k + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      c[r][0] = _mm256_fmadd_ps(xv, w0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(xv, w1, c[r][1]);
    }
  }
  const ColumnVectors cv = column_vectors(e, t.col0, t.ncols);
  // unrolled, so c[] is only indexed by constants: else GCC keeps it on the stack in the K loop
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) finish_row(e, cv, nullptr, r, t.row0 + r, t.col0, t.ncols, c[r][0], c[r][1]);
}

// ----------------------------------------------------------------------------- row loaders
template <InKind K>
RK_AVX2_INLINE __m256 load8(const void* x, int64_t i) {
  if constexpr (K == InKind::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else if constexpr (K == InKind::kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  } else {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
}

template <InKind K>
RK_AVX2_INLINE float load1(const void* x, int64_t i) {
  if constexpr (K == InKind::kF32) {
    return static_cast<const float*>(x)[i];
  } else if constexpr (K == InKind::kF16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(x)[i]);
  } else {
    const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(x)[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

RK_AVX2_INLINE float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// 16 quantized values (fp32 x / scale, rounded half to even, clamped) as int16, in order.
RK_AVX2_INLINE __m256i quantize16(__m256 x0, __m256 x1, __m256 scale) {
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 q0 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(x0, scale), kRound), lo), hi);
  const __m256 q1 = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(x1, scale), kRound), lo), hi);
  const __m256i p = _mm256_packs_epi32(_mm256_cvttps_epi32(q0), _mm256_cvttps_epi32(q1));
  return _mm256_permute4x64_epi64(p, 0xD8);
}

template <InKind K>
RK_AVX2_INLINE bool quantize_row(const void* x, int64_t k, float* scale_out, int8_t* q8, int16_t* q16) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 big = _mm256_set1_ps(3.40282347e38f);
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 a = _mm256_and_ps(load8<K>(x, i), abs_mask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // inf or nan
    amax = _mm256_max_ps(amax, a);
  }
  float m = hmax(amax);
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; i < k; ++i) {
    const float a = std::fabs(load1<K>(x, i));
    finite &= std::isfinite(a);
    m = a > m ? a : m;
  }
  if (!finite) return false;
  float scale = m / 127.0f;
  if (scale == 0.0f) scale = 1.0f;
  *scale_out = scale;
  const __m256 sv = _mm256_set1_ps(scale);
  i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256i q = quantize16(load8<K>(x, i), load8<K>(x, i + 8), sv);
    if (q16 != nullptr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + i), q);
    if (q8 != nullptr)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q8 + i),
                       _mm_packs_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
  }
  for (; i < k; ++i) {
    float q = std::nearbyint(load1<K>(x, i) / scale);
    q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
    if (q16 != nullptr) q16[i] = static_cast<int16_t>(q);
    if (q8 != nullptr) q8[i] = static_cast<int8_t>(q);
  }
  if (q16 != nullptr && (k & 1)) q16[k] = 0;
  return true;
}

}  // namespace

RK_AVX2 void tile_avx2(const Tile& column, const Epilogue& e) {
  ColumnVectors cv{};
  if (column.finish && e.out_kind != OutKind::kI32) cv = column_vectors(e, column.col0, column.ncols);
  Tile t = column;
  for (int64_t i = 0; i < column.rows; i += kMR) {
    t.a = column.a + i * column.lda;
    t.partial = column.partial ? column.partial + i * kNR : nullptr;
    t.a_scale = column.a_scale ? column.a_scale + i : nullptr;
    t.row0 = column.row0 + i;
    switch (std::min<int64_t>(kMR, column.rows - i)) {
      case 1: int8_tile<1>(t, e, cv); break;
      case 2: int8_tile<2>(t, e, cv); break;
      case 3: int8_tile<3>(t, e, cv); break;
      case 4: int8_tile<4>(t, e, cv); break;
      case 5: int8_tile<5>(t, e, cv); break;
      default: int8_tile<6>(t, e, cv); break;
    }
  }
}

RK_AVX2 void float_tile_avx2(const FloatTile& t, const Epilogue& e) {
  switch (t.mr) {
    case 1: float_tile<1>(t, e); break;
    case 2: float_tile<2>(t, e); break;
    case 3: float_tile<3>(t, e); break;
    case 4: float_tile<4>(t, e); break;
    case 5: float_tile<5>(t, e); break;
    default: float_tile<6>(t, e); break;
  }
}

RK_AVX2 void finish_panel_avx2(const int32_t* acc, int64_t ldacc, int64_t rows, const float* a_scale, int64_t row0,
                               int64_t col0, int ncols, const Epilogue& e) {
  const bool i32 = e.out_kind == OutKind::kI32;
  const ColumnVectors cv = i32 ? ColumnVectors{} : column_vectors(e, col0, ncols);
  for (int64_t r = 0; r < rows; ++r) {
    const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * ldacc));
    const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * ldacc + 8));
    if (i32)
      store_row_i32(e, row0 + r, col0, ncols, c0, c1);
    else
      finish_row(e, cv, a_scale ? a_scale + r : nullptr, 0, row0 + r, col0, ncols, _mm256_cvtepi32_ps(c0),
                 _mm256_cvtepi32_ps(c1));
  }
}

RK_AVX2 bool quantize_row_avx2(InKind kind, const void* x, int64_t k, float* scale, int8_t* q8, int16_t* q16) {
  switch (kind) {
    case InKind::kF32: return quantize_row<InKind::kF32>(x, k, scale, q8, q16);
    case InKind::kF16: return quantize_row<InKind::kF16>(x, k, scale, q8, q16);
    case InKind::kBF16: return quantize_row<InKind::kBF16>(x, k, scale, q8, q16);
  }
  return false;
}

RK_AVX2 void widen_row_avx2(const int8_t* a, int64_t k, int16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i))));
  for (; i < k; ++i) dst[i] = a[i];
  if (k & 1) dst[k] = 0;
}

RK_AVX2 void dequant_panel_avx2(const int8_t* panel, int64_t kp, const float* scale16, float* dst) {
  const __m256 s0 = _mm256_loadu_ps(scale16), s1 = _mm256_loadu_ps(scale16 + 8);
  for (int64_t p = 0; p < kp; ++p) {
    for (int h = 0; h < 2; ++h) {
      // 8 columns x (k even, k odd) -> int32 lanes holding both int16 halves
      const __m256i v = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + kPanelPairBytes * p + 16 * h)));
      const __m256 even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16));
      const __m256 odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 16));
      const __m256 s = h == 0 ? s0 : s1;
      _mm256_storeu_ps(dst + (2 * p) * kNR + 8 * h, _mm256_mul_ps(even, s));
      _mm256_storeu_ps(dst + (2 * p + 1) * kNR + 8 * h, _mm256_mul_ps(odd, s));
    }
  }
}

RK_AVX2 void pack_panel_avx2(const int8_t* w, int64_t k, int8_t* dst) {
  // 16 rows x 16 pairs at a time: a 16 x 16 transpose of the (k even, k odd) uint16 pairs.
  const int64_t kp = k / 2;  // whole pairs
  int64_t p0 = 0;
  for (; p0 + 16 <= kp; p0 += 16) {
    __m256i r[16], a[16], c[4][4], e[2][8];
    for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * k + 2 * p0));
    for (int i = 0; i < 8; ++i) {  // rows (2i, 2i+1): pairs 0-3 | 8-11, and 4-7 | 12-15
      a[i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
      a[i + 8] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; ++g)      // rows 4g..4g+3
      for (int half = 0; half < 2; ++half) {
        c[g][2 * half] = _mm256_unpacklo_epi32(a[8 * half + 2 * g], a[8 * half + 2 * g + 1]);
        c[g][2 * half + 1] = _mm256_unpackhi_epi32(a[8 * half + 2 * g], a[8 * half + 2 * g + 1]);
      }
    for (int o = 0; o < 2; ++o)      // rows 8o..8o+7
      for (int q = 0; q < 4; ++q) {
        e[o][2 * q] = _mm256_unpacklo_epi64(c[2 * o][q], c[2 * o + 1][q]);
        e[o][2 * q + 1] = _mm256_unpackhi_epi64(c[2 * o][q], c[2 * o + 1][q]);
      }
    for (int j = 0; j < 8; ++j) {  // e[o][j]: rows 8o..8o+7 of pair j (low lane) and j + 8 (high lane)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kPanelPairBytes * (p0 + j)),
                          _mm256_permute2x128_si256(e[0][j], e[1][j], 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kPanelPairBytes * (p0 + j + 8)),
                          _mm256_permute2x128_si256(e[0][j], e[1][j], 0x31));
    }
  }
  for (int c = 0; c < kNR; ++c) {
    int8_t* col = dst + 16 * (c / 8) + 2 * (c % 8);
    const int8_t* row = w + c * k;
    for (int64_t p = p0; p < kp; ++p) std::memcpy(col + kPanelPairBytes * p, row + 2 * p, 2);
    if (k & 1) col[kPanelPairBytes * kp] = row[k - 1];
  }
}

}  // namespace recsys_kernels::int8_gemm
