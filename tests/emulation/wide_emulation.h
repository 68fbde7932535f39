// Stand-ins for the AVX-512 and AMX instructions of csrc/int8_matmul/int8_gemm_wide.cpp and
// csrc/embedding_bag/embedding_bag_cpu_avx512.h, so that their code runs on CPUs without them
// (built with -DRK_EMULATE_WIDE by tests/test_int8_matmul_wide_emulated.py and
// tests/test_embedding_bag_avx512_emulated.py). AVX-512: SIMDe (Debian's libsimde-dev), whose
// native aliases give the _mm512_* names, plus the few conversions (and a masked shift) it lacks.
// AMX: a scalar model of the tile registers and of the ops the kernel uses, following the ISA
// reference (TILELOADD, TILESTORED, TILEZERO, TDPBSSD: int8 x int8 quads summed into int32,
// wrapping), which also checks that every op fits the loaded config.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

// AVX-512 conversions this SIMDe (0.7.4) lacks, element by element (the same roundings: int32 ->
// float to nearest even, half -> float exact).
namespace rk_avx512_emulation {

inline simde__m512 cvtepi32_ps(simde__m512i a) {
  int32_t in[16];
  float out[16];
  std::memcpy(in, &a, 64);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(in[i]);
  simde__m512 r;
  std::memcpy(&r, out, 64);
  return r;
}

template <class Elem, class From>
inline simde__m512i widen16(From a) {  // 16 unsigned elements -> 16 int32
  Elem in[16];
  int32_t out[16];
  std::memcpy(in, &a, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  simde__m512i r;
  std::memcpy(&r, out, 64);
  return r;
}

inline simde__m512 cvtph_ps(simde__m256i a) {
  uint16_t in[16];
  float out[16];
  std::memcpy(in, &a, 32);
  for (int i = 0; i < 16; ++i) out[i] = _cvtsh_ss(in[i]);
  simde__m512 r;
  std::memcpy(&r, out, 64);
  return r;
}

// the lanes of k from p (the others zero; their memory is not read)
inline simde__m512 maskz_loadu_ps(uint32_t k, const void* p) {
  float out[16];
  for (int i = 0; i < 16; ++i) out[i] = (k >> i) & 1u ? static_cast<const float*>(p)[i] : 0.0f;
  simde__m512 r;
  std::memcpy(&r, out, 64);
  return r;
}

}  // namespace rk_avx512_emulation

#define _mm512_cvtepi32_ps(a) rk_avx512_emulation::cvtepi32_ps(a)
#define _mm512_cvtepu8_epi32(a) rk_avx512_emulation::widen16<uint8_t>(a)
#define _mm512_cvtepu16_epi32(a) rk_avx512_emulation::widen16<uint16_t>(a)
#define _mm512_cvtph_ps(a) rk_avx512_emulation::cvtph_ps(a)
#define _mm512_maskz_loadu_ps(k, p) rk_avx512_emulation::maskz_loadu_ps((k), (p))
#define _mm512_shuffle_f32x4(a, b, imm) simde_mm512_shuffle_f32x4((a), (b), (imm))
// masked shift: the lanes of k shifted, the others from src
#define _mm512_mask_srli_epi32(src, k, a, imm) simde_mm512_mask_blend_epi32((k), (src), simde_mm512_srli_epi32((a), (imm)))

namespace rk_amx_emulation {

struct Tile {
  int rows = 0, colsb = 0;
  uint8_t data[16][64];
};

inline thread_local Tile tiles[8];
inline thread_local bool configured = false;

inline void require(bool ok) {
  if (!ok) std::abort();  // a kernel bug: the test process dies loudly
}

inline void loadconfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  require(c[0] == 1);  // palette 1
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    tiles[t].colsb = colsb;
    tiles[t].rows = c[48 + t];
    require(colsb <= 64 && tiles[t].rows <= 16);
    std::memset(tiles[t].data, 0, sizeof(tiles[t].data));
  }
  configured = true;
}

inline void release() { configured = false; }

inline Tile& tile(int t) {
  require(configured && t >= 0 && t < 8 && tiles[t].rows > 0);
  return tiles[t];
}

inline void loadd(int t, const void* base, int64_t stride) {
  Tile& x = tile(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(x.data[r], static_cast<const uint8_t*>(base) + r * stride, x.colsb);
}

inline void stored(int t, void* base, int64_t stride) {
  Tile& x = tile(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, x.data[r], x.colsb);
}

inline void zero(int t) { std::memset(tile(t).data, 0, sizeof(Tile::data)); }

inline void dpbssd(int ct, int at, int bt) {
  Tile &c = tile(ct), &a = tile(at), &b = tile(bt);
  require(a.rows == c.rows && a.colsb == 4 * b.rows && b.colsb == c.colsb && c.colsb % 4 == 0);
  for (int m = 0; m < c.rows; ++m)
    for (int n = 0; n < c.colsb / 4; ++n) {
      uint32_t sum;
      std::memcpy(&sum, &c.data[m][4 * n], 4);
      for (int k = 0; k < a.colsb / 4; ++k)
        for (int i = 0; i < 4; ++i)
          sum += static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(a.data[m][4 * k + i])) *
                                       static_cast<int8_t>(b.data[k][4 * n + i]));
      std::memcpy(&c.data[m][4 * n], &sum, 4);
    }
}

}  // namespace rk_amx_emulation

// <immintrin.h> (pulled in by SIMDe) defines the real ones as macros around inline assembly
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbssd
#define _tile_loadconfig(config) rk_amx_emulation::loadconfig(config)
#define _tile_release() rk_amx_emulation::release()
#define _tile_zero(t) rk_amx_emulation::zero(t)
#define _tile_loadd(t, base, stride) rk_amx_emulation::loadd(t, base, stride)
#define _tile_stored(t, base, stride) rk_amx_emulation::stored(t, base, stride)
#define _tile_dpbssd(c, a, b) rk_amx_emulation::dpbssd(c, a, b)
