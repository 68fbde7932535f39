// Large CPU outputs that an op writes whole (a dense gradient, a gradient's rows) and their
// page faults.
//
// glibc maps every allocation of 32 MiB or more afresh from the kernel and unmaps it when freed,
// so such an output costs one page fault per 4 KiB on every call: shape A's 512 MB dense
// embedding gradient spends ~140 of its ~155 ms there. empty_for_writing asks the kernel to back
// the buffer with 2 MiB transparent huge pages (madvise(MADV_HUGEPAGE), which THP's usual
// "madvise" mode honours): one fault per 2 MiB, and the same 512 MB filled in ~55 ms. It is
// at::empty otherwise (smaller buffers, other devices, other systems, or THP off).
//
// Off by default in a VM whose virtio balloon reports free pages to the host (as the CI machines'
// does): the host takes back free 2 MiB blocks every ~2 s, and re-faulting one there costs ~3 ms,
// so a training loop measured the same mean step time either way, with a longer tail (a 512 MB
// gradient: 130 ms median, 0.7–1 s every few steps). RECSYS_KERNELS_HUGE_PAGES=1 / 0 forces it on
// / off (read on every call: tests and benchmarks compare both).
#pragma once

#include <ATen/ATen.h>

namespace recsys_kernels {

// glibc's largest mmap threshold on 64-bit systems: smaller blocks are reused from its heap,
// already faulted in.
constexpr int64_t kFreshMappingBytes = int64_t{32} << 20;

bool huge_pages_enabled();

// at::empty(sizes, options), backed by huge pages where that helps (above). Only for buffers the
// caller writes whole: a huge page is committed, and zeroed, as a whole.
at::Tensor empty_for_writing(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace recsys_kernels
