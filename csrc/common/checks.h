// Argument checks of the bad-input policy (DESIGN.md §5) for C++/CUDA kernels, and the dtype
// dispatch they share. The Python front door already checks metadata; these checks repeat the
// cheap ones because the native ops can also be called directly (torch.ops.recsys_kernels.*,
// opcheck), and no input may crash the process.
//
// The TORCH_CHECK_* flavours map to Python exceptions: TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_INDEX -> IndexError. Every message starts with the
// argument's name, like the Python checks do.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>

#include <ATen/Dispatch.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

// RK_CHECK_*(cond, "weight", "must be ...", ...): the message starts with the argument's name
// ("weight must be ..."), like the Python front door's messages.
#define RK_CHECK_VALUE(cond, arg, ...) TORCH_CHECK_VALUE(cond, arg, " ", __VA_ARGS__)
#define RK_CHECK_TYPE(cond, arg, ...) TORCH_CHECK_TYPE(cond, arg, " ", __VA_ARGS__)
#define RK_CHECK_INDEX(cond, arg, ...) TORCH_CHECK_INDEX(cond, arg, " ", __VA_ARGS__)

// The float dtypes every op accepts for tables and activations: fp32, fp16, bf16. `scalar_t`
// is the C++ type inside the body (float, c10::Half, c10::BFloat16).
#define RK_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace recsys_kernels {

// The grouped ops' n tables (at least one) and their per-lookup lists, one entry per lookup each:
// the Python front door's check and messages (ops/embedding_grouped.py, check_lookup_count).
inline void check_lookup_lists(int64_t n, at::TensorList indices, at::TensorList offsets,
                               const c10::List<std::optional<at::Tensor>>& per_sample_weights,
                               const c10::List<std::string>& modes, at::IntArrayRef padding_idx,
                               at::IntArrayRef bits, const c10::List<bool>& sparse) {
  TORCH_CHECK_VALUE(n >= 1, "weights must hold at least one table (one per lookup), got an empty list");
  const auto check = [n](const char* name, int64_t got) {
    RK_CHECK_VALUE(got == n, name, "must have one entry per lookup (", n, "), got ", got);
  };
  check("indices", indices.size());
  check("offsets", offsets.size());
  check("per_sample_weights", per_sample_weights.size());
  check("modes", modes.size());
  check("padding_idx", padding_idx.size());
  check("bits", bits.size());
  check("sparse", sparse.size());
}

// dtype names as Python spells them (torch.float32, not c10's "Float"), for messages.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// TypeError unless t's dtype is one of `allowed`.
inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  std::string names;
  for (auto a : allowed) names += (names.empty() ? "" : ", ") + dtype_name(a);
  RK_CHECK_TYPE(false, name, "must have dtype ", names, ", got ", dtype_name(t.scalar_type()));
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kFloat, at::kHalf, at::kBFloat16});
}

// ValueError unless t has `dim` dimensions.
inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  RK_CHECK_VALUE(t.dim() == dim, name, "must be ", dim, "-D, got shape ", t.sizes());
}

// ValueError unless t is contiguous. Kernels mostly call .contiguous() instead; this is for
// outputs and buffers that must be written in place.
inline void check_contiguous(const at::Tensor& t, const char* name) {
  RK_CHECK_VALUE(t.is_contiguous(), name, "must be contiguous");
}

// ValueError unless t lives on `device` (named after the tensor that fixed the device).
inline void check_device(const at::Tensor& t, const char* name, const c10::Device& device,
                         const char* device_of) {
  RK_CHECK_VALUE(t.device() == device, name, "must be on the same device as ", device_of, " (", device,
                 "), got ", t.device());
}

inline void check_bits(int64_t bits) {
  RK_CHECK_VALUE(bits == 8 || bits == 4, "bits", "must be 8 or 4, got ", bits);
}

// ----------------------------------------------------------------------------- 64-bit index math
// Sizes past 2^31 elements are legal (DESIGN.md §5): kernels index with int64_t, and these
// helpers make the intent explicit at the places where an int product could overflow.

// a * b for sizes (a, b >= 0) as int64, ValueError (naming `what`) if it would overflow.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  RK_CHECK_VALUE(a >= 0 && b >= 0 && (a == 0 || b <= std::numeric_limits<int64_t>::max() / a), what,
                 "is too large: ", a, " x ", b, " overflows int64");
  return a * b;
}

// Offset of element (row, col) in a row-major [*, cols] buffer, always in 64-bit.
inline int64_t offset2d(int64_t row, int64_t cols, int64_t col = 0) { return row * cols + col; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per at::parallel_for chunk so that each chunk touches about `target` elements.
inline int64_t grain_rows(int64_t row_elems, int64_t target = 32768) {
  return row_elems > 0 ? std::max<int64_t>(1, target / row_elems) : target;
}

}  // namespace recsys_kernels
