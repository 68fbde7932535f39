// CUDA kernel of pair_scores_backward (semantics: _pair_scores_backward_ref in
// recsys_kernels/ops/scoring.py; C++ signature and messages: pair_scores_backward_cpu in
// csrc/scoring/pair_scores_cpu.cpp). Dense gradients, accumulated in fp32 and cast to the input
// dtypes at the end:
//   grad_user[user_idx[p]] += g[p] * item_emb[item_idx[p]]
//   grad_item[item_idx[p]] += g[p] * user_emb[user_idx[p]]   (float item tables only)
//   grad_bias[item_idx[p]] += g[p]                            (with item_bias)
// One group of lanes per pair (the forward's column mapping) adds its products with fp32
// atomicAdd. NOT deterministic: pairs that share a row add up in whatever order the hardware
// runs them, so repeated calls can differ in the last bits (the CPU kernel sorts and is
// deterministic). Each product is rounded before it is added, as in the reference.
#include <optional>
#include <tuple>

#include <ATen/Context.h>
#include <torch/library.h>

#include "scoring/scoring_cuda_common.cuh"

namespace recsys_kernels {
namespace pair_scores_backward_cuda_impl {

using namespace scoring_cuda;

template <typename URows, typename IRows, typename IndexT>
__global__ void __launch_bounds__(kThreads)
pair_backward_kernel(const URows users, const IRows items, const IndexT* __restrict__ user_idx,
                     const IndexT* __restrict__ item_idx, const float* __restrict__ g, int64_t n, int64_t d,
                     int tpr_log2, float* __restrict__ grad_user, float* __restrict__ grad_item,
                     float* __restrict__ grad_bias) {
  constexpr int VEC = IRows::kVec;
  static_assert(URows::kVec == VEC, "one column mapping for both rows");
  const int lane = threadIdx.x % kWarpSize;
  const int tpr = 1 << tpr_log2;
  const int sub = lane & (tpr - 1);
  const int group = lane >> tpr_log2;
  const int64_t groups = kWarpSize >> tpr_log2;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t p0 = warp * groups; p0 < n; p0 += n_warps * groups) {
    const int64_t p = p0 + group;
    if (p >= n) continue;  // no shuffles below: lanes may leave
    const int64_t u = IndexPtr<IndexT>{user_idx}[p];
    const int64_t i = IndexPtr<IndexT>{item_idx}[p];
    const float gp = g[p];
    for (int64_t col = static_cast<int64_t>(sub) * VEC; col < d; col += static_cast<int64_t>(tpr) * VEC) {
      float a[VEC], b[VEC];
      users.load(u, col, a);
      items.load(i, col, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        atomicAdd(grad_user + u * d + col + k, gp * b[k]);
        if (grad_item != nullptr) atomicAdd(grad_item + i * d + col + k, gp * a[k]);
      }
    }
    if (grad_bias != nullptr && sub == 0) atomicAdd(grad_bias + i, gp);
  }
}

template <typename URows, typename IRows, typename IndexT>
void launch_backward(const URows& users, const IRows& items, const at::Tensor& user_idx, const at::Tensor& item_idx,
                     const at::Tensor& g, int64_t d, float* grad_user, float* grad_item, float* grad_bias) {
  const int64_t n = g.numel();
  if (n == 0) return;
  const int tpr_log2 = tpr_log2_for(d, IRows::kVec);
  const int64_t per_block = static_cast<int64_t>(kWarpsPerBlock) * (kWarpSize >> tpr_log2);
  pair_backward_kernel<URows, IRows, IndexT>
      <<<cuda::grid_for(n, per_block), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          users, items, user_idx.const_data_ptr<IndexT>(), item_idx.const_data_ptr<IndexT>(),
          g.const_data_ptr<float>(), n, d, tpr_log2, grad_user, grad_item, grad_bias);
  RK_CUDA_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_scores_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& user_emb_in, const at::Tensor& item_emb_in,
    const at::Tensor& user_idx_in, const at::Tensor& item_idx_in, const std::optional<at::Tensor>& item_bias) {
  const auto [user_emb, item_emb, user_idx, item_idx, items] = pair_inputs(user_emb_in, item_emb_in, user_idx_in,
                                                                          item_idx_in);
  const Table users = table_view(user_emb, "user_emb", false);
  check_pair_grad(grad_output, user_idx.size(0), item_bias, items.rows);
  if (item_bias.has_value()) check_cuda(*item_bias, "item_bias", user_emb, "user_emb");
  check_cuda(item_emb, "item_emb", user_emb, "user_emb");
  check_cuda(user_idx, "user_idx", user_emb, "user_emb");
  check_cuda(item_idx, "item_idx", user_emb, "user_emb");
  check_cuda(grad_output, "grad_output", user_emb, "user_emb");
  const c10::cuda::CUDAGuard guard(user_emb.device());
  // the float atomics below: an error (or a warning) under torch.use_deterministic_algorithms(True),
  // as for torch's own CUDA index_add_
  at::globalContext().alertNotDeterministic("recsys_kernels::pair_scores_backward (CUDA kernel)");

  at::Tensor flags = new_flags(user_emb);
  launch_check_index(user_idx, users.rows, kIndexA, nullptr, flags);
  launch_check_index(item_idx, items.rows, kIndexB, &items, flags);
  const HostFlags f(flags);
  raise_index(f, kIndexA, users.rows, "user_idx");
  raise_index(f, kIndexB, items.rows, "item_idx");
  raise_scale(f);

  const at::Tensor g = grad_output.to(at::kFloat).contiguous();
  const auto f32 = user_emb.options().dtype(at::kFloat);
  const int64_t d = items.dim;
  const bool quantized = items.kind == Kind::kQ8;
  const bool want_bias = item_bias.has_value();
  at::Tensor grad_user = at::zeros({users.rows, d}, f32);
  at::Tensor grad_item = quantized ? at::empty({0}, f32) : at::zeros({items.rows, d}, f32);
  at::Tensor grad_bias = want_bias ? at::zeros({items.rows}, f32) : at::empty({0}, f32);
  float* gi = quantized ? nullptr : grad_item.data_ptr<float>();
  float* gb = want_bias ? grad_bias.data_ptr<float>() : nullptr;
  const bool vec = use_vec(d, user_emb.const_data_ptr(), items.data);
  AT_DISPATCH_INDEX_TYPES(user_idx.scalar_type(), "pair_scores_backward_cuda", [&] {
    RK_DISPATCH_FLOAT_TYPES(user_emb.scalar_type(), "pair_scores_backward_cuda", [&] {
      const scalar_t* u = user_emb.const_data_ptr<scalar_t>();
      if (vec) {
        with_item_rows<4>(items, [&](const auto& rows) {
          launch_backward<FloatRows<scalar_t, 4, true>, std::decay_t<decltype(rows)>, index_t>(
              {u, d}, rows, user_idx, item_idx, g, d, grad_user.data_ptr<float>(), gi, gb);
        });
      } else {
        with_item_rows<1>(items, [&](const auto& rows) {
          launch_backward<FloatRows<scalar_t, 1, false>, std::decay_t<decltype(rows)>, index_t>(
              {u, d}, rows, user_idx, item_idx, g, d, grad_user.data_ptr<float>(), gi, gb);
        });
      }
    });
  });
  if (!quantized) grad_item = grad_item.to(item_emb.scalar_type());
  if (want_bias) grad_bias = grad_bias.to(item_bias->scalar_type());
  return {grad_user.to(user_emb.scalar_type()), grad_item, grad_bias};
}

}  // namespace pair_scores_backward_cuda_impl

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) {
  m.impl("pair_scores_backward", &pair_scores_backward_cuda_impl::pair_scores_backward_cuda);
}

}  // namespace recsys_kernels
