// The AVX2 pooling kernel (embedding_bag_cpu_avx2.h) for int32 indices.
#include "embedding_bag/embedding_bag_cpu_avx2.h"

namespace recsys_kernels::embedding_bag_cpu {

RK_AVX2 PoolResult pool_bags_avx2_i32(const PoolArgs& a) { return avx2_kernel::pool_index<int32_t>(a); }

}  // namespace recsys_kernels::embedding_bag_cpu
