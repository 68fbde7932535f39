// The pooling kernel of embedding_bag (see embedding_bag_cpu_kernels.h), written once for every
// vector instruction set. Not a stand-alone header: embedding_bag_cpu_avx2.h and
// embedding_bag_cpu_avx512.h include it inside their kernel namespace, after defining
//   RK_POOL, RK_POOL_INLINE   the function attributes (target ISA, fp-contract=off);
//   Vec, kLanes               the float vector type and its lane count;
//   vzero, vset1, vadd, vmul, vfma, vdiv, vstore, max_nan (NaN-propagating max),
//   prefetch_line(s);
//   F32, F16, BF16, Q8, Q4    the row readers: params (a RowParams, or a reader's own type
//                             derived from it), load (kLanes columns from column c, a multiple
//                             of kLanes), scalar, byte_of, kQuant, kFusedSum, Q4::load_of_4, and
//                             Q8's codes (kLanes codes as floats) and code (one).
// Per column every instruction set performs the same float operations in the same order
// (value = code * scale + bias, * weight, then acc + value or max, index order, / count; int8
// sums in the fused form of embedding_bag_cpu_kernels.h), so the AVX-512, AVX2 and scalar paths
// give the same bits.
//
// Per bag, the columns go in blocks of up to kMaxVecs vectors: the block's fp32 accumulators stay
// in registers while the kernel walks the bag's rows in index order; the first block prefetches
// the whole row kPrefetch (into L2: kPrefetchL2) indices ahead, running on into the next bags.
// Columns past the last full vector go through a scalar loop with the same operations.

constexpr int64_t kPrefetch = 16;  // indices ahead (8..16 measured best on AVX2; 32 and more lose)
// Prefetching into L2 (PoolArgs::rows_from_dram), where more misses are in flight: 32
// indices ahead. Zen 4, 2 threads, paired with torch, 4 alternations of the builds, 16 -> 32:
// 4-bit shape A 1.97-2.01x -> 2.14-2.19x, fp32 1M x 64 1.24-1.31x -> 1.31-1.43x, 1M x 32
// 0.89-0.93x -> 0.95-0.97x, fp32 shape A and int8 the same; 48 lost (1M x 32 0.70x).
constexpr int64_t kPrefetchL2 = 32;

// Where a column block prefetches the rows ahead: nowhere (a bag's later blocks, which find the
// row in cache), into L1 (prefetcht0), or into L2 only (prefetcht1), for tables beyond
// l2_prefetch_bytes(), the last-level cache (cpu_features.h). Measured on Zen 4 (32 MiB L3; 2
// threads, paired with torch): prefetcht1 took the DRAM-bound shape A (1M x 128 fp32) from 0.98x
// to 1.57x torch, 31.8 GB/s of rows against the 27-34 GB/s of a sequential read (prefetcht0 fills
// the L1's few miss buffers, and the rows ahead wait for them); the cache-resident shape B (50K x
// 64, 12.8 MB) lost 5% with it (0.92x -> 0.87x). A prefetcht0 a few rows ahead on top of it lost
// on both. On a Xeon with a 480 MiB L3, where the int8 / int4 shape A tables (136 / 68 MB) stay
// cached between calls, prefetcht0 won: int4 1.55-1.68x -> 1.99-2.20x, int8 0.84x -> 0.87-0.94x
// (fp32 shape A, 512 MB, the same either way): hence the threshold at the L3's size.
enum class Ahead { kNone, kL1, kL2 };

// Accumulator vectors per column block, i.e. the columns one pass over a bag's rows covers. One
// pass per row matters on DRAM-bound gathers: while a second block walks the bag's rows again
// (from cache) no new misses are issued (on AVX2 two blocks of 8 measured 1.2x slower than one of
// 16 at D = 128). A float sum keeps all 16 ymm registers as accumulators (with weights GCC spills
// one or two, which still measured 0-12% faster); max and dequantization need more temporaries,
// and 16 there measured up to 30% slower than blocks of 8. AVX-512 keeps the same counts: twice
// the columns per pass, the other 16 of its 32 zmm registers left for temporaries.
template <class L, bool MAX>
constexpr int kMaxVecs = (MAX || L::kQuant) ? 8 : 16;

// Vector k (0 <= k < NV) of a column block: 4-bit rows decode 4 vectors per load where the block
// holds the whole group (never reading past it, so never past the row).
template <class L, int NV, class P>
RK_POOL_INLINE Vec load_vector(const uint8_t* block, int k, const P& p) {
  if constexpr (std::is_same_v<L, Q4>) {
    if ((k / 4 + 1) * 4 <= NV) return L::load_of_4(block, k, p);
  }
  return L::load(block, kLanes * k, p);
}

RK_POOL_INLINE float max_nan(float acc, float v) { return (std::isnan(v) || v > acc) ? v : acc; }

// Which lines of a row to prefetch, past the `known` first ones: `extra` more lines, and the line
// of its last byte when the row may span one line more than ceil(row_bytes / 64). The same number
// of prefetches for every row, and none outside the row (a quantized D = 128 row is 136 bytes:
// rounding up to whole lines would fetch a fourth).
struct RowLines {
  int64_t extra;
  bool last_byte;
  bool any() const { return extra > 0 || last_byte; }
};

RK_POOL_INLINE RowLines row_lines(const PoolArgs& a, int64_t known) {
  const int64_t lines = (a.row_bytes + 63) / 64;
  // In a 64-byte aligned table every row starts at a multiple of g = gcd(row_bytes, 64) within its
  // line, at most 64 - g in, so its last byte is in its line `lines - 1` when row_bytes - 64 *
  // (lines - 1) <= g (true for the quantized rows at D = 128: 68 and 136 bytes).
  const int64_t g = a.row_bytes & -a.row_bytes;  // the lowest set bit: gcd with 64 when < 64
  const bool fits = reinterpret_cast<uintptr_t>(a.table) % 64 == 0 &&
                    a.row_bytes - 64 * (lines - 1) <= (g < 64 ? g : 64);
  return {lines - known, !fits};
}

// At index position p: prefetch every line of the row kPrefetch positions ahead (running on into
// the next bags, as FBGEMM does). Measured on the DRAM-bound gather (1M x 128 fp32), this code
// must not branch per row: a loop over the lines, a switch (an indirect jump) or a chain of ifs on
// the line count each cost 10-50%. So the KNOWN lines the first column block covers (a
// compile-time count) go in straight-line code, and rows with MORE lines (later blocks, a
// quantized row's scale and bias, a row that may end in a further line) get the rest from a
// switch that falls through. Past idx_end the look-ahead is the current row.
template <Ahead A, int64_t KNOWN, bool MORE, class I>
RK_POOL_INLINE void prefetch_ahead(const PoolArgs& a, const I* idx, int64_t p, RowLines more) {
  constexpr int64_t kAheadRows = A == Ahead::kL2 ? kPrefetchL2 : kPrefetch;
  const int64_t q = p + kAheadRows < a.idx_end ? p + kAheadRows : p;
  // not checked: a prefetch never faults, so a bad look-ahead index only prefetches a useless
  // address (as in FBGEMM's loop); unsigned arithmetic, so a wild index wraps without overflow.
  // Masking it to row 0 cost three instructions per row.
  const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[q]));
  const char* row =
      reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(a.table) + r * static_cast<uint64_t>(a.row_bytes));
  constexpr bool kL2 = A == Ahead::kL2;
#pragma GCC unroll 16
  for (int64_t l = 0; l < KNOWN; ++l) prefetch_line<kL2>(row + 64 * l);
  if constexpr (MORE) {
    prefetch_lines<kL2>(row + 64 * KNOWN, more.extra);
    if (more.last_byte) prefetch_line<kL2>(row + a.row_bytes - 1);
  }
}

// The bag [s, e) of idx (s < e) and where its D results go.
template <class I>
struct Bag {
  const I* idx;
  int64_t s, e;
  float* out;
};

RK_POOL_INLINE bool out_of_range(int64_t r, const PoolArgs& a) {
  return static_cast<uint64_t>(r) >= static_cast<uint64_t>(a.n_rows);
}

// One column block [c0, c0 + kLanes * NV) of a bag (see pool_block); AHEAD (not kNone): prefetch
// the KNOWN first lines of the row ahead, MORE: and its further lines too.
template <class L, int NV, bool MAX, bool W, Ahead AHEAD, int64_t KNOWN, bool MORE, class I>
RK_POOL_INLINE int64_t pool_rows(const PoolArgs& a, const Bag<I>& bag, int64_t c0, RowLines more, bool& ok) {
  constexpr bool kFused = L::kFusedSum && !MAX;  // int8 sums (embedding_bag_cpu_kernels.h)
  Vec acc[NV];
  const Vec init = MAX ? vset1(-INFINITY) : vzero();
  // unrolled: as a loop GCC turned it into a memset of the array on the stack (a microcoded
  // `rep stos` per bag) before the accumulators went into registers
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) acc[k] = init;
  bool finite = true;  // a local: through the reference GCC stored it on every row
  float biases = 0.0f;  // kFused: the biases (* weights) not yet folded into acc
  for (int64_t p = bag.s; p < bag.e; ++p) {
    const int64_t r = bag.idx[p];
    if constexpr (AHEAD != Ahead::kNone) {
      if (out_of_range(r, a)) return p;
      prefetch_ahead<AHEAD, KNOWN, MORE>(a, bag.idx, p, more);
    }
    const uint8_t* row = a.table + r * a.row_bytes;
    const auto prm = L::params(row, a.dim, finite);
    const uint8_t* block = row + L::byte_of(c0);  // constant offsets below (c0 is a multiple of kLanes)
    if constexpr (kFused) {
      const Vec scale = vset1(W ? prm.scale * a.weights[p] : prm.scale);
      biases += W ? prm.bias * a.weights[p] : prm.bias;
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) acc[k] = vfma(L::codes(block, kLanes * k), scale, acc[k]);
      if (fold_biases_after(p - bag.s, bag.e - bag.s)) {
#pragma GCC unroll 16
        for (int k = 0; k < NV; ++k) acc[k] = vadd(acc[k], vset1(biases));
        biases = 0.0f;
      }
      continue;
    }
    Vec w;
    if constexpr (W) w = vset1(a.weights[p]);
#pragma GCC unroll 16  // k must be a constant in load_vector
    for (int k = 0; k < NV; ++k) {
      Vec v = load_vector<L, NV>(block, k, prm);
      if constexpr (W) v = vmul(v, w);
      acc[k] = MAX ? max_nan(acc[k], v) : vadd(acc[k], v);
    }
  }
  ok &= finite;
  if (a.is_mean) {
    const Vec count = vset1(static_cast<float>(bag.e - bag.s));
#pragma GCC unroll 16
    for (int k = 0; k < NV; ++k) acc[k] = vdiv(acc[k], count);
  }
  // unrolled too: as loops (indexing acc by a variable) GCC kept a copy of acc on the stack and
  // stored every accumulator to it on every row
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) vstore(bag.out + c0 + kLanes * k, acc[k]);
  return -1;
}

// One column block [c0, c0 + kLanes * NV) of a bag. AHEAD (not kNone): the bag's first block, which
// prefetches the whole row ahead (the later blocks find it in cache) and checks each index before
// it reads the row. Returns the position of an index out of range, else -1.
template <class L, int NV, bool MAX, bool W, Ahead AHEAD, class I>
RK_POOL int64_t pool_block(const PoolArgs& args, const Bag<I>& bag, int64_t c0, bool& ok) {
  const PoolArgs a = args;  // not reloaded from memory on every row (see pool_bags_one_block)
  // the lines the block's own columns span in a 64-byte aligned row, known at compile time
  constexpr int64_t kKnown = (L::byte_of(kLanes * NV) + 63) / 64;
  if constexpr (AHEAD == Ahead::kNone) return pool_rows<L, NV, MAX, W, AHEAD, kKnown, false>(a, bag, c0, {}, ok);
  const RowLines more = row_lines(a, kKnown);
  // one loop with and one without the further lines, not a branch per row: that branch, though
  // predicted, cost 7% on the cache-resident shape B (the row loop is ~25 instructions)
  return more.any() ? pool_rows<L, NV, MAX, W, AHEAD, kKnown, true>(a, bag, c0, more, ok)
                    : pool_rows<L, NV, MAX, W, AHEAD, kKnown, false>(a, bag, c0, more, ok);
}

// Columns [c0, dim), fewer than kLanes; AHEAD as in pool_block (c0 == 0: the row has no full vector).
template <class L, bool MAX, bool W, Ahead AHEAD, class I>
RK_POOL int64_t pool_tail(const PoolArgs& args, const Bag<I>& bag, int64_t c0, bool& ok) {
  const PoolArgs a = args;  // not reloaded from memory on every row (see pool_bags_one_block)
  constexpr bool kFused = L::kFusedSum && !MAX;  // int8 sums (embedding_bag_cpu_kernels.h)
  float acc[kLanes];
  const int64_t nc = a.dim - c0;
  for (int64_t c = 0; c < nc; ++c) acc[c] = MAX ? -INFINITY : 0.0f;
  const RowLines all = row_lines(a, 0);
  float biases = 0.0f;  // as in pool_rows
  for (int64_t p = bag.s; p < bag.e; ++p) {
    const int64_t r = bag.idx[p];
    if constexpr (AHEAD != Ahead::kNone) {
      if (out_of_range(r, a)) return p;
      prefetch_ahead<AHEAD, 0, true>(a, bag.idx, p, all);
    }
    const uint8_t* row = a.table + r * a.row_bytes;
    const RowParams prm = L::params(row, a.dim, ok);
    if constexpr (kFused) {
      const float scale = W ? prm.scale * a.weights[p] : prm.scale;
      biases += W ? prm.bias * a.weights[p] : prm.bias;
      for (int64_t c = 0; c < nc; ++c) acc[c] = std::fma(L::code(row, c0 + c), scale, acc[c]);
      if (fold_biases_after(p - bag.s, bag.e - bag.s)) {
        for (int64_t c = 0; c < nc; ++c) acc[c] = acc[c] + biases;
        biases = 0.0f;
      }
      continue;
    }
    for (int64_t c = 0; c < nc; ++c) {
      float v = L::scalar(row, c0 + c, prm);
      if constexpr (W) v = v * a.weights[p];
      acc[c] = MAX ? max_nan(acc[c], v) : acc[c] + v;
    }
  }
  const float count = static_cast<float>(bag.e - bag.s);
  for (int64_t c = 0; c < nc; ++c) bag.out[c0 + c] = a.is_mean ? acc[c] / count : acc[c];
  return -1;
}

// pool_block for a block of nv (1..kMaxVecs) vectors: the template instance with NV == nv.
template <class L, bool MAX, bool W, Ahead AHEAD, class I, int NV = 1>
RK_POOL_INLINE int64_t pool_block_n(int nv, const PoolArgs& a, const Bag<I>& bag, int64_t c0, bool& ok) {
  if constexpr (NV < kMaxVecs<L, MAX>) {
    if (nv != NV) return pool_block_n<L, MAX, W, AHEAD, I, NV + 1>(nv, a, bag, c0, ok);
  }
  return pool_block<L, NV, MAX, W, AHEAD>(a, bag, c0, ok);
}

// Every bag of a run whose rows are one column block of NV vectors (D = kLanes * NV, no scalar
// tail): the bag loop and the row loop in one function, the prefetch variant chosen once per run
// (a call of pool_block and its choice per bag made bags of 2-4 indices up to 1.3x slower).
template <class L, int NV, bool MAX, bool W, Ahead AHEAD, int64_t KNOWN, bool MORE, class I>
RK_POOL_INLINE PoolResult pool_bags_one_block(const PoolArgs& args, RowLines more) {
  // a copy the output stores cannot alias (intrinsic stores may alias anything): through the
  // reference GCC reloaded the table, the row size and idx_end from memory on every row, and this
  // loop ran shape B at 0.76x torch's speed instead of 0.91x
  const PoolArgs a = args;
  const I* idx = static_cast<const I*>(a.idx);
  const I* off = static_cast<const I*>(a.off);
  bool ok = true;
  int64_t next = off[0];  // each offset read once, as a scalar (see pool_run)
  for (int64_t b = 0; b < a.n_bags; ++b) {
    const Bag<I> bag{idx, next, off[b + 1], a.out + b * a.out_stride};
    next = bag.e;
    if (bag.s == bag.e) {  // zeros, as NV vector stores: a memset call per empty bag took 5 ns
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) vstore(bag.out + kLanes * k, vzero());
      continue;
    }
    const int64_t bad = pool_rows<L, NV, MAX, W, AHEAD, KNOWN, MORE>(a, bag, 0, more, ok);
    if (bad >= 0) return {bad, ok};
  }
  return {-1, ok};
}

template <class L, int NV, bool MAX, bool W, Ahead AHEAD, class I>
RK_POOL PoolResult pool_run_one_block(const PoolArgs& a) {
  constexpr int64_t kKnown = (L::byte_of(kLanes * NV) + 63) / 64;
  // The block holds the whole row, so its lines are known at compile time, a quantized row's scale
  // and bias included (D = 128: 136 bytes in 3 lines for 8-bit rows, 68 in 2 for 4-bit): those
  // rows need no switch (an indirect jump per row) for the line of their scale and bias.
  constexpr int64_t kWhole = (L::byte_of(kLanes * NV) + L::kTailBytes + 63) / 64;
  if constexpr (kWhole > kKnown) {
    if (!row_lines(a, kWhole).any()) return pool_bags_one_block<L, NV, MAX, W, AHEAD, kWhole, false, I>(a, {});
  }
  const RowLines more = row_lines(a, kKnown);
  return more.any() ? pool_bags_one_block<L, NV, MAX, W, AHEAD, kKnown, true, I>(a, more)
                    : pool_bags_one_block<L, NV, MAX, W, AHEAD, kKnown, false, I>(a, more);
}

// pool_run_one_block for rows of nv (1..kMaxVecs) vectors: the template instance with NV == nv.
template <class L, bool MAX, bool W, Ahead AHEAD, class I, int NV = 1>
RK_POOL_INLINE PoolResult pool_run_one_block_n(int nv, const PoolArgs& a) {
  if constexpr (NV < kMaxVecs<L, MAX>) {
    if (nv != NV) return pool_run_one_block_n<L, MAX, W, AHEAD, I, NV + 1>(nv, a);
  }
  return pool_run_one_block<L, NV, MAX, W, AHEAD, I>(a);
}

// Every bag of the run, bag by bag (one pass over a bag's rows per column block); AHEAD: kL1 or kL2.
template <class L, class I, bool MAX, bool W, Ahead AHEAD>
RK_POOL PoolResult pool_run(const PoolArgs& a) {
  constexpr int kBlock = kMaxVecs<L, MAX>;
  const I* idx = static_cast<const I*>(a.idx);
  const I* off = static_cast<const I*>(a.off);
  const int64_t nvec = a.dim / kLanes;
  // (not for a weighted max, which only the raw op can be asked for: the front door allows weights
  // with sum alone; it keeps the per-bag path, which saves compiling one more set of instances)
  if constexpr (!(MAX && W)) {
    if (nvec >= 1 && nvec <= kBlock && kLanes * nvec == a.dim)
      return pool_run_one_block_n<L, MAX, W, AHEAD, I>(static_cast<int>(nvec), a);
  }
  const int64_t n_full = nvec / kBlock;  // full blocks
  const int rest = static_cast<int>(nvec % kBlock);
  bool ok = true;
  // each offset is read once, as a scalar: reading off[b] and off[b + 1] per bag, GCC loaded the
  // pair as one 8-byte word, spilled it and reloaded it as a vector (a failed store forwarding,
  // which waits for all older stores to commit: the previous bag's misses), and the kernel ran at
  // half FBGEMM's speed on the cache-resident shape B
  int64_t next = off[0];
  for (int64_t b = 0; b < a.n_bags; ++b) {
    const int64_t s = next;
    next = off[b + 1];
    const Bag<I> bag{idx, s, next, a.out + b * a.out_stride};
    if (bag.s == bag.e) {
      for (int64_t c = 0; c < a.dim; ++c) bag.out[c] = 0.0f;
      continue;
    }
    int64_t bad = -1;
    for (int64_t v = 0; v < n_full && bad < 0; ++v) {
      bad = v == 0 ? pool_block<L, kBlock, MAX, W, AHEAD>(a, bag, 0, ok)
                   : pool_block<L, kBlock, MAX, W, Ahead::kNone>(a, bag, kLanes * kBlock * v, ok);
    }
    if (rest > 0 && bad < 0) {
      bad = n_full == 0 ? pool_block_n<L, MAX, W, AHEAD, I>(rest, a, bag, 0, ok)
                        : pool_block_n<L, MAX, W, Ahead::kNone, I>(rest, a, bag, kLanes * kBlock * n_full, ok);
    }
    if (kLanes * nvec < a.dim && bad < 0) {
      bad = nvec == 0 ? pool_tail<L, MAX, W, AHEAD>(a, bag, 0, ok)
                      : pool_tail<L, MAX, W, Ahead::kNone>(a, bag, kLanes * nvec, ok);
    }
    if (bad >= 0) return {bad, ok};
  }
  return {-1, ok};
}

template <class L, class I, Ahead AHEAD>
RK_POOL PoolResult pool_mode(const PoolArgs& a) {
  const bool w = a.weights != nullptr;
  if (a.is_max) return w ? pool_run<L, I, true, true, AHEAD>(a) : pool_run<L, I, true, false, AHEAD>(a);
  return w ? pool_run<L, I, false, true, AHEAD>(a) : pool_run<L, I, false, false, AHEAD>(a);
}

template <class L, class I>
RK_POOL PoolResult pool_kind(const PoolArgs& a) {
  return a.rows_from_dram ? pool_mode<L, I, Ahead::kL2>(a) : pool_mode<L, I, Ahead::kL1>(a);
}

template <class I>
RK_POOL PoolResult pool_index(const PoolArgs& a) {
  switch (a.kind) {
    case TableKind::kF32: return pool_kind<F32, I>(a);
    case TableKind::kF16: return pool_kind<F16, I>(a);
    case TableKind::kBF16: return pool_kind<BF16, I>(a);
    case TableKind::kQ8: return pool_kind<Q8, I>(a);
    case TableKind::kQ4: return pool_kind<Q4, I>(a);
  }
  return {};
}

