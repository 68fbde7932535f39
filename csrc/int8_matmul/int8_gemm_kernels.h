// What the translation units of the int8 GEMM CPU kernels share (int8_matmul_cpu.cpp: ops, driver,
// blocking, threading, scalar kernels; int8_gemm_avx2.cpp: the AVX2 kernels). Free of torch headers
// on purpose: the AVX2 translation unit must not instantiate inline functions the rest of the
// library could link against.
//
// Data layouts (see docs/design.md, "Int8 matmul on the CPU"):
//  * B (nn.Linear weight [N, K] int8) packed in panels of kNR = 16 output columns and K-pairs:
//      packed[j][p][h][c][t] = w[16 j + 8 h + c][2 p + t]   (0 past N or K)
//    j < ceil(N / 16), p < ceil(K / 2), h < 2, c < 8, t < 2: 32 bytes per (panel, pair). Sign-
//    extended to int16, the 16 bytes of one half are 8 columns x (k even, k odd), exactly what
//    _mm256_madd_epi16 against a broadcast (a[2p], a[2p+1]) pair needs.
//  * A (activations) as int16, row-major, each row padded to an even length with a zero: row m's
//    pair p is the int32 word ((int32*)row)[p]. Built per block of rows (the A-packing step), from
//    int8 (int8_matmul) or quantized from float on the fly (int8_linear, act_quant="dynamic").
// int8 x int8 products sum pairwise in int16 -> int32 exactly (|a b| <= 2^14), so the int32
// accumulators are exact for up to 131071 K values; the driver chunks K beyond that.
#pragma once

#include <cstdint>

namespace recsys_kernels::int8_gemm {

constexpr int kMR = 6;    // rows of a micro-tile
constexpr int kNR = 16;   // columns of a micro-tile = of a packed B panel
constexpr int kPanelPairBytes = 32;

enum class Act : int { kNone = 0, kRelu = 1, kGelu = 2, kSilu = 3 };
enum class OutKind : int { kI32 = 0, kF32 = 1, kF16 = 2, kBF16 = 3 };
enum class InKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// How a finished tile becomes output: y = (acc * a_scale[m]) * b_scale[n] + bias[n], activation,
// cast (the reference's order, no FMA). kI32: acc itself.
struct Epilogue {
  OutKind out_kind;
  void* out;              // [M, ldc] of out_kind
  int64_t ldc;
  const float* b_scale;   // [N] or nullptr (weight-only: the scale is in the dequantized weight)
  const float* bias;      // [N] or nullptr
  Act act;
};

// A column of micro-tiles of the int8 GEMM: rows [row0, row0 + rows) (micro-tiles of kMR rows) x
// columns [col0, col0 + ncols) of the output, K-pairs [p0, p0 + kp) (a and b point at pair p0).
struct Tile {
  int64_t rows;
  int ncols;               // 1..kNR
  int64_t kp;              // pairs
  const int32_t* a;        // first row's int16 pairs; row r at a + r * lda
  int64_t lda;             // in pairs
  const int8_t* b;         // the panel, 32 bytes per pair
  int32_t* partial;        // [rows rounded up to kMR][kNR] running sums across K blocks, or nullptr
  bool load_partial;       // start from `partial` (else from 0)
  bool finish;             // run the epilogue (else store the sums to `partial`)
  const float* a_scale;    // [rows] row scales, or nullptr (int32 output)
  int64_t row0, col0;
};

// One micro-tile of the weight-only (fp32) GEMM: x rows (fp32) times a dequantized panel w [K][16].
struct FloatTile {
  int mr, ncols;
  int64_t k;
  const float* x;          // first row; row r at x + r * ldx
  int64_t ldx;
  const float* w;          // [k][kNR] dequantized weights of the panel
  int64_t row0, col0;
};

// Where the int8 GEMM's A rows come from, and one GEMM call (rows of A x packed panels of B).
struct ASource {
  bool quantize;           // float rows quantized per row (act_quant="dynamic"), else int8 rows
  InKind in_kind;          // of float rows
  const uint8_t* data;     // row m at data + m * row_bytes
  int64_t row_bytes;
  const float* a_scale;    // int8 rows: [M] scales, or nullptr (int32 output)
};

struct Problem {
  int64_t m, n, k;         // this call's K values: A columns [0, k), B pairs [b_p0, b_p0 + ceil(k / 2))
  ASource a;
  const int8_t* b;         // packed panels
  int64_t b_panel_bytes, b_p0;
  Epilogue epi;
};

// ---- AVX2 + FMA + F16C kernels (int8_gemm_avx2.cpp); call only when cpu_isa() >= kAvx2.
void tile_avx2(const Tile& t, const Epilogue& e);
void float_tile_avx2(const FloatTile& t, const Epilogue& e);
// Row quantization (the reference rule, bit for bit). Writes q as int8 to q8 (if not null) and/or
// as int16 to q16 (if not null; padded with a zero to an even length). false: non-finite input.
bool quantize_row_avx2(InKind kind, const void* x, int64_t k, float* scale, int8_t* q8, int16_t* q16);
// int8 row -> int16 row padded to an even length.
void widen_row_avx2(const int8_t* a, int64_t k, int16_t* dst);
// One full panel (16 rows of w [*, k], row-major) -> its packed bytes (ceil(k/2) * 32; the odd-K
// padding byte must already be zero).
void pack_panel_avx2(const int8_t* w, int64_t k, int8_t* dst);
// Packed panel (kp pairs) -> fp32 [2 kp][16]: w = float(q) * scale[c] (the reference's rounding).
void dequant_panel_avx2(const int8_t* panel, int64_t kp, const float* scale16, float* dst);
// The epilogue of one panel from exact int32 sums: acc rows [0, rows) x 16 columns (row stride
// ldacc) -> output rows row0.., columns col0.. (ncols of them); a_scale: [rows] or nullptr.
void finish_panel_avx2(const int32_t* acc, int64_t ldacc, int64_t rows, const float* a_scale, int64_t row0,
                       int64_t col0, int ncols, const Epilogue& e);

// ---- AVX512-VNNI and AMX-INT8 kernels (int8_gemm_wide.cpp; the layouts are described there).
enum class WideIsa : int { kVnni = 0, kAmx = 1 };
// true when this thread may use AMX tiles (asks the OS for the tile state once per process).
bool amx_usable();
// Rows [r0, r1) x panels [j0, j1) of P, like the driver's AVX2 task; call only when cpu_isa() is
// at least avx512_vnni (kVnni) or amx with amx_usable() (kAmx). Rows are quantized and finished by
// the AVX2 kernels (quantize_row_avx2, finish_panel_avx2), so both paths give the same bits.
// false: a row to quantize had a non-finite value.
bool wide_task(WideIsa isa, const Problem& P, int64_t r0, int64_t r1, int64_t j0, int64_t j1);

}  // namespace recsys_kernels::int8_gemm
