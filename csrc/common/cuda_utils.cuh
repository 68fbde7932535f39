// Shared host-side helpers of the CUDA kernels: error checks, launch geometry and the device error
// flag of the bad-input policy; the device helpers (warp reductions, packed loads and stores,
// report_bad) are in cuda_device.cuh, included here.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "common/cuda_device.cuh"

// Check a CUDA runtime call / the last kernel launch; both raise a C++ error with the CUDA message.
#define RK_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define RK_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace recsys_kernels::cuda {

// Blocks for a grid-stride loop over `work_items` items of which a block takes `per_block`: enough
// to fill the GPU (`blocks_per_sm` resident blocks on every multiprocessor), never more than needed.
inline unsigned grid_for(int64_t work_items, int64_t per_block, int blocks_per_sm = 8) {
  const int64_t needed = (work_items + per_block - 1) / per_block;
  const int64_t full = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * blocks_per_sm;
  const int64_t blocks = needed < full ? needed : full;
  return static_cast<unsigned>(blocks > 0 ? blocks : 1);
}

// True when p is aligned to `bytes` (for choosing a vectorised kernel at launch).
inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// A device-side error flag: kernels that find a bad value (non-finite scale, index out of range)
// report the position (row, index number; >= 0) where they found it; the flag keeps the smallest,
// and the host reads it back after the launch and raises the Python error, so the message can
// name the same position the CPU kernel names. Reading it waits for the stream, the price of a
// precise error (DESIGN.md §5).
class DeviceFlag {
 public:
  static constexpr int64_t kNone = kNoPosition;
  explicit DeviceFlag(const at::Tensor& like) : flag_(at::full({1}, kNone, like.options().dtype(at::kLong))) {}
  unsigned long long* ptr() { return reinterpret_cast<unsigned long long*>(flag_.data_ptr<int64_t>()); }
  // The smallest position reported, or kNone; synchronises with the current stream.
  int64_t read() const { return flag_.item<int64_t>(); }

 private:
  at::Tensor flag_;
};

}  // namespace recsys_kernels::cuda
