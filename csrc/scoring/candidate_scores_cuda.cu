// CUDA kernels of candidate_scores and candidate_topk (semantics: recsys_kernels/ops/scoring.py;
// C++ signatures and messages: csrc/scoring/pair_scores_cpu.cpp).
//
// Both score the CSR candidate lists with gather_dot (scoring_cuda_common.cuh), the user of a
// candidate found by a binary search in cand_offsets. candidate_topk has it write ranking keys
// (the reference's int64 key: score, then lower id, NaN after -inf) instead of scores, then:
//  * lists of at most kMaxList candidates (the usual case): one block per user loads its keys
//    into shared memory (padded to a power of two with the padding key), sorts them descending
//    (bitonic) and writes the first k, padded past the list's end;
//  * when some list is longer: every key is sorted globally, descending, then stably by user, so
//    that user u's keys, descending, sit at [cand_offsets[u], cand_offsets[u + 1]); its first k
//    are copied out.
// Keys are unique per (score, item), so both paths give exactly the reference's answer.
#include <optional>
#include <tuple>

#include <ATen/ops/arange.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "scoring/scoring_cuda_common.cuh"

namespace recsys_kernels {
namespace candidate_scores_cuda_impl {

using namespace scoring_cuda;

constexpr int64_t kMaxList = 4096;  // keys a block sorts in shared memory (32 KiB)
constexpr int kSortThreads = 512;

// Pair p of the CSR lists: its user is the u with offsets[u] <= p < offsets[u + 1] (the largest u
// with offsets[u] <= p; offsets are valid: checked before the launch).
template <typename IndexT>
struct CsrPairs {
  const IndexT* offsets;
  const IndexT* cand;
  int64_t n_users;
  __device__ __forceinline__ void operator()(int64_t p, int64_t& u, int64_t& i) const {
    const IndexPtr<IndexT> off{offsets};
    int64_t lo = 0, hi = n_users - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (off[mid] <= p) lo = mid;
      else hi = mid - 1;
    }
    u = lo;
    i = IndexPtr<IndexT>{cand}[p];
  }
};

struct Candidates {
  at::Tensor queries;  // fp32, contiguous
  at::Tensor items_t, offsets, cand, bias;
  Table items;
  int64_t max_len = 0;  // the longest list (after validation)
};

// The CPU kernel's checks in its order (check_candidates), then the value checks on the device.
Candidates check_candidates(const at::Tensor& queries, const at::Tensor& items, const at::Tensor& cand_offsets,
                            const at::Tensor& cand_items, const std::optional<at::Tensor>& item_bias) {
  const CandidateInputs in = candidate_inputs(queries, items, cand_offsets, cand_items);
  const at::Tensor& off = in.offsets;
  const at::Tensor& cand = in.cand;
  Candidates c;
  c.items_t = in.items_t;
  c.items = in.items;
  check_cuda(items, "items", queries, "queries");
  check_cuda(off, "cand_offsets", queries, "queries");
  check_cuda(cand, "cand_items", queries, "queries");
  const c10::cuda::CUDAGuard guard(queries.device());
  c.bias = bias_f32(item_bias, c.items.rows, queries, "queries");
  c.offsets = off;
  c.cand = cand;
  c.queries = queries.to(at::kFloat).contiguous();  // [U, D]: small next to the items it scores

  at::Tensor flags = new_flags(queries);
  launch_check_offsets(off, flags);
  launch_check_index(cand, c.items.rows, kIndexA, &c.items, flags);
  const HostFlags f(flags);
  raise_offsets(f, cand.size(0), "cand_offsets");
  raise_index(f, kIndexA, c.items.rows, "cand_items");
  raise_scale(f);
  c.max_len = f.max_len();
  return c;
}

// scores (KEYS false) or ranking keys (KEYS true) of every candidate, [nnz].
template <bool KEYS>
void score_candidates(const Candidates& c, float* scores, int64_t* keys) {
  const int64_t n = c.cand.size(0), d = c.items.dim;
  if (n == 0) return;
  const float* b = c.bias.defined() ? c.bias.const_data_ptr<float>() : nullptr;
  const float* q = c.queries.const_data_ptr<float>();
  const bool vec = use_vec(d, q, c.items.data);
  AT_DISPATCH_INDEX_TYPES(c.cand.scalar_type(), "candidate_scores_cuda", [&] {
    const CsrPairs<index_t> pairs{c.offsets.const_data_ptr<index_t>(), c.cand.const_data_ptr<index_t>(),
                                  c.queries.size(0)};
    if (vec) {
      with_item_rows<4>(c.items, [&](const auto& rows) {
        launch_gather_dot<FloatRows<float, 4, true>, std::decay_t<decltype(rows)>, CsrPairs<index_t>, KEYS>(
            {q, d}, rows, pairs, b, n, d, scores, keys);
      });
    } else {
      with_item_rows<1>(c.items, [&](const auto& rows) {
        launch_gather_dot<FloatRows<float, 1, false>, std::decay_t<decltype(rows)>, CsrPairs<index_t>, KEYS>(
            {q, d}, rows, pairs, b, n, d, scores, keys);
      });
    }
  });
}

at::Tensor candidate_scores_cuda(const at::Tensor& queries, const at::Tensor& items, const at::Tensor& cand_offsets,
                                 const at::Tensor& cand_items, const std::optional<at::Tensor>& item_bias) {
  const Candidates c = check_candidates(queries, items, cand_offsets, cand_items, item_bias);
  const c10::cuda::CUDAGuard guard(queries.device());
  at::Tensor out = at::empty({c.cand.size(0)}, queries.options().dtype(at::kFloat));
  score_candidates<false>(c, out.data_ptr<float>(), nullptr);
  return out;
}

// ----------------------------------------------------------------------------- candidate_topk
// One block per user (grid-stride): its keys (at most kMaxList) sorted descending in shared memory,
// the first k written to out[u, :k], padding past the list.
template <typename IndexT>
__global__ void __launch_bounds__(kSortThreads)
list_topk_kernel(const int64_t* __restrict__ keys, const IndexT* __restrict__ offsets, int64_t n_users, int64_t k,
                 int64_t* __restrict__ out) {
  __shared__ int64_t s[kMaxList];
  const IndexPtr<IndexT> off{offsets};
  for (int64_t u = blockIdx.x; u < n_users; u += gridDim.x) {
    const int64_t start = off[u];
    const int64_t n = off[u + 1] - start;  // <= kMaxList: the launcher checked the longest list
    int size = 1;
    while (size < n) size <<= 1;
    for (int j = threadIdx.x; j < size; j += blockDim.x) s[j] = j < n ? keys[start + j] : kKeyInvalid;
    __syncthreads();
    // bitonic sort, descending overall: runs of `len` alternate direction until the last merge
    for (int len = 2; len <= size; len <<= 1) {
      for (int stride = len >> 1; stride > 0; stride >>= 1) {
        for (int t = threadIdx.x; t < size / 2; t += blockDim.x) {
          const int i = 2 * t - (t & (stride - 1));  // t with a 0 bit inserted at `stride`
          const int j = i + stride;
          const bool descending = (i & len) == 0;
          const int64_t a = s[i], b = s[j];
          if (descending ? a < b : a > b) {
            s[i] = b;
            s[j] = a;
          }
        }
        __syncthreads();
      }
    }
    int64_t* o = out + u * k;
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) o[j] = j < n ? s[j] : kKeyInvalid;
    __syncthreads();  // s is reused by the block's next user
  }
}

// out[u, j] = sorted[offsets[u] + j] for j below the list's length, padding after.
template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
copy_top_kernel(const int64_t* __restrict__ sorted, const IndexT* __restrict__ offsets, int64_t n_users, int64_t k,
                int64_t* __restrict__ out) {
  const IndexPtr<IndexT> off{offsets};
  const int64_t total = n_users * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t u = e / k, j = e % k;
    const int64_t start = off[u], n = off[u + 1] - start;
    out[e] = j < n ? sorted[start + j] : kKeyInvalid;
  }
}

std::tuple<at::Tensor, at::Tensor> candidate_topk_cuda(const at::Tensor& queries, const at::Tensor& items,
                                                       const at::Tensor& cand_offsets, const at::Tensor& cand_items,
                                                       int64_t k, const std::optional<at::Tensor>& item_bias) {
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  check_item_count(items.size(0));
  const Candidates c = check_candidates(queries, items, cand_offsets, cand_items, item_bias);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t n_users = queries.size(0), nnz = c.cand.size(0);
  at::Tensor values = at::empty({n_users, k}, queries.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({n_users, k}, queries.options().dtype(at::kLong));
  if (n_users == 0 || k == 0) return {values, ids};
  const auto long_opts = queries.options().dtype(at::kLong);
  at::Tensor keys = at::empty({nnz}, long_opts);
  score_candidates<true>(c, nullptr, keys.data_ptr<int64_t>());
  at::Tensor top = at::empty({n_users, k}, long_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (c.max_len <= kMaxList) {
    AT_DISPATCH_INDEX_TYPES(c.offsets.scalar_type(), "candidate_topk_cuda", [&] {
      list_topk_kernel<index_t><<<cuda::grid_for(n_users, 1, 4), kSortThreads, 0, stream>>>(
          keys.const_data_ptr<int64_t>(), c.offsets.const_data_ptr<index_t>(), n_users, k, top.data_ptr<int64_t>());
    });
    RK_CUDA_LAUNCH_CHECK();
  } else {
    const at::Tensor off64 = c.offsets.to(at::kLong);
    const at::Tensor lengths = off64.slice(0, 1) - off64.slice(0, 0, n_users);
    const at::Tensor user_of = at::repeat_interleave(at::arange(n_users, long_opts), lengths, /*dim=*/0,
                                                     /*output_size=*/nnz);
    const auto by_key = at::sort(keys, /*stable=*/false, /*dim=*/0, /*descending=*/true);
    const at::Tensor users_by_key = user_of.index_select(0, std::get<1>(by_key));
    const auto by_user = at::sort(users_by_key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor sorted = std::get<0>(by_key).index_select(0, std::get<1>(by_user)).contiguous();
    AT_DISPATCH_INDEX_TYPES(c.offsets.scalar_type(), "candidate_topk_cuda", [&] {
      copy_top_kernel<index_t><<<cuda::grid_for(n_users * k, kThreads), kThreads, 0, stream>>>(
          sorted.const_data_ptr<int64_t>(), c.offsets.const_data_ptr<index_t>(), n_users, k, top.data_ptr<int64_t>());
    });
    RK_CUDA_LAUNCH_CHECK();
  }
  launch_decode(top, values, ids);
  return {values, ids};
}

}  // namespace candidate_scores_cuda_impl

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) {
  m.impl("candidate_scores", &candidate_scores_cuda_impl::candidate_scores_cuda);
  m.impl("candidate_topk", &candidate_scores_cuda_impl::candidate_topk_cuda);
}

}  // namespace recsys_kernels
