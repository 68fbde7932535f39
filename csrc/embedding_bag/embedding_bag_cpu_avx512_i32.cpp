// The AVX-512 pooling kernel (embedding_bag_cpu_avx512.h) for int32_t indices.
#include "embedding_bag/embedding_bag_cpu_avx512.h"

namespace recsys_kernels::embedding_bag_cpu {

RK_AVX512 PoolResult pool_bags_avx512_i32(const PoolArgs& a) { return avx512_kernel::pool_index<int32_t>(a); }

}  // namespace recsys_kernels::embedding_bag_cpu
