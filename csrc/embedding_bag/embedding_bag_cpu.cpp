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
  at::Tensor out = at::empty({lk.c.n_bags, lk.dim()}, weight.options().dtype(lk.out_dtype));
  if (lk.c.n_bags == 0 || lk.dim() == 0) return out;
  lk.out = static_cast<uint8_t*>(out.data_ptr());
  lk.out_stride = lk.dim();
  pool_lookups({&lk});
  raise_pool_errors(lk);
  return out;
}

// ----------------------------------------------------------------------------- backward
template <typename I, typename T, typename Acc>
void backward_impl(const Common& c, const at::Tensor& weight, const at::Tensor& grad, const Acc* psw,
                   bool direct, Acc* G, Acc* grad_psw, int64_t* row_of) {
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
      if (direct) continue;
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

// The same sums without the per-index rows, for a dense gradient of mode sum / mean without
// per-sample weights: grad_weight[r] += grad[b] (mean: grad[b] / count(b), the value backward_impl
// would have written) for every contributing index p of bag b, in index order per row.
template <typename I, typename Acc>
void reduce_dense_from_bags(const Acc* g, const I* off, int64_t n_bags, const int64_t* row_of, bool mean,
                            int64_t nnz, int64_t n_rows, int64_t d, Acc* gw) {
  const int64_t threads = at::get_num_threads();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>({threads, n_rows, nnz * d / 32768}));
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = n_rows * t0 / n_tasks, r1 = n_rows * t1 / n_tasks;
    for (int64_t b = 0; b < n_bags; ++b) {
      const int64_t s = off[b], e = off[b + 1];
      int64_t n = 0;
      if (mean)
        for (int64_t p = s; p < e; ++p) n += row_of[p] >= 0;
      const Acc count = static_cast<Acc>(n);
      const Acc* gb = g + b * d;
      for (int64_t p = s; p < e; ++p) {
        const int64_t r = row_of[p];
        if (r < r0 || r >= r1) continue;  // also skips -1
        Acc* dst = gw + r * d;
        if (mean) {
          for (int64_t col = 0; col < d; ++col) dst[col] = dst[col] + gb[col] / count;
        } else {
          for (int64_t col = 0; col < d; ++col) dst[col] = dst[col] + gb[col];
        }
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

  // a dense sum / mean gradient without per-sample weights needs no per-index rows
  const bool direct = !sparse && c.mode != Mode::kMax && !psw.has_value();
  at::Tensor G = at::empty({direct ? 0 : c.nnz, d}, acc_opts);
  at::Tensor grad_psw = psw.has_value() ? at::empty({c.nnz}, acc_opts) : weight_in.new_empty({0});
  at::Tensor row_of = at::empty({c.nnz}, weight_in.options().dtype(at::kLong));
  at::Tensor grad_weight;

  AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_backward_cpu", [&] {
    using I = index_t;
    AT_DISPATCH_SWITCH(wt, "embedding_bag_backward_cpu_table",
      AT_DISPATCH_CASE(at::kFloat, [&] {
        backward_impl<I, scalar_t, float>(c, weight, grad, psw ? psw->const_data_ptr<float>() : nullptr,
                                          direct, G.data_ptr<float>(), psw ? grad_psw.data_ptr<float>() : nullptr,
                                          row_of.data_ptr<int64_t>());
      })
      AT_DISPATCH_CASE(at::kHalf, [&] {
        backward_impl<I, scalar_t, float>(c, weight, grad, psw ? psw->const_data_ptr<float>() : nullptr,
                                          direct, G.data_ptr<float>(), psw ? grad_psw.data_ptr<float>() : nullptr,
                                          row_of.data_ptr<int64_t>());
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        backward_impl<I, scalar_t, float>(c, weight, grad, psw ? psw->const_data_ptr<float>() : nullptr,
                                          direct, G.data_ptr<float>(), psw ? grad_psw.data_ptr<float>() : nullptr,
                                          row_of.data_ptr<int64_t>());
      })
      AT_DISPATCH_CASE(at::kDouble, [&] {
        backward_impl<I, scalar_t, double>(c, weight, grad, psw ? psw->const_data_ptr<double>() : nullptr,
                                           direct, G.data_ptr<double>(), psw ? grad_psw.data_ptr<double>() : nullptr,
                                           row_of.data_ptr<int64_t>());
      }));
  });
  if (psw.has_value()) grad_psw = grad_psw.to(c.psw->scalar_type());  // c.psw keeps the caller's dtype

  if (sparse) {
    grad_weight = G.to(wt);
  } else {
    at::Tensor gw = at::zeros({c.n_rows, d}, acc_opts);
    if (c.n_rows > 0 && c.nnz > 0 && d > 0 && direct) {
      const bool mean = c.mode == Mode::kMean;
      AT_DISPATCH_INDEX_TYPES(c.indices.scalar_type(), "embedding_bag_backward_cpu_direct", [&] {
        const index_t* off = c.offsets.const_data_ptr<index_t>();
        if (acc == at::kDouble)
          reduce_dense_from_bags<index_t, double>(grad.const_data_ptr<double>(), off, c.n_bags,
                                                  row_of.const_data_ptr<int64_t>(), mean, c.nnz, c.n_rows, d,
                                                  gw.data_ptr<double>());
        else
          reduce_dense_from_bags<index_t, float>(grad.const_data_ptr<float>(), off, c.n_bags,
                                                 row_of.const_data_ptr<int64_t>(), mean, c.nnz, c.n_rows, d,
                                                 gw.data_ptr<float>());
      });
    } else if (c.n_rows > 0 && c.nnz > 0 && d > 0) {
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
