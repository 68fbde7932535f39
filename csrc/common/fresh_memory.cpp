#include "common/fresh_memory.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include <dirent.h>
#include <sys/mman.h>

#include <c10/util/Exception.h>

namespace recsys_kernels {
namespace {

// Whether a virtio balloon negotiated free page reporting (feature bit 5, VIRTIO_BALLOON_F_REPORTING;
// sysfs lists the negotiated bits as a string of 0 / 1, bit 0 first).
bool free_page_reporting() {
  const std::string dir = "/sys/bus/virtio/drivers/virtio_balloon";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return false;
  bool reporting = false;
  while (const dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, "virtio", 6) != 0) continue;
    std::ifstream features(dir + "/" + e->d_name + "/features");
    std::string bits;
    if (features >> bits && bits.size() > 5 && bits[5] == '1') reporting = true;
  }
  closedir(d);
  return reporting;
}

}  // namespace

bool huge_pages_enabled() {
  const char* v = std::getenv("RECSYS_KERNELS_HUGE_PAGES");
  if (v != nullptr && *v != '\0') {
    TORCH_CHECK_VALUE(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "RECSYS_KERNELS_HUGE_PAGES='", v,
                      "' is not 0 or 1");
    return v[0] == '1';
  }
  static const bool by_default = !free_page_reporting();
  return by_default;
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
