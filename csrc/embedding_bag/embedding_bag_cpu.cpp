// C++ CPU kernels of embedding_bag and embedding_bag_backward (semantics: the reference in
// recsys_kernels/ops/embedding.py, which this must match, errors included).
//
// Forward: the offsets are checked first; under bounds="raise" the indices are checked by the
// pooling pass itself, bag by bag before a bag is pooled (one read of the indices, one parallel
// region), and the first bad index in index order raises IndexError once the pass is over (the
// output, a fresh tensor, is dropped). The bags are split into chunks of about equal work
// (indices + bags, not bag count: bag lengths are skewed) for at::parallel_for. Each bag's
// indices are resolved (bounds policy, padding_idx) into a compacted list of the contributing rows
// (no copy for int64 indices when every index contributes), which is pooled in fp32 (fp64 for
// fp64 tables) in index order, like the reference's index_add_: by the AVX2+FMA+F16C kernel
// (embedding_bag_cpu_avx2.cpp) when recsys_kernels::cpu_isa() allows it, else by the scalar loop
// below (RECSYS_KERNELS_CPU_ISA=scalar forces it). Both paths give the same bits.
//
// Backward: the per-index gradient rows G [nnz, D] (grad_output of the bag, / count for mean, only
// at the first arg-max index for max, * per-sample weight) are computed in parallel over bags,
// with the per-sample-weight gradient. sparse=True returns G; the dense gradient is reduced from G
// deterministically: each thread owns a range of table rows and adds, in index order, the G rows
// of the indices that fall in it (no atomics, the same sums as the reference's index_add_).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "embedding_bag/embedding_bag_cpu_kernels.h"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels {
namespace {

using embedding_bag_cpu::PoolArgs;
using embedding_bag_cpu::TableKind;

enum class Mode { kSum, kMean, kMax };
enum class Bounds { kRaise, kZero, kClamp };

Mode parse_mode(const std::string& mode) {
  if (mode == "sum") return Mode::kSum;
  if (mode == "mean") return Mode::kMean;
  if (mode == "max") return Mode::kMax;
  RK_CHECK_VALUE(false, "mode", "must be one of ('sum', 'mean', 'max'), got '", mode, "'");
  return Mode::kSum;
}

Bounds parse_bounds(const std::string& bounds) {
  if (bounds == "raise") return Bounds::kRaise;
  if (bounds == "zero") return Bounds::kZero;
  if (bounds == "clamp") return Bounds::kClamp;
  RK_CHECK_VALUE(false, "bounds", "must be one of ('raise', 'zero', 'clamp'), got '", bounds, "'");
  return Bounds::kRaise;
}

bool is_table_float(at::ScalarType t) { return is_float_dtype(t) || t == at::kDouble; }

// ----------------------------------------------------------------------------- shared checks
struct Common {
  at::Tensor indices, offsets;  // contiguous, one index dtype
  std::optional<at::Tensor> psw;
  Mode mode;
  Bounds bounds;
  int64_t n_rows, nnz, n_bags;
  int64_t padding;  // -1: none (a negative padding_idx names no row, as in the reference)
};

Common check_common(const at::Tensor& weight, const at::Tensor& indices_in, const at::Tensor& offsets_in,
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
  c.padding = padding_idx.has_value() && *padding_idx >= 0 ? *padding_idx : -1;
  return c;
}

// Offsets: offsets[0] == 0, non-decreasing, offsets[B] == nnz (the reference's messages).
template <typename I>
void validate_offsets(const I* off, int64_t n_bags, int64_t nnz) {
  const int64_t first = off[0], last = off[n_bags];
  RK_CHECK_VALUE(first == 0, "offsets[0]", "must be 0, got ", first);
  for (int64_t b = 0; b < n_bags; ++b) {
    TORCH_CHECK_VALUE(off[b + 1] >= off[b], "offsets must be non-decreasing (lengths >= 0), got offsets[", b,
                      "]=", static_cast<int64_t>(off[b]), " > offsets[", b + 1, "]=", static_cast<int64_t>(off[b + 1]));
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

template <typename I>
int64_t n_tasks_for(const I* off, int64_t n_bags, int64_t min_work = 4096) {
  const int64_t work = static_cast<int64_t>(off[n_bags]) + n_bags;
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(threads, work / min_work));
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
  for (int64_t p = 0; p < n; ++p) {
    const uint8_t* row = r.table + rows[p] * r.row_bytes;
    float scale = 1.0f, bias = 0.0f;
    if constexpr (!kFloat) std::tie(scale, bias) = quant_params(r, row, ok);
    const Acc w = weights ? weights[p] : Acc(1);
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

// ----------------------------------------------------------------------------- forward
// Pools every bag. Under bounds="raise" the indices are checked here, bag by bag: a chunk stops at
// its first bad index and first_bad keeps the smallest such position over all chunks (the output
// is then discarded and the caller raises), so the indices are read once, in one parallel region.
template <typename I, typename T, typename Acc>
void forward_impl(const Common& c, const RowReader& reader, const at::Tensor& out, bool use_avx2,
                  std::atomic<bool>& bad_scale, std::atomic<int64_t>& first_bad) {
  const I* idx = c.indices.const_data_ptr<I>();
  const I* off = c.offsets.const_data_ptr<I>();
  const int64_t d = reader.dim;
  const bool quant = std::is_same_v<T, uint8_t>;
  const Acc* psw = c.psw.has_value() ? c.psw->const_data_ptr<Acc>() : nullptr;
  const at::ScalarType out_dtype = out.scalar_type();
  const bool direct = out_dtype == c10::CppTypeToScalarType<Acc>::value;  // write the output rows in place
  uint8_t* out_bytes = static_cast<uint8_t*>(out.data_ptr());
  const int64_t out_elem = out.element_size();
  // every index contributes once it is known to be in range: no compaction (int64 indices are
  // then the row list itself)
  const bool all_contribute = c.bounds == Bounds::kRaise && c.padding < 0;
  const uint64_t n_rows_u = static_cast<uint64_t>(c.n_rows);

  for_bag_chunks(off, c.n_bags, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> rows_buf;
    std::vector<Acc> weights_buf, scratch(direct ? 0 : d);
    bool ok = true;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = off[b], e = off[b + 1];
      if (c.bounds == Bounds::kRaise) {
        bool bad = false;
        for (int64_t p = s; p < e; ++p) bad |= static_cast<uint64_t>(static_cast<int64_t>(idx[p])) >= n_rows_u;
        if (bad) {
          int64_t p = s;
          while (static_cast<uint64_t>(static_cast<int64_t>(idx[p])) < n_rows_u) ++p;
          int64_t seen = first_bad.load(std::memory_order_relaxed);
          while (p < seen && !first_bad.compare_exchange_weak(seen, p, std::memory_order_relaxed)) {
          }
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
          if (static_cast<int64_t>(rows_buf.size()) < n) rows_buf.resize(n);
          for (int64_t p = 0; p < n; ++p) rows_buf[p] = idx[s + p];
          rows = rows_buf.data();
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
      Acc* dst = direct ? reinterpret_cast<Acc*>(out_bytes + b * d * out_elem) : scratch.data();
      if (n == 0) {
        std::fill(dst, dst + d, Acc(0));
      } else {
        const bool is_max = c.mode == Mode::kMax;
        if constexpr (std::is_same_v<Acc, float>) {
          if (use_avx2) {
            PoolArgs a{reader.kind, is_max, reader.table, reader.row_bytes, d, rows, weights, n, dst};
            a.raw_idx = idx + s;
            a.raw_is_int64 = std::is_same_v<I, int64_t>;
            a.raw_left = c.nnz - s;
            a.n_rows = c.n_rows;
            ok &= embedding_bag_cpu::pool_bag_avx2(a);
          } else {
            ok &= pool_scalar<T, Acc>(reader, rows, weights, n, is_max, dst);
          }
        } else {
          ok &= pool_scalar<T, Acc>(reader, rows, weights, n, is_max, dst);
        }
        if (c.mode == Mode::kMean) {
          const Acc count = static_cast<Acc>(n);
          for (int64_t col = 0; col < d; ++col) dst[col] = dst[col] / count;
        }
      }
      if (!direct) {
        AT_DISPATCH_SWITCH(out_dtype, "embedding_bag_cpu_out",
                           AT_DISPATCH_CASE(at::kFloat, [&] {
                             auto* o = reinterpret_cast<scalar_t*>(out_bytes) + b * d;
                             for (int64_t col = 0; col < d; ++col) o[col] = static_cast<scalar_t>(dst[col]);
                           }) AT_DISPATCH_CASE(at::kHalf, [&] {
                             auto* o = reinterpret_cast<scalar_t*>(out_bytes) + b * d;
                             for (int64_t col = 0; col < d; ++col) o[col] = static_cast<scalar_t>(dst[col]);
                           }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                             auto* o = reinterpret_cast<scalar_t*>(out_bytes) + b * d;
                             for (int64_t col = 0; col < d; ++col) o[col] = static_cast<scalar_t>(dst[col]);
                           }) AT_DISPATCH_CASE(at::kDouble, [&] {
                             auto* o = reinterpret_cast<scalar_t*>(out_bytes) + b * d;
                             for (int64_t col = 0; col < d; ++col) o[col] = static_cast<scalar_t>(dst[col]);
                           }));
      }
    }
    if (!ok) bad_scale.store(true);
  });
}

at::Tensor embedding_bag_forward_cpu(const at::Tensor& weight_in, const at::Tensor& indices, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& per_sample_weights, c10::string_view mode,
                             std::optional<int64_t> padding_idx, c10::string_view bounds, int64_t bits,
                             std::optional<at::ScalarType> output_dtype, bool sparse) {
  (void)sparse;  // only the backward reads it
  const at::ScalarType wt = weight_in.scalar_type();
  TORCH_CHECK_TYPE(is_table_float(wt) || wt == at::kByte,
                   "weight must be a float32, float16, bfloat16 or float64 table, or a uint8 row-wise table, got ",
                   dtype_name(wt));
  Common c = check_common(weight_in, indices, offsets, per_sample_weights, std::string(mode), padding_idx,
                          std::string(bounds));
  const bool quant = wt == at::kByte;
  int64_t d = weight_in.size(1);
  if (quant) {
    check_bits(bits);
    const int64_t min_cols = bits == 8 ? 9 : 5;
    TORCH_CHECK_VALUE(weight_in.size(1) >= min_cols, "weight: a ", bits, "-bit row-wise table needs at least ",
                      min_cols, " bytes per row, got ", weight_in.size(1));
    d = rowwise::unpacked_dim(weight_in.size(1), bits);
  }
  if (output_dtype.has_value())
    TORCH_CHECK_TYPE(is_table_float(*output_dtype), "output_dtype must be float32, float16, bfloat16 or float64, got ",
                     dtype_name(*output_dtype));
  const at::ScalarType out_dtype = output_dtype.value_or(quant ? at::kFloat : wt);
  const at::ScalarType acc = wt == at::kDouble ? at::kDouble : at::kFloat;
  if (c.psw.has_value() && c.psw->scalar_type() != acc) c.psw = c.psw->to(acc).contiguous();

  at::Tensor out;
  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_cpu_check", [&] {
    validate_offsets(c.offsets.const_data_ptr<index_t>(), c.n_bags, c.nnz);
    // bounds="raise" is checked by the pooling pass itself (d > 0), else here
    if (c.n_bags == 0 || d == 0 || c.bounds != Bounds::kRaise)
      validate_indices(c.indices.const_data_ptr<index_t>(), c.nnz, c.n_rows, c.bounds);
  });
  out = at::empty({c.n_bags, d}, weight_in.options().dtype(out_dtype));
  if (c.n_bags == 0 || d == 0) return out;

  const at::Tensor weight = weight_in.contiguous();
  RowReader reader{TableKind::kF32, wt, static_cast<const uint8_t*>(weight.const_data_ptr()),
                   weight.size(1) * weight.element_size(), d};
  const bool use_avx2 = cpu_isa() >= CpuIsa::kAvx2;
  std::atomic<bool> bad_scale{false};
  std::atomic<int64_t> first_bad{c.nnz};
  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_cpu", [&] {
    using I = index_t;
    switch (wt) {
      case at::kFloat: reader.kind = TableKind::kF32; forward_impl<I, float, float>(c, reader, out, use_avx2, bad_scale, first_bad); break;
      case at::kHalf: reader.kind = TableKind::kF16; forward_impl<I, c10::Half, float>(c, reader, out, use_avx2, bad_scale, first_bad); break;
      case at::kBFloat16:
        reader.kind = TableKind::kBF16;
        forward_impl<I, c10::BFloat16, float>(c, reader, out, use_avx2, bad_scale, first_bad);
        break;
      case at::kDouble: forward_impl<I, double, double>(c, reader, out, false, bad_scale, first_bad); break;
      default:
        reader.kind = bits == 8 ? TableKind::kQ8 : TableKind::kQ4;
        forward_impl<I, uint8_t, float>(c, reader, out, use_avx2, bad_scale, first_bad);
    }
  });
  if (first_bad.load() < c.nnz) {  // the first out-of-range index under bounds="raise"
    const int64_t p = first_bad.load();
    const int64_t bad = c.indices.scalar_type() == at::kLong ? c.indices.const_data_ptr<int64_t>()[p]
                                                             : c.indices.const_data_ptr<int32_t>()[p];
    TORCH_CHECK_INDEX(false, "indices: index ", bad, " is out of range for a table of ", c.n_rows,
                      " rows (valid: 0 <= index < ", c.n_rows, "; bounds='raise')");
  }
  TORCH_CHECK_VALUE(!bad_scale.load(), "packed table has non-finite scales or biases");
  return out;
}

// ----------------------------------------------------------------------------- backward
template <typename I, typename T, typename Acc>
void backward_impl(const Common& c, const at::Tensor& weight, const at::Tensor& grad, const Acc* psw,
                   Acc* G, Acc* grad_psw, int64_t* row_of) {
  const I* idx = c.indices.const_data_ptr<I>();
  const I* off = c.offsets.const_data_ptr<I>();
  const int64_t d = weight.size(1);
  const T* w = weight.const_data_ptr<T>();
  const Acc* g = grad.const_data_ptr<Acc>();

  for_bag_chunks(off, c.n_bags, [&](int64_t b0, int64_t b1) {
    std::vector<Acc> best(c.mode == Mode::kMax ? d : 0);
    std::vector<int64_t> pos(c.mode == Mode::kMax ? d : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = off[b], e = off[b + 1];
      int64_t count = 0;
      for (int64_t p = s; p < e; ++p) {
        row_of[p] = resolve(idx[p], c.n_rows, c.bounds, c.padding);
        count += row_of[p] >= 0;
      }
      const Acc* gb = g + b * d;
      if (c.mode == Mode::kMax) {
        // first position attaining the max, per column; -1 where a NaN makes the max NaN
        constexpr int64_t kNone = -2;
        std::fill(pos.begin(), pos.end(), kNone);
        for (int64_t p = s; p < e; ++p) {
          if (row_of[p] < 0) continue;
          const T* row = w + row_of[p] * d;
          for (int64_t col = 0; col < d; ++col) {
            const Acc v = static_cast<Acc>(row[col]);
            if (pos[col] == kNone) {
              best[col] = v;
              pos[col] = std::isnan(v) ? -1 : p;
            } else if (pos[col] >= 0) {
              if (std::isnan(v)) pos[col] = -1;
              else if (v > best[col]) { best[col] = v; pos[col] = p; }
            }
          }
        }
        std::fill(G + s * d, G + e * d, Acc(0));
        for (int64_t col = 0; col < d; ++col)
          if (pos[col] >= 0) G[pos[col] * d + col] = gb[col];
      } else {
        for (int64_t p = s; p < e; ++p) {
          Acc* gp = G + p * d;
          if (row_of[p] < 0) {
            std::fill(gp, gp + d, Acc(0));
          } else if (c.mode == Mode::kMean) {
            const Acc cnt = static_cast<Acc>(count);
            for (int64_t col = 0; col < d; ++col) gp[col] = gb[col] / cnt;
          } else {
            std::copy(gb, gb + d, gp);
          }
        }
      }
      if (psw != nullptr) {
        for (int64_t p = s; p < e; ++p) {
          Acc* gp = G + p * d;
          Acc dot = 0;
          if (row_of[p] >= 0) {
            const T* row = w + row_of[p] * d;
            for (int64_t col = 0; col < d; ++col) dot += gp[col] * static_cast<Acc>(row[col]);
          }
          grad_psw[p] = dot;
          const Acc pw = psw[p];
          for (int64_t col = 0; col < d; ++col) gp[col] = gp[col] * pw;
        }
      }
    }
  });
}

// grad_weight[r] += G[p] for every contributing index p (row_of[p] = r), in index order per row.
template <typename Acc>
void reduce_dense(const Acc* G, const int64_t* row_of, int64_t nnz, int64_t n_rows, int64_t d, Acc* gw) {
  const int64_t threads = at::get_num_threads();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>({threads, n_rows, nnz * d / 32768}));
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = n_rows * t0 / n_tasks, r1 = n_rows * t1 / n_tasks;
    for (int64_t p = 0; p < nnz; ++p) {
      const int64_t r = row_of[p];
      if (r < r0 || r >= r1) continue;  // also skips -1
      Acc* dst = gw + r * d;
      const Acc* src = G + p * d;
      for (int64_t col = 0; col < d; ++col) dst[col] = dst[col] + src[col];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_backward_cpu(
    const at::Tensor& grad_output_in, const at::Tensor& weight_in, const at::Tensor& indices,
    const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights, c10::string_view mode,
    std::optional<int64_t> padding_idx, c10::string_view bounds, bool sparse) {
  const at::ScalarType wt = weight_in.scalar_type();
  TORCH_CHECK_TYPE(is_table_float(wt), "embedding_bag_backward: weight must be a float32, float16, bfloat16 or "
                   "float64 table (quantized tables are inference only), got ", dtype_name(wt));
  Common c = check_common(weight_in, indices, offsets, per_sample_weights, std::string(mode), padding_idx,
                          std::string(bounds));
  const int64_t d = weight_in.size(1);
  check_dim(grad_output_in, "grad_output", 2);
  TORCH_CHECK_TYPE(is_table_float(grad_output_in.scalar_type()), "grad_output must be a float tensor, got ",
                   dtype_name(grad_output_in.scalar_type()));
  RK_CHECK_VALUE(grad_output_in.size(0) == c.n_bags && grad_output_in.size(1) == d, "grad_output",
                 "must have shape [", c.n_bags, ", ", d, "], got ", grad_output_in.sizes());
  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_backward_cpu_check", [&] {
    validate_offsets(c.offsets.const_data_ptr<index_t>(), c.n_bags, c.nnz);
    validate_indices(c.indices.const_data_ptr<index_t>(), c.nnz, c.n_rows, c.bounds);
  });
  const at::ScalarType acc = wt == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = weight_in.options().dtype(acc);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor grad = grad_output_in.to(acc).contiguous();
  std::optional<at::Tensor> psw;
  if (c.psw.has_value()) psw = c.psw->to(acc).contiguous();

  at::Tensor G = at::empty({c.nnz, d}, acc_opts);
  at::Tensor grad_psw = psw.has_value() ? at::empty({c.nnz}, acc_opts) : weight_in.new_empty({0});
  at::Tensor row_of = at::empty({c.nnz}, weight_in.options().dtype(at::kLong));
  at::Tensor grad_weight;

  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_backward_cpu", [&] {
    using I = index_t;
    AT_DISPATCH_SWITCH(wt, "embedding_bag_backward_cpu_table",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        backward_impl<I, scalar_t, float>(c, weight, grad, psw ? psw->const_data_ptr<float>() : nullptr,
                                          G.data_ptr<float>(), psw ? grad_psw.data_ptr<float>() : nullptr,
                                          row_of.data_ptr<int64_t>());
      })
      AT_DISPATCH_CASE(at::kHalf, [&] {
        backward_impl<I, scalar_t, float>(c, weight, grad, psw ? psw->const_data_ptr<float>() : nullptr,
                                          G.data_ptr<float>(), psw ? grad_psw.data_ptr<float>() : nullptr,
                                          row_of.data_ptr<int64_t>());
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        backward_impl<I, scalar_t, float>(c, weight, grad, psw ? psw->const_data_ptr<float>() : nullptr,
                                          G.data_ptr<float>(), psw ? grad_psw.data_ptr<float>() : nullptr,
                                          row_of.data_ptr<int64_t>());
      })
      AT_DISPATCH_CASE(at::kDouble, [&] {
        backward_impl<I, scalar_t, double>(c, weight, grad, psw ? psw->const_data_ptr<double>() : nullptr,
                                           G.data_ptr<double>(), psw ? grad_psw.data_ptr<double>() : nullptr,
                                           row_of.data_ptr<int64_t>());
      }));
  });
  if (psw.has_value()) grad_psw = grad_psw.to(c.psw->scalar_type());  // c.psw keeps the caller's dtype

  if (sparse) {
    grad_weight = G.to(wt);
  } else {
    at::Tensor gw = at::zeros({c.n_rows, d}, acc_opts);
    if (c.n_rows > 0 && c.nnz > 0 && d > 0) {
      if (acc == at::kDouble)
        reduce_dense<double>(G.const_data_ptr<double>(), row_of.const_data_ptr<int64_t>(), c.nnz, c.n_rows, d,
                             gw.data_ptr<double>());
      else
        reduce_dense<float>(G.const_data_ptr<float>(), row_of.const_data_ptr<int64_t>(), c.nnz, c.n_rows, d,
                            gw.data_ptr<float>());
    }
    grad_weight = gw.to(wt);
  }
  return {grad_weight.contiguous(), grad_psw.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) {
  m.impl("embedding_bag", &embedding_bag_forward_cpu);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
}

}  // namespace recsys_kernels
