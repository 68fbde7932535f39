// The AVX512-VNNI and AMX-INT8 kernels of the int8 GEMM (int8_gemm_kernels.h), for CPUs that have
// them (Ice Lake / Zen 4 and later for VNNI, Sapphire Rapids and later for AMX). No torch headers.
//
// Layout: both instruction sets multiply K-quads, so a task re-lays the B panels it needs from the
// portable pair layout (pack_weight_int8) into quad panels, one (N block, K block) at a time:
//     quad panel: quad q = 64 bytes, column c's four bytes w[c][4q .. 4q + 3] at 4 c,
// which is both the VNNI operand (one zmm of 16 int32 lanes) and an AMX B tile row (16 quad rows
// = a 64 x 16 tile, stride 64). It costs one pass over the block's B bytes per block of rows (96
// on VNNI, 192 on AMX), against as many multiply-adds per byte; the AVX2 kernel, which reads the
// pair layout as it is, takes tasks of fewer rows (the driver decides). A rows are int8, padded
// with zeros to a multiple of 64 bytes (one AMX tile row) and of the micro-tile's rows.
//  * VNNI (vpdpbusd: u8 x s8, four products summed into an int32 lane): A is stored as
//    a + 128 (the sign bit flipped), and the column sums of the K block's B, times -128, are the
//    starting value of the block's accumulators: sum (a + 128) b - 128 sum b = sum a b. The lanes
//    wrap modulo 2^32, and the true sum fits int32 (the driver keeps K <= 131070), so it is exact.
//    Micro-tile: 12 rows x 32 columns, 24 zmm accumulators; per quad 2 B loads, 12 broadcasts.
//  * AMX (tdpbssd: s8 x s8 into int32 tiles): micro-tile 32 rows x 32 columns = 4 C tiles, 2 A
//    tiles (16 rows x 64 K), 2 B tiles (64 K x 16 columns) per 64 K values.
// Both store the block's exact int32 sums to a buffer (the block's rows x 256 columns, L2), from
// which the AVX2 epilogue (shared with the AVX2 path, so both paths give the same bits) writes the
// output.
//
// Built with -DRK_EMULATE_WIDE by tests/test_int8_matmul_wide_emulated.py: SIMDe's AVX-512 and a
// scalar model of the AMX tile ops stand in for the instructions, so the layouts, padding and
// blocking are tested on machines without these CPUs.
#if defined(RK_EMULATE_WIDE)
#include "wide_emulation.h"
#define RK_WIDE
#define RK_WIDE_INLINE inline
#define RK_WIDE_AMX
#else
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RK_WIDE __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define RK_WIDE_INLINE \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"), always_inline)) inline
#define RK_WIDE_AMX \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-int8")))
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "int8_matmul/int8_gemm_kernels.h"

namespace recsys_kernels::int8_gemm {
namespace {

constexpr int64_t kQuadBytes = 64;     // one K-quad of a quad panel: 16 columns x 4 K values
constexpr int64_t kKStep = 64;         // K granularity: one AMX tile row of int8
constexpr int64_t kKc = 1024;          // K block: a micro-tile's 2 panels x 16 KB of B stay in L1
constexpr int64_t kNcPanels = 16;      // panels per N block: 256 KB of quad panels at kKc (L2)
constexpr int64_t kMcVnni = 96;        // rows per A block on VNNI: 8 micro-tiles
// on AMX: 6 micro-tiles. The B re-layout (once per A block) costs as much as the tile products at
// 96 rows; 192 halves it, 384 made the products and the epilogue slower (L2). Measured on the Xeon
// of 2026-11-30, 2048 x 1024 x 1024 on 1 thread, million cycles for re-layout / tiles / epilogue:
// 96 rows 2.8-3.0 / 3.7 / 2.9-3.0, 192 rows 1.3-1.6 / 3.8-3.9 / 2.7-3.0, 384 rows 0.8-0.9 /
// 4.3-4.4 / 3.6-3.9.
constexpr int64_t kMcAmx = 192;
// Rows per step of the epilogue. Panel by panel down a whole block (64-byte pieces of 192 rows),
// the epilogue of 4096 x 1024 x 1024 on 2 threads took 9.4-11.5 million cycles; 8 rows at a time
// across the panels, 5.8-7.6 (4 rows: 7.0-7.4). Whole tasks (bench/wide_task_timing.cpp, 3
// alternations with the code before): 256 x 1024 -> 4096 0.99-1.12 -> 0.91-0.95 ms, the other
// shapes within the noise. The Xeon of 2026-11-30.
constexpr int64_t kFinishRows = 8;
constexpr int kVnniRows = 12;
constexpr int kAmxRows = 32;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The task's buffers start on a cache line, so every A / B / C tile row and every zmm load from
// them (64 bytes at strides of 64 bytes) is one line: with tile loads straddling two lines a
// tdpbssd took 77 cycles instead of 30 in the task, 84 in a timing loop offset by 16 bytes (the
// AMX Xeon of 2026-11-30).
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_buffer(int64_t n) {
  void* p = std::aligned_alloc(64, round_up(n * static_cast<int64_t>(sizeof(T)), 64));
  if (p == nullptr) throw std::bad_alloc();
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

RK_WIDE_INLINE __m256i load_pair(const int8_t* panel, int64_t p, int64_t p_end) {
  return p < p_end ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + kPanelPairBytes * p))
                   : _mm256_setzero_si256();
}

// Pairs [p0, p0 + 2 nq) of a pair panel -> nq quads of a quad panel; pairs at or past p_end read
// as zero. colsum (VNNI): -128 x the 16 column sums of these quads.
RK_WIDE void repack_quads(const int8_t* panel, int64_t p0, int64_t p_end, int64_t nq, int8_t* dst, int32_t* colsum) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
  for (int64_t q = 0; q < nq; ++q) {
    // even = [c0..7 | c8..15] x (k 4q, 4q + 1) as words, odd the same for (4q + 2, 4q + 3)
    const __m256i even = load_pair(panel, p0 + 2 * q, p_end), odd = load_pair(panel, p0 + 2 * q + 1, p_end);
    const __m256i lo = _mm256_unpacklo_epi16(even, odd);  // quads of c0..3 | c8..11
    const __m256i hi = _mm256_unpackhi_epi16(even, odd);  // quads of c4..7 | c12..15
    const __m256i first = _mm256_permute2x128_si256(lo, hi, 0x20), second = _mm256_permute2x128_si256(lo, hi, 0x31);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kQuadBytes * q), first);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + kQuadBytes * q + 32), second);
    if (colsum != nullptr) {  // 1 x b pair sums in int16 (|sum| <= 256), then quads in int32
      sum0 = _mm256_add_epi32(sum0, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, first), ones16));
      sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, second), ones16));
    }
  }
  if (colsum != nullptr) {
    const __m256i m128 = _mm256_set1_epi32(-128);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(colsum), _mm256_mullo_epi32(sum0, m128));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(colsum + 8), _mm256_mullo_epi32(sum1, m128));
  }
}

RK_WIDE void flip_sign_bits(int8_t* p, int64_t n) {  // int8 a -> uint8 a + 128 (n: a multiple of 64)
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < n; i += 64) {
    __m512i v = _mm512_loadu_si512(p + i);
    _mm512_storeu_si512(p + i, _mm512_xor_si512(v, sign));
  }
}

// 12 rows x 2 quad panels (pstride apart) over nq quads. acc: [12][32] int32 at stride ldacc,
// loaded first unless `first`; comp: the 32 columns' -128 x column sums of this K block.
RK_WIDE void vnni_tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t pstride, int64_t nq, int32_t* acc,
                       int64_t ldacc, bool first, const int32_t* comp) {
  const __m512i k0 = _mm512_loadu_si512(comp), k1 = _mm512_loadu_si512(comp + 16);
  __m512i c[kVnniRows][2];
#pragma GCC unroll 12
  for (int r = 0; r < kVnniRows; ++r) {
    c[r][0] = first ? k0 : _mm512_add_epi32(_mm512_loadu_si512(acc + r * ldacc), k0);
    c[r][1] = first ? k1 : _mm512_add_epi32(_mm512_loadu_si512(acc + r * ldacc + 16), k1);
  }
  for (int64_t q = 0; q < nq; ++q) {
    const __m512i b0 = _mm512_loadu_si512(b + kQuadBytes * q), b1 = _mm512_loadu_si512(b + pstride + kQuadBytes * q);
#pragma GCC unroll 12
    for (int r = 0; r < kVnniRows; ++r) {
      int32_t quad;
      std::memcpy(&quad, a + r * lda + 4 * q, 4);
      const __m512i av = _mm512_set1_epi32(quad);
      c[r][0] = _mm512_dpbusd_epi32(c[r][0], av, b0);
      c[r][1] = _mm512_dpbusd_epi32(c[r][1], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kVnniRows; ++r) {
    _mm512_storeu_si512(acc + r * ldacc, c[r][0]);
    _mm512_storeu_si512(acc + r * ldacc + 16, c[r][1]);
  }
}

// The AMX tile configuration: palette 1, all 8 tiles 16 rows x 64 bytes (0-3 C, 4-5 A, 6-7 B).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64);

// 32 rows x 2 quad panels (pstride apart) over nsteps x 64 K values. acc: [32][32] int32.
RK_WIDE_AMX void amx_tile(const int8_t* a, int64_t lda, const int8_t* b, int64_t pstride, int64_t nsteps,
                          int32_t* acc, int64_t ldacc, bool first) {
  const int64_t ldc = 4 * ldacc;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, acc, ldc);
    _tile_loadd(1, acc + 16, ldc);
    _tile_loadd(2, acc + 16 * ldacc, ldc);
    _tile_loadd(3, acc + 16 * ldacc + 16, ldc);
  }
  for (int64_t s = 0; s < nsteps; ++s) {
    _tile_loadd(4, a + kKStep * s, lda);
    _tile_loadd(5, a + 16 * lda + kKStep * s, lda);
    _tile_loadd(6, b + 16 * kQuadBytes * s, kQuadBytes);
    _tile_loadd(7, b + pstride + 16 * kQuadBytes * s, kQuadBytes);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, acc, ldc);
  _tile_stored(1, acc + 16, ldc);
  _tile_stored(2, acc + 16 * ldacc, ldc);
  _tile_stored(3, acc + 16 * ldacc + 16, ldc);
}

RK_WIDE_AMX void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

RK_WIDE_AMX void amx_end() { _tile_release(); }

}  // namespace

bool amx_usable() {
#if defined(RK_EMULATE_WIDE)
  return true;
#else
  // Linux hands out the AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  // the permission holds for the whole process.
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#endif
}

bool wide_task(WideIsa isa, const Problem& P, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  const bool amx = isa == WideIsa::kAmx;
  const int mr = amx ? kAmxRows : kVnniRows;
  const int64_t kpad = round_up(std::max<int64_t>(P.k, 1), kKStep);
  const int64_t kc_max = std::min(kpad, kKc);
  const int64_t p_end = P.b_p0 + (P.k + 1) / 2;  // this call's pairs end here (K chunks)
  const int64_t ldacc = kNcPanels * kNR;
  const int64_t mc_max = std::min(amx ? kMcAmx : kMcVnni, round_up(r1 - r0, mr));
  const auto a = aligned_buffer<int8_t>(mc_max * kpad);
  const auto b = aligned_buffer<int8_t>(kNcPanels * kc_max * kNR);
  const auto acc = aligned_buffer<int32_t>(mc_max * ldacc);
  std::vector<int32_t> comp(kNcPanels * kNR, 0);
  std::vector<float> scales(mc_max);
  if (amx) amx_begin();
  bool ok = true;
  for (int64_t mb = r0; mb < r1 && ok; mb += mc_max) {
    const int64_t mc = std::min(mc_max, r1 - mb), mc_pad = round_up(mc, mr);
    // A block: int8 rows (quantized from float, or copied), zero-padded to kpad and mc_pad
    for (int64_t r = 0; r < mc && ok; ++r) {
      const uint8_t* src = P.a.data + (mb + r) * P.a.row_bytes;
      int8_t* dst = a.get() + r * kpad;
      if (P.a.quantize)
        ok = quantize_row_avx2(P.a.in_kind, src, P.k, &scales[r], dst, nullptr);
      else
        std::memcpy(dst, src, P.k);
      std::memset(dst + P.k, 0, kpad - P.k);
    }
    if (!ok) break;
    std::memset(a.get() + mc * kpad, 0, (mc_pad - mc) * kpad);
    if (!amx) flip_sign_bits(a.get(), mc_pad * kpad);
    const float* row_scales = P.a.quantize ? scales.data() : (P.a.a_scale ? P.a.a_scale + mb : nullptr);
    for (int64_t jc = j0; jc < j1; jc += kNcPanels) {
      const int64_t nc = std::min(kNcPanels, j1 - jc), nc_even = round_up(nc, 2);
      for (int64_t kc0 = 0; kc0 < kpad; kc0 += kc_max) {
        const int64_t kc = std::min(kc_max, kpad - kc0), nq = kc / 4, pstride = nq * kQuadBytes;
        for (int64_t j = 0; j < nc_even; ++j) {
          int8_t* dst = b.get() + j * pstride;
          int32_t* colsum = amx ? nullptr : comp.data() + kNR * j;
          if (j < nc) {
            repack_quads(P.b + (jc + j) * P.b_panel_bytes, P.b_p0 + kc0 / 2, p_end, nq, dst, colsum);
          } else {  // the odd panel's partner: zeros
            std::memset(dst, 0, pstride);
            if (colsum != nullptr) std::fill(colsum, colsum + kNR, 0);
          }
        }
        for (int64_t i = 0; i < mc_pad; i += mr)
          for (int64_t j = 0; j < nc_even; j += 2) {
            int32_t* c = acc.get() + i * ldacc + kNR * j;
            const int8_t* ab = a.get() + i * kpad + kc0;
            if (amx)
              amx_tile(ab, kpad, b.get() + j * pstride, pstride, kc / kKStep, c, ldacc, kc0 == 0);
            else
              vnni_tile(reinterpret_cast<const uint8_t*>(ab), kpad, b.get() + j * pstride, pstride, nq, c, ldacc,
                        kc0 == 0, comp.data() + kNR * j);
          }
      }
      // kFinishRows rows at a time across the N block's panels: each output row gets up to 1 KB
      // in one go rather than 64 bytes per panel down the whole block
      for (int64_t r = 0; r < mc; r += kFinishRows)
        for (int64_t j = 0; j < nc; ++j) {
          const int64_t col0 = kNR * (jc + j);
          finish_panel_avx2(acc.get() + r * ldacc + kNR * j, ldacc, std::min(kFinishRows, mc - r),
                            row_scales ? row_scales + r : nullptr, mb + r, col0,
                            static_cast<int>(std::min<int64_t>(kNR, P.n - col0)), P.epi);
        }
    }
  }
  if (amx) amx_end();
  return ok;
}

}  // namespace recsys_kernels::int8_gemm
