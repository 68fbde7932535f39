// Build facts of the CUDA extension that only nvcc knows. Kept in its own tiny translation unit
// (no torch headers) and exposed to the module init in cuda_module.cc.
#include <string>

#include <cuda_runtime_api.h>

namespace recsys_kernels {

// The compute capabilities the device code was compiled for, as "8.0;8.6;9.0" (nvcc defines
// __CUDA_ARCH_LIST__ from the -gencode flags, e.g. 800,860,900; PTX vs SASS is not visible here).
std::string compiled_cuda_archs() {
  constexpr int kArchs[] = {__CUDA_ARCH_LIST__};
  std::string out;
  for (int a : kArchs) {
    if (!out.empty()) out += ";";
    out += std::to_string(a / 100) + "." + std::to_string((a / 10) % 10);
  }
  return out;
}

// The CUDA toolkit version the extension was compiled with, as "13.0".
std::string cuda_toolkit_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
}

}  // namespace recsys_kernels
