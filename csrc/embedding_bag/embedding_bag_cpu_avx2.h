// The AVX2+FMA+F16C pooling kernel of embedding_bag (see embedding_bag_cpu_kernels.h): the 8-float
// vector layer for the shared kernel code in embedding_bag_cpu_pool.h. Included only by its two
// translation units, one per index dtype (embedding_bag_cpu_avx2_i32.cpp and _i64.cpp: one unit
// took 80 s to compile). Every function here carries the target attribute (the build has no
// -mavx2); the forward calls pool_bags_avx2 only after recsys_kernels::cpu_isa() said AVX2 is
// there. No torch headers: nothing from this file may be picked by the linker for the baseline-ISA
// code. fp-contract=off: a * b + c must stay two roundings, as in the reference.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/avx2_rows.h"
#include "embedding_bag/embedding_bag_cpu_kernels.h"

#define RK_POOL RK_AVX2
#define RK_POOL_INLINE RK_AVX2_INLINE

// Internal linkage in each including unit: as external (interposable) symbols of the shared
// library the kernels were called through the PLT and lost GCC's inter-procedural clones.
namespace recsys_kernels::embedding_bag_cpu::avx2_kernel {
namespace {

using Vec = __m256;
constexpr int kLanes = 8;

RK_AVX2_INLINE Vec vzero() { return _mm256_setzero_ps(); }
RK_AVX2_INLINE Vec vset1(float x) { return _mm256_set1_ps(x); }
RK_AVX2_INLINE Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
RK_AVX2_INLINE Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
RK_AVX2_INLINE Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
RK_AVX2_INLINE Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
RK_AVX2_INLINE void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }

// max that propagates NaN (as amax does): a NaN value wins, a NaN accumulator stays.
RK_AVX2_INLINE Vec max_nan(Vec acc, Vec v) {
  const Vec m = _mm256_max_ps(v, acc);  // acc where either is NaN
  return _mm256_blendv_ps(m, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

using avx2::BF16;
using avx2::F16;
using avx2::F32;
using avx2::prefetch_line;
using avx2::prefetch_lines;
using avx2::Q4;
using avx2::Q8;
using avx2::RowParams;

#include "embedding_bag/embedding_bag_cpu_pool.h"

}  // namespace
}  // namespace recsys_kernels::embedding_bag_cpu::avx2_kernel

#undef RK_POOL
#undef RK_POOL_INLINE
