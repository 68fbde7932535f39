#include "common/cpu_features.h"
#include "common/fresh_memory.h"

#include <cpuid.h>
#include <cstdlib>
#include <cstring>

#include <unistd.h>

#include <c10/util/Exception.h>

namespace recsys_kernels {
namespace {

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;          // XMM + YMM state
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;     // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = os_avx && (b & (1u << 5)) && fma && f16c;
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  f.avx512 = f.avx2 && os_avx512 && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_vnni = f.avx512 && (c & (1u << 11));
  f.avx512_vbmi = f.avx512 && (c & (1u << 1));
  f.amx_int8 = f.avx512 && (d & (1u << 24)) && (d & (1u << 25));
  unsigned a1, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) f.avx512_bf16 = f.avx512 && (a1 & (1u << 5));
  return f;
}

CpuIsa highest_supported(const CpuFeatures& f) {
  if (f.amx_int8 && f.avx512_vnni) return CpuIsa::kAmx;
  if (f.avx512_vnni) return CpuIsa::kAvx512Vnni;
  if (f.avx512) return CpuIsa::kAvx512;
  if (f.avx2) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

CpuIsa parse_cap(const char* s) {
  static const struct { const char* name; CpuIsa isa; } kNames[] = {
      {"scalar", CpuIsa::kScalar}, {"avx2", CpuIsa::kAvx2}, {"avx512", CpuIsa::kAvx512},
      {"avx512_vnni", CpuIsa::kAvx512Vnni}, {"amx", CpuIsa::kAmx}};
  for (const auto& n : kNames)
    if (std::strcmp(s, n.name) == 0) return n.isa;
  TORCH_CHECK_VALUE(false, "RECSYS_KERNELS_CPU_ISA='", s,
                    "' is not one of scalar, avx2, avx512, avx512_vnni, amx");
}

}  // namespace

int64_t l2_prefetch_bytes() {
  if (const char* v = std::getenv("RECSYS_KERNELS_L2_PREFETCH_MIB"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const long long mib = std::strtoll(v, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && mib >= 0 && mib < (1LL << 40), "RECSYS_KERNELS_L2_PREFETCH_MIB='", v,
                      "' is not a whole number of MiB");
    return static_cast<int64_t>(mib) << 20;
  }
  static const int64_t llc = [] {
    const long bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);  // glibc reads it from cpuid; 0 or -1: unknown
    return bytes > 0 ? int64_t{bytes} : kL3BytesIfUnknown;
  }();
  return llc;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

CpuIsa cpu_isa() {
  const CpuIsa best = highest_supported(cpu_features());
  const char* cap = std::getenv("RECSYS_KERNELS_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const CpuIsa requested = parse_cap(cap);
  return static_cast<int>(requested) < static_cast<int>(best) ? requested : best;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Vnni: return "avx512_vnni";
    case CpuIsa::kAmx: return "amx";
  }
  return "?";
}

std::map<std::string, std::string> cpu_features_dict() {
  const CpuFeatures& f = cpu_features();
  auto yn = [](bool b) { return std::string(b ? "yes" : "no"); };
  return {{"avx2", yn(f.avx2)},
          {"avx512", yn(f.avx512)},
          {"avx512_vnni", yn(f.avx512_vnni)},
          {"avx512_bf16", yn(f.avx512_bf16)},
          {"avx512_vbmi", yn(f.avx512_vbmi)},
          {"amx_int8", yn(f.amx_int8)},
          {"l2_prefetch_above_mib", std::to_string(l2_prefetch_bytes() >> 20)},
          {"huge_pages_above_mib", huge_pages_enabled() ? std::to_string(kFreshMappingBytes >> 20) : "off"},
          {"best_path", isa_name(highest_supported(f))},
          {"selected_path", isa_name(cpu_isa())}};
}

}  // namespace recsys_kernels
