// Shared by the CUDA kernels of the int8 matmul family (quantize / GEMM / GEMV translation units):
// the fused epilogue, the launcher interfaces, and the device error flags.
//
// Epilogue (the reference's order, each step rounded once as in fp32 PyTorch, no FMA contraction):
//   y = (float(acc) * a_scale[m]) * b_scale[n] + bias[n] -> activation -> cast to the output dtype
// float(acc) is the correctly rounded conversion of the exact integer dot product (int32, or int64
// where K is long enough that an int32 accumulator could wrap), as the reference's fp64 -> fp32 is.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/cuda_utils.cuh"

namespace recsys_kernels::int8mm {

enum Activation : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActSilu = 3 };
enum OutKind : int { kOutI32 = 0, kOutF32 = 1, kOutF16 = 2, kOutBF16 = 3 };

// K up to which an int32 accumulator of int8 products cannot wrap: 131071 * 128 * 128 < 2^31.
constexpr int64_t kMaxExactK = 131071;

// Slots of the per-call flag buffer (int64, each starts at INT64_MAX; kernels atomicMin a position).
enum FlagSlot : int { kFlagScale = 0, kFlagInput = 1, kFlagOverflow = 2, kNumFlags = 3 };

struct Epilogue {
  const float* a_scale;  // [M]; nullptr: no scales, the output is the exact int32 result
  const float* b_scale;  // [N]
  const float* bias;     // [N] fp32 or nullptr
  int act;               // Activation
  int out_kind;          // OutKind
  void* out;             // [M, N] row-major
  unsigned long long* overflow;  // flag slot: position m * N + n of a result that does not fit int32
};

__device__ __forceinline__ float activate(float y, int act) {
  switch (act) {
    case kActRelu: return y < 0.f ? 0.f : y;  // NaN stays NaN, as torch.relu
    case kActGelu: return y * 0.5f * (1.f + erff(y * 0.70710678118654752440f));  // torch's erf form
    case kActSilu: return y / (1.f + expf(-y));
    default: return y;
  }
}

__device__ __forceinline__ float to_float(int32_t v) { return __int2float_rn(v); }
__device__ __forceinline__ float to_float(long long v) { return __ll2float_rn(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// The epilogue's float part for an integer accumulator of output (m, n).
template <typename Acc>
__device__ __forceinline__ float dequant_value(const Epilogue& ep, int64_t m, int64_t n, Acc acc) {
  float y = __fmul_rn(__fmul_rn(to_float(acc), __ldg(ep.a_scale + m)), __ldg(ep.b_scale + n));
  if (ep.bias != nullptr) y = __fadd_rn(y, __ldg(ep.bias + n));
  return activate(y, ep.act);
}

// Store a finished float value y of output element idx.
__device__ __forceinline__ void store_float(const Epilogue& ep, int64_t idx, float y) {
  switch (ep.out_kind) {
    case kOutF16: static_cast<__half*>(ep.out)[idx] = __float2half_rn(y); break;
    case kOutBF16: static_cast<__nv_bfloat16*>(ep.out)[idx] = __float2bfloat16_rn(y); break;
    default: static_cast<float*>(ep.out)[idx] = y; break;
  }
}

// Two adjacent finished values (idx even, both in range, the row length even: 2-element aligned).
__device__ __forceinline__ void store_float2(const Epilogue& ep, int64_t idx, float y0, float y1) {
  switch (ep.out_kind) {
    case kOutF16: *reinterpret_cast<__half2*>(static_cast<__half*>(ep.out) + idx) = __floats2half2_rn(y0, y1); break;
    case kOutBF16:
      *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(ep.out) + idx) = __floats2bfloat162_rn(y0, y1);
      break;
    default: *reinterpret_cast<float2*>(static_cast<float*>(ep.out) + idx) = make_float2(y0, y1); break;
  }
}

// The whole epilogue for one output element from its exact integer dot product.
template <typename Acc>
__device__ __forceinline__ void finish(const Epilogue& ep, int64_t m, int64_t n, int64_t N, Acc acc) {
  const int64_t idx = m * N + n;
  if (ep.a_scale == nullptr) {
    if constexpr (sizeof(Acc) == 8) {
      if (acc > INT32_MAX || acc < INT32_MIN) cuda::report_bad(ep.overflow, idx);
    }
    static_cast<int32_t*>(ep.out)[idx] = static_cast<int32_t>(acc);
    return;
  }
  store_float(ep, idx, dequant_value(ep, m, n, acc));
}

// Outputs (m, n) and (m, n + 1) from int32 accumulators; has1: n + 1 < N.
__device__ __forceinline__ void finish_pair(const Epilogue& ep, int64_t m, int64_t n, int64_t N, int32_t v0,
                                            int32_t v1, bool has1) {
  const int64_t idx = m * N + n;
  const bool vec = has1 && (N % 2 == 0);  // idx is then even: an aligned 2-element store
  if (ep.a_scale == nullptr) {
    int32_t* out = static_cast<int32_t*>(ep.out);
    if (vec) {
      *reinterpret_cast<int2*>(out + idx) = make_int2(v0, v1);
    } else {
      out[idx] = v0;
      if (has1) out[idx + 1] = v1;
    }
    return;
  }
  const float y0 = dequant_value(ep, m, n, v0);
  if (vec) {
    store_float2(ep, idx, y0, dequant_value(ep, m, n + 1, v1));
  } else {
    store_float(ep, idx, y0);
    if (has1) store_float(ep, idx + 1, dequant_value(ep, m, n + 1, v1));
  }
}

// ----------------------------------------------------------------------------- launchers
// All on the current stream; pointers are device pointers of contiguous row-major tensors.

// q [M, K] int8, scale [M] fp32 from x [M, K] (`dtype`: 0 fp32, 1 fp16, 2 bf16; read as float /
// c10::Half / c10::BFloat16, whose conversions torch's build flags leave enabled). Non-finite rows are reported in `bad` and left unwritten.
void launch_quantize_rows(const void* x, int dtype, int8_t* q, float* scale, int64_t M, int64_t K,
                          unsigned long long* bad, cudaStream_t stream);

// out = epilogue(a [M, K] @ b [N, K]^T) with the mma.sync tensor-core GEMM (any M, N, K >= 0).
void launch_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& ep,
                 cudaStream_t stream);

// The same for small M (<= kGemvMaxRows): one warp per output column, dp4a.
constexpr int64_t kGemvMaxRows = 16;
void launch_gemv(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& ep,
                 cudaStream_t stream);

// Weight-only: out = epilogue(x [M, K] float @ (w [N, K] int8 * w_scale[:, None])^T) in fp32, for
// M <= kGemvMaxRows (ep.a_scale must be nullptr-free: it uses only bias / act / out_kind).
void launch_weight_only_gemv(const void* x, int dtype, const int8_t* w, const float* w_scale, int64_t M, int64_t N,
                             int64_t K, const Epilogue& ep, cudaStream_t stream);

// w_f32 [N, K] = w [N, K] * w_scale[:, None] (each product rounded once, as the reference).
void launch_dequantize_weight(const int8_t* w, const float* w_scale, float* out, int64_t N, int64_t K,
                              cudaStream_t stream);

// out = act(y + bias) cast: the epilogue of a float product y [M, N] fp32.
void launch_bias_act(const float* y, int64_t M, int64_t N, const Epilogue& ep, cudaStream_t stream);

// Report in `bad` (offset + i) for the first non-finite p[i], i < n.
void launch_check_finite(const float* p, int64_t n, int64_t offset, unsigned long long* bad, cudaStream_t stream);

}  // namespace recsys_kernels::int8mm
