// A C entry point for tests/test_embedding_bag_cuda_emulated.py: the forward pooling loop of the
// CUDA embedding_bag kernels (pool_bags / pool_bag in csrc/embedding_bag/embedding_bag_cuda_common.cuh,
// which embedding_bag_cuda.cu's kernel runs, and the grouped kernel per lookup) on emulated CUDA
// threads, with the reader the launcher (embedding_bag_cuda.cu: fwd_float / fwd_quant) would pick
// for the table. Built with torch's headers for the header's host part; nothing of libtorch is
// called.
#include "cuda_emulation.h"

#include "embedding_bag/embedding_bag_cuda_common.cuh"

namespace {

using namespace recsys_kernels::embedding_bag_cuda_common;

template <typename Rows, typename IndexT>
void pool_bags_kernel(Rows rows, const IndexT* indices, const IndexT* offsets, const float* psw, float* out,
                      int64_t n_bags, int64_t nnz, int64_t n_rows, int64_t d, int mode, int bounds,
                      int64_t padding_idx, int tpr_log2, int64_t* flags) {
  pool_bags(rows, IndexPtr<IndexT>{indices}, IndexPtr<IndexT>{offsets}, psw, out, n_bags, nnz, n_rows, d, mode, bounds,
            padding_idx, tpr_log2, flags);
}

struct Call {
  const void* indices;
  const void* offsets;
  const float* psw;
  float* out;
  int64_t n_bags, nnz, n_rows, d;
  int mode, bounds;
  int64_t padding_idx;
  int64_t* flags;
  unsigned blocks;
};

template <typename Rows, typename IndexT>
void launch(const Rows& rows, const Call& c) {
  emulate_launch(dim3{c.blocks, 1, 1}, dim3{kThreads, 1, 1}, pool_bags_kernel<Rows, IndexT>, rows,
                 static_cast<const IndexT*>(c.indices), static_cast<const IndexT*>(c.offsets), c.psw, c.out, c.n_bags,
                 c.nnz, c.n_rows, c.d, c.mode, c.bounds, c.padding_idx, tpr_log2_for(c.d, Rows::kVec), c.flags);
}

template <typename IndexT>
void run(int bits, bool vec, const void* table, int64_t row_bytes, const Call& c) {
  if (bits == 0) {
    const float* w = static_cast<const float*>(table);
    if (vec) launch<FloatRows<float, 4, true>, IndexT>({w, c.d}, c);
    else launch<FloatRows<float, 1, false>, IndexT>({w, c.d}, c);
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(table);
    if (bits == 8 && vec) launch<QuantRows<8, 8, true>, IndexT>({q, c.d, row_bytes}, c);
    else if (bits == 8) launch<QuantRows<8, 1, false>, IndexT>({q, c.d, row_bytes}, c);
    else if (vec) launch<QuantRows<4, 8, true>, IndexT>({q, c.d, row_bytes}, c);
    else launch<QuantRows<4, 2, false>, IndexT>({q, c.d, row_bytes}, c);
  }
}

}  // namespace

// bits: 0 (fp32 table [n_rows, d]), 8 or 4 (fused row-wise table of row_bytes a row); vec: the
// vectorised reader (the caller checks what the launcher checks); mode / bounds: the kernel's
// enums (sum 0, mean 1, max 2; raise 0, zero 1, clamp 2); padding_idx -1: none; flags: int64[5],
// each INT64_MAX; blocks: of 256 threads (8 warps), grid-stride over the bags.
extern "C" void rk_embedding_bag_cuda_emulated(int bits, int vec, int index64, const void* table, int64_t row_bytes,
                                               int64_t d, int64_t n_rows, const void* indices, const void* offsets,
                                               const float* psw, float* out, int64_t n_bags, int64_t nnz, int mode,
                                               int bounds, int64_t padding_idx, int64_t* flags, unsigned blocks) {
  const Call c{indices, offsets, psw, out, n_bags, nnz, n_rows, d, mode, bounds, padding_idx, flags, blocks};
  if (index64) run<int64_t>(bits, vec != 0, table, row_bytes, c);
  else run<int32_t>(bits, vec != 0, table, row_bytes, c);
}
