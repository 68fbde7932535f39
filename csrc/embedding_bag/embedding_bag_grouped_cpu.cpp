// C++ CPU kernel of embedding_bag_grouped: every lookup of the group pooled in one parallel region
// (embedding_bag_cpu_forward.h), each into its own columns of one [B, sum D] output. Semantics and
// preconditions: recsys_kernels/ops/embedding_grouped.py. Errors: the pass records them per lookup;
// when any lookup fails (offsets, bounds, scales), the lookups are replayed one by one through the
// single-table op, in order, so the error raised is exactly embedding_bag's for the first bad lookup.
#include <memory>
#include <string>
#include <vector>

#include <torch/library.h>

#include "common/fresh_memory.h"
#include "embedding_bag/embedding_bag_cpu_forward.h"

namespace recsys_kernels {
namespace {

using namespace embedding_bag_cpu;

at::Tensor embedding_bag_grouped_cpu(at::TensorList weights, at::TensorList indices, at::TensorList offsets,
                                     const c10::List<std::optional<at::Tensor>>& per_sample_weights,
                                     const c10::List<std::string>& modes, at::IntArrayRef padding_idx,
                                     at::IntArrayRef bits, const c10::List<bool>& sparse, c10::string_view bounds,
                                     at::ScalarType output_dtype) {
  // (the signature must be the CUDA kernel's to the letter: one op, one C++ signature)
  // (sparse: only the backward reads it, but its length is checked like the others')
  const size_t n = weights.size();
  check_lookup_lists(n, indices, offsets, per_sample_weights, modes, padding_idx, bits, sparse);
  TORCH_CHECK_TYPE(is_float_dtype(output_dtype), "output_dtype must be float32, float16 or bfloat16, got ",
                   dtype_name(output_dtype));
  const std::string bounds_s(bounds);
  auto pad_of = [&](size_t f) { return padding_idx[f] >= 0 ? std::optional<int64_t>(padding_idx[f]) : std::nullopt; };
  // Replays the lookups through the single-table checks and pass, in order: raises the first
  // lookup's error, which is the one to report.
  auto raise_in_lookup_order = [&] {
    for (size_t f = 0; f < n; ++f) {
      Lookup one;
      prepare_lookup(one, weights[f], indices[f], offsets[f], per_sample_weights.get(f), modes.get(f), pad_of(f),
                     bounds_s, bits[f]);
      at::Tensor out = at::empty({one.c.n_bags, one.dim()}, weights[f].options().dtype(at::kFloat));
      if (one.c.n_bags == 0 || one.dim() == 0) continue;
      one.out = static_cast<uint8_t*>(out.data_ptr());
      one.out_stride = one.dim();
      pool_lookups({&one});
      raise_pool_errors(one);
    }
  };

  std::vector<std::unique_ptr<Lookup>> lookups;
  int64_t total_dim = 0;
  try {
    for (size_t f = 0; f < n; ++f) {
      TORCH_CHECK_TYPE(weights[f].scalar_type() != at::kDouble,
                       "embedding_bag_grouped: float64 tables are not supported (weights[", f, "])");
      lookups.push_back(std::make_unique<Lookup>());
      prepare_lookup(*lookups.back(), weights[f], indices[f], offsets[f], per_sample_weights.get(f), modes.get(f),
                     pad_of(f), bounds_s, bits[f]);
      total_dim += lookups.back()->dim();
    }
  } catch (const c10::Error&) {
    raise_in_lookup_order();  // an earlier lookup may hold an error the pass has not looked for yet
    throw;
  }
  const int64_t n_bags = lookups[0]->c.n_bags;
  for (size_t f = 1; f < n; ++f)
    TORCH_CHECK_VALUE(lookups[f]->c.n_bags == n_bags, "offsets[", f, "] has ", lookups[f]->c.n_bags + 1,
                      " entries, offsets[0] has ", n_bags + 1, ": every lookup needs the same batch size B");
  at::Tensor out = empty_for_writing({n_bags, total_dim}, weights[0].options().dtype(output_dtype));
  if (n_bags == 0 || total_dim == 0) return out;
  std::vector<Lookup*> group;
  int64_t col = 0;
  for (auto& lk : lookups) {
    lk->out = static_cast<uint8_t*>(out.data_ptr());
    lk->out_stride = total_dim;
    lk->col0 = col;
    lk->out_dtype = output_dtype;
    col += lk->dim();
    // a lookup of D = 0 has nothing to pool (its indices were checked in prepare_lookup), and the
    // pooling pass divides by D
    if (lk->dim() > 0) group.push_back(lk.get());
  }
  pool_lookups(group);
  for (auto& lk : lookups) {
    if (lk->first_bad.load() < lk->c.nnz || lk->bad_scale.load()) {
      raise_in_lookup_order();
      raise_pool_errors(*lk);  // not reached: the replay raises
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) { m.impl("embedding_bag_grouped", &embedding_bag_grouped_cpu); }

}  // namespace recsys_kernels
