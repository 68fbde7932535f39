// What the two translation units of the embedding_bag CPU kernel share: the description of a run
// of bags to pool. When every index contributes (bounds="raise", no padding_idx) the vector kernel
// (embedding_bag_cpu_pool.h, built for AVX2+FMA+F16C and for AVX-512, chosen at run time) pools a
// thread's whole range of bags straight from the raw indices in one call, checking each index as
// it reads it, as FBGEMM does; otherwise embedding_bag_cpu_forward.h resolves each bag's indices
// into a compacted list of the rows that contribute and pools it as a run of one bag. The scalar
// fallback is in embedding_bag_cpu_forward.h. Both compute, per column, the same float operations
// in the same order (row value = code * scale + bias for quantized rows, then * weight, then
// acc + value or max(acc, value), index order, then / count for mean), so the two paths give
// bit-identical results. No FMA there: the reference rounds the product and the sum separately.
// The exception is the int8 sums (sum, mean, weighted sum), in a form like FBGEMM's: per row
// acc = fma(code, scale * weight, acc), the bias * weight summed apart and added to acc after every
// kBiasFoldRows rows of the bag and after its last. Every CPU path still gives the same bits; they
// match the reference to its 1e-5 (DESIGN.md's tolerance for quantized paths), not its bits.
//
// Kept free of torch headers on purpose: the vector translation units must not instantiate any
// inline function that the rest of the library could link against.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace recsys_kernels::embedding_bag_cpu {

enum class TableKind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kQ8 = 3, kQ4 = 4 };

// The int8 sums fold their biases into the accumulators every 4 rows of a bag: summing code *
// scale alone lets the accumulators grow with the bag (codes are 0..255, so each row adds about
// half its range) and the rounding error with them (once per bag of 32: 15x the reference's
// error against the exact sum; every 4 rows: 1.1-1.9x). Three vector operations per 16 columns
// (widen, convert, fma) and one per 4 rows, where the reference's arithmetic takes five and
// FBGEMM's four: int8 shape A 0.86-0.90x -> 1.06-1.12x torch's op on a Xeon (docs/performance.md,
// "int8 sums in FBGEMM's form").
constexpr int64_t kBiasFoldRows = 4;

// Whether the int8 sums add their biases into the accumulators after row j (from 0) of a bag of n
// rows: the one rule of every CPU path. static: each translation unit keeps its own copy, compiled
// for its own instruction set (see above).
static inline bool fold_biases_after(int64_t j, int64_t n) {
  return j % kBiasFoldRows == kBiasFoldRows - 1 || j + 1 == n;
}

// A run of bags to pool, all of whose indices contribute (the caller resolved the bounds policy and
// padding_idx, or they have nothing to resolve): bag b pools the rows idx[off[b]], ...,
// idx[off[b + 1] - 1], in index order, into out + b * out_stride.
struct PoolArgs {
  TableKind kind;
  bool is_max;                // max, else sum
  bool is_mean;               // sum / count
  const uint8_t* table;       // base of the table
  int64_t row_bytes;          // bytes per row
  int64_t dim;                // D (unpacked)
  int64_t n_rows;             // the table's rows: an index outside [0, n_rows) stops the run
  const void* idx;            // indices, int32 or int64 (idx_is_int64)
  const void* off;            // [n_bags + 1] offsets into idx, same dtype as idx
  bool idx_is_int64;
  int64_t n_bags;
  // the prefetch look-ahead reads idx[p + 16] up to idx[idx_end - 1], running on into the bags
  // after the run (FBGEMM does the same)
  int64_t idx_end;
  const float* weights;       // one fp32 weight per index (same positions as idx), or nullptr
  float* out;                 // fp32 results, D per bag; an empty bag gets zeros
  int64_t out_stride;
  bool rows_from_dram;        // the table is beyond l2_prefetch_bytes(): prefetch rows into L2
};

struct PoolResult {
  // position in idx of the first index out of range: its bag and the later ones are not (fully)
  // written; -1 when all were in range
  int64_t first_bad = -1;
  bool finite = true;  // false: a quantized row had a non-finite scale or bias (the caller raises)
};

// AVX2+FMA+F16C kernel, one build per index dtype; call only when cpu_isa() >= kAvx2.
PoolResult pool_bags_avx2_i32(const PoolArgs& a);
PoolResult pool_bags_avx2_i64(const PoolArgs& a);
// AVX-512 kernel (the same code on 16-float vectors); call only when cpu_isa() >= kAvx512.
PoolResult pool_bags_avx512_i32(const PoolArgs& a);
PoolResult pool_bags_avx512_i64(const PoolArgs& a);
// The same for 4-bit rows (kind kQ4 only) with AVX512_VBMI; call only when the CPU has it.
PoolResult pool_bags_avx512_vbmi_q4_i32(const PoolArgs& a);
PoolResult pool_bags_avx512_vbmi_q4_i64(const PoolArgs& a);

// The vector kernel for a run on the CPU path `isa` (at least kAvx2): AVX-512 for D a multiple of
// 16 (other D keep AVX2, whose 8-column vectors leave fewer columns to the scalar tail). 4-bit
// rows take the VBMI build from the avx512_vnni path up where the CPU has VBMI (every CPU with
// VBMI we know of has VNNI too), so that RECSYS_KERNELS_CPU_ISA=avx512 still reaches the other.
inline PoolResult pool_bags_vector(CpuIsa isa, const PoolArgs& a) {
  if (isa >= CpuIsa::kAvx512 && a.dim % 16 == 0) {
    if (a.kind == TableKind::kQ4 && isa >= CpuIsa::kAvx512Vnni && cpu_features().avx512_vbmi)
      return a.idx_is_int64 ? pool_bags_avx512_vbmi_q4_i64(a) : pool_bags_avx512_vbmi_q4_i32(a);
    return a.idx_is_int64 ? pool_bags_avx512_i64(a) : pool_bags_avx512_i32(a);
  }
  return a.idx_is_int64 ? pool_bags_avx2_i64(a) : pool_bags_avx2_i32(a);
}

}  // namespace recsys_kernels::embedding_bag_cpu
