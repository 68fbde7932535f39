// The AVX-512 pooling kernel (embedding_bag_cpu_avx512.h) for int64_t indices.
#include "embedding_bag/embedding_bag_cpu_avx512.h"

namespace recsys_kernels::embedding_bag_cpu {

RK_AVX512 PoolResult pool_bags_avx512_i64(const PoolArgs& a) { return avx512_kernel::pool_index<int64_t>(a); }

}  // namespace recsys_kernels::embedding_bag_cpu
