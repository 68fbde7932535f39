// The portable (baseline-ISA) kernels of the int8 GEMM family: the same operations as the AVX2
// kernels, element by element. Taken when the CPU has no AVX2 or RECSYS_KERNELS_CPU_ISA=scalar.
// The int32 results are exact on both paths; the float epilogue uses libm (erfc, exp) here.
#include <algorithm>
#include <cmath>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "int8_matmul/int8_gemm_scalar.h"

namespace recsys_kernels::int8_gemm {
namespace {

float activate(float v, Act act) {
  switch (act) {
    case Act::kNone: return v;
    case Act::kRelu: return v < 0.0f ? 0.0f : v;  // NaN stays NaN, like torch.relu
    case Act::kGelu: return static_cast<float>(0.5 * v * std::erfc(-static_cast<double>(v) * 0.70710678118654752));
    case Act::kSilu: return v / (1.0f + std::exp(-v));
  }
  return v;
}

void store(const Epilogue& e, int64_t row, int64_t col, float v) {
  const int64_t off = row * e.ldc + col;
  switch (e.out_kind) {
    case OutKind::kF32: static_cast<float*>(e.out)[off] = v; return;
    case OutKind::kF16: static_cast<c10::Half*>(e.out)[off] = c10::Half(v); return;
    case OutKind::kBF16: static_cast<c10::BFloat16*>(e.out)[off] = c10::BFloat16(v); return;
    case OutKind::kI32: return;
  }
}

}  // namespace

void finish_value_scalar(const Epilogue& e, const float* a_scale, int64_t r, int64_t row, int64_t col, float f) {
  if (a_scale != nullptr) f = f * a_scale[r];
  if (e.b_scale != nullptr) f = f * e.b_scale[col];
  if (e.bias != nullptr) f = f + e.bias[col];
  store(e, row, col, activate(f, e.act));
}

namespace {
void micro_tile(const Tile& t, int mr, const Epilogue& e) {
  int32_t c[kMR][kNR];
  for (int r = 0; r < mr; ++r)
    for (int n = 0; n < kNR; ++n) c[r][n] = t.load_partial ? t.partial[r * kNR + n] : 0;
  for (int64_t p = 0; p < t.kp; ++p) {
    const int8_t* bp = t.b + kPanelPairBytes * p;
    for (int r = 0; r < mr; ++r) {
      int32_t pair;
      std::memcpy(&pair, t.a + r * t.lda + p, 4);
      const int32_t a0 = static_cast<int16_t>(static_cast<uint32_t>(pair) & 0xffffu);  // little-endian: k even
      const int32_t a1 = static_cast<int16_t>(static_cast<uint32_t>(pair) >> 16);
      for (int n = 0; n < kNR; ++n) {
        const int8_t* bn = bp + 16 * (n / 8) + 2 * (n % 8);
        c[r][n] += a0 * bn[0] + a1 * bn[1];
      }
    }
  }
  if (!t.finish) {
    for (int r = 0; r < mr; ++r) std::memcpy(t.partial + r * kNR, c[r], sizeof(c[r]));
    return;
  }
  for (int r = 0; r < mr; ++r) {
    for (int n = 0; n < t.ncols; ++n) {
      if (e.out_kind == OutKind::kI32)
        static_cast<int32_t*>(e.out)[(t.row0 + r) * e.ldc + t.col0 + n] = c[r][n];
      else
        finish_value_scalar(e, t.a_scale, r, t.row0 + r, t.col0 + n, static_cast<float>(c[r][n]));
    }
  }
}
}  // namespace

void tile_scalar(const Tile& column, const Epilogue& e) {
  Tile t = column;
  for (int64_t i = 0; i < column.rows; i += kMR) {
    t.a = column.a + i * column.lda;
    t.partial = column.partial ? column.partial + i * kNR : nullptr;
    t.a_scale = column.a_scale ? column.a_scale + i : nullptr;
    t.row0 = column.row0 + i;
    micro_tile(t, static_cast<int>(std::min<int64_t>(kMR, column.rows - i)), e);
  }
}

void float_tile_scalar(const FloatTile& t, const Epilogue& e) {
  float c[kMR][kNR] = {};
  for (int64_t k = 0; k < t.k; ++k)
    for (int r = 0; r < t.mr; ++r) {
      const float xv = t.x[r * t.ldx + k];
      for (int n = 0; n < kNR; ++n) c[r][n] += xv * t.w[kNR * k + n];
    }
  Epilogue plain = e;
  plain.b_scale = nullptr;  // the scale is in the dequantized weight
  for (int r = 0; r < t.mr; ++r)
    for (int n = 0; n < t.ncols; ++n) finish_value_scalar(plain, nullptr, r, t.row0 + r, t.col0 + n, c[r][n]);
}

template <typename T>
static bool quantize_row_t(const T* x, int64_t k, float* scale_out, int8_t* q8, int16_t* q16) {
  float m = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < k; ++i) {
    const float a = std::fabs(static_cast<float>(x[i]));
    finite &= std::isfinite(a);
    m = a > m ? a : m;
  }
  if (!finite) return false;
  float scale = m / 127.0f;
  if (scale == 0.0f) scale = 1.0f;
  *scale_out = scale;
  for (int64_t i = 0; i < k; ++i) {
    float q = std::nearbyint(static_cast<float>(x[i]) / scale);  // default rounding: half to even
    q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
    if (q16 != nullptr) q16[i] = static_cast<int16_t>(q);
    if (q8 != nullptr) q8[i] = static_cast<int8_t>(q);
  }
  if (q16 != nullptr && (k & 1)) q16[k] = 0;
  return true;
}

bool quantize_row_scalar(InKind kind, const void* x, int64_t k, float* scale, int8_t* q8, int16_t* q16) {
  switch (kind) {
    case InKind::kF32: return quantize_row_t(static_cast<const float*>(x), k, scale, q8, q16);
    case InKind::kF16: return quantize_row_t(static_cast<const c10::Half*>(x), k, scale, q8, q16);
    case InKind::kBF16: return quantize_row_t(static_cast<const c10::BFloat16*>(x), k, scale, q8, q16);
  }
  return false;
}

void widen_row_scalar(const int8_t* a, int64_t k, int16_t* dst) {
  for (int64_t i = 0; i < k; ++i) dst[i] = a[i];
  if (k & 1) dst[k] = 0;
}

void dequant_panel_scalar(const int8_t* panel, int64_t kp, const float* scale16, float* dst) {
  for (int64_t p = 0; p < kp; ++p)
    for (int n = 0; n < kNR; ++n)
      for (int t = 0; t < 2; ++t)
        dst[(2 * p + t) * kNR + n] =
            static_cast<float>(panel[kPanelPairBytes * p + 16 * (n / 8) + 2 * (n % 8) + t]) * scale16[n];
}

}  // namespace recsys_kernels::int8_gemm
