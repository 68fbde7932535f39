// What the CUDA forward kernels of embedding_bag (embedding_bag_cuda.cu) and embedding_bag_grouped
// (embedding_bag_grouped_cuda.cu) share: the row readers (float rows, int8/int4 row-wise rows
// dequantized in registers), the per-bag pooling loop of one warp, the validation of offsets and
// indices, and the device error-flag protocol with its host side. The single-table kernel calls
// pool_bag with the table format fixed at compile time; the grouped kernel picks the format of
// each (lookup, bag) at run time and calls the same pool_bag.
//
// pool_bag: one warp pools one bag. The warp is split into G = 32 / TPR groups of TPR lanes; the
// lanes of a group cover VEC consecutive columns each (16-byte loads where the table and the row
// width allow: float4 for fp32, 8 halves for fp16/bf16, 8 codes for uint8 rows), the groups take
// the bag's indices round-robin (kUnroll of them per step, so several row loads are in flight),
// and a butterfly over the group bits of the lane id combines the groups at the end. The indices
// come 32 at a time, one per lane (a coalesced load, checked in parallel), and reach the groups by
// shuffles: a step waits for its rows only, not for an index load before them (the H200 run of
// 2026-11-28 found the kernel bound by rows in flight, not bytes). D wider than
// TPR * VEC is covered chunk by chunk (the bag's index list is re-read per chunk, from L1/L2). All
// index and address arithmetic is int64. Every lane of the warp calls pool_bag (the shuffles).
//
// Error flags: one set of kFlagCount int64 per table (a lookup of the grouped op). The kernels
// never read outside the tensors, whatever the offsets and indices hold; they record the first
// out-of-range index position, the first decreasing offset step, offsets[0], offsets[B] and the
// first position whose gathered quantized row has a non-finite scale or bias (atomicMin). The host
// reads the flags back after the launch (one small D2H copy, which waits for the stream) and
// raises the reference's errors in the reference's order (raise_for_flag_values).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include <ATen/ATen.h>
#include <c10/util/Half.h>

#include "common/checks.h"
#include "common/cuda_device.cuh"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels::embedding_bag_cuda_common {

using cuda::kFullMask;
using cuda::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int kUnroll = 4;  // indices per group and step: row loads in flight per lane

enum Mode : int { kSum = 0, kMean = 1, kMax = 2 };
enum Bounds : int { kRaise = 0, kZero = 1, kClamp = 2 };

// Layout of one table's flag set (int64[kFlagCount]).
constexpr int kFlagBadIndex = 0;  // smallest position p with indices[p] out of range (bounds="raise")
constexpr int kFlagBadStep = 1;   // smallest b with offsets[b] > offsets[b + 1]
constexpr int kFlagFirst = 2;     // offsets[0]
constexpr int kFlagLast = 3;      // offsets[B]
constexpr int kFlagBadScale = 4;  // smallest p whose gathered (clamped) quantized row has a non-finite scale/bias
constexpr int kFlagCount = 5;
constexpr int64_t kNone = cuda::kNoPosition;

// ----------------------------------------------------------------------------- index readers
// indices / offsets through the read-only data cache, widened to int64. IndexPtr: dtype fixed at
// compile time (single-table kernel); AnyIndexPtr: int32 or int64 chosen at run time (a grouped
// launch mixes lookups of both; the branch is warp-uniform).
template <typename IndexT>
struct IndexPtr {
  static_assert(sizeof(IndexT) == 4 || sizeof(IndexT) == 8, "int32 or int64 indices");
  const IndexT* p;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    if constexpr (sizeof(IndexT) == 8) return static_cast<int64_t>(__ldg(reinterpret_cast<const long long*>(p) + i));
    else return static_cast<int64_t>(__ldg(reinterpret_cast<const int*>(p) + i));
  }
};

struct AnyIndexPtr {
  const void* p;
  bool is64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is64 ? IndexPtr<int64_t>{static_cast<const int64_t*>(p)}[i] : IndexPtr<int32_t>{static_cast<const int32_t*>(p)}[i];
  }
};

// ----------------------------------------------------------------------------- row readers
// Rows::load(row, col, v) reads VEC consecutive values of table row `row` from column `col` (a
// multiple of VEC, col + VEC <= D) in the accumulation type. kAligned: the loads are single
// VEC-wide accesses; the launcher checks the pointers and widths. Rows::tail_finite(row): whether
// a quantized row's scale and bias are finite (always true for float rows, kQuant == false).

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T, int VEC, bool ALIGNED>
struct FloatRows {
  using acc_t = typename AccOf<T>::type;
  static constexpr int kVec = VEC;
  static constexpr bool kAligned = ALIGNED;
  static constexpr bool kQuant = false;
  const T* w;
  int64_t d;
  __device__ __forceinline__ void load(int64_t row, int64_t col, acc_t (&v)[VEC]) const {
    T x[VEC];
    cuda::load_pack<VEC, ALIGNED>(w + row * d + col, x);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<acc_t>(x[k]);
  }
  __device__ __forceinline__ bool tail_finite(int64_t) const { return true; }
};

// Fused row-wise rows (recsys_kernels/ops/rowwise.py): 8-bit: D codes, fp32 scale, fp32 bias;
// 4-bit: D / 2 bytes (low nibble first), fp16 scale, fp16 bias. value = code * scale + bias with
// the reference's rounding (rowwise_common.h::dequant: a rounded product, then a rounded sum).
// With ALIGNED (launcher: D % 8 == 0 and the table 8-byte (8-bit) / 4-byte (4-bit) aligned), every
// row start, code group and the scale/bias pair are aligned for one wide load each.
template <int BITS, int VEC, bool ALIGNED>
struct QuantRows {
  using acc_t = float;
  static constexpr int kVec = VEC;
  static constexpr bool kAligned = ALIGNED;
  static constexpr bool kQuant = true;
  static_assert(BITS == 8 || VEC % 2 == 0, "4-bit rows pack element pairs");
  const uint8_t* w;
  int64_t d;
  int64_t cols;  // bytes per packed row

  __device__ __forceinline__ void params(const uint8_t* r, float& scale, float& bias) const {
    if constexpr (BITS == 8) {
      if constexpr (ALIGNED) {
        const float2 sb = *reinterpret_cast<const float2*>(r + d);
        scale = sb.x;
        bias = sb.y;
      } else {
        memcpy(&scale, r + d, sizeof(float));
        memcpy(&bias, r + d + sizeof(float), sizeof(float));
      }
    } else {
      uint16_t h[2];
      if constexpr (ALIGNED) {
        const uint32_t sb = *reinterpret_cast<const uint32_t*>(r + d / 2);
        h[0] = static_cast<uint16_t>(sb & 0xFFFFu);  // little endian: scale first
        h[1] = static_cast<uint16_t>(sb >> 16);
      } else {
        memcpy(h, r + d / 2, sizeof(h));
      }
      scale = static_cast<float>(c10::Half(h[0], c10::Half::from_bits()));
      bias = static_cast<float>(c10::Half(h[1], c10::Half::from_bits()));
    }
  }

  __device__ __forceinline__ void load(int64_t row, int64_t col, float (&v)[VEC]) const {
    const uint8_t* r = w + row * cols;
    float scale, bias;
    params(r, scale, bias);
    if constexpr (BITS == 8) {
      uint8_t q[VEC];
      cuda::load_pack<VEC, ALIGNED>(r + col, q);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = rowwise::dequant(static_cast<float>(q[k]), scale, bias);
    } else {
      uint8_t q[VEC / 2];
      cuda::load_pack<VEC / 2, ALIGNED>(r + col / 2, q);
#pragma unroll
      for (int k = 0; k < VEC / 2; ++k) {
        v[2 * k] = rowwise::dequant(static_cast<float>(q[k] & 0xF), scale, bias);
        v[2 * k + 1] = rowwise::dequant(static_cast<float>(q[k] >> 4), scale, bias);
      }
    }
  }

  __device__ __forceinline__ bool tail_finite(int64_t row) const {
    float scale, bias;
    params(w + row * cols, scale, bias);
    return isfinite(scale) && isfinite(bias);
  }
};

// ----------------------------------------------------------------------------- device helpers
// max that propagates NaN (torch's amax / scatter_reduce "amax" do).
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) {
  return (b > a || b != b) ? b : a;
}

// The bag [start, end) of offsets, clamped so that bad offsets can never make the kernel read
// outside indices (the host raises for them after the launch). `report`: record a decreasing step.
template <typename Index>
__device__ __forceinline__ void bag_range(const Index& offsets, int64_t bag, int64_t nnz, bool report, int64_t* flags,
                                          int64_t& start, int64_t& end) {
  const int64_t o0 = offsets[bag];
  const int64_t o1 = offsets[bag + 1];
  if (report && o0 > o1) cuda::report_bad(reinterpret_cast<unsigned long long*>(flags + kFlagBadStep), bag);
  start = o0 < 0 ? 0 : (o0 > nnz ? nnz : o0);
  end = o1 < start ? start : (o1 > nnz ? nnz : o1);
}

// Row of index i under the bounds policy, and whether the position contributes (in range after the
// policy, not the padding row). An out-of-range index under "raise" is reported when `report`.
__device__ __forceinline__ bool resolve_row(int64_t i, int64_t p, int64_t n_rows, int bounds, int64_t padding_idx,
                                            bool report, int64_t* flags, int64_t& row) {
  bool valid = i >= 0 && i < n_rows;
  row = i;
  if (!valid) {
    if (bounds == kClamp && n_rows > 0) {  // an empty table cannot be clamped into: the host raises
      row = i < 0 ? 0 : n_rows - 1;
      valid = true;
    } else if (bounds == kRaise && report) {
      cuda::report_bad(reinterpret_cast<unsigned long long*>(flags + kFlagBadIndex), p);
    }
  }
  return valid && row != padding_idx;
}

// Stores VEC outputs at p. `width` (a power of two): the widest access, in elements, that the
// output address allows (p is a multiple of width elements); VEC-wide when width >= VEC.
template <int W, int VEC, typename OutT>
__device__ __forceinline__ void store_chunks(OutT* p, const OutT (&o)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; j += W) {
    OutT t[W];
#pragma unroll
    for (int k = 0; k < W; ++k) t[k] = o[j + k];
    cuda::store_pack<W, true>(p + j, t);
  }
}

template <int VEC, typename OutT>
__device__ __forceinline__ void store_row(OutT* p, const OutT (&o)[VEC], int width) {
  if (width >= VEC) {
    store_chunks<VEC, VEC>(p, o);
  } else if (VEC >= 4 && width >= VEC / 2) {
    store_chunks<(VEC >= 4 ? VEC / 2 : 1), VEC>(p, o);
  } else if (VEC >= 8 && width >= VEC / 4) {
    store_chunks<(VEC >= 8 ? VEC / 4 : 1), VEC>(p, o);
  } else {
    store_chunks<1, VEC>(p, o);
  }
}

// ----------------------------------------------------------------------------- the pooling loop
// One warp (all 32 lanes, warp-uniform arguments) pools bag `bag` of one table into out_row[0, d):
// validates the bag's offsets and indices into `flags` (that table's set), gathers and pools the
// rows in the accumulation type, and writes the result converted to OutT. `tpr_log2`: log2 of the
// lanes per group (tpr_log2_for). `store_width`: see store_row.
template <typename Rows, typename OutT, typename Index>
__device__ __forceinline__ void pool_bag(const Rows& rows, const Index& indices, const Index& offsets,
                                         const typename Rows::acc_t* psw, int64_t bag, int64_t nnz, int64_t n_rows,
                                         int64_t d, int mode, int bounds, int64_t padding_idx, int tpr_log2,
                                         int store_width, OutT* out_row, int64_t* flags) {
  using acc_t = typename Rows::acc_t;
  constexpr int VEC = Rows::kVec;
  const int lane = threadIdx.x % kWarpSize;
  const int tpr = 1 << tpr_log2;       // lanes per group
  const int sub = lane & (tpr - 1);    // lane within the group: which columns
  const int group = lane >> tpr_log2;  // which group: which indices
  const int groups = kWarpSize >> tpr_log2;
  const acc_t init = mode == kMax ? -INFINITY : acc_t(0);

  int64_t start, end;
  bag_range(offsets, bag, nnz, lane == 0, flags, start, end);
  int64_t c0 = 0;
  do {  // column chunks of tpr * VEC; at least one pass, so that D == 0 still checks the indices
    const int64_t col = c0 + static_cast<int64_t>(sub) * VEC;
    const bool active = col < d;
    const bool report = c0 == 0;  // the first chunk's lanes check and report their positions
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = init;
    int64_t count = 0;  // contributing indices seen by this group

    // Batches of 32 positions: lane j reads and checks position b0 + j (one coalesced load of the
    // indices for the whole warp, before any row load), then the groups take the batch's rows from
    // the lanes by shuffles, kUnroll at a time. The trip counts are warp-uniform, as the shuffles
    // need; a group's positions and their order are those of a plain round-robin over the bag.
    for (int64_t b0 = start; b0 < end; b0 += kWarpSize) {
      const int64_t n = end - b0 < kWarpSize ? end - b0 : kWarpSize;  // positions in this batch
      int64_t my_row = 0;
      bool my_keep = false;
      acc_t my_wgt = acc_t(1);
      if (lane < n) {
        const int64_t p = b0 + lane;
        const int64_t i = indices[p];
        my_keep = resolve_row(i, p, n_rows, bounds, padding_idx, report, flags, my_row);
        if (psw != nullptr) my_wgt = psw[p];
        if constexpr (Rows::kQuant) {
          // The reference dequantizes every gathered row (index clamped), contributing or not,
          // and raises for a non-finite scale or bias.
          if (report && n_rows > 0) {
            const int64_t g = i < 0 ? 0 : (i >= n_rows ? n_rows - 1 : i);
            if (!rows.tail_finite(g))
              cuda::report_bad(reinterpret_cast<unsigned long long*>(flags + kFlagBadScale), p);
          }
        }
      }
      const unsigned keep_mask = __ballot_sync(kFullMask, my_keep);
      for (int j0 = 0; j0 < n; j0 += groups * kUnroll) {
        int64_t row[kUnroll];
        bool keep[kUnroll];
        acc_t wgt[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int j = j0 + u * groups + group;  // < 32 + groups * kUnroll; past n: kept by no lane
          row[u] = __shfl_sync(kFullMask, my_row, j % kWarpSize);
          wgt[u] = psw != nullptr ? __shfl_sync(kFullMask, my_wgt, j % kWarpSize) : acc_t(1);
          keep[u] = j < n && ((keep_mask >> j) & 1u);
        }
        acc_t v[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (keep[u] && active) {
            rows.load(row[u], col, v[u]);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[u][k] = acc_t(0);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!keep[u]) continue;
          ++count;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            // a rounded product (never contracted into an FMA with the sum, which nvcc decides per
            // kernel): the single-table and the grouped kernels give the same bits, as the reference
            const acc_t x = rowwise::mul_rn(v[u][k], wgt[u]);
            acc[k] = mode == kMax ? max_nan(acc[k], x) : acc[k] + x;
          }
        }
      }
    }

    // Combine the groups: butterfly over the lane bits above the group's own.
    for (int off = tpr; off < kWarpSize; off <<= 1) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t other = __shfl_xor_sync(kFullMask, acc[k], off);
        acc[k] = mode == kMax ? max_nan(acc[k], other) : acc[k] + other;
      }
      count += __shfl_xor_sync(kFullMask, count, off);
    }

    if (group == 0 && active) {
      OutT o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_t r = acc[k];
        if (mode == kMean) r = r / static_cast<acc_t>(count > 0 ? count : 1);
        else if (mode == kMax && count == 0) r = acc_t(0);
        o[k] = static_cast<OutT>(r);
      }
      store_row<VEC>(out_row + col, o, store_width);
    }
    c0 += static_cast<int64_t>(tpr) * VEC;
  } while (c0 < d);
}

// The single-table forward: warps take the bags of one table grid-stride (kWarpsPerBlock warps a
// block), and the first lane of the grid records offsets[0] and offsets[B].
template <typename Rows, typename OutT, typename Index>
__device__ __forceinline__ void pool_bags(const Rows& rows, const Index& indices, const Index& offsets,
                                          const typename Rows::acc_t* psw, OutT* out, int64_t n_bags, int64_t nnz,
                                          int64_t n_rows, int64_t d, int mode, int bounds, int64_t padding_idx,
                                          int tpr_log2, int64_t* flags) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  if (warp == 0 && lane == 0) {
    flags[kFlagFirst] = offsets[0];
    flags[kFlagLast] = offsets[n_bags];
  }
  // The launcher picks aligned readers only where the output rows allow VEC-wide stores too.
  constexpr int kStoreWidth = Rows::kAligned ? Rows::kVec : 1;
  for (int64_t bag = warp; bag < n_bags; bag += n_warps) {
    pool_bag(rows, indices, offsets, psw, bag, nnz, n_rows, d, mode, bounds, padding_idx, tpr_log2, kStoreWidth,
             out + bag * d, flags);
  }
}

// ----------------------------------------------------------------------------- host side
inline int parse_mode(std::string_view mode) {
  if (mode == "sum") return kSum;
  if (mode == "mean") return kMean;
  if (mode == "max") return kMax;
  TORCH_CHECK_VALUE(false, "mode must be one of ('sum', 'mean', 'max'), got '", std::string(mode), "'");
  return kSum;
}

inline int parse_bounds(std::string_view bounds) {
  if (bounds == "raise") return kRaise;
  if (bounds == "zero") return kZero;
  if (bounds == "clamp") return kClamp;
  TORCH_CHECK_VALUE(false, "bounds must be one of ('raise', 'zero', 'clamp'), got '", std::string(bounds), "'");
  return kRaise;
}

// log2 of the lanes per group for a table of width d read VEC columns per lane: enough lanes to
// cover D once, at most a warp.
inline int tpr_log2_for(int64_t d, int vec) {
  const int64_t lanes = (d + vec - 1) / vec;
  int l = 0;
  while (l < 5 && (int64_t{1} << l) < lanes) ++l;
  return l;
}

// `n_sets` flag sets, every entry kNone (offsets[0] and offsets[B] are always written by the kernels).
inline at::Tensor new_flags(const at::Tensor& like, int64_t n_sets = 1) {
  return at::full({n_sets * kFlagCount}, kNone, like.options().dtype(at::kLong));
}

// Raises the reference's error for one table's flag set `f` (already on the host), in the
// reference's order: ValueError for the offsets, IndexError for an empty table under "clamp" and
// for an out-of-range index under "raise", ValueError for a non-finite scale or bias. `indices` /
// `offsets`: the tensors the kernel read (for the values the messages quote).
inline void raise_for_flag_values(const int64_t* f, const at::Tensor& indices, const at::Tensor& offsets, int bounds,
                                  int64_t n_rows, int64_t nnz) {
  TORCH_CHECK_VALUE(f[kFlagFirst] == 0, "offsets[0] must be 0, got ", f[kFlagFirst]);
  if (f[kFlagBadStep] != kNone) {
    const int64_t i = f[kFlagBadStep];
    const at::Tensor pair = offsets.narrow(0, i, 2).to(at::kLong).to(at::kCPU);
    const int64_t start = pair.const_data_ptr<int64_t>()[0];
    TORCH_CHECK_VALUE(start <= nnz, "offsets must be non-decreasing (lengths >= 0) and end at the number of indices ",
                      nnz, ", got offsets[", i, "]=", start);
    TORCH_CHECK_VALUE(false, "offsets must be non-decreasing (lengths >= 0), got offsets[", i, "]=", start,
                      " > offsets[", i + 1, "]=", pair.const_data_ptr<int64_t>()[1]);
  }
  TORCH_CHECK_VALUE(f[kFlagLast] == nnz, "offsets[-1] (the sum of lengths) must equal the number of indices ", nnz,
                    ", got ", f[kFlagLast]);
  TORCH_CHECK_INDEX(!(bounds == kClamp && n_rows == 0 && nnz > 0),
                    "indices: bounds='clamp' cannot clamp into an empty table (weight has 0 rows)");
  if (bounds == kRaise && f[kFlagBadIndex] != kNone) {
    const int64_t bad = indices.narrow(0, f[kFlagBadIndex], 1).to(at::kLong).item<int64_t>();
    TORCH_CHECK_INDEX(false, "indices: index ", bad, " is out of range for a table of ", n_rows,
                      " rows (valid: 0 <= index < ", n_rows, "; bounds='raise')");
  }
  TORCH_CHECK_VALUE(f[kFlagBadScale] == kNone, "packed table has non-finite scales or biases");
}

}  // namespace recsys_kernels::embedding_bag_cuda_common
