// The portable kernels of the int8 GEMM family (int8_gemm_scalar.cpp), same contracts as the AVX2
// ones in int8_gemm_kernels.h.
#pragma once

#include "int8_matmul/int8_gemm_kernels.h"

namespace recsys_kernels::int8_gemm {

void tile_scalar(const Tile& t, const Epilogue& e);
void float_tile_scalar(const FloatTile& t, const Epilogue& e);
bool quantize_row_scalar(InKind kind, const void* x, int64_t k, float* scale, int8_t* q8, int16_t* q16);
void widen_row_scalar(const int8_t* a, int64_t k, int16_t* dst);
void dequant_panel_scalar(const int8_t* panel, int64_t kp, const float* scale16, float* dst);
// One output value from a float accumulator: (f * a_scale[r]) * b_scale[col] + bias[col],
// activation, store (used by the scalar tiles and by the chunked large-K path).
void finish_value_scalar(const Epilogue& e, const float* a_scale, int64_t r, int64_t row, int64_t col, float f);

}  // namespace recsys_kernels::int8_gemm
