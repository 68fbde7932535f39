// C++ CPU kernels of embedding_bag and embedding_bag_backward (semantics: the reference in
// recsys_kernels/ops/embedding.py, which this must match, errors included).
//
// Forward: the offsets are checked first; under bounds="raise" the indices are checked by the
// pooling pass itself, each before its row is read (one read of the indices, one parallel
// region), and the first bad index in index order raises IndexError once the pass is over (the
// output, a fresh tensor, is dropped). The bags are split into chunks of about equal work
// (indices + bags, not bag count: bag lengths are skewed) for at::parallel_for. Rows are pooled in
// fp32 (fp64 for fp64 tables) in index order, like the reference's index_add_: by the
// vector kernel (embedding_bag_cpu_pool.h: AVX-512 for D a multiple of 16, else AVX2+FMA+F16C)
// when recsys_kernels::cpu_isa() allows it, else by the scalar loop (RECSYS_KERNELS_CPU_ISA=avx2 /
// scalar force the lower paths). When every index contributes the
// kernel pools a chunk's bags straight from the raw indices in one call; otherwise each bag's
// indices are first resolved (bounds policy, padding_idx) into a compacted list of the
// contributing rows (embedding_bag_cpu_forward.h). Both paths give the same bits.
//
// Backward: the per-index gradient rows G [nnz, D] (grad_output of the bag, / count for mean, only
// at the first arg-max index for max, * per-sample weight) are computed in parallel over bags,
// with the per-sample-weight gradient. sparse=True returns G. The dense gradient is reduced
// deterministically, each row the sum in index order of its indices' G rows, or of their bags'
// grad_output rows when sum / mean need no G (no atomics, the reference's index_add_ sums), by
// each thread over its run of rows: scatter_to_rows (zeros, then in-place adds) for an fp32 /
// fp64 table whose rows are mostly unread, else reduce_by_row (the indices grouped by row, each
// row written once, fp16 / bf16 rounded as it is stored).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "common/fresh_memory.h"
#include "embedding_bag/embedding_bag_cpu_forward.h"

namespace recsys_kernels {
namespace {

using namespace embedding_bag_cpu;

at::Tensor embedding_bag_forward_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                                     const std::optional<at::Tensor>& per_sample_weights, c10::string_view mode,
                                     std::optional<int64_t> padding_idx, c10::string_view bounds, int64_t bits,
                                     std::optional<at::ScalarType> output_dtype, bool sparse) {
  (void)sparse;  // only the backward reads it
  Lookup lk;
  prepare_lookup(lk, weight, indices, offsets, per_sample_weights, std::string(mode), padding_idx,
                 std::string(bounds), bits);
  if (output_dtype.has_value())
    TORCH_CHECK_TYPE(is_table_float(*output_dtype), "output_dtype must be float32, float16, bfloat16 or float64, got ",
                     dtype_name(*output_dtype));
  lk.out_dtype = output_dtype.value_or(lk.default_out);
  at::Tensor out = empty_for_writing({lk.c.n_bags, lk.dim()}, weight.options().dtype(lk.out_dtype));
  if (lk.c.n_bags == 0 || lk.dim() == 0) return out;
  lk.out = static_cast<uint8_t*>(out.data_ptr());
  lk.out_stride = lk.dim();
  pool_lookups({&lk});
  raise_pool_errors(lk);
  return out;
}

// ----------------------------------------------------------------------------- backward
// The accumulation type of a table type: fp64 for fp64 tables, else fp32.
template <typename T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename I, typename T, typename Acc>
void backward_impl(const Common& c, const at::Tensor& weight, const at::Tensor& grad, const Acc* psw,
                   bool direct, Acc* G, Acc* grad_psw, int64_t* row_of, int64_t* bag_of, int64_t* bag_count) {
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
      // the dense sum/mean gradient is reduced from grad directly (not `G == nullptr`: an empty G
      // of D = 0 has none either, and the per-sample-weight gradient was left unwritten)
      if (direct) {
        std::fill(bag_of + s, bag_of + e, b);
        bag_count[b] = count;
        continue;
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
          if (row_of[p] < 0) continue;  // a skipped row stays 0, whatever its weight (0 * inf is NaN)
          const Acc pw = psw[p];
          for (int64_t col = 0; col < d; ++col) gp[col] = gp[col] * pw;
        }
      }
    }
  });
}

// The contributing positions of rows r0, ..., r1 - 1 grouped by row, ascending (a counting sort
// over those rows from two scans of row_of, whose -1s are dropped): row r's are
// pos[start[r - r0] .. start[r - r0 + 1]).
void group_positions_by_row(const int64_t* row_of, int64_t nnz, int64_t r0, int64_t r1, std::vector<int64_t>& start,
                            std::vector<int64_t>& pos) {
  const int64_t n = r1 - r0;
  start.assign(n + 1, 0);
  for (int64_t p = 0; p < nnz; ++p)
    if (row_of[p] >= r0 && row_of[p] < r1) ++start[row_of[p] - r0];
  for (int64_t i = 1; i < n; ++i) start[i] += start[i - 1];  // start[i]: the end of row r0 + i
  if (n > 0) start[n] = start[n - 1];
  pos.resize(start[n]);
  for (int64_t p = nnz - 1; p >= 0; --p)  // filled from each row's end back: start[i] ends at its start
    if (row_of[p] >= r0 && row_of[p] < r1) pos[--start[row_of[p] - r0]] = p;
}

// The two reductions of the dense gradient below give every row the same sum, 0 + the gradient
// rows of its indices added in index order by add_position(p, sum) in Acc (the reference's
// index_add_ sums; no atomics). Each task owns a run of rows (an even split: hot rows lie
// scattered through a table).

// The number of tasks of a reduction over n_rows rows: one per thread, but no more than there are
// rows, and none with under ~32k values of work (`work_values`).
int64_t row_tasks(int64_t n_rows, int64_t work_values) {
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), n_rows, work_values / 32768}));
}

// grad_weight [n_rows, D] in an fp32 / fp64 table's own dtype, zeroed by the caller: each task
// scans the indices in order and adds those of its rows in place. Best where few rows are read (a
// large table's dense gradient): the zeros cost one bulk page-faulting memset and the scan keeps
// each bag's grad_output row in L1 (shape A: 8-12 ms ahead of reduce_by_row, measured in one
// process).
template <typename Acc, typename AddPosition>
void scatter_to_rows(const int64_t* row_of, int64_t nnz, int64_t n_rows, int64_t d, Acc* gw,
                     const AddPosition& add_position) {
  const int64_t n_tasks = row_tasks(n_rows, nnz * d);
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = n_rows * t0 / n_tasks, r1 = n_rows * t1 / n_tasks;
    for (int64_t p = 0; p < nnz; ++p)
      if (row_of[p] >= r0 && row_of[p] < r1) add_position(p, gw + row_of[p] * d);  // (skips -1 too)
  });
}

// grad_weight [n_rows, D] in the table's dtype, every row written once, summed in Acc and rounded
// once (store_values: F16C / AVX2 for fp16 / bf16); a run of rows no index reads is one memset.
// Each task groups its own indices by row.
// Best where most rows are read (the compact table of a sparse gradient: 25 ms against 39 at
// shape A), and for fp16 / bf16 tables, which need no fp32 [N, D] copy (that had made them 2x
// slower than torch).
template <typename Acc, typename T, typename AddPosition>
void reduce_by_row(const int64_t* row_of, int64_t nnz, int64_t n_rows, int64_t d, T* gw,
                   const AddPosition& add_position) {
  const int64_t n_tasks = row_tasks(n_rows, (n_rows + nnz) * d);
  const bool avx2 = cpu_isa() >= CpuIsa::kAvx2;
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Acc> sum(std::is_same_v<T, Acc> ? 0 : d);
    std::vector<int64_t> start, pos;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r0 = n_rows * task / n_tasks, r1 = n_rows * (task + 1) / n_tasks;
      group_positions_by_row(row_of, nnz, r0, r1, start, pos);
      for (int64_t r = r0; r < r1;) {
        int64_t untouched = r;  // a run of rows no index reads: zeros
        while (untouched < r1 && start[untouched - r0] == start[untouched - r0 + 1]) ++untouched;
        if (untouched > r) {
          std::memset(gw + r * d, 0, (untouched - r) * d * sizeof(T));
          r = untouched;
          continue;
        }
        // fp32 / fp64 tables sum in place; fp16 / bf16 ones in fp32, then rounded once
        Acc* acc = std::is_same_v<T, Acc> ? reinterpret_cast<Acc*>(gw + r * d) : sum.data();
        std::fill(acc, acc + d, Acc(0));
        for (int64_t k = start[r - r0]; k < start[r - r0 + 1]; ++k) add_position(pos[k], acc);
        if constexpr (!std::is_same_v<T, Acc>) store_values(acc, gw + r * d, d, avx2);
        ++r;
      }
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

  // a dense sum / mean gradient without per-sample weights needs no per-index rows, only each
  // index's bag (and the bag's count, for mean)
  const bool direct = !sparse && c.mode != Mode::kMax && !psw.has_value();
  const auto long_opts = weight_in.options().dtype(at::kLong);
  at::Tensor G = empty_for_writing({direct ? 0 : c.nnz, d}, acc_opts);
  at::Tensor grad_psw = psw.has_value() ? at::empty({c.nnz}, acc_opts) : weight_in.new_empty({0});
  at::Tensor row_of = at::empty({c.nnz}, long_opts);
  at::Tensor bag_of = at::empty({direct ? c.nnz : 0}, long_opts);
  at::Tensor bag_count = at::empty({direct ? c.n_bags : 0}, long_opts);

  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_backward_cpu", [&] {
    using I = index_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt, "embedding_bag_backward_cpu_table", [&] {
      using Acc = AccOf<scalar_t>;
      backward_impl<I, scalar_t, Acc>(c, weight, grad, psw ? psw->const_data_ptr<Acc>() : nullptr, direct,
                                      G.data_ptr<Acc>(), psw ? grad_psw.data_ptr<Acc>() : nullptr,
                                      row_of.data_ptr<int64_t>(), bag_of.data_ptr<int64_t>(),
                                      bag_count.data_ptr<int64_t>());
    });
  });
  if (psw.has_value()) grad_psw = grad_psw.to(c.psw->scalar_type());  // c.psw keeps the caller's dtype
  if (sparse) return {G.to(wt).contiguous(), grad_psw.contiguous()};

  // reduce_by_row unless the table is fp32 / fp64 and most rows go unread (the measured crossover
  // lies between 13% read, shape A's dense gradient, and ~100%, a sparse gradient's compact table)
  const bool scatter = (wt == at::kFloat || wt == at::kDouble) && c.nnz * 4 < c.n_rows;
  at::Tensor grad_weight = empty_for_writing({c.n_rows, d}, weight_in.options());
  if (scatter) grad_weight.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt, "embedding_bag_backward_cpu_reduce", [&] {
    using Acc = AccOf<scalar_t>;
    const Acc* g = grad.const_data_ptr<Acc>();
    const Acc* rows = G.const_data_ptr<Acc>();
    const int64_t* bag = bag_of.const_data_ptr<int64_t>();
    const int64_t* count = bag_count.const_data_ptr<int64_t>();
    const bool mean = c.mode == Mode::kMean;
    auto add_position = [&](int64_t p, Acc* sum) {
      if (!direct) {
        const Acc* src = rows + p * d;
        for (int64_t col = 0; col < d; ++col) sum[col] = sum[col] + src[col];
      } else if (mean) {  // the value backward_impl would have written: grad[b] / count(b)
        const Acc* src = g + bag[p] * d;
        const Acc n = static_cast<Acc>(count[bag[p]]);
        for (int64_t col = 0; col < d; ++col) sum[col] = sum[col] + src[col] / n;
      } else {
        const Acc* src = g + bag[p] * d;
        for (int64_t col = 0; col < d; ++col) sum[col] = sum[col] + src[col];
      }
    };
    const int64_t* row = row_of.const_data_ptr<int64_t>();
    if constexpr (std::is_same_v<scalar_t, Acc>) {
      if (scatter) return scatter_to_rows<Acc>(row, c.nnz, c.n_rows, d, grad_weight.data_ptr<Acc>(), add_position);
    }
    reduce_by_row<Acc>(row, c.nnz, c.n_rows, d, grad_weight.data_ptr<scalar_t>(), add_position);
  });
  return {grad_weight, grad_psw.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) {
  m.impl("embedding_bag", &embedding_bag_forward_cpu);
  m.impl("embedding_bag_backward", &embedding_bag_backward_cpu);
}

}  // namespace recsys_kernels
