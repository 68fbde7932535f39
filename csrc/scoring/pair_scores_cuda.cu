// CUDA kernel of pair_scores (semantics and messages: recsys_kernels/ops/scoring.py and the CPU
// kernel csrc/scoring/pair_scores_cpu.cpp, whose C++ signature this one repeats exactly).
// scores[p] = <user_emb[user_idx[p]], item_emb[item_idx[p]]> (+ item_bias[item_idx[p]]): a group
// of lanes per pair, fp32 fma per lane, a shuffle reduction (gather_dot in scoring_cuda_common.cuh).
// The indices (and the int8 rows they gather) are validated first (device flags, one read back).
#include <optional>

#include <torch/library.h>

#include "scoring/scoring_cuda_common.cuh"

namespace recsys_kernels {
namespace pair_scores_cuda_impl {

using namespace scoring_cuda;

template <typename IndexT>
struct IndexedPairs {
  const IndexT* user_idx;
  const IndexT* item_idx;
  __device__ __forceinline__ void operator()(int64_t p, int64_t& u, int64_t& i) const {
    u = IndexPtr<IndexT>{user_idx}[p];
    i = IndexPtr<IndexT>{item_idx}[p];
  }
};

at::Tensor pair_scores_cuda(const at::Tensor& user_emb_in, const at::Tensor& item_emb_in, const at::Tensor& user_idx_in,
                            const at::Tensor& item_idx_in, const std::optional<at::Tensor>& item_bias) {
  const auto [user_emb, item_emb, user_idx, item_idx, items] = pair_inputs(user_emb_in, item_emb_in, user_idx_in,
                                                                          item_idx_in);
  check_cuda(item_emb, "item_emb", user_emb, "user_emb");
  check_cuda(user_idx, "user_idx", user_emb, "user_emb");
  check_cuda(item_idx, "item_idx", user_emb, "user_emb");
  const c10::cuda::CUDAGuard guard(user_emb.device());
  const at::Tensor bias = bias_f32(item_bias, items.rows, user_emb, "user_emb");

  at::Tensor flags = new_flags(user_emb);
  launch_check_index(user_idx, user_emb.size(0), kIndexA, nullptr, flags);
  launch_check_index(item_idx, items.rows, kIndexB, &items, flags);
  const HostFlags f(flags);
  raise_index(f, kIndexA, user_emb.size(0), "user_idx");
  raise_index(f, kIndexB, items.rows, "item_idx");
  raise_scale(f);

  at::Tensor out = at::empty({user_idx.size(0)}, user_emb.options().dtype(at::kFloat));
  const int64_t n = out.numel(), d = items.dim;
  if (n == 0) return out;
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const bool vec = use_vec(d, user_emb.const_data_ptr(), items.data);
  AT_DISPATCH_INDEX_TYPES(user_idx.scalar_type(), "pair_scores_cuda", [&] {
    const IndexedPairs<index_t> pairs{user_idx.const_data_ptr<index_t>(), item_idx.const_data_ptr<index_t>()};
    RK_DISPATCH_FLOAT_TYPES(user_emb.scalar_type(), "pair_scores_cuda", [&] {
      const scalar_t* q = user_emb.const_data_ptr<scalar_t>();
      if (vec) {
        with_item_rows<4>(items, [&](const auto& rows) {
          launch_gather_dot<FloatRows<scalar_t, 4, true>, std::decay_t<decltype(rows)>, IndexedPairs<index_t>, false>(
              {q, d}, rows, pairs, b, n, d, out.data_ptr<float>(), nullptr);
        });
      } else {
        with_item_rows<1>(items, [&](const auto& rows) {
          launch_gather_dot<FloatRows<scalar_t, 1, false>, std::decay_t<decltype(rows)>, IndexedPairs<index_t>, false>(
              {q, d}, rows, pairs, b, n, d, out.data_ptr<float>(), nullptr);
        });
      }
    });
  });
  return out;
}

}  // namespace pair_scores_cuda_impl

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) { m.impl("pair_scores", &pair_scores_cuda_impl::pair_scores_cuda); }

}  // namespace recsys_kernels
