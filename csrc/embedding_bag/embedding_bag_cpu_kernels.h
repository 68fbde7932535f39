// What the two translation units of the embedding_bag CPU kernel share: the description of one
// bag to pool. embedding_bag_cpu.cpp resolves each bag's indices (bounds policy, padding_idx) into
// a compacted list of the rows that contribute, then pools it with the AVX2 kernel
// (embedding_bag_cpu_avx2.cpp, the only code built for AVX2+FMA+F16C, chosen at run time) or with
// its own scalar fallback. Both compute, per column, the same float operations in the same order
// (row value = code * scale + bias for quantized rows, then * weight, then acc + value or
// max(acc, value), index order), so the two paths give bit-identical results. No FMA: the
// reference rounds the product and the sum separately.
//
// Kept free of torch headers on purpose: the AVX2 translation unit must not instantiate any
// inline function that the rest of the library could link against.
#pragma once

#include <cstdint>

namespace recsys_kernels::embedding_bag_cpu {

enum class TableKind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kQ8 = 3, kQ4 = 4 };

// Bytes a table row occupies in the row-major table (quantized: codes, then scale and bias).
struct PoolArgs {
  TableKind kind;
  bool is_max;                // max, else sum (mean = sum, divided by the caller)
  const uint8_t* table;       // base of the table
  int64_t row_bytes;          // bytes per row
  int64_t dim;                // D (unpacked)
  const int64_t* rows;        // [n] rows that contribute, in index order (all in range)
  const float* weights;       // [n] per-sample weights (fp32), or nullptr
  int64_t n;                  // >= 1
  float* out;                 // [D] fp32 result
  // Prefetching looks ahead in the raw indices, not in the compacted rows, so that it runs on into
  // the next bags (FBGEMM does the same): raw_idx points at this bag's first raw index (int64 or
  // int32), raw_left (>= 1) counts the raw indices left in the batch from there; only rows in
  // [0, n_rows) are fetched.
  const void* raw_idx = nullptr;
  bool raw_is_int64 = true;
  int64_t raw_left = 0, n_rows = 0;
};

// AVX2+FMA+F16C kernel; call only when cpu_isa() >= kAvx2. Returns false when a quantized row
// had a non-finite scale or bias (the result is then meaningless and the caller raises).
bool pool_bag_avx2(const PoolArgs& a);

}  // namespace recsys_kernels::embedding_bag_cpu
