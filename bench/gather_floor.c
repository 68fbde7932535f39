// The memory floor of the gather-bound ops on this machine, in plain C (no torch, no recsys_kernels):
// the sequential read bandwidth, and the best rate we could get out of random row gathers written
// as simply as possible (all accumulators in registers, every line of the row a few rows ahead
// prefetched, into L1 or into L2 only), on 4 KB pages and on 2 MB pages; and the same plain loops
// over embedding_bag's int8 shape A rows (read, no arithmetic) and its fp32 shape B Zipf bags.
// embedding_bag and pair_scores are compared with these figures in docs/performance.md ("The
// memory floor", "int8 sums in FBGEMM's form, and the floor under the CPU targets"). Build and run it with
// `bash bench/gather_floor.sh` (OMP_NUM_THREADS sets the threads, 2 by default).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "floor_timing.h"

// A table of `bytes`, filled; on 2 MB pages when `huge` (THP in "madvise" mode honours this).
static float* table(size_t bytes, int huge) {
  float* t = aligned_alloc(huge ? 1 << 21 : 64, bytes);
  if (huge) madvise(t, bytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < bytes / 4; ++i) t[i] = (float)(i % 7);
  return t;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

// Sum of every float of t (bytes / 4 of them): the sequential read bandwidth.
static double seq_read(const float* t, size_t bytes, float* sink) {
  const int64_t n = bytes / 4;
  float total = 0;
  const double t0 = now();
#pragma omp parallel for reduction(+ : total)
  for (int64_t i = 0; i < n; i += 64) {
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(t + i), _mm512_load_ps(t + i + 16)),
                             _mm512_add_ps(_mm512_load_ps(t + i + 32), _mm512_load_ps(t + i + 48)));
    total += _mm512_reduce_add_ps(s);
  }
  *sink += total;
  return bytes / (now() - t0) / 1e9;
}

// Bags of 32 random rows of D = 128 floats (embedding_bag's shape A): sum pooling, the rows 16
// ahead prefetched with HINT. Returns GB/s of row bytes.
#define BAG_GATHER(name, HINT)                                                                  \
  static double name(const float* t, const int64_t* idx, int64_t n_bags, float* out) {         \
    const double t0 = now();                                                                    \
    _Pragma("omp parallel for schedule(static)") for (int64_t b = 0; b < n_bags; ++b) {        \
      __m512 acc[8];                                                                            \
      for (int k = 0; k < 8; ++k) acc[k] = _mm512_setzero_ps();                                 \
      for (int64_t p = 32 * b; p < 32 * b + 32; ++p) {                                          \
        const char* ahead = (const char*)(t + idx[p + 16 < 32 * n_bags ? p + 16 : p] * 128);    \
        for (int l = 0; l < 8; ++l) _mm_prefetch(ahead + 64 * l, HINT);                         \
        const float* row = t + idx[p] * 128;                                                    \
        for (int k = 0; k < 8; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(row + 16 * k)); \
      }                                                                                         \
      for (int k = 0; k < 8; ++k) _mm512_storeu_ps(out + 128 * b + 16 * k, acc[k]);             \
    }                                                                                           \
    return 32.0 * n_bags * 512 / (now() - t0) / 1e9;                                            \
  }
BAG_GATHER(bag_gather_l1, _MM_HINT_T0)
BAG_GATHER(bag_gather_l2, _MM_HINT_T1)

// Bags of 32 random int8 rows of embedding_bag's shape A (1M rows of 128 codes + fp32 scale and
// bias: 136 bytes, 3 lines each), every line of the row 16 ahead prefetched into L1 and each read
// once, no arithmetic: what no int8 kernel can beat. Returns ms per call.
static double bag_gather_q8(const uint8_t* t, const int64_t* idx, int64_t n_bags, float* out) {
  const double t0 = now();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_bags; ++b) {
    __m512i sum = _mm512_setzero_si512();
    uint64_t tail = 0;
    for (int64_t p = 32 * b; p < 32 * b + 32; ++p) {
      const char* ahead = (const char*)(t + idx[p + 16 < 32 * n_bags ? p + 16 : p] * 136);
      _mm_prefetch(ahead, _MM_HINT_T0), _mm_prefetch(ahead + 64, _MM_HINT_T0), _mm_prefetch(ahead + 135, _MM_HINT_T0);
      const uint8_t* row = t + idx[p] * 136;
      sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_loadu_si512(row), _mm512_loadu_si512(row + 64)));
      uint64_t x;
      memcpy(&x, row + 128, 8);
      tail += x;
    }
    out[b] = (float)_mm512_reduce_add_epi32(sum) + (float)tail;
  }
  return (now() - t0) * 1e3;
}

// Bags of 32 Zipf-distributed rows of embedding_bag's shape B (50,000 fp32 rows of 64), the plain
// sum (4 loads and 4 adds a row), the row 16 ahead prefetched into L1 (as FBGEMM's loop and ours
// do). Returns µs per call.
static double bag_sum_zipf(const float* t, const int64_t* idx, int64_t n_bags, float* out) {
  const double t0 = now();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_bags; ++b) {
    __m512 acc[4];
    for (int k = 0; k < 4; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t p = 32 * b; p < 32 * b + 32; ++p) {
      const char* ahead = (const char*)(t + idx[p + 16 < 32 * n_bags ? p + 16 : p] * 64);
      for (int l = 0; l < 4; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
      const float* row = t + idx[p] * 64;
      for (int k = 0; k < 4; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(row + 16 * k));
    }
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(out + 64 * b + 16 * k, acc[k]);
  }
  return (now() - t0) * 1e6;
}

// n draws of Zipf(1.05) over `rows` rows, the vocabulary shuffled (hot rows scattered through the
// table), as bench_embedding_bag.py draws shape B's indices.
static void zipf_indices(int64_t rows, int64_t n, int64_t* idx) {
  double* cdf = malloc(rows * sizeof(double));
  int64_t* vocab = malloc(rows * sizeof(int64_t));
  double total = 0;
  for (int64_t k = 0; k < rows; ++k) cdf[k] = total += pow(k + 1.0, -1.05), vocab[k] = k;
  for (int64_t k = rows - 1; k > 0; --k) {
    const int64_t j = next() % (k + 1), v = vocab[k];
    vocab[k] = vocab[j], vocab[j] = v;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double u = (next() >> 11) * 0x1p-53 * total;
    int64_t lo = 0, hi = rows - 1;  // the first k with cdf[k] >= u
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cdf[mid] < u) lo = mid + 1; else hi = mid;
    }
    idx[i] = vocab[lo];
  }
  free(cdf);
  free(vocab);
}

// Dot products of random (user, item) pairs of D = 64 rows (pair_scores' shape), the pair 8
// ahead prefetched with HINT. Returns GB/s of row bytes.
#define PAIR_DOTS(name, HINT)                                                                          \
  static double name(const float* u, const float* v, const int64_t* ui, const int64_t* vi, int64_t n, \
                     float* out) {                                                                     \
    const double t0 = now();                                                                           \
    _Pragma("omp parallel for schedule(static)") for (int64_t p = 0; p < n; ++p) {                    \
      if (p + 8 < n) {                                                                                 \
        const char *a = (const char*)(u + ui[p + 8] * 64), *b = (const char*)(v + vi[p + 8] * 64);     \
        for (int l = 0; l < 4; ++l) _mm_prefetch(a + 64 * l, HINT), _mm_prefetch(b + 64 * l, HINT);    \
      }                                                                                                \
      const float *a = u + ui[p] * 64, *b = v + vi[p] * 64;                                            \
      __m512 s = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));                                \
      for (int k = 16; k < 64; k += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), s); \
      out[p] = _mm512_reduce_add_ps(s);                                                                \
    }                                                                                                  \
    return n * 512.0 / (now() - t0) / 1e9;                                                             \
  }
PAIR_DOTS(pair_dots_l1, _MM_HINT_T0)
PAIR_DOTS(pair_dots_l2, _MM_HINT_T1)

// Median over `rounds` calls of one of the measurements above.
#define MEDIAN(rounds, expr)                                           \
  ({                                                                   \
    double r_[rounds];                                                 \
    for (int i_ = 0; i_ < (rounds); ++i_) r_[i_] = (expr);             \
    qsort(r_, (rounds), sizeof(double), cmp_double);                   \
    r_[(rounds) / 2];                                                  \
  })

int main(void) {
  const int64_t rows = 1000000, n_bags = 4096, pairs = 1000000;
  float sink = 0;
  int64_t* idx = malloc(32 * n_bags * sizeof(int64_t));
  int64_t *ui = malloc(pairs * sizeof(int64_t)), *vi = malloc(pairs * sizeof(int64_t));
  for (int64_t i = 0; i < 32 * n_bags; ++i) idx[i] = next() % rows;
  for (int64_t i = 0; i < pairs; ++i) ui[i] = next() % rows, vi[i] = next() % rows;
  float* out = aligned_alloc(64, n_bags * 512 > pairs * 4 ? n_bags * 512 : pairs * 4);
  printf("threads %d\n", omp_get_max_threads());
  // [pages][hint]: pages 4 KB / 2 MB, rows ahead prefetched into L1 (prefetcht0) / L2 (prefetcht1)
  double seq[2], bags[2][2], dots[2][2];
  for (int huge = 0; huge <= 1; ++huge) {
    float* t = table(rows * 512, huge);  // 1M x 128 fp32
    seq[huge] = MEDIAN(5, seq_read(t, rows * 512, &sink));
    bags[huge][0] = MEDIAN(15, bag_gather_l1(t, idx, n_bags, out));
    bags[huge][1] = MEDIAN(15, bag_gather_l2(t, idx, n_bags, out));
    free(t);
    float *u = table(rows * 256, huge), *v = table(rows * 256, huge);  // two 1M x 64 fp32
    dots[huge][0] = MEDIAN(9, pair_dots_l1(u, v, ui, vi, pairs, out));
    dots[huge][1] = MEDIAN(9, pair_dots_l2(u, v, ui, vi, pairs, out));
    free(u);
    free(v);
  }
  // embedding_bag's int8 shape A and fp32 shape B (4 KB pages, as torch's tables have by default)
  uint8_t* q8 = (uint8_t*)table(rows * 136, 0);
  const double q8_ms = MEDIAN(15, bag_gather_q8(q8, idx, n_bags, out));
  free(q8);
  int64_t* zipf = malloc(32 * n_bags * sizeof(int64_t));
  zipf_indices(50000, 32 * n_bags, zipf);
  float* b_table = table(50000 * 256, 0);
  float* b_out = aligned_alloc(64, n_bags * 256);
  const double zipf_us = MEDIAN(41, bag_sum_zipf(b_table, zipf, n_bags, b_out));
  free(b_table);
  // the read bandwidth is the better of the two sequential figures (2 MB pages let the hardware
  // prefetcher run on across 4 KB boundaries)
  const double peak = seq[0] > seq[1] ? seq[0] : seq[1];
  for (int huge = 0; huge <= 1; ++huge)
    for (int l2 = 0; l2 <= 1; ++l2)
      printf("%s, prefetch into %s: sequential read %.1f GB/s; bags of 512-byte rows %.1f GB/s (%.0f%% of %.1f); "
             "pairs of 256-byte rows %.1f GB/s (%.0f%%; %.1f ms for 1M pairs)\n",
             huge ? "2 MB pages" : "4 KB pages", l2 ? "L2" : "L1", seq[huge], bags[huge][l2],
             100 * bags[huge][l2] / peak, peak, dots[huge][l2], 100 * dots[huge][l2] / peak,
             pairs * 512.0 / dots[huge][l2] / 1e6);
  printf("int8 shape A (4,096 bags of 32 rows of 136 bytes, 4 KB pages, prefetch into L1, no arithmetic): %.3f ms "
         "a call, %.1f GB/s of lines (3 a row)\n", q8_ms, 32.0 * n_bags * 192 / q8_ms / 1e6);
  printf("fp32 shape B (4,096 bags of 32 Zipf(1.05) rows of 50,000 x 64, prefetch into L1, plain sum): %.1f us a "
         "call\n", zipf_us);
  return sink + out[0] + b_out[0] == 12345.0f;  // keeps the sums alive
}
