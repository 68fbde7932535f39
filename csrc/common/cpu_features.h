// Run-time CPU feature detection and the instruction-set path kernels should take.
// RECSYS_KERNELS_CPU_ISA=scalar|avx2|avx512|avx512_vnni|amx caps the path so that tests cover the
// lower paths on any machine; it never enables a path the CPU (or the OS) lacks.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace recsys_kernels {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAmx = 4 };

struct CpuFeatures {
  bool avx2 = false;         // AVX2 + FMA + F16C
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ with OS support for the ZMM state
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx512_vbmi = false;  // byte permutes (vpmultishiftqb: embedding_bag's 4-bit rows, see there)
  bool amx_int8 = false;     // AMX-TILE + AMX-INT8 (the OS permission is requested by the AMX kernel)
};

// Gathers from tables larger than l2_prefetch_bytes() (the last-level cache: their rows come
// from DRAM) prefetch the rows ahead into L2 only (prefetcht1), smaller ones into L1
// (prefetcht0); the measurements are in embedding_bag_cpu_pool.h (Ahead). The size is the L3
// the OS reports (kL3BytesIfUnknown where it reports none: Zen 4's), or
// RECSYS_KERNELS_L2_PREFETCH_MIB (read on every call: the tests force both ways with it).
constexpr int64_t kL3BytesIfUnknown = int64_t{32} << 20;
int64_t l2_prefetch_bytes();

const CpuFeatures& cpu_features();
// The highest path the CPU supports, capped by RECSYS_KERNELS_CPU_ISA (read on every call, cheap).
CpuIsa cpu_isa();
const char* isa_name(CpuIsa isa);
std::map<std::string, std::string> cpu_features_dict();

}  // namespace recsys_kernels
