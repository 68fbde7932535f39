// fp32 -> fp16 / bf16 conversion of output rows with F16C / AVX2 (call only when cpu_isa() >=
// kAvx2), with the bits of c10::Half's and c10::BFloat16's constructors: round to nearest even,
// and a NaN becomes the canonical quiet NaN (fp16: its sign | 0x7E00; bf16: 0x7FC0). Through the
// scalar constructors 4,096 x 64 fp16 outputs took longer than pooling them.
#pragma once

#include <cstdint>

namespace recsys_kernels {

void f32_to_f16_avx2(const float* src, uint16_t* dst, int64_t n);
void f32_to_bf16_avx2(const float* src, uint16_t* dst, int64_t n);

}  // namespace recsys_kernels
