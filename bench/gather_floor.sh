#!/bin/bash
# Builds and runs bench/gather_floor.c: the machine's sequential read bandwidth and the best random
# row gather rates a plain C loop reaches (needs gcc with AVX-512 and OpenMP, and an AVX-512 CPU).
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
gcc -O3 -mavx512f -fopenmp -o "$out/gather_floor" gather_floor.c -lm
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$out/gather_floor"
rm -rf "$out"
