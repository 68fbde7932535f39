// The AVX2 pooling kernel (embedding_bag_cpu_avx2.h) for int64 indices.
#include "embedding_bag/embedding_bag_cpu_avx2.h"

namespace recsys_kernels::embedding_bag_cpu {

RK_AVX2 PoolResult pool_bags_avx2_i64(const PoolArgs& a) { return avx2_kernel::pool_index<int64_t>(a); }

}  // namespace recsys_kernels::embedding_bag_cpu
