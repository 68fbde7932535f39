// CUDA kernel of topk_scores: the top k items of the whole catalog per query, never
// materialising [U, I] (semantics: recsys_kernels/ops/scoring.py; C++ signature and messages:
// csrc/scoring/topk_scores_cpu.cpp).
//
// Users are taken in blocks and the catalog in chunks of C items. Each block keeps a key buffer
// [users, k + C]: columns [0, k) hold the user's running top k (the reference's int64 ranking key:
// score, then lower id, NaN after -inf; sorted descending, padding keys until k items are seen),
// columns [k, k + C) collect the chunk's candidates. Per chunk:
//  1. topk_tile_keys_kernel (topk_scores_cuda_tile.cuh) scores a [users, C] tile (128 x 128 per
//     CUDA block, 8 x 8 per thread, queries and items staged in shared memory as fp32, int8 rows
//     dequantized on the way in, one fma chain over d per score, + item bias) and keeps only the keys above the user's floor (its running
//     k-th key) that are not excluded (binary search in the user's sorted exclusion list); those
//     it appends to the user's candidates (an atomic counter per user);
//  2. the host reads the largest count W (one small copy, which waits for the stream), pads each
//     user's candidates to W with the padding key, and at::topk over the k + W columns gives the
//     new running top k.
// A key at or below the floor can never enter the top k: the k keys at or above the floor were
// all seen before (keys are unique per (score, item), and each item is offered once per user). So
// the result is exactly the reference's, and after the first chunks few keys pass (on random data
// about k * C / items seen), so the scores are never written to memory. The first chunks of a
// user block are smaller (C / 8, then growing to the items seen), so that the one chunk where
// every key passes is small.
//
// Value checks (exclusion offsets and ids, the scale / bias of every int8 row) run first on the
// device (scoring_cuda_common.cuh) and are raised in the CPU kernel's order.
//
// Test hooks: RECSYS_KERNELS_CUDA_TOPK_CHUNK (items per chunk) and RECSYS_KERNELS_CUDA_TOPK_USERS
// (users per block) shrink the blocking so that small tests cross chunk and block boundaries.
#include <cstdlib>
#include <optional>
#include <tuple>

#include <ATen/ops/arange.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <torch/library.h>

#include "scoring/scoring_cuda_common.cuh"
#include "scoring/topk_scores_cuda_tile.cuh"

namespace recsys_kernels {
namespace topk_scores_cuda_impl {

using namespace scoring_cuda;

constexpr int64_t kDefaultChunk = 32768;
// 512 MiB of keys per user block at most: each (user block, chunk) step costs a host sync and a
// few small launches, so their number, U * I / kBufferKeys, is kept small
constexpr int64_t kBufferKeys = int64_t{64} << 20;
// The first chunk of a user block is chunk / kFirstChunkDivisor items and the next ones grow to the
// items seen so far: every key of the first chunk passes (no floor yet) and the next pass about
// k * C / (seen + C), so at::topk never sorts a full chunk's keys.
constexpr int64_t kFirstChunkDivisor = 8;

// The padding key over buf[lu * ld + k + j] for count[lu] <= j < width.
__global__ void __launch_bounds__(kThreads)
pad_candidates_kernel(int64_t* __restrict__ buf, const int* __restrict__ count, int64_t n_u, int64_t ld, int64_t k,
                      int64_t width) {
  const int64_t total = n_u * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t lu = e / width, j = e % width;
    if (j >= count[lu]) buf[lu * ld + k + j] = kKeyInvalid;
  }
}

int64_t env_size(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const long long n = std::strtoll(v, nullptr, 10);
  return n > 0 ? static_cast<int64_t>(n) : fallback;
}

std::tuple<at::Tensor, at::Tensor> topk_scores_cuda(const at::Tensor& queries_in, const at::Tensor& items_in, int64_t k,
                                                    const std::optional<at::Tensor>& exclude_offsets,
                                                    const std::optional<at::Tensor>& exclude_items,
                                                    const std::optional<at::Tensor>& item_bias) {
  const at::Tensor items_t = items_in.contiguous();
  const Table items = table_view(items_t, "items", true);
  check_queries(queries_in, "queries", items.dim, "items");
  const int64_t n_users = queries_in.size(0), n_items = items.rows, d = items.dim;
  TORCH_CHECK_VALUE(k >= 0 && k <= n_items, "k must be in [0, ", n_items, "] (the number of items), got ", k);
  check_item_count(n_items);
  TORCH_CHECK_VALUE(exclude_offsets.has_value() == exclude_items.has_value(),
                    "exclude_offsets and exclude_items must be given together");
  check_cuda(items_t, "items", queries_in, "queries");
  const c10::cuda::CUDAGuard guard(queries_in.device());
  at::Tensor ex_off, ex_items;
  at::Tensor flags = new_flags(queries_in);
  if (exclude_offsets.has_value()) {
    check_index_tensor(*exclude_offsets, "exclude_offsets");
    check_index_tensor(*exclude_items, "exclude_items");
    TORCH_CHECK_VALUE(exclude_offsets->size(0) == n_users + 1, "exclude_offsets must have U + 1 = ", n_users + 1,
                      " elements, got ", exclude_offsets->size(0));
    check_cuda(*exclude_offsets, "exclude_offsets", queries_in, "queries");
    check_cuda(*exclude_items, "exclude_items", queries_in, "queries");
    std::tie(ex_off, ex_items) = index_pair(*exclude_offsets, "exclude_offsets", *exclude_items, "exclude_items");
  }
  const at::Tensor bias = bias_f32(item_bias, n_items, queries_in, "queries");  // metadata before values
  if (ex_off.defined()) {
    launch_check_offsets(ex_off, flags);
    launch_check_index(ex_items, n_items, kIndexA, nullptr, flags);
  }
  if (n_users > 0) launch_check_q8_rows(items, flags);  // the reference dequantizes every row
  const HostFlags f(flags);
  if (ex_off.defined()) {
    raise_offsets(f, ex_items.size(0), "exclude_offsets");
    raise_index(f, kIndexA, n_items, "exclude_items");
  }
  at::Tensor values = at::empty({n_users, k}, queries_in.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({n_users, k}, queries_in.options().dtype(at::kLong));
  if (n_users == 0) return {values, ids};
  raise_scale(f);
  if (k == 0) return {values, ids};

  const at::Tensor q = queries_in.to(at::kFloat).contiguous();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const auto long_opts = queries_in.options().dtype(at::kLong);

  // each user's exclusions sorted ascending: by id, then stably by user
  Exclusions ex;
  at::Tensor ex_off64, ex_sorted;
  if (ex_off.defined() && ex_items.numel() > 0) {
    ex_off64 = ex_off.to(at::kLong).contiguous();
    const int64_t n_ex = ex_items.numel();
    const at::Tensor lengths = ex_off64.slice(0, 1) - ex_off64.slice(0, 0, n_users);
    const at::Tensor user_of =
        at::repeat_interleave(at::arange(n_users, long_opts), lengths, /*dim=*/0, /*output_size=*/n_ex);
    const auto by_id = at::sort(ex_items.to(at::kLong), /*stable=*/false, /*dim=*/0, /*descending=*/false);
    const auto by_user = at::sort(user_of.index_select(0, std::get<1>(by_id)), /*stable=*/true, /*dim=*/0,
                                  /*descending=*/false);
    ex_sorted = std::get<0>(by_id).index_select(0, std::get<1>(by_user)).contiguous();
    ex.offsets = ex_off64.const_data_ptr<int64_t>();
    ex.sorted = ex_sorted.const_data_ptr<int64_t>();
  }

  // int counters per user: a chunk is at most 2^30 items
  const int64_t chunk = std::min({n_items, int64_t{1} << 30, env_size("RECSYS_KERNELS_CUDA_TOPK_CHUNK", kDefaultChunk)});
  const int64_t ld = k + chunk;  // running top k, then the chunk's candidates
  // grid.y (user tiles of a block) is at most 65535
  int64_t fit_users = std::max<int64_t>(1, kBufferKeys / ld);
  if (fit_users >= kTileU) fit_users -= fit_users % kTileU;  // whole user tiles
  const int64_t block_users =
      std::min({n_users, int64_t{65535} * kTileU, env_size("RECSYS_KERNELS_CUDA_TOPK_USERS", fit_users)});
  const int64_t first_chunk = std::max<int64_t>(1, chunk / kFirstChunkDivisor);
  at::Tensor buffer = at::empty({block_users, ld}, long_opts);
  at::Tensor counts = at::zeros({block_users}, queries_in.options().dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  for (int64_t u0 = 0; u0 < n_users; u0 += block_users) {
    const int64_t n_u = std::min(block_users, n_users - u0);
    at::Tensor buf = buffer.narrow(0, 0, n_u);
    at::Tensor count = counts.narrow(0, 0, n_u);
    buf.narrow(1, 0, k).fill_(kKeyInvalid);
    for (int64_t c0 = 0, n_c = 0; c0 < n_items; c0 += n_c) {
      n_c = std::min({chunk, n_items - c0, std::max(first_chunk, c0)});
      const dim3 grid(static_cast<unsigned>(ceil_div(n_c, kTileI)), static_cast<unsigned>(ceil_div(n_u, kTileU)));
      with_item_rows<1>(items, [&](const auto& rows) {
        topk_tile_keys_kernel<std::decay_t<decltype(rows)>><<<grid, kTileThreads, 0, stream>>>(
            q.const_data_ptr<float>(), rows, b, ex, u0, n_u, c0, n_c, d, k, buf.data_ptr<int64_t>(), ld,
            count.data_ptr<int>());
      });
      RK_CUDA_LAUNCH_CHECK();
      const int64_t width = count.max().item<int>();  // waits for the stream
      if (width == 0) continue;  // nothing above any floor: the running top k stands
      pad_candidates_kernel<<<cuda::grid_for(n_u * width, kThreads), kThreads, 0, stream>>>(
          buf.data_ptr<int64_t>(), count.const_data_ptr<int>(), n_u, ld, k, width);
      RK_CUDA_LAUNCH_CHECK();
      const at::Tensor top =
          std::get<0>(at::topk(buf.narrow(1, 0, k + width), k, /*dim=*/1, /*largest=*/true, /*sorted=*/true));
      buf.narrow(1, 0, k).copy_(top);
      count.zero_();
    }
    const at::Tensor top = buf.narrow(1, 0, k).contiguous();
    at::Tensor v = values.narrow(0, u0, n_u), i = ids.narrow(0, u0, n_u);  // contiguous row ranges
    launch_decode(top, v, i);
  }
  return {values, ids};
}

}  // namespace topk_scores_cuda_impl

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) { m.impl("topk_scores", &topk_scores_cuda_impl::topk_scores_cuda); }

}  // namespace recsys_kernels
