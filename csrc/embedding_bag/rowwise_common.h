// What the CPU and CUDA kernels of quantize_rowwise / dequantize_rowwise share: the argument
// checks, and the arithmetic of the fused row-wise formats, so that both produce the same bytes
// as torch.ops.quantized.embedding_bag_byte_prepack / embedding_bag_4bit_prepack (FBGEMM's
// FloatOrHalfToFused{8,N}BitRowwiseQuantized*). The order of the float operations below is
// FBGEMM's; do not "simplify" it (e.g. a * (1 / b) for a / b).
//
// On the device every operation is an explicit round-to-nearest intrinsic: nvcc would otherwise
// fuse a * b + c into one FMA (different rounding from the CPU) and -use_fast_math would
// approximate divisions.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#include <c10/macros/Macros.h>
#include <c10/util/Half.h>

#include "common/checks.h"

namespace recsys_kernels::rowwise {

constexpr float kEps8Bit = 1e-8f;  // FBGEMM's kEpsilon: keeps 255 / range finite for a constant row

C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

C10_HOST_DEVICE inline float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Round half to even, as torch.round and FBGEMM's lrintf (default rounding mode) do. On the host,
// adding and subtracting 1.5 * 2^23 rounds exactly like nearbyintf for |x| < 2^22, and passes
// inf / NaN through; unlike a libm call it lets the compiler vectorise the row loops. Larger x
// cannot occur for codes ((x - bias) * inv_scale is at most about 255) and would clamp the same.
// (Needs IEEE semantics: never build this with -ffast-math, which would fold it to x.)
C10_HOST_DEVICE inline float round_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
#endif
}

C10_HOST_DEVICE inline bool is_inf(float x) {
#ifdef __CUDA_ARCH__
  return isinf(x);
#else
  return std::isinf(x);
#endif
}

// Clamp to [0, hi]; NaN (only reachable from overflowing ranges) becomes 0, never UB in the cast.
C10_HOST_DEVICE inline uint8_t clamp_code(float q, float hi) {
  q = q > 0.0f ? q : 0.0f;
  q = q < hi ? q : hi;
  return static_cast<uint8_t>(q);
}

// 8-bit: value = code * scale + bias; the row stores fp32 scale then fp32 bias after the codes.
struct Params8 {
  float scale, bias, inv_scale;
};

C10_HOST_DEVICE inline Params8 params_8bit(float lo, float hi) {
  const float range = sub_rn(hi, lo);
  return {div_rn(range, 255.0f), lo, div_rn(255.0f, add_rn(range, kEps8Bit))};
}

C10_HOST_DEVICE inline uint8_t code_8bit(float x, const Params8& p) {
  return clamp_code(round_even(mul_rn(sub_rn(x, p.bias), p.inv_scale)), 255.0f);
}

// 4-bit: the row stores fp16 scale then fp16 bias; the bias is the row minimum rounded to fp16
// first, so that the codes are computed against the bias dequantization will see.
struct Params4 {
  float scale, bias, inv_scale;
  uint16_t scale_bits, bias_bits;  // the fp16 values stored in the row
};

C10_HOST_DEVICE inline Params4 params_4bit(float lo, float hi) {
  const c10::Half bias_h(lo);  // round to nearest even, on host and device
  const float bias = static_cast<float>(bias_h);
  const float range = sub_rn(hi, bias);
  const c10::Half scale_h(range == 0.0f ? 1.0f : div_rn(range, 15.0f));
  float scale = static_cast<float>(scale_h);
  float inv_scale = div_rn(1.0f, scale);
  if (scale == 0.0f || is_inf(inv_scale)) {  // any scale works when every x - bias is 0
    scale = 1.0f;
    inv_scale = 1.0f;
  }
  return {scale, bias, inv_scale, c10::Half(scale).x, bias_h.x};
}

// A 4-bit row's scale and bias are stored as fp16: a row whose minimum or (max - min) / 15 rounds
// beyond fp16's range would be stored as inf, which every reader refuses, so quantization refuses
// the row instead (torch's embedding_bag_4bit_prepack stores the inf).
C10_HOST_DEVICE inline bool fits_fp16(const Params4& p) { return !is_inf(p.scale) && !is_inf(p.bias); }

// What quantize_rowwise says of the first row it refuses.
inline const char* unquantizable_row(int64_t bits) {
  return bits == 8 ? "has non-finite values"
                   : "has non-finite values, or a row whose 4-bit fp16 scale or bias would overflow "
                     "(|min| or (max - min) / 15 beyond 65504)";
}

C10_HOST_DEVICE inline uint8_t code_4bit(float x, const Params4& p) {
  return clamp_code(round_even(mul_rn(sub_rn(x, p.bias), p.inv_scale)), 15.0f);
}

// Dequantization: a rounded product, then a rounded sum (never one FMA), as the reference does.
C10_HOST_DEVICE inline float dequant(float code, float scale, float bias) {
  return add_rn(mul_rn(code, scale), bias);
}

// Bytes per packed row and the D a packed width stands for (recsys_kernels/ops/rowwise.py).
C10_HOST_DEVICE inline int64_t packed_width(int64_t dim, int64_t bits) { return bits == 8 ? dim + 8 : dim / 2 + 4; }
C10_HOST_DEVICE inline int64_t unpacked_dim(int64_t cols, int64_t bits) { return bits == 8 ? cols - 8 : 2 * (cols - 4); }

// ----------------------------------------------------------------------------- argument checks
// The metadata checks both kernels repeat (the front door did them already, but the native ops can
// be called directly). Value checks (non-finite inputs, scales) happen inside the kernels.

// Checks quantize_rowwise's arguments; returns the packed width.
inline int64_t check_quantize_args(const at::Tensor& weight, int64_t bits) {
  check_bits(bits);
  check_float_dtype(weight, "weight");
  check_dim(weight, "weight", 2);
  // no reader takes a row of only the scale and bias (torch's neither)
  RK_CHECK_VALUE(weight.size(1) >= 1, "weight", "must have an embedding dim >= 1 for row-wise tables, got 0");
  RK_CHECK_VALUE(bits == 8 || weight.size(1) % 2 == 0, "weight",
                 "must have an even embedding dim for 4-bit row-wise tables, got ", weight.size(1));
  return packed_width(weight.size(1), bits);
}

// Checks dequantize_rowwise's arguments; returns (D, output dtype).
inline std::pair<int64_t, at::ScalarType> check_dequantize_args(const at::Tensor& packed, int64_t bits,
                                                                std::optional<at::ScalarType> output_dtype) {
  check_bits(bits);
  check_dtype(packed, "packed", {at::kByte});
  check_dim(packed, "packed", 2);
  const at::ScalarType out_dtype = output_dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(is_float_dtype(out_dtype), "output_dtype must be float32, float16 or bfloat16, got ",
                   dtype_name(out_dtype));
  const int64_t cols = packed.size(1), min_cols = bits == 8 ? 9 : 5;  // D >= 1 (4-bit: D even)
  RK_CHECK_VALUE(cols >= min_cols, "packed:", "a ", bits, "-bit row-wise table needs at least ", min_cols,
                 " bytes per row, got ", cols);
  return {unpacked_dim(cols, bits), out_dtype};
}

}  // namespace recsys_kernels::rowwise
