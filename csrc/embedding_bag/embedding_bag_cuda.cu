// CUDA kernels of embedding_bag (forward) and embedding_bag_backward. The specification is the
// reference in recsys_kernels/ops/embedding.py: modes sum / mean / max, per-sample weights,
// padding_idx, bounds "raise" / "zero" / "clamp", empty bags -> 0, fp32 accumulation (fp64 for
// fp64 tables), uint8 fused row-wise tables (8-bit and 4-bit), output dtype rules.
//
// Forward: one warp per bag (grid-stride over bags); the per-bag loop, the row readers and the
// error-flag protocol live in embedding_bag_cuda_common.cuh, shared with embedding_bag_grouped.
//
// Bad input: the kernels never read outside the tensors, whatever the offsets and indices hold.
// They write into a small int64 device tensor (flags, one set: see embedding_bag_cuda_common.cuh)
// the first out-of-range index position, the first decreasing offset step, offsets[0], offsets[B]
// and the first position whose gathered quantized row has a non-finite scale or bias; the host
// copies it back after the launch (one small D2H copy, which waits for the stream) and raises the
// reference's errors in the reference's order: ValueError for offsets first, then IndexError for
// indices, then ValueError for scales.
//
// Backward (dense [N, D] or per-index rows [nnz, D], and the per-sample-weight gradient) is
// deterministic: the dense gradient sorts the contributing positions by row (a stable sort, so
// positions stay in index order within a row) and one warp sums each row's contributions in that
// order. No floating-point atomics.
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "embedding_bag/embedding_bag_cuda_common.cuh"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels {
// A named namespace: nvcc flags unused static constexpr members of templates in anonymous ones.
namespace embedding_bag_cuda_impl {

using namespace embedding_bag_cuda_common;

// ----------------------------------------------------------------------------- forward kernel
template <typename Rows, typename OutT, typename IndexT>
__global__ void __launch_bounds__(kThreads)
embedding_bag_fwd_kernel(const Rows rows, const IndexT* __restrict__ indices, const IndexT* __restrict__ offsets,
                         const typename Rows::acc_t* __restrict__ psw, OutT* __restrict__ out, int64_t n_bags,
                         int64_t nnz, int64_t n_rows, int64_t d, int mode, int bounds, int64_t padding_idx,
                         int tpr_log2, int64_t* __restrict__ flags) {
  pool_bags(rows, IndexPtr<IndexT>{indices}, IndexPtr<IndexT>{offsets}, psw, out, n_bags, nnz, n_rows, d, mode, bounds,
            padding_idx, tpr_log2, flags);
}


// ----------------------------------------------------------------------------- backward kernels
// Scalar accesses, one lane per column (lanes stride D by 32): the backward is a training-time
// path whose first duty is to be deterministic and to match the reference exactly.

// Per bag: validate (as the forward), write each position's bag and its contributing row (-1 when
// the position contributes nothing), the bag's count of contributing positions, and in max mode
// the first position attaining each column's max (nnz where none does, or where the max is NaN:
// the reference compares src == best, which is false for NaN).
template <typename T, typename IndexT>
__global__ void __launch_bounds__(kThreads)
bwd_bags_kernel(const T* __restrict__ w, const IndexT* __restrict__ indices, const IndexT* __restrict__ offsets,
                int64_t* __restrict__ bag_of, int64_t* __restrict__ row_of, int64_t* __restrict__ counts,
                int64_t* __restrict__ first, int64_t n_bags, int64_t nnz, int64_t n_rows, int64_t d, int mode,
                int bounds, int64_t padding_idx, int64_t* __restrict__ flags) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  if (warp == 0 && lane == 0) {
    flags[kFlagFirst] = static_cast<int64_t>(offsets[0]);
    flags[kFlagLast] = static_cast<int64_t>(offsets[n_bags]);
  }
  for (int64_t bag = warp; bag < n_bags; bag += n_warps) {
    int64_t start, end;
    bag_range(offsets, bag, nnz, lane == 0, flags, start, end);
    int64_t count = 0;
    for (int64_t p = start + lane; p < end; p += kWarpSize) {
      int64_t row;
      const bool keep = resolve_row(static_cast<int64_t>(indices[p]), p, n_rows, bounds, padding_idx, true, flags, row);
      bag_of[p] = bag;
      row_of[p] = keep ? row : -1;
      count += keep ? 1 : 0;
    }
    for (int off = kWarpSize / 2; off > 0; off /= 2) count += __shfl_xor_sync(kFullMask, count, off);
    if (lane == 0) counts[bag] = count;
    if (mode != kMax) continue;
    for (int64_t col = lane; col < d; col += kWarpSize) {
      acc_t m = -INFINITY;
      int64_t pos = nnz;
      bool nan = false;
      for (int64_t p = start; p < end; ++p) {
        int64_t row;
        if (!resolve_row(static_cast<int64_t>(indices[p]), p, n_rows, bounds, padding_idx, false, flags, row)) continue;
        const acc_t v = static_cast<acc_t>(w[row * d + col]);
        if (v != v) {
          nan = true;
        } else if (v > m || (v == m && pos == nnz)) {  // the second case: a -inf max (v == m == -inf)
          m = v;
          pos = p;
        }
      }
      first[bag * d + col] = nan ? nnz : pos;
    }
  }
}

// d out[bag(p), col] / d (row p's contribution), before the per-sample weight: the output gradient
// in the accumulation dtype, divided by the bag's count (mean), routed to the first maximum (max).
template <typename acc_t>
struct PositionGrad {
  const acc_t* go;  // [B, D], accumulation dtype
  const int64_t* bag_of;
  const int64_t* row_of;
  const int64_t* counts;
  const int64_t* first;
  int64_t d;
  int mode;
  __device__ __forceinline__ acc_t operator()(int64_t p, int64_t bag, int64_t col) const {
    acc_t g = go[bag * d + col];
    if (mode == kMean) {
      const int64_t c = counts[bag];
      g = g / static_cast<acc_t>(c > 0 ? c : 1);
    } else if (mode == kMax) {
      g = first[bag * d + col] == p ? g : acc_t(0);
    }
    return g;
  }
};

// One warp per position: the sparse gradient row (weight dtype) and the per-sample-weight gradient.
template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_positions_kernel(const T* __restrict__ w, const PositionGrad<typename AccOf<T>::type> pg,
                     const typename AccOf<T>::type* __restrict__ psw, T* __restrict__ grad_rows,
                     typename AccOf<T>::type* __restrict__ grad_psw, int64_t nnz) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t d = pg.d;
  for (int64_t p = warp; p < nnz; p += n_warps) {
    const int64_t row = pg.row_of[p];
    const int64_t bag = pg.bag_of[p];
    const acc_t s = psw != nullptr ? psw[p] : acc_t(1);
    acc_t dot = 0;
    for (int64_t col = lane; col < d; col += kWarpSize) {
      acc_t g = 0;
      if (row >= 0) {
        g = pg(p, bag, col);
        dot += g * static_cast<acc_t>(w[row * d + col]);
      }
      // a skipped position's row is 0, whatever its weight (0 * inf would be NaN)
      if (grad_rows != nullptr) grad_rows[p * d + col] = static_cast<T>(row >= 0 ? g * s : acc_t(0));
    }
    if (grad_psw != nullptr) {
      for (int off = kWarpSize / 2; off > 0; off /= 2) dot += __shfl_xor_sync(kFullMask, dot, off);
      if (lane == 0) grad_psw[p] = dot;
    }
  }
}

// Dense gradient. The contributing positions, sorted by row (stably: in index order within a row),
// form one segment per distinct row; a segment is cut into chunks of kChunk positions, so that a hot
// row (a power-law table's row 0 can take a large share of a batch) is summed by many warps. A warp
// sums one chunk in position order; a one-chunk segment writes its row directly, a longer one writes
// its chunk sums to `partials`, which bwd_dense_combine_kernel adds up in chunk order. The grouping
// is fixed by the sorted positions alone: the same bits on every run.
constexpr int64_t kChunk = 128;

struct DenseSegments {
  const int64_t* rows;        // [S] row of each segment (-1: the positions that contribute nothing)
  const int64_t* start;       // [S] first sorted position of the segment
  const int64_t* len;         // [S] positions in the segment
  const int64_t* n_chunks;    // [S] ceil(len / kChunk)
  const int64_t* chunk_base;  // [S] first chunk of the segment
  const int64_t* part_base;   // [S] first row of `partials` of a multi-chunk segment
  const int64_t* chunk_seg;   // [C] segment of each chunk
  const int64_t* perm;        // [nnz] position at each sorted slot
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_dense_chunks_kernel(const PositionGrad<typename AccOf<T>::type> pg, const typename AccOf<T>::type* __restrict__ psw,
                        const DenseSegments sg, int64_t total_chunks, typename AccOf<T>::type* __restrict__ partials,
                        T* __restrict__ grad_weight) {
  using acc_t = typename AccOf<T>::type;
  constexpr int kU = 4;  // positions per step: independent loads in flight
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t d = pg.d;
  for (int64_t c = warp; c < total_chunks; c += n_warps) {
    const int64_t s = sg.chunk_seg[c];
    const int64_t row = sg.rows[s];
    if (row < 0) continue;  // the positions that contribute nothing
    const int64_t k = c - sg.chunk_base[s];
    const int64_t seg_end = sg.start[s] + sg.len[s];
    const int64_t j0 = sg.start[s] + k * kChunk;
    const int64_t j1 = j0 + kChunk < seg_end ? j0 + kChunk : seg_end;
    const bool single = sg.n_chunks[s] == 1;
    for (int64_t col = lane; col < d; col += kWarpSize) {
      acc_t acc = 0;
      for (int64_t j = j0; j < j1; j += kU) {
        int64_t p[kU];
        acc_t g[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) p[u] = j + u < j1 ? sg.perm[j + u] : -1;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          g[u] = 0;
          if (p[u] >= 0) {
            g[u] = pg(p[u], pg.bag_of[p[u]], col);
            if (psw != nullptr) g[u] = g[u] * psw[p[u]];
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (p[u] >= 0) acc += g[u];
      }
      if (single) grad_weight[row * d + col] = static_cast<T>(acc);
      else partials[(sg.part_base[s] + k) * d + col] = acc;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_dense_combine_kernel(const DenseSegments sg, int64_t n_segs, int64_t d,
                         const typename AccOf<T>::type* __restrict__ partials, T* __restrict__ grad_weight) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t s = warp; s < n_segs; s += n_warps) {
    const int64_t row = sg.rows[s];
    const int64_t n = sg.n_chunks[s];
    if (row < 0 || n <= 1) continue;
    const acc_t* part = partials + sg.part_base[s] * d;
    for (int64_t col = lane; col < d; col += kWarpSize) {
      acc_t acc = 0;
      for (int64_t k = 0; k < n; ++k) acc += part[k * d + col];
      grad_weight[row * d + col] = static_cast<T>(acc);
    }
  }
}

// ----------------------------------------------------------------------------- host: checks
struct Args {
  int mode;
  int bounds;
  int64_t padding_idx;  // -1: none
  int64_t n_rows, d, n_bags, nnz;
};

bool is_table_float(at::ScalarType t) { return is_float_dtype(t) || t == at::kDouble; }

// The metadata checks of the front door, repeated for direct calls of the native op (the front
// door has done them already). Returns the shared arguments; D is the unpacked width.
Args check_args(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                const std::optional<at::Tensor>& psw, std::string_view mode, std::optional<int64_t> padding_idx,
                std::string_view bounds, int64_t bits) {
  Args a{};
  a.mode = parse_mode(mode);
  a.bounds = parse_bounds(bounds);
  check_dim(weight, "weight", 2);
  const bool quantized = weight.scalar_type() == at::kByte;
  if (quantized) {
    check_bits(bits);
    const int64_t min_cols = bits == 8 ? 9 : 5;
    RK_CHECK_VALUE(weight.size(1) >= min_cols, "weight:", "a ", bits, "-bit row-wise table needs at least ", min_cols,
                   " bytes per row, got ", weight.size(1));
  } else {
    check_dtype(weight, "weight", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble, at::kByte});
  }
  check_dtype(indices, "indices", {at::kInt, at::kLong});
  check_dtype(offsets, "offsets", {at::kInt, at::kLong});
  check_dim(indices, "indices", 1);
  check_dim(offsets, "offsets", 1);
  RK_CHECK_VALUE(offsets.numel() >= 1, "offsets", "must have B + 1 >= 1 entries, got an empty tensor");
  const c10::Device device = weight.device();
  TORCH_CHECK_VALUE(device.is_cuda(), "weight must be a CUDA tensor for the CUDA kernel, got ", device);
  check_device(indices, "indices", device, "weight");
  check_device(offsets, "offsets", device, "weight");
  a.n_rows = weight.size(0);
  a.d = quantized ? rowwise::unpacked_dim(weight.size(1), bits) : weight.size(1);
  a.n_bags = offsets.numel() - 1;
  a.nnz = indices.numel();
  if (psw.has_value()) {
    check_dtype(*psw, "per_sample_weights", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_dim(*psw, "per_sample_weights", 1);
    RK_CHECK_VALUE(psw->numel() == a.nnz, "per_sample_weights", "must have one weight per index (", a.nnz,
                   "), got shape ", psw->sizes());
    check_device(*psw, "per_sample_weights", device, "weight");
  }
  a.padding_idx = -1;
  if (padding_idx.has_value()) {
    const int64_t p = *padding_idx;
    // the ops' rule on every device, the reference's meaning (the front door passes None or [0, N)):
    // < N, a negative one names no row
    RK_CHECK_VALUE(p < a.n_rows, "padding_idx", "must be < ", a.n_rows, " for a table of ", a.n_rows,
                   " rows (or negative: none), got ", p);
    a.padding_idx = p < 0 ? -1 : p;
  }
  return a;
}

// One index dtype for the kernels (the front door promotes mixed int32/int64 to int64 too).
std::pair<at::Tensor, at::Tensor> same_index_dtype(const at::Tensor& indices, const at::Tensor& offsets) {
  if (indices.scalar_type() == offsets.scalar_type()) return {indices.contiguous(), offsets.contiguous()};
  return {indices.to(at::kLong).contiguous(), offsets.to(at::kLong).contiguous()};
}

// Reads the flags back (waits for the stream) and raises the reference's errors, in its order.
void raise_for_flags(const at::Tensor& flags, const at::Tensor& indices, const at::Tensor& offsets, const Args& a) {
  const at::Tensor host = flags.to(at::kCPU);
  raise_for_flag_values(host.const_data_ptr<int64_t>(), indices, offsets, a.bounds, a.n_rows, a.nnz);
}

// ----------------------------------------------------------------------------- host: forward
template <typename Rows, typename OutT, typename IndexT>
void launch_fwd(const Rows& rows, const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& psw,
                at::Tensor& out, const Args& a, const at::Tensor& flags) {
  const unsigned blocks = cuda::grid_for(a.n_bags, kWarpsPerBlock);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  using acc_t = typename Rows::acc_t;
  embedding_bag_fwd_kernel<Rows, OutT, IndexT><<<blocks, kThreads, 0, stream>>>(
      rows, indices.const_data_ptr<IndexT>(), offsets.const_data_ptr<IndexT>(),
      psw.defined() ? psw.const_data_ptr<acc_t>() : nullptr, out.data_ptr<OutT>(), a.n_bags, a.nnz, a.n_rows, a.d,
      a.mode, a.bounds, a.padding_idx, tpr_log2_for(a.d, Rows::kVec), flags.data_ptr<int64_t>());
  RK_CUDA_LAUNCH_CHECK();
}

// Picks the vectorised or the scalar reader for a float table.
template <typename T, typename OutT, typename IndexT>
void fwd_float(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& psw,
               at::Tensor& out, const Args& a, const at::Tensor& flags) {
  constexpr int kVec = 16 / sizeof(T);
  const T* w = weight.const_data_ptr<T>();
  const bool vec = a.d % kVec == 0 && cuda::aligned(w, 16) && cuda::aligned(out.data_ptr(), kVec * sizeof(OutT));
  if (vec) launch_fwd<FloatRows<T, kVec, true>, OutT, IndexT>({w, a.d}, indices, offsets, psw, out, a, flags);
  else launch_fwd<FloatRows<T, 1, false>, OutT, IndexT>({w, a.d}, indices, offsets, psw, out, a, flags);
}

template <int BITS, typename IndexT>
void fwd_quant(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& psw,
               at::Tensor& out, const Args& a, const at::Tensor& flags) {
  const uint8_t* w = weight.const_data_ptr<uint8_t>();
  const int64_t cols = weight.size(1);
  const bool vec = a.d % 8 == 0 && cuda::aligned(w, BITS == 8 ? 8 : 4) && cuda::aligned(out.data_ptr(), 32);
  if (vec) launch_fwd<QuantRows<BITS, 8, true>, float, IndexT>({w, a.d, cols}, indices, offsets, psw, out, a, flags);
  else launch_fwd<QuantRows<BITS, BITS == 8 ? 1 : 2, false>, float, IndexT>({w, a.d, cols}, indices, offsets, psw, out,
                                                                              a, flags);
}

at::Tensor embedding_bag_cuda(const at::Tensor& weight_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
                              const std::optional<at::Tensor>& psw_in, c10::string_view mode,
                              std::optional<int64_t> padding_idx, c10::string_view bounds, int64_t bits,
                              std::optional<at::ScalarType> output_dtype, bool /*sparse*/) {
  const Args a = check_args(weight_in, indices_in, offsets_in, psw_in, mode, padding_idx, bounds, bits);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::ScalarType wtype = weight_in.scalar_type();
  const bool quantized = wtype == at::kByte;
  const at::ScalarType acc_type = wtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType out_type = output_dtype.value_or(quantized ? at::kFloat : wtype);
  TORCH_CHECK_TYPE(is_table_float(out_type), "output_dtype must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(out_type));

  const at::Tensor weight = weight_in.contiguous();
  const auto index_pair = same_index_dtype(indices_in, offsets_in);
  const at::Tensor& indices = index_pair.first;
  const at::Tensor& offsets = index_pair.second;
  const at::Tensor psw = psw_in.has_value() ? psw_in->to(acc_type).contiguous() : at::Tensor();
  // The kernel writes the table's dtype or the accumulation dtype; any other output dtype is
  // converted afterwards, exactly as the reference converts its accumulator.
  const bool direct = out_type == acc_type || (!quantized && out_type == wtype);
  at::Tensor out = at::empty({a.n_bags, a.d}, weight.options().dtype(direct ? out_type : acc_type));
  at::Tensor flags = new_flags(weight);

  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bag_cuda", [&] {
    using IndexT = index_t;
    if (quantized) {
      if (bits == 8) fwd_quant<8, IndexT>(weight, indices, offsets, psw, out, a, flags);
      else fwd_quant<4, IndexT>(weight, indices, offsets, psw, out, a, flags);
      return;
    }
    const bool to_acc = out.scalar_type() != wtype;  // fp16/bf16 table written as fp32
    switch (wtype) {
      case at::kFloat: fwd_float<float, float, IndexT>(weight, indices, offsets, psw, out, a, flags); break;
      case at::kDouble: fwd_float<double, double, IndexT>(weight, indices, offsets, psw, out, a, flags); break;
      case at::kHalf:
        if (to_acc) fwd_float<c10::Half, float, IndexT>(weight, indices, offsets, psw, out, a, flags);
        else fwd_float<c10::Half, c10::Half, IndexT>(weight, indices, offsets, psw, out, a, flags);
        break;
      case at::kBFloat16:
        if (to_acc) fwd_float<c10::BFloat16, float, IndexT>(weight, indices, offsets, psw, out, a, flags);
        else fwd_float<c10::BFloat16, c10::BFloat16, IndexT>(weight, indices, offsets, psw, out, a, flags);
        break;
      default: TORCH_CHECK_TYPE(false, "weight: unsupported dtype ", dtype_name(wtype));
    }
  });
  raise_for_flags(flags, indices, offsets, a);
  return direct ? out : out.to(out_type);
}


// ----------------------------------------------------------------------------- host: backward
template <typename T, typename IndexT>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_output, const at::Tensor& weight,
                                                 const at::Tensor& indices, const at::Tensor& offsets,
                                                 const at::Tensor& psw_acc, at::ScalarType psw_type, const Args& a,
                                                 bool sparse) {
  using acc_t = typename AccOf<T>::type;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto long_opts = weight.options().dtype(at::kLong);
  at::Tensor bag_of = at::empty({a.nnz}, long_opts);
  at::Tensor row_of = at::empty({a.nnz}, long_opts);
  at::Tensor counts = at::empty({a.n_bags}, long_opts);
  at::Tensor first = at::empty({a.mode == kMax ? a.n_bags * a.d : 0}, long_opts);
  at::Tensor flags = new_flags(weight);
  const T* w = weight.const_data_ptr<T>();
  bwd_bags_kernel<T, IndexT><<<cuda::grid_for(a.n_bags, kWarpsPerBlock), kThreads, 0, stream>>>(
      w, indices.const_data_ptr<IndexT>(), offsets.const_data_ptr<IndexT>(), bag_of.data_ptr<int64_t>(),
      row_of.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), first.data_ptr<int64_t>(), a.n_bags, a.nnz, a.n_rows,
      a.d, a.mode, a.bounds, a.padding_idx, flags.data_ptr<int64_t>());
  RK_CUDA_LAUNCH_CHECK();
  raise_for_flags(flags, indices, offsets, a);

  const at::Tensor go = grad_output.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const PositionGrad<acc_t> pg{go.const_data_ptr<acc_t>(), bag_of.const_data_ptr<int64_t>(),
                               row_of.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
                               first.const_data_ptr<int64_t>(), a.d, a.mode};
  const acc_t* psw = psw_acc.defined() ? psw_acc.const_data_ptr<acc_t>() : nullptr;

  at::Tensor grad_psw = psw_acc.defined() ? at::empty({a.nnz}, psw_acc.options()) : at::empty({0}, weight.options());
  at::Tensor grad_weight = sparse ? at::empty({a.nnz, a.d}, weight.options()) : at::zeros({a.n_rows, a.d}, weight.options());
  if ((sparse || psw_acc.defined()) && a.nnz > 0) {
    bwd_positions_kernel<T><<<cuda::grid_for(a.nnz, kWarpsPerBlock), kThreads, 0, stream>>>(
        w, pg, psw, sparse ? grad_weight.data_ptr<T>() : nullptr, psw_acc.defined() ? grad_psw.data_ptr<acc_t>() : nullptr,
        a.nnz);
    RK_CUDA_LAUNCH_CHECK();
  }
  if (!sparse && a.nnz > 0 && a.d > 0 && a.n_rows > 0) {
    // Stable sort of the positions by row (-1, the positions that contribute nothing, first).
    const auto sorted = at::sort(row_of, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor& sorted_rows = std::get<0>(sorted);
    const at::Tensor perm = std::get<1>(sorted).contiguous();
    const auto uniq = at::unique_consecutive(sorted_rows, /*return_inverse=*/false, /*return_counts=*/true);
    const at::Tensor seg_rows = std::get<0>(uniq).contiguous();
    const at::Tensor seg_len = std::get<2>(uniq).contiguous();
    const at::Tensor seg_start = (at::cumsum(seg_len, 0) - seg_len).contiguous();
    const int64_t n_segs = seg_rows.numel();
    const at::Tensor n_chunks = at::floor_divide(seg_len + (kChunk - 1), kChunk).contiguous();
    const at::Tensor chunk_end = at::cumsum(n_chunks, 0);
    const at::Tensor chunk_base = (chunk_end - n_chunks).contiguous();
    const at::Tensor part_count = at::where(n_chunks > 1, n_chunks, at::zeros_like(n_chunks));
    const at::Tensor part_base = (at::cumsum(part_count, 0) - part_count).contiguous();
    const at::Tensor totals = at::stack({chunk_end[-1], part_count.sum()}).to(at::kCPU);  // waits for the stream
    const int64_t total_chunks = totals.const_data_ptr<int64_t>()[0];
    const int64_t total_parts = totals.const_data_ptr<int64_t>()[1];
    const at::Tensor chunk_seg =
        at::repeat_interleave(at::arange(n_segs, long_opts), n_chunks, /*dim=*/0, /*output_size=*/total_chunks)
            .contiguous();
    at::Tensor partials = at::empty({total_parts, a.d}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const DenseSegments sg{seg_rows.const_data_ptr<int64_t>(),  seg_start.const_data_ptr<int64_t>(),
                           seg_len.const_data_ptr<int64_t>(),   n_chunks.const_data_ptr<int64_t>(),
                           chunk_base.const_data_ptr<int64_t>(), part_base.const_data_ptr<int64_t>(),
                           chunk_seg.const_data_ptr<int64_t>(),  perm.const_data_ptr<int64_t>()};
    bwd_dense_chunks_kernel<T><<<cuda::grid_for(total_chunks, kWarpsPerBlock), kThreads, 0, stream>>>(
        pg, psw, sg, total_chunks, partials.data_ptr<acc_t>(), grad_weight.data_ptr<T>());
    RK_CUDA_LAUNCH_CHECK();
    if (total_parts > 0) {
      bwd_dense_combine_kernel<T><<<cuda::grid_for(n_segs, kWarpsPerBlock), kThreads, 0, stream>>>(
          sg, n_segs, a.d, partials.const_data_ptr<acc_t>(), grad_weight.data_ptr<T>());
      RK_CUDA_LAUNCH_CHECK();
    }
  }
  if (psw_acc.defined() && grad_psw.scalar_type() != psw_type) grad_psw = grad_psw.to(psw_type);
  return {grad_weight, grad_psw};
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cuda(
    const at::Tensor& grad_output_in, const at::Tensor& weight_in, const at::Tensor& indices_in,
    const at::Tensor& offsets_in, const std::optional<at::Tensor>& psw_in, c10::string_view mode,
    std::optional<int64_t> padding_idx, c10::string_view bounds, bool sparse) {
  TORCH_CHECK_NOT_IMPLEMENTED(weight_in.scalar_type() != at::kByte,
                              "embedding_bag: quantized (uint8) tables are inference only; there is no gradient "
                              "through them");
  check_dtype(weight_in, "weight", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  const Args a = check_args(weight_in, indices_in, offsets_in, psw_in, mode, padding_idx, bounds, 8);
  check_dtype(grad_output_in, "grad_output", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_device(grad_output_in, "grad_output", weight_in.device(), "weight");
  RK_CHECK_VALUE(grad_output_in.dim() == 2 && grad_output_in.size(0) == a.n_bags && grad_output_in.size(1) == a.d,
                 "grad_output", "must have shape [", a.n_bags, ", ", a.d, "], got ", grad_output_in.sizes());
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::ScalarType wtype = weight_in.scalar_type();
  const at::ScalarType acc_type = wtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor weight = weight_in.contiguous();
  const auto index_pair = same_index_dtype(indices_in, offsets_in);
  const at::Tensor& indices = index_pair.first;
  const at::Tensor& offsets = index_pair.second;
  const at::Tensor psw = psw_in.has_value() ? psw_in->to(acc_type).contiguous() : at::Tensor();
  const at::ScalarType psw_type = psw_in.has_value() ? psw_in->scalar_type() : wtype;
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bag_backward_cuda", [&] {
    using IndexT = index_t;
    switch (wtype) {
      case at::kFloat: result = backward_impl<float, IndexT>(grad_output_in, weight, indices, offsets, psw, psw_type, a, sparse); break;
      case at::kDouble: result = backward_impl<double, IndexT>(grad_output_in, weight, indices, offsets, psw, psw_type, a, sparse); break;
      case at::kHalf: result = backward_impl<c10::Half, IndexT>(grad_output_in, weight, indices, offsets, psw, psw_type, a, sparse); break;
      case at::kBFloat16: result = backward_impl<c10::BFloat16, IndexT>(grad_output_in, weight, indices, offsets, psw, psw_type, a, sparse); break;
      default: TORCH_CHECK_TYPE(false, "weight: unsupported dtype ", dtype_name(wtype));
    }
  });
  return result;
}

}  // namespace embedding_bag_cuda_impl

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) {
  m.impl("embedding_bag", &embedding_bag_cuda_impl::embedding_bag_cuda);
  m.impl("embedding_bag_backward", &embedding_bag_cuda_impl::embedding_bag_backward_cuda);
}

}  // namespace recsys_kernels
