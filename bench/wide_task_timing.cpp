// Times the int8 GEMM's AVX512-VNNI and AMX kernels (wide_task, csrc/int8_matmul/int8_gemm_wide.cpp)
// without torch: fp32 activations quantized per row, a packed weight, the fp32 epilogue, the rows
// split over the threads in equal ranges (close to the driver's split at these shapes on 2 threads;
// it rounds the ranges to 6 rows). Built and run by wide_task_timing.sh.
//     wide_task_timing M K N [threads] [rounds]
// Prints the fastest round per instruction set the CPU has (the driver's own choice is AMX, then
// VNNI). Each round starts its threads (tens of microseconds, in the time: small beside the
// batched shapes' 0.4 ms and more).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "int8_matmul/int8_gemm_kernels.h"

using namespace recsys_kernels::int8_gemm;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s M K N [threads] [rounds]\n", argv[0]);
    return 2;
  }
  const int64_t m = std::atol(argv[1]), k = std::atol(argv[2]), n = std::atol(argv[3]);
  const int threads = argc > 4 ? std::atoi(argv[4]) : 2, rounds = argc > 5 ? std::atoi(argv[5]) : 30;
  if (m < 1 || k < 1 || n < 1 || threads < 1 || rounds < 1) {
    std::fprintf(stderr, "M, K, N, threads and rounds must be positive\n");
    return 2;
  }
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  std::vector<float> a(m * k);
  for (float& v : a) v = normal(gen);
  const int64_t panels = (n + 15) / 16, panel_bytes = (k + 1) / 2 * kPanelPairBytes;
  std::vector<int8_t> b(panels * panel_bytes);  // the timing does not depend on the weights' values
  for (int8_t& v : b) v = static_cast<int8_t>(gen());
  std::vector<float> b_scale(n, 0.01f), bias(n, 0.5f), out(m * n);
  const Problem P{m, n, k, {true, InKind::kF32, reinterpret_cast<const uint8_t*>(a.data()), 4 * k, nullptr},
                  b.data(), panel_bytes, 0, {OutKind::kF32, out.data(), n, b_scale.data(), bias.data(), Act::kNone}};
  // amx_usable(): the OS grants the tile state (it refuses where the CPU has no AMX), once per process
  const bool has[2] = {__builtin_cpu_supports("avx512vnni") != 0, amx_usable()};
  if (!has[0] && !has[1]) {
    std::fprintf(stderr, "this CPU has neither AVX512-VNNI nor AMX-INT8\n");
    return 1;
  }
  const char* names[2] = {"avx512_vnni", "amx"};
  for (int isa = 0; isa < 2; ++isa) {
    if (!has[isa]) continue;
    double best = 1e30;
    for (int r = 0; r < rounds; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          wide_task(static_cast<WideIsa>(isa), P, m * t / threads, m * (t + 1) / threads, 0, panels);
        });
      for (std::thread& th : pool) th.join();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("%ld x %ld -> %ld, %d threads, %-11s %8.3f ms %7.0f GOP/s\n", m, k, n, threads, names[isa],
                best * 1e3, 2.0 * m * k * n / best / 1e9);
  }
}
