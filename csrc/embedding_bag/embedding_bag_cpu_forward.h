// The forward of the embedding_bag CPU kernel, shared by embedding_bag (one lookup) and
// embedding_bag_grouped (several lookups in one parallel region): argument checks, the bounds and
// padding rules, the work split over threads, and the pooling of a range of bags of one lookup
// (vector kernel or scalar loop; see embedding_bag_cpu.cpp's header comment for the semantics).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/half_convert.h"
#include "embedding_bag/embedding_bag_cpu_kernels.h"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels::embedding_bag_cpu {

enum class Mode { kSum, kMean, kMax };
enum class Bounds { kRaise, kZero, kClamp };

inline Mode parse_mode(const std::string& mode) {
  if (mode == "sum") return Mode::kSum;
  if (mode == "mean") return Mode::kMean;
  if (mode == "max") return Mode::kMax;
  RK_CHECK_VALUE(false, "mode", "must be one of ('sum', 'mean', 'max'), got '", mode, "'");
  return Mode::kSum;
}

inline Bounds parse_bounds(const std::string& bounds) {
  if (bounds == "raise") return Bounds::kRaise;
  if (bounds == "zero") return Bounds::kZero;
  if (bounds == "clamp") return Bounds::kClamp;
  RK_CHECK_VALUE(false, "bounds", "must be one of ('raise', 'zero', 'clamp'), got '", bounds, "'");
  return Bounds::kRaise;
}

inline bool is_table_float(at::ScalarType t) { return is_float_dtype(t) || t == at::kDouble; }

// ----------------------------------------------------------------------------- shared checks
struct Common {
  at::Tensor indices, offsets;  // contiguous, one index dtype
  std::optional<at::Tensor> psw;
  Mode mode;
  Bounds bounds;
  int64_t n_rows, nnz, n_bags;
  int64_t padding;  // -1: none (a negative padding_idx names no row, as in the reference)
};

inline Common check_common(const at::Tensor& weight, const at::Tensor& indices_in, const at::Tensor& offsets_in,
                    const std::optional<at::Tensor>& psw_in, const std::string& mode,
                    std::optional<int64_t> padding_idx, const std::string& bounds) {
  Common c;
  check_dim(weight, "weight", 2);
  check_dtype(indices_in, "indices", {at::kInt, at::kLong});
  check_dtype(offsets_in, "offsets", {at::kInt, at::kLong});
  check_dim(indices_in, "indices", 1);
  check_dim(offsets_in, "offsets", 1);
  const c10::Device dev = weight.device();
  check_device(indices_in, "indices", dev, "weight");
  check_device(offsets_in, "offsets", dev, "weight");
  c.mode = parse_mode(mode);
  c.bounds = parse_bounds(bounds);
  if (indices_in.scalar_type() == offsets_in.scalar_type()) {
    c.indices = indices_in.contiguous();
    c.offsets = offsets_in.contiguous();
  } else {  // one index dtype for the kernels; int64 loses nothing
    c.indices = indices_in.to(at::kLong).contiguous();
    c.offsets = offsets_in.to(at::kLong).contiguous();
  }
  c.n_rows = weight.size(0);
  c.nnz = c.indices.numel();
  RK_CHECK_VALUE(c.offsets.numel() >= 1, "offsets", "must have B + 1 >= 1 entries, got an empty tensor");
  c.n_bags = c.offsets.numel() - 1;
  if (psw_in.has_value()) {
    const at::Tensor& p = *psw_in;
    check_dtype(p, "per_sample_weights", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_dim(p, "per_sample_weights", 1);
    check_device(p, "per_sample_weights", dev, "weight");
    RK_CHECK_VALUE(p.size(0) == c.nnz, "per_sample_weights", "must have one weight per index (", c.nnz,
                   "), got shape ", p.sizes());
    c.psw = p.contiguous();
  }
  // the ops' rule on every device (the front door passes None or [0, N)): < N, a negative one names no row
  RK_CHECK_VALUE(!padding_idx.has_value() || *padding_idx < c.n_rows, "padding_idx", "must be < ", c.n_rows,
                 " for a table of ", c.n_rows, " rows (or negative: none), got ", *padding_idx);
  c.padding = padding_idx.has_value() && *padding_idx >= 0 ? *padding_idx : -1;
  return c;
}

// Offsets: offsets[0] == 0, non-decreasing, offsets[B] == nnz (the reference's messages).
template <typename I>
void validate_offsets(const I* off, int64_t n_bags, int64_t nnz) {
  const int64_t first = off[0], last = off[n_bags];
  RK_CHECK_VALUE(first == 0, "offsets[0]", "must be 0, got ", first);
  for (int64_t b = 0; b < n_bags; ++b) {
    if (off[b + 1] >= off[b]) continue;
    TORCH_CHECK_VALUE(off[b] <= nnz, "offsets must be non-decreasing (lengths >= 0) and end at the number of indices ",
                      nnz, ", got offsets[", b, "]=", static_cast<int64_t>(off[b]));
    TORCH_CHECK_VALUE(false, "offsets must be non-decreasing (lengths >= 0), got offsets[", b, "]=",
                      static_cast<int64_t>(off[b]), " > offsets[", b + 1, "]=", static_cast<int64_t>(off[b + 1]));
  }
  TORCH_CHECK_VALUE(last == nnz, "offsets[-1] (the sum of lengths) must equal the number of indices ", nnz,
                    ", got ", last);
}

// Index bounds under bounds="raise": IndexError naming the first bad index (in index order).
template <typename I>
void validate_indices(const I* idx, int64_t nnz, int64_t n_rows, Bounds bounds) {
  if (bounds == Bounds::kClamp) {
    TORCH_CHECK_INDEX(!(n_rows == 0 && nnz > 0),
                      "indices: bounds='clamp' cannot clamp into an empty table (weight has 0 rows)");
    return;
  }
  if (bounds != Bounds::kRaise) return;
  std::atomic<int64_t> first_bad{nnz};
  at::parallel_for(0, nnz, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = idx[p];
      if (i < 0 || i >= n_rows) {
        int64_t seen = first_bad.load(std::memory_order_relaxed);
        while (p < seen && !first_bad.compare_exchange_weak(seen, p, std::memory_order_relaxed)) {
        }
        return;  // later positions in this range cannot be first
      }
    }
  });
  const int64_t p = first_bad.load();
  if (p < nnz) {
    const int64_t bad = idx[p];
    TORCH_CHECK_INDEX(false, "indices: index ", bad, " is out of range for a table of ", n_rows, " rows (valid: 0 <= index < ",
                      n_rows, "; bounds='raise')");
  }
}

// The row an index reads, or -1 when it does not contribute (out of range under "zero", padding).
inline int64_t resolve(int64_t i, int64_t n_rows, Bounds bounds, int64_t padding) {
  if (i < 0 || i >= n_rows) {
    if (bounds != Bounds::kClamp) return -1;  // "raise" was validated before
    i = i < 0 ? 0 : n_rows - 1;
  }
  return i == padding ? -1 : i;
}

// The row a skipped index still gathers in the reference (clamped), or -1 for an empty table.
inline int64_t gathered_row(int64_t i, int64_t n_rows) {
  if (n_rows == 0) return -1;
  return i < 0 ? 0 : (i >= n_rows ? n_rows - 1 : i);
}

// Bag boundaries of `n_tasks` chunks of about equal work, work(b) = offsets[b] + b.
template <typename I>
std::vector<int64_t> split_bags(const I* off, int64_t n_bags, int64_t n_tasks) {
  std::vector<int64_t> bounds(n_tasks + 1);
  const int64_t total = static_cast<int64_t>(off[n_bags]) + n_bags;
  bounds[0] = 0;
  for (int64_t t = 1; t < n_tasks; ++t) {
    const int64_t target = total / n_tasks * t + (total % n_tasks) * t / n_tasks;
    int64_t lo = bounds[t - 1], hi = n_bags;  // first b with work(b) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(off[mid]) + mid < target) lo = mid + 1; else hi = mid;
    }
    bounds[t] = lo;
  }
  bounds[n_tasks] = n_bags;
  return bounds;
}

// Tasks for `work` units: one per thread, each of at least min_work units (at least one task).
inline int64_t tasks_for_work(int64_t work, int64_t min_work) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / min_work));
}

template <typename I>
int64_t n_tasks_for(const I* off, int64_t n_bags, int64_t min_work = 4096) {
  return tasks_for_work(static_cast<int64_t>(off[n_bags]) + n_bags, min_work);
}

// Runs fn(bag_begin, bag_end) over balanced chunks of bags, in parallel.
template <typename I, typename F>
void for_bag_chunks(const I* off, int64_t n_bags, const F& fn) {
  const int64_t n_tasks = n_tasks_for(off, n_bags);
  const std::vector<int64_t> chunks = split_bags(off, n_bags, n_tasks);
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(chunks[t], chunks[t + 1]);
  });
}

// ----------------------------------------------------------------------------- scalar pooling
// Value of column c of a row, in the accumulation type. Same operations as the AVX2 loaders.
struct RowReader {
  TableKind kind;
  at::ScalarType dtype;  // of a float table (for kDouble)
  const uint8_t* table;
  int64_t row_bytes, dim;
};

inline float half_bits_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// Scale and bias of a quantized row; ok &= both finite.
inline std::pair<float, float> quant_params(const RowReader& r, const uint8_t* row, bool& ok) {
  float scale, bias;
  if (r.kind == TableKind::kQ8) {
    std::memcpy(&scale, row + r.dim, 4);
    std::memcpy(&bias, row + r.dim + 4, 4);
  } else {
    uint16_t h[2];
    std::memcpy(h, row + r.dim / 2, 4);
    scale = half_bits_to_float(h[0]);
    bias = half_bits_to_float(h[1]);
  }
  ok &= std::isfinite(scale) && std::isfinite(bias);
  return {scale, bias};
}

template <typename T, typename Acc>
inline Acc float_at(const uint8_t* row, int64_t c) {
  T v;
  std::memcpy(&v, row + sizeof(T) * c, sizeof(T));
  return static_cast<Acc>(v);
}

template <typename Acc>
inline Acc max_nan(Acc acc, Acc v) { return (std::isnan(v) || v > acc) ? v : acc; }

// Pools rows[n] (n >= 1) into out[D]: sum (or max), each value * weights[p] when given.
template <typename T, typename Acc>
bool pool_scalar(const RowReader& r, const int64_t* rows, const Acc* weights, int64_t n, bool is_max, Acc* out) {
  const int64_t d = r.dim;
  const Acc init = is_max ? -std::numeric_limits<Acc>::infinity() : Acc(0);
  std::fill(out, out + d, init);
  bool ok = true;
  constexpr bool kFloat = !std::is_same_v<T, uint8_t>;
  const bool fused = !kFloat && r.kind == TableKind::kQ8 && !is_max;  // embedding_bag_cpu_kernels.h
  float biases = 0.0f;  // fused: the biases (* weights) not yet folded into out
  for (int64_t p = 0; p < n; ++p) {
    const uint8_t* row = r.table + rows[p] * r.row_bytes;
    float scale = 1.0f, bias = 0.0f;
    if constexpr (!kFloat) std::tie(scale, bias) = quant_params(r, row, ok);
    const Acc w = weights ? weights[p] : Acc(1);
    if constexpr (!kFloat) {
      if (fused) {
        const float s = weights ? scale * weights[p] : scale;
        biases += weights ? bias * weights[p] : bias;
        for (int64_t c = 0; c < d; ++c) out[c] = std::fma(static_cast<float>(row[c]), s, out[c]);
        if (fold_biases_after(p, n)) {
          for (int64_t c = 0; c < d; ++c) out[c] = out[c] + biases;
          biases = 0.0f;
        }
        continue;
      }
    }
    for (int64_t c = 0; c < d; ++c) {
      Acc v;
      if constexpr (kFloat) {
        v = float_at<T, Acc>(row, c);
      } else {
        const uint8_t code = r.kind == TableKind::kQ8 ? row[c] : ((c & 1) ? (row[c / 2] >> 4) : (row[c / 2] & 0x0F));
        v = static_cast<float>(code) * scale + bias;
      }
      if (weights) v = v * w;
      out[c] = is_max ? max_nan(out[c], v) : out[c] + v;
    }
  }
  return ok;
}


// ----------------------------------------------------------------------------- one lookup
// A table with its indices and offsets, checked, and where its pooled rows go: rows of out_stride
// elements of out_dtype, from column col0 (the whole row for embedding_bag, its own columns for a
// lookup of embedding_bag_grouped). The pooling pass records errors instead of raising mid-way.
struct Lookup {
  Common c;
  RowReader reader{};
  at::Tensor weight;  // contiguous; keeps the table alive
  at::ScalarType default_out = at::kFloat;  // embedding_bag's output dtype without output_dtype
  uint8_t* out = nullptr;
  int64_t out_stride = 0, col0 = 0;
  at::ScalarType out_dtype = at::kFloat;
  bool rows_from_dram = false;  // a table beyond l2_prefetch_bytes(): rows ahead prefetched into L2
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};  // first out-of-range index position
  std::atomic<bool> bad_scale{false};  // a non-finite scale or bias in a gathered quantized row

  int64_t dim() const { return reader.dim; }
  int64_t work() const { return c.nnz + c.n_bags; }
};

// Checks what the reference checks before pooling (metadata, offsets, and the indices unless the
// pooling pass does: bounds="raise" with bags to pool) and fills lk. Raises as the reference does.
inline void prepare_lookup(Lookup& lk, const at::Tensor& weight_in, const at::Tensor& indices, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& per_sample_weights, const std::string& mode,
                           std::optional<int64_t> padding_idx, const std::string& bounds, int64_t bits) {
  const at::ScalarType wt = weight_in.scalar_type();
  TORCH_CHECK_TYPE(is_table_float(wt) || wt == at::kByte,
                   "weight must be a float32, float16, bfloat16 or float64 table, or a uint8 row-wise table, got ",
                   dtype_name(wt));
  lk.c = check_common(weight_in, indices, offsets, per_sample_weights, mode, padding_idx, bounds);
  Common& c = lk.c;
  const bool quant = wt == at::kByte;
  int64_t d = weight_in.size(1);
  if (quant) {
    check_bits(bits);
    const int64_t min_cols = bits == 8 ? 9 : 5;
    TORCH_CHECK_VALUE(weight_in.size(1) >= min_cols, "weight: a ", bits, "-bit row-wise table needs at least ",
                      min_cols, " bytes per row, got ", weight_in.size(1));
    d = rowwise::unpacked_dim(weight_in.size(1), bits);
  }
  lk.default_out = quant ? at::kFloat : wt;
  const at::ScalarType acc = wt == at::kDouble ? at::kDouble : at::kFloat;
  if (c.psw.has_value() && c.psw->scalar_type() != acc) c.psw = c.psw->to(acc).contiguous();
  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_cpu_check", [&] {
    validate_offsets(c.offsets.const_data_ptr<index_t>(), c.n_bags, c.nnz);
    if (c.n_bags == 0 || d == 0 || c.bounds != Bounds::kRaise)
      validate_indices(c.indices.const_data_ptr<index_t>(), c.nnz, c.n_rows, c.bounds);
  });
  lk.weight = weight_in.contiguous();
  TableKind kind = TableKind::kF32;
  switch (wt) {
    case at::kHalf: kind = TableKind::kF16; break;
    case at::kBFloat16: kind = TableKind::kBF16; break;
    case at::kByte: kind = bits == 8 ? TableKind::kQ8 : TableKind::kQ4; break;
    default: break;  // fp32; fp64 is read through reader.dtype
  }
  lk.reader = RowReader{kind, wt, static_cast<const uint8_t*>(lk.weight.const_data_ptr()),
                        lk.weight.size(1) * lk.weight.element_size(), d};
  // (read here, once: it may raise, and reads the environment)
  lk.rows_from_dram = lk.weight.size(0) * lk.reader.row_bytes > l2_prefetch_bytes();
  lk.first_bad.store(c.nnz);
}

// Prefetches the first lines (up to 512 bytes) of p[0, n). The scalar loop's bounds scan of a bag
// otherwise waits for the bag's indices.
template <typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t len = std::min<int64_t>(n * static_cast<int64_t>(sizeof(T)), 512);
  for (int64_t o = 0; o < len; o += 64) __builtin_prefetch(bytes + o);
}

// Keeps the smallest out-of-range index position seen by any thread.
inline void record_bad_index(Lookup& lk, int64_t p) {
  int64_t seen = lk.first_bad.load(std::memory_order_relaxed);
  while (p < seen && !lk.first_bad.compare_exchange_weak(seen, p, std::memory_order_relaxed)) {
  }
}

// n values summed in Acc into dst of dtype T; avx2: fp32 into fp16 / bf16 with F16C / AVX2
// (half_convert.h: the same bits as the casts; c10::Half's scalar cast is a software conversion).
template <typename T, typename Acc>
void store_values(const Acc* src, T* dst, int64_t n, bool avx2) {
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, at::Half>) {
    if (avx2) return f32_to_f16_avx2(src, reinterpret_cast<uint16_t*>(dst), n);
  } else if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, at::BFloat16>) {
    if (avx2) return f32_to_bf16_avx2(src, reinterpret_cast<uint16_t*>(dst), n);
  }
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]);
}

// Writes bags b, ..., b + n_bags - 1's D pooled values (src: n_bags x D in the accumulation type)
// into the output in its dtype, in one call when the output rows are contiguous.
template <typename Acc>
void store_converted(const Lookup& lk, int64_t b, int64_t n_bags, const Acc* src, bool avx2) {
  const int64_t d = lk.dim();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lk.out_dtype, "embedding_bag_cpu_out", [&] {
    scalar_t* o = reinterpret_cast<scalar_t*>(lk.out) + b * lk.out_stride + lk.col0;
    if (lk.out_stride == d) {
      store_values(src, o, n_bags * d, avx2);
    } else {
      for (int64_t j = 0; j < n_bags; ++j) store_values(src + j * d, o + j * lk.out_stride, d, avx2);
    }
  });
}

// The vector kernels' description of a run of bags of lk: bag j pools the rows idx[off[j]], ...,
// idx[off[j + 1] - 1] into out + j * out_stride (see PoolArgs).
inline PoolArgs pool_args(const Lookup& lk, const void* idx, bool idx_is_int64, const void* off, int64_t n_bags,
                          int64_t idx_end, const float* weights, float* out, int64_t out_stride) {
  PoolArgs a{};
  a.kind = lk.reader.kind;
  a.is_max = lk.c.mode == Mode::kMax;
  a.is_mean = lk.c.mode == Mode::kMean;
  a.table = lk.reader.table;
  a.row_bytes = lk.reader.row_bytes;
  a.dim = lk.reader.dim;
  a.n_rows = lk.c.n_rows;
  a.idx = idx;
  a.idx_is_int64 = idx_is_int64;
  a.off = off;
  a.n_bags = n_bags;
  a.idx_end = idx_end;
  a.weights = weights;
  a.out = out;
  a.out_stride = out_stride;
  a.rows_from_dram = lk.rows_from_dram;
  return a;
}

// Pools bags [b0, b1) of lk. Under bounds="raise" each index is checked in this pass, before its
// row is read (by the vector kernel, or bag by bag below): the range stops at its first bad index
// and lk.first_bad keeps the smallest such position over all ranges (the caller then raises), so
// the indices are read once, in the one parallel region. The common case, a vector kernel with
// every index contributing (bounds="raise", no padding_idx), is one call of the kernel for the
// whole range, straight from the raw indices (an output dtype other than fp32 is staged in an fp32
// block and converted); the rest goes bag by bag: each bag's contributing rows are compacted into
// a list (no copy for int64 indices that all contribute) and pooled as a run of one bag, or by the
// scalar loop.
template <typename I, typename T, typename Acc>
void pool_bags_impl(Lookup& lk, int64_t b0, int64_t b1, CpuIsa isa) {
  const Common& c = lk.c;
  const RowReader& reader = lk.reader;
  const I* idx = c.indices.const_data_ptr<I>();
  const I* off = c.offsets.const_data_ptr<I>();
  const int64_t d = reader.dim;
  const bool quant = std::is_same_v<T, uint8_t>;
  const Acc* psw = c.psw.has_value() ? c.psw->const_data_ptr<Acc>() : nullptr;
  const bool direct = lk.out_dtype == c10::CppTypeToScalarType<Acc>::value;  // write the output in place
  const int64_t out_elem = c10::elementSize(lk.out_dtype);
  const bool all_contribute = c.bounds == Bounds::kRaise && c.padding < 0;
  constexpr bool kVectorAcc = std::is_same_v<Acc, float>;  // the vector kernels accumulate in fp32
  constexpr bool kInt64 = std::is_same_v<I, int64_t>;
  const bool vector = kVectorAcc && isa >= CpuIsa::kAvx2;
  if constexpr (kVectorAcc) {
    if (vector && all_contribute && direct) {
      const PoolResult r = pool_bags_vector(isa, pool_args(lk, idx, kInt64, off + b0, b1 - b0, c.nnz, psw,
          reinterpret_cast<float*>(lk.out) + b0 * lk.out_stride + lk.col0, lk.out_stride));
      if (!r.finite) lk.bad_scale.store(true);
      if (r.first_bad >= 0) record_bad_index(lk, r.first_bad);
      return;
    }
    if (vector && all_contribute) {
      // Another output dtype: pooled in fp32 a few bags at a time into a block that stays in L1,
      // then converted (staging the whole range, 1 MB at 4,096 bags of 64, and converting it cost
      // an fp16 table 15% against F.embedding_bag). The look-ahead still runs to c.nnz.
      constexpr int64_t kStagedFloats = 4096;
      const int64_t step = std::max<int64_t>(1, kStagedFloats / d);
      std::unique_ptr<float[]> staged(new float[std::min(step, b1 - b0) * d]);
      for (int64_t s0 = b0; s0 < b1; s0 += step) {
        const int64_t s1 = std::min(b1, s0 + step);
        const PoolResult r = pool_bags_vector(isa,
            pool_args(lk, idx, kInt64, off + s0, s1 - s0, c.nnz, psw, staged.get(), d));
        if (!r.finite) lk.bad_scale.store(true);
        if (r.first_bad >= 0) {
          record_bad_index(lk, r.first_bad);
          return;
        }
        store_converted(lk, s0, s1 - s0, staged.get(), vector);
      }
      return;
    }
  }
  // int32 indices that all contribute (here: the scalar loop) are widened into the row list in the
  // same pass as their bounds check
  const bool widen = all_contribute && std::is_same_v<I, int32_t>;
  const uint64_t n_rows_u = static_cast<uint64_t>(c.n_rows);
  std::vector<int64_t> rows_buf;
  std::vector<Acc> weights_buf, scratch(direct ? 0 : d);
  bool ok = true;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = off[b], e = off[b + 1];
    Acc* dst = direct ? reinterpret_cast<Acc*>(lk.out + (b * lk.out_stride + lk.col0) * out_elem) : scratch.data();
    if (b + 1 < b1) {  // the next bag's indices (and weights), a bag ahead
      prefetch_span(idx + e, off[b + 2] - e);
      if (psw) prefetch_span(psw + e, off[b + 2] - e);
    }
    if (widen && static_cast<int64_t>(rows_buf.size()) < e - s) rows_buf.resize(e - s);
    if (c.bounds == Bounds::kRaise) {
      bool bad = false;
      if (widen) {
        int64_t* out = rows_buf.data();
        for (int64_t p = s; p < e; ++p) {
          const int64_t r = idx[p];
          out[p - s] = r;
          bad |= static_cast<uint64_t>(r) >= n_rows_u;
        }
      } else {
        for (int64_t p = s; p < e; ++p) bad |= static_cast<uint64_t>(static_cast<int64_t>(idx[p])) >= n_rows_u;
      }
      if (bad) {
        int64_t p = s;
        while (static_cast<uint64_t>(static_cast<int64_t>(idx[p])) < n_rows_u) ++p;
        record_bad_index(lk, p);
        break;  // later bags of this chunk cannot hold the first bad index
      }
    }
    const int64_t* rows;
    const Acc* weights = nullptr;
    int64_t n;
    if (all_contribute) {
      n = e - s;
      if constexpr (std::is_same_v<I, int64_t>) {
        rows = idx + s;
      } else {
        rows = rows_buf.data();  // widened above
      }
      if (psw) weights = psw + s;
    } else {
      if (static_cast<int64_t>(rows_buf.size()) < e - s) {
        rows_buf.resize(e - s);
        if (psw) weights_buf.resize(e - s);
      }
      n = 0;
      for (int64_t p = s; p < e; ++p) {
        const int64_t r = resolve(idx[p], c.n_rows, c.bounds, c.padding);
        if (r >= 0) {
          rows_buf[n] = r;
          if (psw) weights_buf[n] = psw[p];
          ++n;
        } else if (quant) {  // the reference dequantizes (and checks) the rows it masks too
          const int64_t g = gathered_row(idx[p], c.n_rows);
          if (g >= 0) quant_params(reader, reader.table + g * reader.row_bytes, ok);
        }
      }
      rows = rows_buf.data();
      if (psw) weights = weights_buf.data();
    }
    if (vector) {  // the compacted rows as a run of one bag (an empty one writes zeros)
      if constexpr (kVectorAcc) {
        const int64_t run_off[2] = {0, n};
        ok &= pool_bags_vector(isa, pool_args(lk, rows, true, run_off, 1, std::max<int64_t>(n, 1), weights, dst, d))
                  .finite;
      }
    } else if (n == 0) {
      std::fill(dst, dst + d, Acc(0));
    } else {
      ok &= pool_scalar<T, Acc>(reader, rows, weights, n, c.mode == Mode::kMax, dst);
      if (c.mode == Mode::kMean) {
        const Acc count = static_cast<Acc>(n);
        for (int64_t col = 0; col < d; ++col) dst[col] = dst[col] / count;
      }
    }
    if (!direct) store_converted(lk, b, 1, dst, vector);
  }
  if (!ok) lk.bad_scale.store(true);
}

// pool_bags_impl for lk's index and table dtypes.
inline void pool_bags(Lookup& lk, int64_t b0, int64_t b1, CpuIsa isa) {
  AT_DISPATCH_INDEX_TYPES(lk.c.indices.scalar_type(), "embedding_bag_cpu", [&] {
    switch (lk.reader.dtype) {
      case at::kFloat: pool_bags_impl<index_t, float, float>(lk, b0, b1, isa); break;
      case at::kHalf: pool_bags_impl<index_t, c10::Half, float>(lk, b0, b1, isa); break;
      case at::kBFloat16: pool_bags_impl<index_t, c10::BFloat16, float>(lk, b0, b1, isa); break;
      case at::kDouble: pool_bags_impl<index_t, double, double>(lk, b0, b1, CpuIsa::kScalar); break;
      default: pool_bags_impl<index_t, uint8_t, float>(lk, b0, b1, isa);
    }
  });
}

// The first bag b of lk whose work (indices before it + b) reaches `work`.
inline int64_t bag_at_work(const Lookup& lk, int64_t work) {
  int64_t lo = 0, hi = lk.c.n_bags;
  AT_DISPATCH_INDEX_TYPES(lk.c.offsets.scalar_type(), "embedding_bag_cpu_split", [&] {
    const index_t* off = lk.c.offsets.const_data_ptr<index_t>();
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(off[mid]) + mid < work) lo = mid + 1; else hi = mid;
    }
  });
  return lo;
}

// Pools every bag of every lookup in one parallel region, split into one task per thread of about
// equal work (indices + bags, not bag count: bag lengths are skewed); a task may span lookups.
// A task has at least kMinTaskWork: with 4,096, 128 bags of 32 rows ran on one thread in 54-56 us
// where F.embedding_bag (which splits any batch) took 25 us; 512: 33-35 us (2 threads, rows
// cached); 32 bags and fewer stay on one thread, where a parallel region costs as much as it saves.
constexpr int64_t kMinTaskWork = 512;

inline void pool_lookups(std::vector<Lookup*> lookups) {
  int64_t total = 0;
  for (const Lookup* lk : lookups) total += lk->work();
  const int64_t n_tasks = tasks_for_work(total, kMinTaskWork);
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // global work range [w0, w1) of this task, walked lookup by lookup
      const int64_t w0 = total / n_tasks * t + (total % n_tasks) * t / n_tasks;
      const int64_t w1 = total / n_tasks * (t + 1) + (total % n_tasks) * (t + 1) / n_tasks;
      int64_t base = 0;
      for (Lookup* lk : lookups) {
        const int64_t lo = std::max<int64_t>(w0 - base, 0), hi = std::min<int64_t>(w1 - base, lk->work());
        base += lk->work();
        if (lo >= hi) continue;
        // the bags whose work(b) = offsets[b] + b falls in [lo, hi)
        const int64_t b0 = bag_at_work(*lk, lo), b1 = bag_at_work(*lk, hi);
        if (b0 < b1) pool_bags(*lk, b0, b1, isa);
      }
    }
  });
}

// The error the pooling pass recorded for lk, if any: IndexError for the first out-of-range index,
// ValueError for a non-finite scale or bias.
inline void raise_pool_errors(const Lookup& lk) {
  const int64_t p = lk.first_bad.load();
  if (p < lk.c.nnz) {
    const int64_t bad = lk.c.indices.scalar_type() == at::kLong ? lk.c.indices.const_data_ptr<int64_t>()[p]
                                                                : lk.c.indices.const_data_ptr<int32_t>()[p];
    TORCH_CHECK_INDEX(false, "indices: index ", bad, " is out of range for a table of ", lk.c.n_rows,
                      " rows (valid: 0 <= index < ", lk.c.n_rows, "; bounds='raise')");
  }
  TORCH_CHECK_VALUE(!lk.bad_scale.load(), "packed table has non-finite scales or biases");
}

}  // namespace recsys_kernels::embedding_bag_cpu
