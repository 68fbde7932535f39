// What the CUDA kernels of the scoring ops share (pair_scores_cuda.cu, candidate_scores_cuda.cu,
// topk_scores_cuda.cu): the argument checks with the CPU kernels' messages
// (csrc/scoring/scoring_cpu_common.h; the reference is recsys_kernels/ops/scoring.py), the
// validation kernels and their device error flags, the ranking key, and the gather-dot loop.
//
// Bad input. Every op first runs small validation kernels over its offsets and indices (and the
// scale / bias of the int8 rows the reference would dequantize); they record into one int64 flag
// tensor the first offsets value, the last, the first decreasing step, the smallest negative index
// and the largest index past the table (as its negation, so that every flag is an atomicMin), the
// first non-finite int8 row and the longest CSR list. The host reads the flags back (one small
// D2H copy, which waits for the stream) and raises the CPU kernel's error in the CPU kernel's
// order, before any scoring kernel runs: the scoring kernels only ever see valid input.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "embedding_bag/embedding_bag_cuda_common.cuh"
#include "embedding_bag/rowwise_common.h"
#include "scoring/scoring_cpu_common.h"
#include "scoring/scoring_cuda_keys.cuh"

namespace recsys_kernels::scoring_cuda {

using cuda::kFullMask;
using cuda::kWarpSize;
using embedding_bag_cuda_common::FloatRows;
using embedding_bag_cuda_common::IndexPtr;
using embedding_bag_cuda_common::QuantRows;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

// values [n] / ids [n] of keys [n] (keys row-major [rows, k], outputs likewise).
static __global__ void __launch_bounds__(kThreads)
decode_keys_kernel(const int64_t* __restrict__ keys, int64_t n, float* __restrict__ values, int64_t* __restrict__ ids) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride)
    decode_key(keys[j], values[j], ids[j]);
}

inline void launch_decode(const at::Tensor& keys, at::Tensor& values, at::Tensor& ids) {
  const int64_t n = keys.numel();
  if (n == 0) return;
  decode_keys_kernel<<<cuda::grid_for(n, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      keys.const_data_ptr<int64_t>(), n, values.data_ptr<float>(), ids.data_ptr<int64_t>());
  RK_CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------- host checks
// The CPU kernels' metadata checks, messages and table view (scoring_cpu_common.h), one copy.
using scoring_cpu::candidate_inputs;
using scoring_cpu::CandidateInputs;
using scoring_cpu::check_index_tensor;
using scoring_cpu::check_item_count;
using scoring_cpu::check_pair_grad;
using scoring_cpu::check_queries;
using scoring_cpu::index_pair;
using scoring_cpu::Kind;
using scoring_cpu::pair_inputs;
using scoring_cpu::PairInputs;
using scoring_cpu::raise_non_finite;
using scoring_cpu::Table;
using scoring_cpu::table_view;

// ValueError unless every given tensor is a CUDA tensor on `first`'s device (a CPU tensor among
// CUDA ones would otherwise be read through a host pointer on the device).
inline void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& first, const char* first_name) {
  TORCH_CHECK_VALUE(first.is_cuda(), first_name, " must be a CUDA tensor for the CUDA kernel, got ", first.device());
  check_device(t, name, first.device(), first_name);
}

// fp32 item bias [I] (converted once), or an undefined tensor.
inline at::Tensor bias_f32(const std::optional<at::Tensor>& item_bias, int64_t n_items, const at::Tensor& like,
                           const char* like_name) {
  if (!item_bias.has_value()) return {};
  check_float_dtype(*item_bias, "item_bias");
  check_dim(*item_bias, "item_bias", 1);
  TORCH_CHECK_VALUE(item_bias->size(0) == n_items, "item_bias must have one value per item (", n_items, "), got ",
                    item_bias->size(0));
  check_cuda(*item_bias, "item_bias", like, like_name);
  return item_bias->to(at::kFloat).contiguous();
}

// ----------------------------------------------------------------------------- error flags
// One int64 flag tensor per call; every slot starts at kNone and only ever decreases (atomicMin).
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
constexpr int kOffFirst = 0;  // offsets[0] (written, not min-reduced)
constexpr int kOffLast = 1;   // offsets[n] (written)
constexpr int kBadStep = 2;   // smallest b with offsets[b] > offsets[b + 1]
constexpr int kMaxLenNeg = 3;  // -(longest list), kNone when there are no lists
constexpr int kBadScale = 4;  // smallest position / row whose int8 row has a non-finite scale or bias
// Per index tensor (slot base kIndexA or kIndexB): + 0 the smallest negative index,
// + 1 -(the largest index >= the table's rows).
constexpr int kIndexA = 5;
constexpr int kIndexB = 7;
constexpr int kFlagCount = 9;

inline at::Tensor new_flags(const at::Tensor& like) {
  return at::full({kFlagCount}, kNone, like.options().dtype(at::kLong));
}

__device__ __forceinline__ void flag_min(int64_t* flags, int slot, int64_t v) {
  atomicMin(reinterpret_cast<long long*>(flags + slot), static_cast<long long>(v));
}

// Range of idx[0, n) against [0, n_rows) into slots base, base + 1; with `q8` (an int8 table), the
// in-range positions whose row has a non-finite scale or bias into kBadScale.
template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
check_index_kernel(const IndexT* __restrict__ idx, int64_t n, int64_t n_rows, int base, const uint8_t* __restrict__ q8,
                   int64_t q8_dim, int64_t* __restrict__ flags) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const IndexPtr<IndexT> ix{idx};
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n; p += stride) {
    const int64_t v = ix[p];
    if (v < 0) {
      flag_min(flags, base, v);
    } else if (v >= n_rows) {
      flag_min(flags, base + 1, -v);
    } else if (q8 != nullptr) {
      const uint8_t* tail = q8 + v * (q8_dim + 8) + q8_dim;
      float sb[2];
      memcpy(sb, tail, sizeof(sb));  // rows of D + 8 bytes: the tail can sit at any alignment
      if (!isfinite(sb[0]) || !isfinite(sb[1])) flag_min(flags, kBadScale, p);
    }
  }
}

// CSR offsets [n_lists + 1]: first / last value, the first decreasing step, the longest list.
template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
check_offsets_kernel(const IndexT* __restrict__ offsets, int64_t n_lists, int64_t* __restrict__ flags) {
  const IndexPtr<IndexT> off{offsets};
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    flags[kOffFirst] = off[0];
    flags[kOffLast] = off[n_lists];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < n_lists; b += stride) {
    const int64_t len = off[b + 1] - off[b];
    if (len < 0) flag_min(flags, kBadStep, b);
    else flag_min(flags, kMaxLenNeg, -len);
  }
}

// Every row of an int8 table [n_rows, dim + 8]: the first non-finite scale or bias.
static __global__ void __launch_bounds__(kThreads)
check_q8_rows_kernel(const uint8_t* __restrict__ q8, int64_t n_rows, int64_t dim, int64_t* __restrict__ flags) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_rows; r += stride) {
    float sb[2];
    memcpy(sb, q8 + r * (dim + 8) + dim, sizeof(sb));
    if (!isfinite(sb[0]) || !isfinite(sb[1])) flag_min(flags, kBadScale, r);
  }
}

// Host launchers (current stream).
inline void launch_check_index(const at::Tensor& idx, int64_t n_rows, int base, const Table* q8, at::Tensor& flags) {
  const int64_t n = idx.numel();
  if (n == 0) return;
  const uint8_t* rows = q8 != nullptr && q8->kind == Kind::kQ8 ? q8->data : nullptr;
  const int64_t dim = q8 != nullptr ? q8->dim : 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "scoring_check_index", [&] {
    check_index_kernel<index_t><<<cuda::grid_for(n, kThreads), kThreads, 0, stream>>>(
        idx.const_data_ptr<index_t>(), n, n_rows, base, rows, dim, flags.data_ptr<int64_t>());
  });
  RK_CUDA_LAUNCH_CHECK();
}

inline void launch_check_offsets(const at::Tensor& offsets, at::Tensor& flags) {
  const int64_t n_lists = offsets.numel() - 1;  // offsets.numel() >= 1: checked by the caller
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "scoring_check_offsets", [&] {
    check_offsets_kernel<index_t><<<cuda::grid_for(n_lists, kThreads), kThreads, 0, stream>>>(
        offsets.const_data_ptr<index_t>(), n_lists, flags.data_ptr<int64_t>());
  });
  RK_CUDA_LAUNCH_CHECK();
}

inline void launch_check_q8_rows(const Table& t, at::Tensor& flags) {
  if (t.kind != Kind::kQ8 || t.rows == 0) return;
  check_q8_rows_kernel<<<cuda::grid_for(t.rows, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      t.data, t.rows, t.dim, flags.data_ptr<int64_t>());
  RK_CUDA_LAUNCH_CHECK();
}

// The flags on the host (waits for the stream).
struct HostFlags {
  at::Tensor host;
  explicit HostFlags(const at::Tensor& flags) : host(flags.to(at::kCPU)) {}
  int64_t operator[](int slot) const { return host.const_data_ptr<int64_t>()[slot]; }
  int64_t max_len() const { return (*this)[kMaxLenNeg] == kNone ? 0 : -(*this)[kMaxLenNeg]; }
};

// The CPU kernels' errors, in their order (scoring_cpu_common.h).
inline void raise_offsets(const HostFlags& f, int64_t nnz, const char* name) {
  TORCH_CHECK_VALUE(f[kOffFirst] == 0, name, "[0] must be 0, got ", f[kOffFirst]);
  RK_CHECK_VALUE(f[kBadStep] == kNone, name, "must be non-decreasing");
  TORCH_CHECK_VALUE(f[kOffLast] == nnz, name, "[-1] must equal the number of items listed (", nnz, "), got ",
                    f[kOffLast]);
}

// IndexError naming the smallest index when it is negative, else the largest (as the reference).
inline void raise_index(const HostFlags& f, int base, int64_t n_rows, const char* name) {
  int64_t bad = 0;
  bool found = false;
  if (f[base] != kNone) {
    bad = f[base];
    found = true;
  } else if (f[base + 1] != kNone) {
    bad = -f[base + 1];
    found = true;
  }
  if (found) TORCH_CHECK_INDEX(false, name, ": index ", bad, " out of range [0, ", n_rows, ")");
}

inline void raise_scale(const HostFlags& f) {
  if (f[kBadScale] != kNone) raise_non_finite();
}

// ----------------------------------------------------------------------------- gather-dot
// Row readers (embedding_bag_cuda_common.cuh): load(row, col, v[VEC]) gives fp32 values, int8 rows
// dequantized as code * scale + bias with the reference's two roundings.
//
// gather_dot: one group of `tpr` lanes (a power of two <= 32) per pair; lane `sub` of the group
// covers columns sub * VEC + j * tpr * VEC, an fma chain per lane, then a butterfly over the group.
// The order of the float operations depends only on D, VEC and tpr, never on the table's dtype, so
// an int8 table scores bit-identically to its dequantized fp32 table (the launcher picks VEC and
// tpr from D and the pointers' alignment alone).
// `pairs(p, u, i)` gives the query row and item row of pair p (valid: checked before the launch).
template <typename QRows, typename IRows, typename Pairs, bool KEYS>
__global__ void __launch_bounds__(kThreads)
gather_dot_kernel(const QRows q, const IRows items, const Pairs pairs, const float* __restrict__ bias, int64_t n,
                  int64_t d, int tpr_log2, float* __restrict__ out_scores, int64_t* __restrict__ out_keys) {
  constexpr int VEC = IRows::kVec;
  static_assert(QRows::kVec == VEC, "one column mapping for both rows");
  const int lane = threadIdx.x % kWarpSize;
  const int tpr = 1 << tpr_log2;
  const int sub = lane & (tpr - 1);
  const int group = lane >> tpr_log2;
  const int64_t groups = kWarpSize >> tpr_log2;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t p0 = warp * groups; p0 < n; p0 += n_warps * groups) {  // warp-uniform loop
    const int64_t p = p0 + group;
    const bool live = p < n;
    int64_t u = 0, i = 0;
    if (live) pairs(p, u, i);
    float acc = 0.0f;
    if (live) {
      for (int64_t col = static_cast<int64_t>(sub) * VEC; col < d; col += static_cast<int64_t>(tpr) * VEC) {
        float a[VEC], b[VEC];
        q.load(u, col, a);
        items.load(i, col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc = fmaf(a[k], b[k], acc);
      }
    }
    for (int o = tpr / 2; o > 0; o /= 2) acc += __shfl_xor_sync(kFullMask, acc, o);
    if (live && sub == 0) {
      const float s = bias != nullptr ? acc + bias[i] : acc;
      if constexpr (KEYS) out_keys[p] = rank_key(s, i);
      else out_scores[p] = s;
    }
  }
}

// log2 of the lanes per pair: enough to cover D once with VEC columns a lane, at most a warp.
inline int tpr_log2_for(int64_t d, int vec) {
  const int64_t lanes = (d + vec - 1) / vec;
  int l = 0;
  while (l < 5 && (int64_t{1} << l) < lanes) ++l;
  return l;
}

// The vectorised readers (VEC = 4) need D % 8 == 0 (int8 rows: the scale / bias pair is then
// 8-byte aligned; the same condition for every dtype keeps one summation order) and 16-byte
// aligned tables.
inline bool use_vec(int64_t d, const void* a, const void* b) {
  return d % 8 == 0 && cuda::aligned(a, 16) && cuda::aligned(b, 16);
}

// Calls fn(rows) with the reader of table t for VEC (ALIGNED when VEC > 1).
template <int VEC, typename Fn>
void with_item_rows(const Table& t, Fn&& fn) {
  constexpr bool kAl = VEC > 1;
  switch (t.kind) {
    case Kind::kF32: fn(FloatRows<float, VEC, kAl>{reinterpret_cast<const float*>(t.data), t.dim}); break;
    case Kind::kF16: fn(FloatRows<c10::Half, VEC, kAl>{reinterpret_cast<const c10::Half*>(t.data), t.dim}); break;
    case Kind::kBF16:
      fn(FloatRows<c10::BFloat16, VEC, kAl>{reinterpret_cast<const c10::BFloat16*>(t.data), t.dim});
      break;
    case Kind::kQ8: fn(QuantRows<8, VEC, kAl>{t.data, t.dim, t.row_bytes}); break;
  }
}

template <typename QRows, typename IRows, typename Pairs, bool KEYS>
void launch_gather_dot(const QRows& q, const IRows& items, const Pairs& pairs, const float* bias, int64_t n, int64_t d,
                       float* out_scores, int64_t* out_keys) {
  if (n == 0) return;
  const int tpr_log2 = tpr_log2_for(d, IRows::kVec);
  const int64_t per_block = static_cast<int64_t>(kWarpsPerBlock) * (kWarpSize >> tpr_log2);
  gather_dot_kernel<QRows, IRows, Pairs, KEYS>
      <<<cuda::grid_for(n, per_block), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          q, items, pairs, bias, n, d, tpr_log2, out_scores, out_keys);
  RK_CUDA_LAUNCH_CHECK();
}

}  // namespace recsys_kernels::scoring_cuda
