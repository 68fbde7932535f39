// A C entry point to wide_task (csrc/int8_matmul/int8_gemm_wide.cpp) for the emulated tests: one
// task of an int8 GEMM with the problem spelled out in plain arguments (ctypes).
#include "int8_matmul/int8_gemm_kernels.h"

using namespace recsys_kernels::int8_gemm;

extern "C" int rk_wide_task(int isa, int64_t m, int64_t n, int64_t k, int quantize, int in_kind, const void* a,
                            int64_t a_row_bytes, const float* a_scale, const int8_t* packed, int64_t panel_bytes,
                            int64_t b_p0, const float* b_scale, const float* bias, int act, int out_kind, void* out,
                            int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  const Problem P{m,
                  n,
                  k,
                  {quantize != 0, static_cast<InKind>(in_kind), static_cast<const uint8_t*>(a), a_row_bytes, a_scale},
                  packed,
                  panel_bytes,
                  b_p0,
                  {static_cast<OutKind>(out_kind), out, n, b_scale, bias, static_cast<Act>(act)}};
  return wide_task(static_cast<WideIsa>(isa), P, r0, r1, j0, j1) ? 1 : 0;
}
