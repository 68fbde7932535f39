// Small-M kernels of the int8 family (M <= 16, e.g. online inference one request at a time): the
// weight matrix [N, K] is read once, which is all the time there is, so each warp streams one weight
// row (one output column) with 16-byte loads and keeps all M rows' sums in registers. The activation
// rows (M x K bytes or floats) are re-read by every warp from L1/L2.
//
// int8 x int8 (int8_matmul / dynamic int8_linear): __dp4a, 4 products a lane and instruction. Each
// lane's int32 sum covers at most 4096 steps (65536 products, |sum| < 2^30) before it is folded into
// int64, and the warp reduction is in int64: exact for any K, the int32 overflow rule applied in
// the epilogue.
// Weight-only (int8_linear act_quant="none"): w = float(q) * w_scale[n] rounded once (the reference's
// dequantized weight), then fp32 FMAs.
#include "int8_matmul/int8_cuda_common.cuh"

namespace recsys_kernels::int8mm {
namespace {

using cuda::kFullMask;
using cuda::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int kFoldSteps = 4096;  // lane steps between int32 -> int64 folds

template <int VEC>
struct Bytes;  // VEC int8 values in registers
template <>
struct Bytes<16> {
  int4 v;
  __device__ __forceinline__ void load(const int8_t* p) { v = __ldg(reinterpret_cast<const int4*>(p)); }
  __device__ __forceinline__ int dot(const Bytes& o, int acc) const {
    acc = __dp4a(v.x, o.v.x, acc);
    acc = __dp4a(v.y, o.v.y, acc);
    acc = __dp4a(v.z, o.v.z, acc);
    return __dp4a(v.w, o.v.w, acc);
  }
};
template <>
struct Bytes<4> {
  int v;
  __device__ __forceinline__ void load(const int8_t* p) { v = __ldg(reinterpret_cast<const int*>(p)); }
  __device__ __forceinline__ int dot(const Bytes& o, int acc) const { return __dp4a(v, o.v, acc); }
};
template <>
struct Bytes<1> {
  int v;
  __device__ __forceinline__ void load(const int8_t* p) { v = __ldg(p); }
  __device__ __forceinline__ int dot(const Bytes& o, int acc) const { return acc + v * o.v; }
};

__device__ __forceinline__ long long warp_sum(long long v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// MT: compile-time bound on M (M <= MT), so the per-row sums are registers. VEC: bytes a lane loads
// per step (K % VEC == 0 and the rows VEC-aligned).
template <int MT, int VEC>
__global__ void __launch_bounds__(kThreads)
gemv_s8_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B, int64_t M, int64_t N, int64_t K,
               Epilogue ep) {
  const int lane = threadIdx.x % kWarpSize;
  constexpr int64_t kStep = static_cast<int64_t>(kWarpSize) * VEC;
  constexpr int64_t kChunk = kStep * kFoldSteps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; n < N;
       n += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int8_t* brow = B + n * K;
    long long sum[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) sum[m] = 0;
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t k_end = min(K, k0 + kChunk);
      int part[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) part[m] = 0;
#pragma unroll 4
      for (int64_t k = k0 + lane * VEC; k < k_end; k += kStep) {
        Bytes<VEC> b;
        b.load(brow + k);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            Bytes<VEC> a;
            a.load(A + m * K + k);
            part[m] = a.dot(b, part[m]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) sum[m] += part[m];
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {  // uniform across the warp
        const long long s = warp_sum(sum[m]);
        if (lane == m) finish(ep, m, n, N, s);
      }
    }
  }
}

// Weight-only: x [M, K] of T (float / c10::Half / c10::BFloat16). VEC16: 16 weights a lane and step.
template <typename T, int MT, bool VEC16>
__global__ void __launch_bounds__(kThreads)
gemv_weight_only_kernel(const T* __restrict__ X, const int8_t* __restrict__ W, const float* __restrict__ w_scale,
                        int64_t M, int64_t N, int64_t K, Epilogue ep) {
  const int lane = threadIdx.x % kWarpSize;
  constexpr int kPack = 16 / sizeof(T);  // x elements in one 16-byte load
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; n < N;
       n += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int8_t* wrow = W + n * K;
    const float s = __ldg(w_scale + n);
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    if constexpr (VEC16) {
#pragma unroll 2
      for (int64_t k = lane * 16; k < K; k += kWarpSize * 16) {
        const int4 q4 = __ldg(reinterpret_cast<const int4*>(wrow + k));
        const int qw[4] = {q4.x, q4.y, q4.z, q4.w};
        float w[16];
#pragma unroll
        for (int j = 0; j < 16; ++j)
          w[j] = __fmul_rn(static_cast<float>(static_cast<int8_t>(qw[j / 4] >> (8 * (j % 4)))), s);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
#pragma unroll
            for (int j0 = 0; j0 < 16; j0 += kPack) {
              T xv[kPack];
              cuda::load_pack<kPack, true>(X + m * K + k + j0, xv);
#pragma unroll
              for (int j = 0; j < kPack; ++j) acc[m] = fmaf(static_cast<float>(xv[j]), w[j0 + j], acc[m]);
            }
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += kWarpSize) {
        const float w = __fmul_rn(static_cast<float>(wrow[k]), s);
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < M) acc[m] = fmaf(static_cast<float>(X[m * K + k]), w, acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float y = warp_sum(acc[m]);
        if (lane == m) {
          if (ep.bias != nullptr) y = __fadd_rn(y, __ldg(ep.bias + n));
          store_float(ep, m * N + n, activate(y, ep.act));
        }
      }
    }
  }
}

template <int MT>
void gemv_rows(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& ep,
               cudaStream_t stream) {
  const unsigned blocks = cuda::grid_for(N, kWarpsPerBlock);
  if (K % 16 == 0 && cuda::aligned(a, 16) && cuda::aligned(b, 16))
    gemv_s8_kernel<MT, 16><<<blocks, kThreads, 0, stream>>>(a, b, M, N, K, ep);
  else if (K % 4 == 0 && cuda::aligned(a, 4) && cuda::aligned(b, 4))
    gemv_s8_kernel<MT, 4><<<blocks, kThreads, 0, stream>>>(a, b, M, N, K, ep);
  else
    gemv_s8_kernel<MT, 1><<<blocks, kThreads, 0, stream>>>(a, b, M, N, K, ep);
  RK_CUDA_LAUNCH_CHECK();
}

template <typename T, int MT>
void weight_only_rows(const T* x, const int8_t* w, const float* w_scale, int64_t M, int64_t N, int64_t K,
                      const Epilogue& ep, cudaStream_t stream) {
  const unsigned blocks = cuda::grid_for(N, kWarpsPerBlock);
  if (K % 16 == 0 && cuda::aligned(x, 16) && cuda::aligned(w, 16))
    gemv_weight_only_kernel<T, MT, true><<<blocks, kThreads, 0, stream>>>(x, w, w_scale, M, N, K, ep);
  else
    gemv_weight_only_kernel<T, MT, false><<<blocks, kThreads, 0, stream>>>(x, w, w_scale, M, N, K, ep);
  RK_CUDA_LAUNCH_CHECK();
}

template <typename T>
void weight_only_typed(const T* x, const int8_t* w, const float* w_scale, int64_t M, int64_t N, int64_t K,
                       const Epilogue& ep, cudaStream_t stream) {
  if (M <= 1) weight_only_rows<T, 1>(x, w, w_scale, M, N, K, ep, stream);
  else if (M <= 4) weight_only_rows<T, 4>(x, w, w_scale, M, N, K, ep, stream);
  else if (M <= 8) weight_only_rows<T, 8>(x, w, w_scale, M, N, K, ep, stream);
  else weight_only_rows<T, 16>(x, w, w_scale, M, N, K, ep, stream);
}

}  // namespace

void launch_gemv(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& ep,
                 cudaStream_t stream) {
  TORCH_CHECK(M <= kGemvMaxRows, "launch_gemv: M = ", M, " > ", kGemvMaxRows);
  if (M == 0 || N == 0) return;
  if (M <= 1) gemv_rows<1>(a, b, M, N, K, ep, stream);
  else if (M <= 2) gemv_rows<2>(a, b, M, N, K, ep, stream);
  else if (M <= 4) gemv_rows<4>(a, b, M, N, K, ep, stream);
  else if (M <= 8) gemv_rows<8>(a, b, M, N, K, ep, stream);
  else gemv_rows<16>(a, b, M, N, K, ep, stream);
}

void launch_weight_only_gemv(const void* x, int dtype, const int8_t* w, const float* w_scale, int64_t M, int64_t N,
                             int64_t K, const Epilogue& ep, cudaStream_t stream) {
  TORCH_CHECK(M <= kGemvMaxRows, "launch_weight_only_gemv: M = ", M, " > ", kGemvMaxRows);
  if (M == 0 || N == 0) return;
  switch (dtype) {
    case 1: weight_only_typed(static_cast<const c10::Half*>(x), w, w_scale, M, N, K, ep, stream); break;
    case 2: weight_only_typed(static_cast<const c10::BFloat16*>(x), w, w_scale, M, N, K, ep, stream); break;
    default: weight_only_typed(static_cast<const float*>(x), w, w_scale, M, N, K, ep, stream); break;
  }
}

}  // namespace recsys_kernels::int8mm
