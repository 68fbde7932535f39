#!/bin/bash
# Builds bench/wide_task_timing.cpp against the int8 GEMM's sources and times the VNNI / AMX kernels
# at bench_int8_linear.py's batched shapes (needs g++ and a CPU with AVX512-VNNI or AMX).
#     bash bench/wide_task_timing.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
g++ -O3 -std=c++20 -pthread -Icsrc -o "$out/wide_task_timing" bench/wide_task_timing.cpp \
  csrc/int8_matmul/int8_gemm_wide.cpp csrc/int8_matmul/int8_gemm_avx2.cpp
for shape in "4096 1024 1024" "256 1024 4096" "4096 128 128"; do
  "$out/wide_task_timing" $shape "${1:-2}"
done
