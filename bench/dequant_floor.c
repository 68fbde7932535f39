// What the arithmetic of an int8 row-wise bag costs when the rows are in L1, in plain C (no torch,
// no recsys_kernels): D = 128 codes + fp32 scale + fp32 bias a row (136 bytes), bags of 32 rows,
// one thread, six ways to add a row's 16 values (one vector) into the bag's sum:
//   exact    acc + (code * scale + bias): two roundings, then the sum (the reference, and our
//            kernels until 2026-12-01: 5 vector ops with the code's widening and conversion)
//   folded   fma(code, scale, acc), the biases summed apart and added every 4 rows: our kernels
//            now (embedding_bag_cpu_kernels.h, kBiasFoldRows; 3 ops, and 1 per 4 rows)
//   bias_fma the same bits with the bias added by fma(x, 1, bias), on the multiply pipes
//   one_fma  acc + fma(code, scale, bias): one rounding fewer (4 ops)
//   fbgemm   fma(code, scale, acc + bias): FBGEMM's form (4 ops)
//   magic    exact's bits in 4 ops (AVX512-VBMI): a byte permute merges the code into the float
//            2^23 + code, then fma(that, scale, -2^23 * scale) is code * scale rounded once
//            (valid for |scale| < 2^105), + bias, + acc
// and, for fp32 D = 64 rows, a plain sum with and without the prefetch of the row 16 ahead.
// docs/performance.md ("What an int8 row costs") compares the ns per row with our op's.
// Build and run it with `bash bench/dequant_floor.sh`.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "floor_timing.h"

enum { kDim = 128, kRowBytes = kDim + 8, kBags = 1024, kLen = 32, kRows = 100, kRounds = 31 };

enum Form { kExact, kFolded, kBiasFma, kOneFma, kFbgemm, kMagic };

// Bags of kLen rows of the int8 table t (idx: kBags * kLen row numbers) into out [kBags][kDim].
static inline __attribute__((always_inline)) void pool_q8(const uint8_t* t, const int32_t* idx, float* out,
                                                          enum Form form) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i magic = _mm512_set1_epi32(0x4B000000);  // the float 2^23
  __m512i byte_of[4];  // vector k % 4's index: lane i's low byte <- code byte 16 * (k % 4) + i
  for (int q = 0; q < 4; ++q) {
    int32_t lanes[16];
    for (int i = 0; i < 16; ++i) lanes[i] = 16 * q + i;
    byte_of[q] = _mm512_loadu_si512(lanes);
  }
  for (int b = 0; b < kBags; ++b) {
    __m512 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();
    float biases = 0.0f;  // kFolded's biases not yet added
    for (int j = 0; j < kLen; ++j) {
      const uint8_t* row = t + (int64_t)idx[b * kLen + j] * kRowBytes;
      float s, o;
      memcpy(&s, row + kDim, 4);
      memcpy(&o, row + kDim + 4, 4);
      const __m512 scale = _mm512_set1_ps(s), bias = _mm512_set1_ps(o), offset = _mm512_set1_ps(-0x1p23f * s);
      if (form == kFolded) {
        biases += o;
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + 16 * k))));
          acc[k] = _mm512_fmadd_ps(c, scale, acc[k]);
        }
        if (j % 4 == 3) {  // kLen is a multiple of 4: the last row folds too
          for (int k = 0; k < 8; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_set1_ps(biases));
          biases = 0.0f;
        }
        continue;
      }
      if (form == kMagic) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const __m512i codes = _mm512_loadu_si512(row + 64 * (k / 4));
          const __m512 c = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(magic, 0x1111111111111111ull,
                                                                             byte_of[k % 4], codes));
          acc[k] = _mm512_add_ps(acc[k], _mm512_add_ps(_mm512_fmadd_ps(c, scale, offset), bias));
        }
        continue;
      }
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + 16 * k))));
        switch (form) {
          case kExact: acc[k] = _mm512_add_ps(acc[k], _mm512_add_ps(_mm512_mul_ps(c, scale), bias)); break;
          case kBiasFma: acc[k] = _mm512_add_ps(acc[k], _mm512_fmadd_ps(_mm512_mul_ps(c, scale), one, bias)); break;
          case kOneFma: acc[k] = _mm512_add_ps(acc[k], _mm512_fmadd_ps(c, scale, bias)); break;
          case kFbgemm: acc[k] = _mm512_fmadd_ps(c, scale, _mm512_add_ps(acc[k], bias)); break;
          case kMagic:
          case kFolded: break;  // above
        }
      }
    }
    for (int k = 0; k < 8; ++k) _mm512_storeu_ps(out + b * kDim + 16 * k, acc[k]);
  }
}

// One instance per form, so that each loop is compiled with its form fixed.
#define POOL_Q8(name, form) \
  static __attribute__((noinline)) void name(const uint8_t* t, const int32_t* idx, float* out) { pool_q8(t, idx, out, form); }
POOL_Q8(pool_exact, kExact)
POOL_Q8(pool_folded, kFolded)
POOL_Q8(pool_bias_fma, kBiasFma)
POOL_Q8(pool_one_fma, kOneFma)
POOL_Q8(pool_fbgemm, kFbgemm)
POOL_Q8(pool_magic, kMagic)

// fp32 rows of 64 (4 vectors) summed; PREFETCH: every line of the row 16 positions ahead into L1.
static inline __attribute__((always_inline)) void pool_f32(const float* t, const int32_t* idx, float* out, int prefetch) {
  const int n = kBags * kLen;
  for (int b = 0; b < kBags; ++b) {
    __m512 acc[4];
    for (int k = 0; k < 4; ++k) acc[k] = _mm512_setzero_ps();
    for (int j = 0; j < kLen; ++j) {
      const int p = b * kLen + j;
      if (prefetch) {
        const char* ahead = (const char*)(t + (int64_t)idx[p + 16 < n ? p + 16 : p] * 64);
        for (int l = 0; l < 4; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
      }
      const float* row = t + (int64_t)idx[p] * 64;
      for (int k = 0; k < 4; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(row + 16 * k));
    }
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(out + b * 64 + 16 * k, acc[k]);
  }
}

static __attribute__((noinline)) void pool_f32_plain(const float* t, const int32_t* idx, float* out) { pool_f32(t, idx, out, 0); }
static __attribute__((noinline)) void pool_f32_prefetch(const float* t, const int32_t* idx, float* out) { pool_f32(t, idx, out, 1); }

int main(void) {
  uint8_t* q8 = aligned_alloc(64, kRows * kRowBytes);
  float* f32 = aligned_alloc(64, kRows * 64 * sizeof(float));
  for (int r = 0; r < kRows; ++r) {
    const float scale = 0.01f + r * 1e-4f, bias = -1.0f + r * 1e-3f;
    for (int c = 0; c < kDim; ++c) q8[r * kRowBytes + c] = (uint8_t)(r * 7 + c * 13);
    memcpy(q8 + r * kRowBytes + kDim, &scale, 4);
    memcpy(q8 + r * kRowBytes + kDim + 4, &bias, 4);
    for (int c = 0; c < 64; ++c) f32[r * 64 + c] = (float)((r + c) % 7);
  }
  int32_t* idx = malloc(sizeof(int32_t) * kBags * kLen);
  uint64_t x = 88172645463325252ull;
  for (int p = 0; p < kBags * kLen; ++p) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    idx[p] = (int32_t)(x % kRows);
  }
  float* out = aligned_alloc(64, kBags * kDim * sizeof(float));

  const char* q8_names[] = {"exact", "folded (ours)", "bias_fma", "one_fma", "fbgemm", "magic"};
  void (*q8_forms[])(const uint8_t*, const int32_t*, float*) = {pool_exact, pool_folded, pool_bias_fma, pool_one_fma,
                                                                pool_fbgemm, pool_magic};
  enum { kQ8Forms = 6 };
  const char* f32_names[] = {"fp32 D=64, no prefetch", "fp32 D=64, prefetch"};
  void (*f32_forms[])(const float*, const int32_t*, float*) = {pool_f32_plain, pool_f32_prefetch};
  double t[kQ8Forms + 2][kRounds];
  for (int r = 0; r < kRounds; ++r) {  // the forms in turn, so that a slow spell hits all of them
    for (int f = 0; f < kQ8Forms + 2; ++f) {
      const double t0 = now();
      if (f < kQ8Forms) q8_forms[f](q8, idx, out);
      else f32_forms[f - kQ8Forms](f32, idx, out);
      t[f][r] = now() - t0;
    }
  }
  // magic must give exact's bits (the table's scales are far below 2^105)
  float* exact_out = aligned_alloc(64, kBags * kDim * sizeof(float));
  pool_exact(q8, idx, exact_out);
  pool_magic(q8, idx, out);
  const int magic_exact = memcmp(exact_out, out, kBags * kDim * sizeof(float)) == 0;
  printf("rows in L1, 1 thread, %d bags of %d rows; ns per row (median of %d rounds); magic %s exact's bits\n", kBags,
         kLen, kRounds, magic_exact ? "gives" : "DOES NOT give");
  for (int f = 0; f < kQ8Forms + 2; ++f) {
    qsort(t[f], kRounds, sizeof(double), cmp_double);
    printf("  %-24s %5.2f\n", f < kQ8Forms ? q8_names[f] : f32_names[f - kQ8Forms],
           t[f][kRounds / 2] * 1e9 / (kBags * kLen));
  }
  return out[0] == 12345.0f;  // keep the results live
}
