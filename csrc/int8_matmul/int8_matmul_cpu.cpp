// C++ CPU kernels of quantize_rows_int8, int8_matmul, int8_linear and int8_linear_packed
// (semantics: the references in recsys_kernels/ops/int8_matmul.py, errors included).
//
// The GEMM (layouts in int8_gemm_kernels.h): B is packed into 16-column panels of int8 K-pairs
// (int8_linear packs weight_q on the fly; int8_linear_packed takes the panels Int8Linear prepacked
// once). The work is split into one task per thread, a grid of row ranges x panel ranges (rows
// first; panels when M is small), run with at::parallel_for. A task walks its rows in blocks of up
// to kMaxRowBlock rows; the A-packing step turns a block's rows into int16 (sign-extended int8 for
// int8_matmul, or quantized from float for int8_linear's act_quant="dynamic", the row scale kept
// for the epilogue), ~192 KB that stay in L2. Then for each panel (its K x 16 bytes stay in L1
// across the row block) the 6 x 16 micro-kernel runs over the block's micro-rows and, on the last
// K block, applies the fused epilogue ((acc * sa) * sb + bias, activation, cast) from registers
// straight into the output. K beyond kKcPairs pairs is blocked (int32 partial tiles in a small
// per-task buffer), so a panel's slice always fits L1. No full-size intermediate goes through
// memory, except for K > 131070, where the int32 sums could overflow: there K is split into chunks
// whose exact int32 results are summed in int64 (then the overflow rule / epilogue applies).
// Paths: AMX or AVX512-VNNI (int8_gemm_wide.cpp, their own quad layout and blocking) for tasks of
// 16 rows or more when cpu_isa() has them, else AVX2 (int8_gemm_avx2.cpp) when cpu_isa() >= avx2,
// else the portable kernels (int8_gemm_scalar.cpp); RECSYS_KERNELS_CPU_ISA caps the path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/cpu_features.h"
#include "int8_matmul/int8_gemm_kernels.h"
#include "int8_matmul/int8_gemm_scalar.h"

namespace recsys_kernels {
namespace {

using namespace int8_gemm;

struct Kernels {
  void (*tile)(const Tile&, const Epilogue&);
  void (*float_tile)(const FloatTile&, const Epilogue&);
  bool (*quantize_row)(InKind, const void*, int64_t, float*, int8_t*, int16_t*);
  void (*widen_row)(const int8_t*, int64_t, int16_t*);
  void (*dequant_panel)(const int8_t*, int64_t, const float*, float*);
};

Kernels select_kernels() {
  if (static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2))
    return {tile_avx2, float_tile_avx2, quantize_row_avx2, widen_row_avx2, dequant_panel_avx2};
  return {tile_scalar, float_tile_scalar, quantize_row_scalar, widen_row_scalar, dequant_panel_scalar};
}

constexpr int64_t kKcPairs = 512;          // K block: 16 KB of a panel, kept in L1 across a row block
constexpr int64_t kNcPanels = 16;          // panels per N block when K is blocked (partial sums buffer)
constexpr int64_t kMaxRowBlock = 96;       // rows of an A block (16 micro-rows)
constexpr int64_t kRowBlockBytes = 192 << 10;  // budget of an A block (int16 rows), L2
constexpr int64_t kMaxChunkK = 131070;     // even; 131070 * 2^14 < 2^31: int32 sums cannot overflow
constexpr int64_t kMinWorkPerThread = 1 << 18;  // multiply-adds below which one thread does it all

int64_t n_panels(int64_t n) { return ceil_div(n, kNR); }
int64_t n_pairs(int64_t k) { return ceil_div(k, 2); }

template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ----------------------------------------------------------------------------- B packing
// [N, K] int8 (contiguous) -> [ceil(N/16), ceil(K/2) * 32] int8 panels (int8_gemm_kernels.h).
at::Tensor pack_weight(const at::Tensor& w) {
  const int64_t n = w.size(0), k = w.size(1), np = n_panels(n), kp = n_pairs(k);
  at::Tensor packed = at::empty({np, kp * kPanelPairBytes}, w.options().dtype(at::kChar));
  if (np == 0 || kp == 0) return packed;
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst_all = packed.data_ptr<int8_t>();
  const int64_t panel_bytes = kp * kPanelPairBytes;
  const bool avx2 = static_cast<int>(cpu_isa()) >= static_cast<int>(CpuIsa::kAvx2);
  at::parallel_for(0, np, std::max<int64_t>(1, (1 << 16) / panel_bytes), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int8_t* dst = dst_all + j * panel_bytes;
      if (kNR * (j + 1) > n || (k & 1)) std::memset(dst, 0, panel_bytes);
      if (avx2 && kNR * (j + 1) <= n) {
        pack_panel_avx2(src + kNR * j * k, k, dst);
        continue;
      }
      for (int c = 0; c < kNR && kNR * j + c < n; ++c) {
        const int8_t* row = src + (kNR * j + c) * k;
        int8_t* col = dst + 16 * (c / 8) + 2 * (c % 8);
        int64_t p = 0;
        for (; 2 * p + 1 < k; ++p) std::memcpy(col + kPanelPairBytes * p, row + 2 * p, 2);  // the (k even, k odd) pair
        if (k & 1) col[kPanelPairBytes * p] = row[2 * p];
      }
    }
  });
  return packed;
}

// ----------------------------------------------------------------------------- work split
struct Split {
  int64_t tm, tn;  // a grid of row ranges x panel ranges, one task each
};

Split split_work(int64_t m, int64_t np, int64_t k) {
  const int64_t work = m * np * kNR * std::max<int64_t>(k, 1);
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / kMinWorkPerThread));
  const int64_t tm = std::max<int64_t>(1, std::min<int64_t>(threads, m / (4 * kMR)));  // >= 24 rows each
  const int64_t tn = std::max<int64_t>(1, std::min<int64_t>(threads / tm, np));
  return {tm, tn};
}

// Range i of t over [0, total), boundaries rounded to multiples of `align`.
std::pair<int64_t, int64_t> range_of(int64_t i, int64_t t, int64_t total, int64_t align) {
  auto at = [&](int64_t q) { return q == t ? total : std::min(total, (total * q / t) / align * align); };
  return {at(i), at(i + 1)};
}

template <typename F>
void for_tasks(const Split& s, int64_t m, int64_t np, const F& fn) {
  at::parallel_for(0, s.tm * s.tn, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [r0, r1] = range_of(t / s.tn, s.tm, m, kMR);
      const auto [j0, j1] = range_of(t % s.tn, s.tn, np, 1);
      if (r0 < r1 && j0 < j1) fn(r0, r1, j0, j1);
    }
  });
}

// ----------------------------------------------------------------------------- int8 GEMM driver
// One task: rows [r0, r1) x panels [j0, j1). false: a row to quantize had a non-finite value.
bool int8_task(const Problem& P, const Kernels& K, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  const int64_t kp = n_pairs(P.k), lda = kp;
  const int64_t mc_max = std::max<int64_t>(
      kMR, std::min<int64_t>(kMaxRowBlock, kRowBlockBytes / std::max<int64_t>(1, 4 * kp)) / kMR * kMR);
  auto abuf = uninitialized<int32_t>(mc_max * kp);
  std::vector<float> scales(P.a.quantize ? mc_max : 0);
  const bool blocked = kp > kKcPairs;
  const int64_t micro_rows = ceil_div(mc_max, kMR);
  auto partial = uninitialized<int32_t>(blocked ? kNcPanels * micro_rows * kMR * kNR : 0);
  for (int64_t mb = r0; mb < r1; mb += mc_max) {
    const int64_t mc = std::min(mc_max, r1 - mb);
    // A packing: int16 rows (quantized from float, or sign-extended int8)
    for (int64_t r = 0; r < mc; ++r) {
      const uint8_t* src = P.a.data + (mb + r) * P.a.row_bytes;
      int16_t* dst = reinterpret_cast<int16_t*>(abuf.get() + r * lda);
      if (P.a.quantize) {
        if (!K.quantize_row(P.a.in_kind, src, P.k, &scales[r], nullptr, dst)) return false;
      } else {
        K.widen_row(reinterpret_cast<const int8_t*>(src), P.k, dst);
      }
    }
    const float* row_scales = P.a.quantize ? scales.data() : (P.a.a_scale ? P.a.a_scale + mb : nullptr);
    Tile t{};
    t.lda = lda;
    for (int64_t jc = j0; jc < j1; jc += blocked ? kNcPanels : j1 - j0) {
      const int64_t jend = blocked ? std::min(j1, jc + kNcPanels) : j1;
      for (int64_t pc = 0; pc < std::max<int64_t>(kp, 1); pc += kKcPairs) {
        t.kp = std::min(kKcPairs, kp - pc);
        t.load_partial = pc > 0;
        t.finish = pc + kKcPairs >= kp;
        for (int64_t j = jc; j < jend; ++j) {
          t.b = P.b + j * P.b_panel_bytes + (P.b_p0 + pc) * kPanelPairBytes;
          t.col0 = kNR * j;
          t.ncols = static_cast<int>(std::min<int64_t>(kNR, P.n - t.col0));
          t.rows = mc;
          t.a = abuf.get() + pc;
          t.partial = blocked ? partial.get() + (j - jc) * micro_rows * kMR * kNR : nullptr;
          t.a_scale = row_scales;
          t.row0 = mb;
          K.tile(t, P.epi);
        }
      }
    }
  }
  return true;
}

// The AVX512-VNNI / AMX kernels (int8_gemm_wide.cpp), when the CPU has them, for tasks of at least
// kWideMinRows rows: they re-lay their B panels in K-quads once per block of rows, which a task of
// a few rows would not pay back. Smaller tasks (M = 1 ...) take the AVX2 kernel.
constexpr int64_t kWideMinRows = 16;

std::optional<WideIsa> select_wide_isa() {
  const int isa = static_cast<int>(cpu_isa());
  if (isa >= static_cast<int>(CpuIsa::kAmx) && amx_usable()) return WideIsa::kAmx;
  if (isa >= static_cast<int>(CpuIsa::kAvx512Vnni)) return WideIsa::kVnni;
  return std::nullopt;
}

// false: non-finite input rows (only when quantizing).
bool run_int8_gemm(const Problem& P) {
  if (P.m == 0 || P.n == 0) return true;
  const Kernels K = select_kernels();
  const std::optional<WideIsa> wide = select_wide_isa();
  const int64_t np = n_panels(P.n);
  std::atomic<bool> ok{true};
  for_tasks(split_work(P.m, np, P.k), P.m, np, [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    const bool task_ok = wide && r1 - r0 >= kWideMinRows ? wide_task(*wide, P, r0, r1, j0, j1)
                                                         : int8_task(P, K, r0, r1, j0, j1);
    if (!task_ok) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

OutKind out_kind_of(at::ScalarType t) {
  switch (t) {
    case at::kInt: return OutKind::kI32;
    case at::kHalf: return OutKind::kF16;
    case at::kBFloat16: return OutKind::kBF16;
    default: return OutKind::kF32;
  }
}

InKind in_kind_of(at::ScalarType t) {
  return t == at::kHalf ? InKind::kF16 : (t == at::kBFloat16 ? InKind::kBF16 : InKind::kF32);
}

const char* kOverflowMessage =
    "int8_matmul: the exact result does not fit in int32 (K too large for these values); pass scales to get a "
    "float result";

// a_q [M, K] int8 rows (contiguous) @ packed B -> out, K of any size. With epi.out_kind == kI32 and
// K > kMaxChunkK the int32 overflow rule applies (ValueError).
void int8_gemm_any_k(const at::Tensor& a_q, const float* a_scale, const int8_t* b_packed, int64_t n,
                     const Epilogue& epi) {
  const int64_t m = a_q.size(0), k = a_q.size(1);
  Problem P{m, n, k, {false, InKind::kF32, reinterpret_cast<const uint8_t*>(a_q.const_data_ptr<int8_t>()), k, a_scale},
            b_packed, n_pairs(k) * kPanelPairBytes, 0, epi};
  if (k <= kMaxChunkK) {
    run_int8_gemm(P);
    return;
  }
  // Exact int32 sums of K chunks, added in int64; then the overflow rule or the epilogue.
  at::Tensor acc = at::zeros({m, n}, a_q.options().dtype(at::kLong));
  at::Tensor part = at::empty({m, n}, a_q.options().dtype(at::kInt));
  for (int64_t k0 = 0; k0 < k; k0 += kMaxChunkK) {
    Problem Q = P;
    Q.k = std::min(kMaxChunkK, k - k0);
    Q.a.data = P.a.data + k0;
    Q.a.a_scale = nullptr;
    Q.b_p0 = k0 / 2;
    Q.epi = Epilogue{OutKind::kI32, part.data_ptr<int32_t>(), n, nullptr, nullptr, Act::kNone};
    run_int8_gemm(Q);
    acc.add_(part);
  }
  if (epi.out_kind == OutKind::kI32) {
    TORCH_CHECK_VALUE(!((acc < std::numeric_limits<int32_t>::min()) | (acc > std::numeric_limits<int32_t>::max()))
                           .any()
                           .item<bool>(),
                      kOverflowMessage);
    std::memcpy(epi.out, acc.to(at::kInt).const_data_ptr<int32_t>(), sizeof(int32_t) * m * n);
    return;
  }
  const int64_t* sums = acc.const_data_ptr<int64_t>();
  at::parallel_for(0, m, grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < n; ++c)
        finish_value_scalar(epi, a_scale, r, r, c, static_cast<float>(sums[r * n + c]));
  });
}

// ----------------------------------------------------------------------------- weight-only driver
void weight_only_gemm(const at::Tensor& x /* fp32 [M, K] contiguous */, const int8_t* b_packed,
                      const float* w_scale, int64_t n, Epilogue epi) {
  const int64_t m = x.size(0), k = x.size(1), kp = n_pairs(k), np = n_panels(n);
  if (m == 0 || n == 0) return;
  epi.b_scale = nullptr;  // the weights are dequantized with their scales
  const Kernels K = select_kernels();
  const float* xp = x.const_data_ptr<float>();
  const int64_t panel_bytes = kp * kPanelPairBytes;
  const int64_t mc_max = std::max<int64_t>(
      kMR, std::min<int64_t>(kMaxRowBlock, kRowBlockBytes / std::max<int64_t>(1, 4 * k)) / kMR * kMR);
  for_tasks(split_work(m, np, k), m, np, [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
    auto w = uninitialized<float>(2 * kp * kNR);
    for (int64_t mb = r0; mb < r1; mb += mc_max) {
      const int64_t mc = std::min(mc_max, r1 - mb);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t col0 = kNR * j;
        const int ncols = static_cast<int>(std::min<int64_t>(kNR, n - col0));
        float scale16[kNR] = {};
        std::memcpy(scale16, w_scale + col0, sizeof(float) * ncols);
        K.dequant_panel(b_packed + j * panel_bytes, kp, scale16, w.get());
        for (int64_t i = 0; i < mc; i += kMR) {
          FloatTile t{static_cast<int>(std::min<int64_t>(kMR, mc - i)), ncols, k, xp + (mb + i) * k, k, w.get(),
                      mb + i, col0};
          K.float_tile(t, epi);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------- argument checks
Act parse_activation(c10::string_view s) {
  if (s == "none") return Act::kNone;
  if (s == "relu") return Act::kRelu;
  if (s == "gelu") return Act::kGelu;
  if (s == "silu") return Act::kSilu;
  RK_CHECK_VALUE(false, "activation", "must be one of ('none', 'relu', 'gelu', 'silu'), got '", std::string(s), "'");
  return Act::kNone;
}

// t: fp32 (checked by the caller). A loop, not at::isfinite(t).all(): that costs ~9 us a call.
void check_finite(const at::Tensor& t_in, const char* name) {
  const at::Tensor t = t_in.contiguous();
  const float* p = t.const_data_ptr<float>();
  bool finite = true;
  for (int64_t i = 0; i < t.numel(); ++i) finite &= std::isfinite(p[i]);
  RK_CHECK_VALUE(finite, name, "has non-finite values (inf or nan)");
}

void check_vector(const at::Tensor& t, const char* name, int64_t size, const char* dim_name) {
  check_dtype(t, name, {at::kFloat});
  RK_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, name, "must have shape [", size, "] (", dim_name, "), got ",
                 t.sizes());
}

std::optional<at::Tensor> checked_bias(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return std::nullopt;
  check_float_dtype(*bias, "bias");
  RK_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, "bias", "must have shape [", n, "] (N), got ",
                 bias->sizes());
  if (bias->scalar_type() == at::kFloat && bias->is_contiguous()) return *bias;
  return bias->to(at::kFloat).contiguous();
}

at::ScalarType checked_float_out(std::optional<at::ScalarType> out_dtype, at::ScalarType dflt) {
  const at::ScalarType t = out_dtype.value_or(dflt);
  TORCH_CHECK_TYPE(is_float_dtype(t), "out_dtype must be None or one of float32, float16, bfloat16, got ",
                   dtype_name(t));
  return t;
}

// ----------------------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor> quantize_rows_int8_cpu(const at::Tensor& x_in) {
  check_float_dtype(x_in, "x");
  check_dim(x_in, "x", 2);
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {q, scale};
  const Kernels K = select_kernels();
  const InKind kind = in_kind_of(x.scalar_type());
  const uint8_t* src = static_cast<const uint8_t*>(x.const_data_ptr());
  const int64_t row_bytes = k * x.element_size();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, m, grain_rows(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      if (!K.quantize_row(kind, src + r * row_bytes, k, sp + r, qp + r * k, nullptr)) ok = false;
  });
  TORCH_CHECK_VALUE(ok.load(), "quantize_rows_int8: x has non-finite values (inf or nan)");
  return {q, scale};
}

at::Tensor int8_matmul_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& a_scale,
                           const std::optional<at::Tensor>& b_scale, const std::optional<at::Tensor>& bias,
                           c10::string_view activation, std::optional<at::ScalarType> out_dtype) {
  check_dtype(a_in, "a", {at::kChar});
  check_dtype(b_in, "b", {at::kChar});
  check_dim(a_in, "a", 2);
  check_dim(b_in, "b", 2);
  const int64_t m = a_in.size(0), k = a_in.size(1), n = b_in.size(0);
  TORCH_CHECK_VALUE(b_in.size(1) == k, "int8_matmul: a is [M, ", k, "] but b is [N, ", b_in.size(1),
                    "] (K must match)");
  TORCH_CHECK_VALUE(a_scale.has_value() == b_scale.has_value(),
                    "int8_matmul: give both a_scale and b_scale, or neither");
  const Act act = parse_activation(activation);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor packed = pack_weight(b);
  if (!a_scale.has_value()) {
    TORCH_CHECK_VALUE(!bias.has_value() && act == Act::kNone,
                      "int8_matmul: bias and activation need a_scale and b_scale");
    TORCH_CHECK_VALUE(!out_dtype.has_value() || *out_dtype == at::kInt,
                      "int8_matmul: without scales the output is int32, got out_dtype=", dtype_name(*out_dtype));
    at::Tensor out = at::empty({m, n}, a.options().dtype(at::kInt));
    int8_gemm_any_k(a, nullptr, packed.const_data_ptr<int8_t>(), n,
                    Epilogue{OutKind::kI32, out.data_ptr(), n, nullptr, nullptr, Act::kNone});
    return out;
  }
  check_vector(*a_scale, "a_scale", m, "M");
  check_vector(*b_scale, "b_scale", n, "N");
  check_finite(*a_scale, "a_scale");
  check_finite(*b_scale, "b_scale");
  const at::ScalarType odt = checked_float_out(out_dtype, at::kFloat);
  const std::optional<at::Tensor> bias_f = checked_bias(bias, n);
  const at::Tensor sa = a_scale->contiguous(), sb = b_scale->contiguous();
  at::Tensor out = at::empty({m, n}, a.options().dtype(odt));
  int8_gemm_any_k(a, sa.const_data_ptr<float>(), packed.const_data_ptr<int8_t>(), n,
                  Epilogue{out_kind_of(odt), out.data_ptr(), n, sb.const_data_ptr<float>(),
                           bias_f ? bias_f->const_data_ptr<float>() : nullptr, act});
  return out;
}

// The shared body of int8_linear and int8_linear_packed: B already packed for weight [n, k].
at::Tensor linear_packed_impl(const char* op, const at::Tensor& x_in, const at::Tensor& packed, int64_t n,
                              const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                              c10::string_view activation, c10::string_view act_quant,
                              std::optional<at::ScalarType> out_dtype) {
  const int64_t m = x_in.size(0), k = x_in.size(1);
  check_finite(weight_scale, "weight_scale");
  const bool dynamic = act_quant == "dynamic";
  RK_CHECK_VALUE(dynamic || act_quant == "none", "act_quant", "must be one of ('dynamic', 'none'), got '",
                 std::string(act_quant), "'");
  const Act act = parse_activation(activation);
  const at::ScalarType odt = checked_float_out(out_dtype, x_in.scalar_type());
  const std::optional<at::Tensor> bias_f = checked_bias(bias, n);
  const at::Tensor ws = weight_scale.contiguous();
  at::Tensor out = at::empty({m, n}, x_in.options().dtype(odt));
  const Epilogue epi{out_kind_of(odt), out.data_ptr(), n, ws.const_data_ptr<float>(),
                     bias_f ? bias_f->const_data_ptr<float>() : nullptr, act};
  const int8_t* b = packed.const_data_ptr<int8_t>();
  if (!dynamic) {
    weight_only_gemm(x_in.to(at::kFloat).contiguous(), b, ws.const_data_ptr<float>(), n, epi);
    return out;
  }
  const at::Tensor x = x_in.contiguous();
  if (n == 0) {  // nothing to multiply, but a non-finite x still raises, as in the reference
    if (m > 0) quantize_rows_int8_cpu(x);
    return out;
  }
  if (k > kMaxChunkK) {  // rare: quantize first, then the chunked int8 GEMM
    auto [q, sx] = quantize_rows_int8_cpu(x);
    int8_gemm_any_k(q, sx.const_data_ptr<float>(), b, n, epi);
    return out;
  }
  const ASource a{true, in_kind_of(x.scalar_type()), static_cast<const uint8_t*>(x.const_data_ptr()),
                  k * static_cast<int64_t>(x.element_size()), nullptr};
  const Problem P{m, n, k, a, b, n_pairs(k) * kPanelPairBytes, 0, epi};
  TORCH_CHECK_VALUE(run_int8_gemm(P), op, ": x has non-finite values (inf or nan)");
  return out;
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight_scale, int64_t n) {
  check_float_dtype(x, "x");
  check_dim(x, "x", 2);
  check_vector(weight_scale, "weight_scale", n, "N");
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& weight_q, const at::Tensor& weight_scale,
                           const std::optional<at::Tensor>& bias, c10::string_view activation,
                           c10::string_view act_quant, std::optional<at::ScalarType> out_dtype) {
  check_dtype(weight_q, "weight_q", {at::kChar});
  check_dim(weight_q, "weight_q", 2);
  const int64_t n = weight_q.size(0);
  check_linear_args(x, weight_scale, n);
  RK_CHECK_VALUE(x.size(1) == weight_q.size(1), "x", "must be [M, K] with K = weight_q.shape[1] = ",
                 weight_q.size(1), ", got shape ", x.sizes());
  return linear_packed_impl("int8_linear", x, pack_weight(weight_q.contiguous()), n, weight_scale, bias, activation,
                            act_quant, out_dtype);
}

at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed_weight,
                                  const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                                  c10::string_view activation, c10::string_view act_quant,
                                  std::optional<at::ScalarType> out_dtype) {
  const int64_t n = weight_scale.dim() == 1 ? weight_scale.size(0) : -1;
  check_dtype(weight_scale, "weight_scale", {at::kFloat});
  RK_CHECK_VALUE(n >= 0, "weight_scale", "must be 1-D, got shape ", weight_scale.sizes());
  check_linear_args(x, weight_scale, n);
  check_dtype(packed_weight, "packed_weight", {at::kChar});
  const int64_t k = x.size(1);
  RK_CHECK_VALUE(packed_weight.dim() == 2 && packed_weight.size(0) == n_panels(n) &&
                     packed_weight.size(1) == n_pairs(k) * kPanelPairBytes,
                 "packed_weight", "must have shape [", n_panels(n), ", ", n_pairs(k) * kPanelPairBytes,
                 "] (pack_weight_int8 of an [N, K] = [", n, ", ", k, "] weight), got ", packed_weight.sizes());
  return linear_packed_impl("int8_linear_packed", x, packed_weight.contiguous(), n, weight_scale, bias, activation,
                            act_quant, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) {
  m.impl("quantize_rows_int8", &quantize_rows_int8_cpu);
  m.impl("int8_matmul", &int8_matmul_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_packed", &int8_linear_packed_cpu);
}

}  // namespace recsys_kernels
