// C++ CPU kernels of quantize_rowwise / dequantize_rowwise: byte-identical to the reference and to
// torch.ops.quantized.embedding_bag_{byte,4bit}_prepack (the arithmetic is in rowwise_common.h).
// Scalar code, parallel over rows; vectorised paths come later.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/checks.h"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels {
namespace {

using namespace rowwise;

// Remembers the first row that had a bad value, across at::parallel_for threads.
class FirstBadRow {
 public:
  explicit FirstBadRow(int64_t none) : none_(none), row_(none) {}
  void report(int64_t row) {
    int64_t seen = row_.load(std::memory_order_relaxed);
    while (row < seen && !row_.compare_exchange_weak(seen, row, std::memory_order_relaxed)) {
    }
  }
  bool any() const { return row_.load() != none_; }
  int64_t row() const { return row_.load(); }

 private:
  const int64_t none_;
  std::atomic<int64_t> row_;
};

// Quantizes one row; false (and nothing written) if the row has a non-finite value or (4 bits)
// does not fit the fp16 scale and bias.
template <typename T, int BITS>
bool quantize_row(const T* x, int64_t d, uint8_t* out) {
  float lo = static_cast<float>(x[0]), hi = lo;
  bool finite = true;
  for (int64_t c = 0; c < d; ++c) {
    const float v = static_cast<float>(x[c]);
    finite &= std::isfinite(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (!finite) return false;
  if constexpr (BITS == 8) {
    const Params8 p = params_8bit(lo, hi);
    for (int64_t c = 0; c < d; ++c) out[c] = code_8bit(static_cast<float>(x[c]), p);
    std::memcpy(out + d, &p.scale, sizeof(float));
    std::memcpy(out + d + sizeof(float), &p.bias, sizeof(float));
  } else {
    const Params4 p = params_4bit(lo, hi);
    if (!fits_fp16(p)) return false;
    for (int64_t c = 0; c < d; c += 2)  // d is even: two codes a byte, low nibble first
      out[c / 2] = code_4bit(static_cast<float>(x[c]), p) | (code_4bit(static_cast<float>(x[c + 1]), p) << 4);
    std::memcpy(out + d / 2, &p.scale_bits, sizeof(uint16_t));
    std::memcpy(out + d / 2 + sizeof(uint16_t), &p.bias_bits, sizeof(uint16_t));
  }
  return true;
}

at::Tensor quantize_rowwise_cpu(const at::Tensor& weight_in, int64_t bits) {
  const int64_t cols = check_quantize_args(weight_in, bits);
  const int64_t n = weight_in.size(0), d = weight_in.size(1);
  if (n == 0 || d == 0) return at::zeros({n, cols}, weight_in.options().dtype(at::kByte));

  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({n, cols}, weight.options().dtype(at::kByte));
  uint8_t* out_ptr = out.data_ptr<uint8_t>();
  FirstBadRow bad(n);
  RK_DISPATCH_FLOAT_TYPES(weight.scalar_type(), "quantize_rowwise_cpu", [&] {
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const bool ok = bits == 8 ? quantize_row<scalar_t, 8>(w + offset2d(r, d), d, out_ptr + offset2d(r, cols))
                                  : quantize_row<scalar_t, 4>(w + offset2d(r, d), d, out_ptr + offset2d(r, cols));
        if (!ok) bad.report(r);
      }
    });
  });
  RK_CHECK_VALUE(!bad.any(), "weight", unquantizable_row(bits), " (first in row ", bad.row(), ")");
  return out;
}

// Dequantizes one row; false if its scale or bias is not finite.
template <typename OutT, int BITS>
bool dequantize_row(const uint8_t* row, int64_t d, OutT* out) {
  float scale, bias;
  if constexpr (BITS == 8) {
    std::memcpy(&scale, row + d, sizeof(float));
    std::memcpy(&bias, row + d + sizeof(float), sizeof(float));
  } else {
    uint16_t bits_[2];
    std::memcpy(bits_, row + d / 2, sizeof(bits_));
    scale = static_cast<float>(c10::Half(bits_[0], c10::Half::from_bits()));
    bias = static_cast<float>(c10::Half(bits_[1], c10::Half::from_bits()));
  }
  if (!std::isfinite(scale) || !std::isfinite(bias)) return false;
  if constexpr (BITS == 8) {
    for (int64_t c = 0; c < d; ++c) out[c] = static_cast<OutT>(dequant(row[c], scale, bias));
  } else {
    for (int64_t c = 0; c < d; c += 2) {
      out[c] = static_cast<OutT>(dequant(row[c / 2] & 0xF, scale, bias));
      out[c + 1] = static_cast<OutT>(dequant(row[c / 2] >> 4, scale, bias));
    }
  }
  return true;
}

at::Tensor dequantize_rowwise_cpu(const at::Tensor& packed_in, int64_t bits, std::optional<at::ScalarType> output_dtype) {
  const auto checked = check_dequantize_args(packed_in, bits, output_dtype);
  const int64_t d = checked.first;
  const at::ScalarType out_dtype = checked.second;
  const int64_t n = packed_in.size(0), cols = packed_in.size(1);
  at::Tensor out = at::empty({n, d}, packed_in.options().dtype(out_dtype));
  if (n == 0) return out;

  const at::Tensor packed = packed_in.contiguous();
  const uint8_t* q = packed.const_data_ptr<uint8_t>();
  FirstBadRow bad(n);
  RK_DISPATCH_FLOAT_TYPES(out_dtype, "dequantize_rowwise_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_rows(d + 1), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const bool ok = bits == 8 ? dequantize_row<scalar_t, 8>(q + offset2d(r, cols), d, o + offset2d(r, d))
                                  : dequantize_row<scalar_t, 4>(q + offset2d(r, cols), d, o + offset2d(r, d));
        if (!ok) bad.report(r);
      }
    });
  });
  RK_CHECK_VALUE(!bad.any(), "packed", "has a non-finite scale or bias (first in row ", bad.row(), ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) {
  m.impl("quantize_rowwise", &quantize_rowwise_cpu);
  m.impl("dequantize_rowwise", &dequantize_rowwise_cpu);
}

}  // namespace recsys_kernels
