// A C entry point to the AVX-512 pooling kernel (csrc/embedding_bag/embedding_bag_cpu_avx512.h)
// and its AVX512_VBMI build for 4-bit rows, for the emulated tests: one run of bags (PoolArgs)
// spelled out in plain arguments (ctypes).
#include "embedding_bag/embedding_bag_cpu_kernels.h"

using namespace recsys_kernels::embedding_bag_cpu;

// vbmi: the AVX512_VBMI build (embedding_bag_cpu_avx512_vbmi.cpp), for 4-bit rows only
extern "C" int64_t rk_pool_bags_avx512(int kind, int is_max, int is_mean, const uint8_t* table, int64_t row_bytes,
                                       int64_t dim, int64_t n_rows, const void* idx, const void* off, int idx_is_int64,
                                       int64_t n_bags, int64_t idx_end, const float* weights, float* out,
                                       int64_t out_stride, int vbmi, int* finite) {
  PoolArgs a{};
  a.kind = static_cast<TableKind>(kind);
  a.is_max = is_max != 0;
  a.is_mean = is_mean != 0;
  a.table = table;
  a.row_bytes = row_bytes;
  a.dim = dim;
  a.n_rows = n_rows;
  a.idx = idx;
  a.off = off;
  a.idx_is_int64 = idx_is_int64 != 0;
  a.n_bags = n_bags;
  a.idx_end = idx_end;
  a.weights = weights;
  a.out = out;
  a.out_stride = out_stride;
  a.rows_from_dram = n_rows * row_bytes > recsys_kernels::kL3BytesIfUnknown;  // (l2_prefetch_bytes()'s fallback)
  const PoolResult r = vbmi ? (a.idx_is_int64 ? pool_bags_avx512_vbmi_q4_i64(a) : pool_bags_avx512_vbmi_q4_i32(a))
                            : (a.idx_is_int64 ? pool_bags_avx512_i64(a) : pool_bags_avx512_i32(a));
  *finite = r.finite ? 1 : 0;
  return r.first_bad;
}
