#!/bin/bash
# Builds and runs bench/dequant_floor.c: what the arithmetic of an int8 row-wise bag costs with the
# rows in L1, in six forms, and what prefetching costs fp32 rows already in cache (needs gcc and an
# AVX-512 CPU with VBMI). fp-contract=off: each form's roundings are the ones it writes.
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
gcc -O3 -mavx512f -mavx512bw -mavx512vbmi -mfma -ffp-contract=off -o "$out/dequant_floor" dequant_floor.c
"$out/dequant_floor"
rm -rf "$out"
