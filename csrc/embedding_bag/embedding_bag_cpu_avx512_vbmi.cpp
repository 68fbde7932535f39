// The AVX-512 pooling kernel (embedding_bag_cpu_avx512.h) built with AVX512_VBMI, for 4-bit rows
// only: their codes reach the permute's lanes through one vpmultishiftqb (see Q4 there). Called
// only when the CPU has VBMI (pool_bags_vector).
#define RK_AVX512_VBMI
#include "embedding_bag/embedding_bag_cpu_avx512.h"

namespace recsys_kernels::embedding_bag_cpu {

RK_AVX512 PoolResult pool_bags_avx512_vbmi_q4_i32(const PoolArgs& a) {
  return avx512_kernel::pool_kind<avx512_kernel::Q4, int32_t>(a);
}

RK_AVX512 PoolResult pool_bags_avx512_vbmi_q4_i64(const PoolArgs& a) {
  return avx512_kernel::pool_kind<avx512_kernel::Q4, int64_t>(a);
}

}  // namespace recsys_kernels::embedding_bag_cpu
