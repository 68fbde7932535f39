#include "common/fresh_memory.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <sys/mman.h>

#include <c10/util/Exception.h>

namespace recsys_kernels {

bool huge_pages_enabled() {
  const char* v = std::getenv("RECSYS_KERNELS_HUGE_PAGES");
  if (v == nullptr || *v == '\0') return true;
  TORCH_CHECK_VALUE(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "RECSYS_KERNELS_HUGE_PAGES='", v,
                    "' is not 0 or 1");
  return v[0] == '1';
}

at::Tensor empty_for_writing(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (t.is_cpu() && bytes >= kFreshMappingBytes && huge_pages_enabled()) {
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1), last = (start + bytes) & ~(kHuge - 1);
    // advice only: where the kernel refuses it (THP "never", no THP), the pages stay 4 KiB
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace recsys_kernels
