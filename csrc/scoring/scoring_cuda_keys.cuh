// The reference's ranking key (recsys_kernels/ops/scoring.py _rank_key) on the device. Free of
// torch headers, so that tests/emulation/cuda_emulation.h can compile the top-k tile kernel, which
// uses it, as plain C++.
#pragma once

#include <cmath>
#include <cstdint>

namespace recsys_kernels::scoring_cuda {

// The reference's key (scoring.py _rank_key), int64, larger = ranked first:
// (score ordinal << 32) | (2^32 - 1 - item id); NaN just below -inf, padding below NaN.
constexpr int64_t kOrdNegInf = -2139095041;
constexpr int64_t kOrdNan = kOrdNegInf - 1;
constexpr int64_t kKeyInvalid = static_cast<int64_t>(static_cast<uint64_t>(kOrdNegInf - 2) << 32);
constexpr uint64_t kIdMask = 0xFFFFFFFFull;

__device__ __forceinline__ int64_t rank_key(float s, int64_t id) {
  int64_t ord = kOrdNan;
  if (!isnan(s)) {
    const int32_t bits = __float_as_int(s == 0.0f ? 0.0f : s);  // -0.0 ties +0.0
    ord = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  }
  return static_cast<int64_t>((static_cast<uint64_t>(ord) << 32) | (kIdMask - static_cast<uint64_t>(id)));
}

// (value, id) of a key: padding gives (-inf, -1), the NaN ordinal a NaN.
__device__ __forceinline__ void decode_key(int64_t key, float& value, int64_t& id) {
  if (key == kKeyInvalid) {
    value = -INFINITY;
    id = -1;
    return;
  }
  id = static_cast<int64_t>(kIdMask - (static_cast<uint64_t>(key) & kIdMask));
  const int64_t ord = key >> 32;  // arithmetic shift: the ordinal's sign comes back
  if (ord == kOrdNan) {
    value = __int_as_float(0x7FC00000);
    return;
  }
  value = __int_as_float(static_cast<int32_t>(ord >= 0 ? ord : (ord ^ 0x7FFFFFFF)));
}

}  // namespace recsys_kernels::scoring_cuda
