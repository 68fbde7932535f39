// CUDA kernels of quantize_rowwise / dequantize_rowwise: one warp per row, grid-stride over rows,
// 16-byte loads where the row width and the pointers allow. The float arithmetic is the CPU
// kernel's (rowwise_common.h, round-to-nearest intrinsics, no FMA), so both give the same bytes.
// Non-finite inputs (quantize) or scales/biases (dequantize) are reported through a device flag
// and raised as the same ValueError as on the CPU.
#include <cstring>
#include <optional>

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "embedding_bag/rowwise_common.h"

namespace recsys_kernels {
namespace {

using namespace rowwise;
using cuda::kFullMask;
using cuda::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;

// VEC input elements per lane and step; d % VEC == 0 (the launcher guarantees it). With ALIGNED,
// rows start on VEC-element boundaries, so loads and code stores are single wide accesses.
template <typename T, int BITS, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
quantize_rows_kernel(const T* __restrict__ w, uint8_t* __restrict__ out, int64_t n, int64_t d,
                     unsigned long long* __restrict__ bad) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t cols = packed_width(d, BITS);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < n;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const T* x = w + row * d;
    uint8_t* o = out + row * cols;

    // Pass 1: row min / max and finiteness, reduced across the warp.
    float lo = INFINITY, hi = -INFINITY;
    bool finite = true;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarpSize * VEC) {
      T v[VEC];
      cuda::load_pack<VEC, ALIGNED>(x + c, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = static_cast<float>(v[k]);
        finite = finite && isfinite(f);
        lo = fminf(lo, f);
        hi = fmaxf(hi, f);
      }
    }
    lo = cuda::warp_min(lo);
    hi = cuda::warp_max(hi);
    if (!__all_sync(kFullMask, finite)) {  // warp-uniform: the whole warp skips the row
      if (lane == 0) cuda::report_bad(bad, row);
      continue;
    }

    // Pass 2: codes (the row is re-read from L1/L2), then lane 0 writes scale and bias.
    if constexpr (BITS == 8) {
      const Params8 p = params_8bit(lo, hi);
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarpSize * VEC) {
        T v[VEC];
        uint8_t q[VEC];
        cuda::load_pack<VEC, ALIGNED>(x + c, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) q[k] = code_8bit(static_cast<float>(v[k]), p);
        cuda::store_pack<VEC, ALIGNED>(o + c, q);
      }
      if (lane == 0) {  // the tail is not 4-byte aligned unless d % 4 == 0: copy bytes
        memcpy(o + d, &p.scale, sizeof(float));
        memcpy(o + d + sizeof(float), &p.bias, sizeof(float));
      }
    } else {
      static_assert(VEC % 2 == 0, "4-bit rows pack element pairs");
      const Params4 p = params_4bit(lo, hi);
      if (!fits_fp16(p)) {  // warp-uniform, as lo and hi are
        if (lane == 0) cuda::report_bad(bad, row);
        continue;
      }
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarpSize * VEC) {
        T v[VEC];
        uint8_t q[VEC / 2];
        cuda::load_pack<VEC, ALIGNED>(x + c, v);
#pragma unroll
        for (int k = 0; k < VEC / 2; ++k)  // low nibble first
          q[k] = code_4bit(static_cast<float>(v[2 * k]), p) | (code_4bit(static_cast<float>(v[2 * k + 1]), p) << 4);
        cuda::store_pack<VEC / 2, ALIGNED>(o + c / 2, q);
      }
      if (lane == 0) {
        memcpy(o + d / 2, &p.scale_bits, sizeof(uint16_t));
        memcpy(o + d / 2 + sizeof(uint16_t), &p.bias_bits, sizeof(uint16_t));
      }
    }
  }
}

// VEC output elements per lane and step; d % VEC == 0.
template <typename OutT, int BITS, int VEC, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
dequantize_rows_kernel(const uint8_t* __restrict__ packed, OutT* __restrict__ out, int64_t n, int64_t d,
                       unsigned long long* __restrict__ bad) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t cols = packed_width(d, BITS);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < n;
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const uint8_t* r = packed + row * cols;
    OutT* o = out + row * d;
    float scale, bias;
    if constexpr (BITS == 8) {
      memcpy(&scale, r + d, sizeof(float));
      memcpy(&bias, r + d + sizeof(float), sizeof(float));
    } else {
      uint16_t h[2];
      memcpy(h, r + d / 2, sizeof(h));
      scale = static_cast<float>(c10::Half(h[0], c10::Half::from_bits()));
      bias = static_cast<float>(c10::Half(h[1], c10::Half::from_bits()));
    }
    if (!isfinite(scale) || !isfinite(bias)) {  // the same for every lane
      if (lane == 0) cuda::report_bad(bad, row);
      continue;
    }
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarpSize * VEC) {
      OutT v[VEC];
      if constexpr (BITS == 8) {
        uint8_t q[VEC];
        cuda::load_pack<VEC, ALIGNED>(r + c, q);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = static_cast<OutT>(dequant(q[k], scale, bias));
      } else {
        static_assert(VEC % 2 == 0, "4-bit rows pack element pairs");
        uint8_t q[VEC / 2];
        cuda::load_pack<VEC / 2, ALIGNED>(r + c / 2, q);
#pragma unroll
        for (int k = 0; k < VEC / 2; ++k) {
          v[2 * k] = static_cast<OutT>(dequant(q[k] & 0xF, scale, bias));
          v[2 * k + 1] = static_cast<OutT>(dequant(q[k] >> 4, scale, bias));
        }
      }
      cuda::store_pack<VEC, ALIGNED>(o + c, v);
    }
  }
}

at::Tensor quantize_rowwise_cuda(const at::Tensor& weight_in, int64_t bits) {
  const int64_t cols = check_quantize_args(weight_in, bits);
  const int64_t n = weight_in.size(0), d = weight_in.size(1);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  if (n == 0 || d == 0) return at::zeros({n, cols}, weight_in.options().dtype(at::kByte));

  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({n, cols}, weight.options().dtype(at::kByte));
  cuda::DeviceFlag bad(weight);
  const unsigned blocks = cuda::grid_for(n, kWarpsPerBlock);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_TYPES(weight.scalar_type(), "quantize_rowwise_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);  // 16-byte loads
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    const bool vec = d % kVec == 0 && cuda::aligned(w, 16) && cuda::aligned(o, 16);
    if (bits == 8) {
      if (vec) quantize_rows_kernel<scalar_t, 8, kVec, true><<<blocks, kThreads, 0, stream>>>(w, o, n, d, bad.ptr());
      else quantize_rows_kernel<scalar_t, 8, 1, false><<<blocks, kThreads, 0, stream>>>(w, o, n, d, bad.ptr());
    } else {
      if (vec) quantize_rows_kernel<scalar_t, 4, kVec, true><<<blocks, kThreads, 0, stream>>>(w, o, n, d, bad.ptr());
      else quantize_rows_kernel<scalar_t, 4, 2, false><<<blocks, kThreads, 0, stream>>>(w, o, n, d, bad.ptr());
    }
    RK_CUDA_LAUNCH_CHECK();
  });
  const int64_t first_bad = bad.read();
  RK_CHECK_VALUE(first_bad == cuda::DeviceFlag::kNone, "weight", unquantizable_row(bits), " (first in row ", first_bad,
                 ")");
  return out;
}

at::Tensor dequantize_rowwise_cuda(const at::Tensor& packed_in, int64_t bits, std::optional<at::ScalarType> output_dtype) {
  const auto checked = check_dequantize_args(packed_in, bits, output_dtype);
  const int64_t d = checked.first;
  const int64_t n = packed_in.size(0);
  const c10::cuda::CUDAGuard guard(packed_in.device());
  at::Tensor out = at::empty({n, d}, packed_in.options().dtype(checked.second));
  if (n == 0) return out;

  const at::Tensor packed = packed_in.contiguous();
  cuda::DeviceFlag bad(packed);
  const unsigned blocks = cuda::grid_for(n, kWarpsPerBlock);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_TYPES(checked.second, "dequantize_rowwise_cuda", [&] {
    const uint8_t* q = packed.const_data_ptr<uint8_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // 8-bit: 4 codes (a 4-byte load) per step; 4-bit: 8 values from a 4-byte load. The packed row
    // width is then a multiple of the load width, so every row stays aligned.
    constexpr int kVec8 = 4, kVec4 = 8;
    const bool aligned = cuda::aligned(q, 16) && cuda::aligned(o, 32);
    if (bits == 8) {
      if (aligned && d % kVec8 == 0)
        dequantize_rows_kernel<scalar_t, 8, kVec8, true><<<blocks, kThreads, 0, stream>>>(q, o, n, d, bad.ptr());
      else
        dequantize_rows_kernel<scalar_t, 8, 1, false><<<blocks, kThreads, 0, stream>>>(q, o, n, d, bad.ptr());
    } else {
      if (aligned && d % kVec4 == 0)
        dequantize_rows_kernel<scalar_t, 4, kVec4, true><<<blocks, kThreads, 0, stream>>>(q, o, n, d, bad.ptr());
      else
        dequantize_rows_kernel<scalar_t, 4, 2, false><<<blocks, kThreads, 0, stream>>>(q, o, n, d, bad.ptr());
    }
    RK_CUDA_LAUNCH_CHECK();
  });
  const int64_t first_bad = bad.read();
  RK_CHECK_VALUE(first_bad == cuda::DeviceFlag::kNone, "packed", "has a non-finite scale or bias (first in row ",
                 first_bad, ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) {
  m.impl("quantize_rowwise", &quantize_rowwise_cuda);
  m.impl("dequantize_rowwise", &dequantize_rowwise_cuda);
}

}  // namespace recsys_kernels
