// CUDA kernels of quantize_rows_int8 (one warp per row) and the small elementwise kernels of the
// int8 family: the finite-scale check, weight dequantization and the bias + activation epilogue of
// the weight-only path.
//
// Quantization is the reference's rule, bit for bit: scale = absmax / 127 (correctly rounded fp32
// division, __fdiv_rn), 1 where that is 0; q = clamp(round_half_even(x / scale), -127, 127) with
// the quotient correctly rounded (__fdiv_rn) and rounded to an integer by __float2int_rn (ties to
// even). Compiled without fast-math, so denormals are kept as on the CPU.
#include "int8_matmul/int8_cuda_common.cuh"

namespace recsys_kernels::int8mm {
namespace {

using cuda::kFullMask;
using cuda::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

// VEC elements per lane and step; K % VEC == 0 (the launcher guarantees it). With ALIGNED each
// row starts on a VEC-element boundary, so loads and stores are single wide accesses.
template <typename T, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale, int64_t M,
                     int64_t K, unsigned long long* __restrict__ bad) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < M;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const T* xr = x + row * K;
    int8_t* qr = q + row * K;

    // Pass 1: absmax and finiteness, reduced across the warp.
    float amax = 0.f;
    bool finite = true;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < K; c += kWarpSize * VEC) {
      T v[VEC];
      cuda::load_pack<VEC, ALIGNED>(xr + c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = static_cast<float>(v[j]);
        finite = finite && isfinite(f);
        amax = fmaxf(amax, fabsf(f));
      }
    }
    amax = cuda::warp_max(amax);
    if (!__all_sync(kFullMask, finite)) {  // warp-uniform: the whole warp skips the row
      if (lane == 0) cuda::report_bad(bad, row);
      continue;
    }
    float s = __fdiv_rn(amax, 127.f);
    if (s == 0.f) s = 1.f;  // an all-zero row, or absmax / 127 underflowed

    // Pass 2: the codes (the row is re-read from L1/L2).
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < K; c += kWarpSize * VEC) {
      T v[VEC];
      int8_t qv[VEC];
      cuda::load_pack<VEC, ALIGNED>(xr + c, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int r = __float2int_rn(__fdiv_rn(static_cast<float>(v[j]), s));
        qv[j] = static_cast<int8_t>(max(-127, min(127, r)));
      }
      cuda::store_pack<VEC, ALIGNED>(qr + c, qv);
    }
    if (lane == 0) scale[row] = s;
  }
}

template <typename T>
void quantize_typed(const T* x, int8_t* q, float* scale, int64_t M, int64_t K, unsigned long long* bad,
                    cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);  // 16-byte loads
  const unsigned blocks = cuda::grid_for(M, kWarpsPerBlock);
  if (K % kVec == 0 && cuda::aligned(x, 16) && cuda::aligned(q, kVec))
    quantize_rows_kernel<T, kVec, true><<<blocks, kThreads, 0, stream>>>(x, q, scale, M, K, bad);
  else
    quantize_rows_kernel<T, 1, false><<<blocks, kThreads, 0, stream>>>(x, q, scale, M, K, bad);
  RK_CUDA_LAUNCH_CHECK();
}

__global__ void check_finite_kernel(const float* __restrict__ p, int64_t n, int64_t offset,
                                    unsigned long long* __restrict__ bad) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    if (!isfinite(p[i])) cuda::report_bad(bad, offset + i);
}

__global__ void dequantize_weight_kernel(const int8_t* __restrict__ w, const float* __restrict__ w_scale,
                                         float* __restrict__ out, int64_t N, int64_t K) {
  const int64_t total = N * K;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __fmul_rn(static_cast<float>(w[i]), __ldg(w_scale + i / K));
}

__global__ void bias_act_kernel(const float* __restrict__ y, int64_t M, int64_t N, Epilogue ep) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = y[i];
    if (ep.bias != nullptr) v = __fadd_rn(v, __ldg(ep.bias + i % N));
    store_float(ep, i, activate(v, ep.act));
  }
}

}  // namespace

void launch_quantize_rows(const void* x, int dtype, int8_t* q, float* scale, int64_t M, int64_t K,
                          unsigned long long* bad, cudaStream_t stream) {
  if (M == 0) return;
  switch (dtype) {
    case 1: quantize_typed(static_cast<const c10::Half*>(x), q, scale, M, K, bad, stream); break;
    case 2: quantize_typed(static_cast<const c10::BFloat16*>(x), q, scale, M, K, bad, stream); break;
    default: quantize_typed(static_cast<const float*>(x), q, scale, M, K, bad, stream); break;
  }
}

void launch_check_finite(const float* p, int64_t n, int64_t offset, unsigned long long* bad, cudaStream_t stream) {
  if (n == 0) return;
  check_finite_kernel<<<cuda::grid_for(n, kThreads, 4), kThreads, 0, stream>>>(p, n, offset, bad);
  RK_CUDA_LAUNCH_CHECK();
}

void launch_dequantize_weight(const int8_t* w, const float* w_scale, float* out, int64_t N, int64_t K,
                              cudaStream_t stream) {
  if (N * K == 0) return;
  dequantize_weight_kernel<<<cuda::grid_for(N * K, kThreads, 8), kThreads, 0, stream>>>(w, w_scale, out, N, K);
  RK_CUDA_LAUNCH_CHECK();
}

void launch_bias_act(const float* y, int64_t M, int64_t N, const Epilogue& ep, cudaStream_t stream) {
  if (M * N == 0) return;
  bias_act_kernel<<<cuda::grid_for(M * N, kThreads, 8), kThreads, 0, stream>>>(y, M, N, ep);
  RK_CUDA_LAUNCH_CHECK();
}

}  // namespace recsys_kernels::int8mm
