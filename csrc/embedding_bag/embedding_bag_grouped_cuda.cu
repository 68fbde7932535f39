// CUDA kernel of embedding_bag_grouped: F embedding-bag lookups (each its own table, indices,
// offsets, per-sample weights, mode, padding row and format) over one batch of B bags, in one
// launch, into one output [B, sum_f D_f] (lookup f's columns at its column offset). Lookup f's
// columns are what embedding_bag(weights[f], ..., output_dtype=float32) returns, converted to the
// output dtype: the same fp32 accumulation, written straight in the output dtype.
//
// Layout of the work: one warp per (lookup, bag) pair, lookup-major (item = f * B + b, so that
// neighbouring warps read the same table), grid-stride. Each pair runs the single-table kernel's
// per-bag loop (embedding_bag_cuda_common.cuh::pool_bag) with the lookup's row reader, picked at
// run time from the lookup's format (fp32 / fp16 / bf16 / int8 / int4 rows, vectorised or scalar;
// the branch is warp-uniform) and its index dtype (int32 / int64, also per lookup).
//
// Per-lookup metadata (pointers, sizes, format, mode, ...) is an array of LookupMeta in device
// memory, and F flag sets (kFlagCount int64 each) follow it in the same buffer: the host fills
// both in one pinned buffer and sends them with one asynchronous copy (no separate fill of the
// flags), F is unbounded (no kernel-parameter size limit). After the launch the flags come back
// in one small D2H copy (it waits for the stream) and the host raises, for the first lookup in
// lookup order that has one, the error the single-table op raises for that lookup.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "embedding_bag/embedding_bag_cuda_common.cuh"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels {
namespace embedding_bag_grouped_cuda_impl {

using namespace embedding_bag_cuda_common;

// Row reader of a lookup: table format x vectorised (V) or scalar (S) loads.
enum Kind : int32_t {
  kF32V = 0, kF32S, kF16V, kF16S, kBF16V, kBF16S, kQ8V, kQ8S, kQ4V, kQ4S,
};

// One lookup, as the kernel sees it. Plain data: the host writes it byte for byte into the buffer.
struct alignas(8) LookupMeta {
  const void* table;
  const void* indices;
  const void* offsets;
  const float* psw;     // nullptr: no per-sample weights
  int64_t row_bytes;    // bytes per packed row (quantized tables)
  int64_t d;            // columns (unpacked)
  int64_t n_rows;
  int64_t nnz;
  int64_t out_col;      // first output column of the lookup
  int64_t padding_idx;  // -1: none
  int32_t kind;         // Kind
  int32_t mode;         // Mode
  int32_t index64;      // indices and offsets are int64 (else int32)
  int32_t tpr_log2;     // see pool_bag
  int32_t store_width;  // see store_row
  int32_t unused;
};
static_assert(sizeof(LookupMeta) % sizeof(int64_t) == 0, "the flags follow the metadata in one int64 buffer");
constexpr int64_t kMetaWords = sizeof(LookupMeta) / sizeof(int64_t);

template <typename Rows, typename OutT>
__device__ __forceinline__ void pool(const Rows& rows, const LookupMeta& m, const AnyIndexPtr& idx,
                                     const AnyIndexPtr& off, int64_t bag, int bounds, OutT* out_row,
                                     int64_t* flags) {
  pool_bag(rows, idx, off, m.psw, bag, m.nnz, m.n_rows, m.d, m.mode, bounds, m.padding_idx, m.tpr_log2,
           m.store_width, out_row, flags);
}

template <typename OutT>
// 116 registers, no spills (sm_90, CUDA 13.0): 2 blocks of 256 per SM; a cap of 3 blocks (80
// registers) spills ~0.6 KB per thread. Which is faster is for a GPU to say (see docs/design.md).
__global__ void __launch_bounds__(kThreads)
embedding_bag_grouped_fwd_kernel(const LookupMeta* __restrict__ lookups, int64_t n_lookups, int64_t n_bags,
                                 OutT* __restrict__ out, int64_t out_stride, int bounds,
                                 int64_t* __restrict__ flags) {
  // offsets[0] and offsets[B] of every lookup (B may be 0: no (lookup, bag) pair below).
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t f = tid; f < n_lookups; f += n_threads) {
    const LookupMeta& m = lookups[f];
    const AnyIndexPtr off{m.offsets, m.index64 != 0};
    flags[f * kFlagCount + kFlagFirst] = off[0];
    flags[f * kFlagCount + kFlagLast] = off[n_bags];
  }

  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t n_items = n_lookups * n_bags;
  for (int64_t item = warp; item < n_items; item += n_warps) {  // warp-uniform: every lane, same item
    const int64_t f = item / n_bags;
    const int64_t bag = item - f * n_bags;
    const LookupMeta& m = lookups[f];
    const AnyIndexPtr idx{m.indices, m.index64 != 0};
    const AnyIndexPtr off{m.offsets, m.index64 != 0};
    int64_t* fl = flags + f * kFlagCount;
    OutT* out_row = out + bag * out_stride + m.out_col;
    const uint8_t* q = static_cast<const uint8_t*>(m.table);
    switch (m.kind) {
      case kF32V: pool(FloatRows<float, 4, true>{static_cast<const float*>(m.table), m.d}, m, idx, off, bag, bounds, out_row, fl); break;
      case kF32S: pool(FloatRows<float, 1, false>{static_cast<const float*>(m.table), m.d}, m, idx, off, bag, bounds, out_row, fl); break;
      case kF16V: pool(FloatRows<c10::Half, 8, true>{static_cast<const c10::Half*>(m.table), m.d}, m, idx, off, bag, bounds, out_row, fl); break;
      case kF16S: pool(FloatRows<c10::Half, 1, false>{static_cast<const c10::Half*>(m.table), m.d}, m, idx, off, bag, bounds, out_row, fl); break;
      case kBF16V: pool(FloatRows<c10::BFloat16, 8, true>{static_cast<const c10::BFloat16*>(m.table), m.d}, m, idx, off, bag, bounds, out_row, fl); break;
      case kBF16S: pool(FloatRows<c10::BFloat16, 1, false>{static_cast<const c10::BFloat16*>(m.table), m.d}, m, idx, off, bag, bounds, out_row, fl); break;
      case kQ8V: pool(QuantRows<8, 8, true>{q, m.d, m.row_bytes}, m, idx, off, bag, bounds, out_row, fl); break;
      case kQ8S: pool(QuantRows<8, 1, false>{q, m.d, m.row_bytes}, m, idx, off, bag, bounds, out_row, fl); break;
      case kQ4V: pool(QuantRows<4, 8, true>{q, m.d, m.row_bytes}, m, idx, off, bag, bounds, out_row, fl); break;
      default: pool(QuantRows<4, 2, false>{q, m.d, m.row_bytes}, m, idx, off, bag, bounds, out_row, fl); break;
    }
  }
}

// ----------------------------------------------------------------------------- host
// "weights[3]" for messages.
std::string nth(const char* name, int64_t f) { return std::string(name) + "[" + std::to_string(f) + "]"; }

int vec_of(int kind) {
  switch (kind) {
    case kF32V: return 4;
    case kF16V: case kBF16V: case kQ8V: case kQ4V: return 8;
    case kQ4S: return 2;
    default: return 1;
  }
}

// The widest store (elements, a power of two up to vec) that every output row of the lookup allows.
int store_width_for(int vec, const void* out, int64_t out_stride, int64_t out_col, int64_t elem_size) {
  int w = vec;
  while (w > 1 && !(out_stride % w == 0 && out_col % w == 0 && cuda::aligned(out, static_cast<int>(w * elem_size))))
    w /= 2;
  return w;
}

// What the host keeps of one lookup: the tensors the kernel reads (kept alive until the flags are
// back) and the sizes the messages quote.
struct Lookup {
  at::Tensor weight, indices, offsets, psw;
  int64_t n_rows, d, nnz;
};

at::Tensor embedding_bag_grouped_cuda(at::TensorList weights, at::TensorList indices_list, at::TensorList offsets_list,
                                      const c10::List<std::optional<at::Tensor>>& psw_list,
                                      const c10::List<std::string>& modes, at::IntArrayRef padding_idx,
                                      at::IntArrayRef bits, const c10::List<bool>& sparse, c10::string_view bounds_str,
                                      at::ScalarType output_dtype) {
  // Metadata checks (the front door made them already; the op can be called directly).
  const int64_t n_lookups = static_cast<int64_t>(weights.size());
  check_lookup_lists(n_lookups, indices_list, offsets_list, psw_list, modes, padding_idx, bits, sparse);
  const int bounds = parse_bounds(bounds_str);
  TORCH_CHECK_TYPE(is_float_dtype(output_dtype), "output_dtype must be float32, float16 or bfloat16, got ",
                   dtype_name(output_dtype));
  const c10::Device device = weights[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "weights[0] must be a CUDA tensor for the CUDA kernel, got ", device);
  RK_CHECK_VALUE(offsets_list[0].dim() == 1 && offsets_list[0].numel() >= 1, "offsets[0]",
                 "must be 1-D with B + 1 >= 1 entries, got shape ", offsets_list[0].sizes());
  const int64_t n_bags = offsets_list[0].numel() - 1;
  const c10::cuda::CUDAGuard guard(device);

  std::vector<Lookup> lookups(n_lookups);
  std::vector<LookupMeta> metas(n_lookups);
  int64_t total_d = 0;
  for (int64_t f = 0; f < n_lookups; ++f) {
    const at::Tensor& w = weights[f];
    const std::string wn = nth("weights", f), in = nth("indices", f), on = nth("offsets", f),
                      pn = nth("per_sample_weights", f);
    check_dim(w, wn.c_str(), 2);
    check_dtype(w, wn.c_str(), {at::kFloat, at::kHalf, at::kBFloat16, at::kByte});
    check_device(w, wn.c_str(), device, "weights[0]");
    const bool quantized = w.scalar_type() == at::kByte;
    if (quantized) {
      RK_CHECK_VALUE(bits[f] == 8 || bits[f] == 4, nth("bits", f).c_str(), "must be 8 or 4, got ", bits[f]);
      const int64_t min_cols = bits[f] == 8 ? 9 : 5;
      RK_CHECK_VALUE(w.size(1) >= min_cols, wn.c_str(), "a ", bits[f], "-bit row-wise table needs at least ", min_cols,
                     " bytes per row, got ", w.size(1));
    }
    const at::Tensor& idx_in = indices_list[f];
    const at::Tensor& off_in = offsets_list[f];
    check_dtype(idx_in, in.c_str(), {at::kInt, at::kLong});
    check_dtype(off_in, on.c_str(), {at::kInt, at::kLong});
    check_dim(idx_in, in.c_str(), 1);
    check_dim(off_in, on.c_str(), 1);
    RK_CHECK_VALUE(off_in.numel() == n_bags + 1, on.c_str(), "must have B + 1 = ", n_bags + 1,
                   " entries like offsets[0] (one batch for every table), got ", off_in.numel());
    check_device(idx_in, in.c_str(), device, "weights[0]");
    check_device(off_in, on.c_str(), device, "weights[0]");

    Lookup& l = lookups[f];
    l.n_rows = w.size(0);
    l.d = quantized ? rowwise::unpacked_dim(w.size(1), bits[f]) : w.size(1);
    l.nnz = idx_in.numel();
    const std::optional<at::Tensor> psw = psw_list.get(f);
    if (psw.has_value()) {
      check_dtype(*psw, pn.c_str(), {at::kFloat, at::kHalf, at::kBFloat16});
      check_dim(*psw, pn.c_str(), 1);
      RK_CHECK_VALUE(psw->numel() == l.nnz, pn.c_str(), "must have one weight per index (", l.nnz, "), got shape ",
                     psw->sizes());
      check_device(*psw, pn.c_str(), device, "weights[0]");
      l.psw = psw->to(at::kFloat).contiguous();
    }
    int64_t pad = padding_idx[f];
    RK_CHECK_VALUE(pad < l.n_rows, nth("padding_idx", f).c_str(), "must be < ", l.n_rows, " for a table of ", l.n_rows,
                   " rows (or negative: none), got ", pad);
    if (pad < 0) pad = -1;

    l.weight = w.contiguous();
    if (idx_in.scalar_type() == off_in.scalar_type()) {
      l.indices = idx_in.contiguous();
      l.offsets = off_in.contiguous();
    } else {  // one index dtype per lookup; int64 loses nothing
      l.indices = idx_in.to(at::kLong).contiguous();
      l.offsets = off_in.to(at::kLong).contiguous();
    }

    LookupMeta& m = metas[f];
    std::memset(&m, 0, sizeof(m));
    m.table = l.weight.const_data_ptr();
    m.indices = l.indices.const_data_ptr();
    m.offsets = l.offsets.const_data_ptr();
    m.psw = l.psw.defined() ? l.psw.const_data_ptr<float>() : nullptr;
    m.row_bytes = l.weight.size(1);
    m.d = l.d;
    m.n_rows = l.n_rows;
    m.nnz = l.nnz;
    m.out_col = total_d;
    m.padding_idx = pad;
    m.mode = parse_mode(modes.get(f));
    m.index64 = l.indices.scalar_type() == at::kLong ? 1 : 0;
    switch (l.weight.scalar_type()) {
      case at::kFloat: m.kind = l.d % 4 == 0 && cuda::aligned(m.table, 16) ? kF32V : kF32S; break;
      case at::kHalf: m.kind = l.d % 8 == 0 && cuda::aligned(m.table, 16) ? kF16V : kF16S; break;
      case at::kBFloat16: m.kind = l.d % 8 == 0 && cuda::aligned(m.table, 16) ? kBF16V : kBF16S; break;
      default:  // uint8 row-wise; the vectorised reader needs every row start aligned (see QuantRows)
        if (bits[f] == 8) m.kind = l.d % 8 == 0 && cuda::aligned(m.table, 8) ? kQ8V : kQ8S;
        else m.kind = l.d % 8 == 0 && cuda::aligned(m.table, 4) ? kQ4V : kQ4S;
    }
    m.tpr_log2 = tpr_log2_for(l.d, vec_of(m.kind));
    total_d += l.d;
  }

  at::Tensor out = at::empty({n_bags, total_d}, weights[0].options().dtype(output_dtype));
  for (auto& m : metas)
    m.store_width = store_width_for(vec_of(m.kind), out.data_ptr(), total_d, m.out_col, out.element_size());

  // Metadata, then the flag sets (all kNone; offsets[0] / offsets[B] are written by the kernel),
  // in one pinned buffer and one asynchronous copy. The caching host allocator keeps the pinned
  // block until the copy has run.
  const int64_t meta_words = n_lookups * kMetaWords;
  const int64_t total_words = meta_words + n_lookups * kFlagCount;
  at::Tensor host = at::empty({total_words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::memcpy(h, metas.data(), n_lookups * sizeof(LookupMeta));
  std::fill(h + meta_words, h + total_words, kNone);
  const at::Tensor dev = host.to(device, at::kLong, /*non_blocking=*/true);
  const auto* lookups_dev = reinterpret_cast<const LookupMeta*>(dev.const_data_ptr<int64_t>());
  int64_t* flags = dev.data_ptr<int64_t>() + meta_words;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = cuda::grid_for(n_lookups * n_bags, kWarpsPerBlock);
  switch (output_dtype) {
    case at::kFloat:
      embedding_bag_grouped_fwd_kernel<float><<<blocks, kThreads, 0, stream>>>(
          lookups_dev, n_lookups, n_bags, out.data_ptr<float>(), total_d, bounds, flags);
      break;
    case at::kHalf:
      embedding_bag_grouped_fwd_kernel<c10::Half><<<blocks, kThreads, 0, stream>>>(
          lookups_dev, n_lookups, n_bags, out.data_ptr<c10::Half>(), total_d, bounds, flags);
      break;
    default:
      embedding_bag_grouped_fwd_kernel<c10::BFloat16><<<blocks, kThreads, 0, stream>>>(
          lookups_dev, n_lookups, n_bags, out.data_ptr<c10::BFloat16>(), total_d, bounds, flags);
  }
  RK_CUDA_LAUNCH_CHECK();

  // The flags back (waits for the stream); the first bad lookup raises the single-table op's error.
  const at::Tensor flags_host = dev.narrow(0, meta_words, n_lookups * kFlagCount).to(at::kCPU);
  const int64_t* fh = flags_host.const_data_ptr<int64_t>();
  for (int64_t f = 0; f < n_lookups; ++f) {
    const Lookup& l = lookups[f];
    raise_for_flag_values(fh + f * kFlagCount, l.indices, l.offsets, bounds, l.n_rows, l.nnz);
  }
  return out;
}

}  // namespace embedding_bag_grouped_cuda_impl

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) {
  m.impl("embedding_bag_grouped", &embedding_bag_grouped_cuda_impl::embedding_bag_grouped_cuda);
}

}  // namespace recsys_kernels
