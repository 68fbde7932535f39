// Module init of the CUDA extension recsys_kernels._C_cuda. Its kernels register themselves on the
// CUDA dispatch key (TORCH_LIBRARY_IMPL in the .cu files) when the library is loaded; loading needs
// no GPU, so importing on a machine without one is fine. recsys_kernels._loader loads it after _C,
// which defines the op schemas.
#include <string>

#include <torch/extension.h>
#include <torch/version.h>

#include <cuda_runtime_api.h>

namespace recsys_kernels {
std::string compiled_cuda_archs();  // cuda_info.cu
std::string cuda_toolkit_version();  // cuda_info.cu

namespace {
// The CUDA driver's version as "13.0", or "none" where no driver is installed (no GPU).
std::string driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess || v == 0) {
    cudaGetLastError();  // clear the error so that later runtime calls do not report it
    return "none";
  }
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
}  // namespace
}  // namespace recsys_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recsys_kernels CUDA C++ kernels (registered on the CUDA dispatch key at import)";
  m.def("built_with_torch", [] { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("cuda_archs", &recsys_kernels::compiled_cuda_archs,
        "The compute capabilities compiled into the extension, e.g. '8.0;8.6;8.9;9.0'.");
  m.def("cuda_version", &recsys_kernels::cuda_toolkit_version,
        "The CUDA toolkit version the extension was compiled with, e.g. '13.0'.");
  m.def("cuda_driver_version", &recsys_kernels::driver_version,
        "The installed CUDA driver's version, or 'none' without a driver.");
}
