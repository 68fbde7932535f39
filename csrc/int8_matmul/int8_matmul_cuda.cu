// The CUDA entry points of quantize_rows_int8, int8_matmul and int8_linear: argument checks, path
// choice (GEMV for M <= 16, the tensor-core GEMM otherwise), and the device error flags turned into
// the reference's Python errors. The kernels live in int8_quantize_cuda.cu, int8_gemm_cuda.cu and
// int8_gemv_cuda.cu.
//
// Errors found on the device (non-finite scales or inputs, an int32 overflow) go to a 3-slot flag
// buffer that is read once after the launches (one synchronisation per call, the price of a precise
// error, DESIGN.md §5), and raised in the reference's order: scales, then x, then the overflow.
#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "int8_matmul/int8_cuda_common.cuh"

namespace recsys_kernels {
namespace {

using namespace int8mm;

int parse_activation(std::string_view act) {
  if (act == "none") return kActNone;
  if (act == "relu") return kActRelu;
  if (act == "gelu") return kActGelu;
  if (act == "silu") return kActSilu;
  TORCH_CHECK_VALUE(false, "activation must be one of ('none', 'relu', 'gelu', 'silu'), got '", std::string(act), "'");
  return kActNone;  // unreachable
}

int out_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kOutF16;
    case at::kBFloat16: return kOutBF16;
    case at::kInt: return kOutI32;
    default: return kOutF32;
  }
}

int x_dtype_code(at::ScalarType t) { return t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : 0; }

class Flags {
 public:
  explicit Flags(const at::Tensor& like)
      : t_(at::full({kNumFlags}, cuda::DeviceFlag::kNone, like.options().dtype(at::kLong))) {}
  unsigned long long* slot(int i) { return reinterpret_cast<unsigned long long*>(t_.data_ptr<int64_t>() + i); }
  // Synchronises with the current stream.
  std::array<int64_t, kNumFlags> read() const {
    const at::Tensor h = t_.cpu();
    std::array<int64_t, kNumFlags> out{};
    for (int i = 0; i < kNumFlags; ++i) out[i] = h.data_ptr<int64_t>()[i];
    return out;
  }

 private:
  at::Tensor t_;
};

void raise_overflow(int64_t pos, int64_t n) {
  TORCH_CHECK_VALUE(pos == cuda::DeviceFlag::kNone,
                    "int8_matmul: the exact result does not fit in int32 (K too large for these values; first at "
                    "row ", pos / n, ", column ", pos % n, "); pass scales to get a float result");
}

void check_i8_matrix(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kChar});
  check_dim(t, name, 2);
}

// A [size] fp32 scale vector on `device`.
void check_scale(const at::Tensor& s, const char* name, int64_t size, const char* dim_name, const c10::Device& device,
                 const char* device_of) {
  check_dtype(s, name, {at::kFloat});
  check_dim(s, name, 1);
  RK_CHECK_VALUE(s.size(0) == size, name, "must have shape [", size, "] (", dim_name, "), got ", s.sizes());
  check_device(s, name, device, device_of);
}

// bias: None or a float [N] tensor on `device`; returned as contiguous fp32.
std::optional<at::Tensor> check_bias(const std::optional<at::Tensor>& bias, int64_t n, const c10::Device& device,
                                     const char* device_of) {
  if (!bias.has_value()) return std::nullopt;
  check_float_dtype(*bias, "bias");
  check_dim(*bias, "bias", 1);
  RK_CHECK_VALUE(bias->size(0) == n, "bias", "must have shape [", n, "] (N), got ", bias->sizes());
  check_device(*bias, "bias", device, device_of);
  return bias->to(at::kFloat).contiguous();
}

void check_float_out_dtype(const std::optional<at::ScalarType>& out_dtype, const char* what) {
  RK_CHECK_TYPE(!out_dtype.has_value() || is_float_dtype(*out_dtype), "out_dtype",
                "must be None or one of float32, float16, bfloat16", what, ", got ",
                dtype_name(out_dtype.value_or(at::kFloat)));
}

// GEMV for small M, the tensor-core GEMM otherwise.
void run_matmul(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue& ep,
                cudaStream_t stream) {
  if (M <= kGemvMaxRows) launch_gemv(a, b, M, N, K, ep, stream);
  else launch_gemm(a, b, M, N, K, ep, stream);
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8_cuda(const at::Tensor& x_in) {
  check_float_dtype(x_in, "x");
  check_dim(x_in, "x", 2);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  Flags flags(x);
  launch_quantize_rows(x.const_data_ptr(), x_dtype_code(x.scalar_type()), q.data_ptr<int8_t>(),
                       scale.data_ptr<float>(), M, K, flags.slot(kFlagInput), at::cuda::getCurrentCUDAStream());
  const int64_t bad = flags.read()[kFlagInput];
  RK_CHECK_VALUE(bad == cuda::DeviceFlag::kNone, "x", "has non-finite values (inf or nan; first in row ", bad, ")");
  return {q, scale};
}

at::Tensor int8_matmul_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& a_scale_in,
                            const std::optional<at::Tensor>& b_scale_in, const std::optional<at::Tensor>& bias_in,
                            c10::string_view activation, std::optional<at::ScalarType> out_dtype) {
  check_i8_matrix(a_in, "a");
  check_i8_matrix(b_in, "b");
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  RK_CHECK_VALUE(b_in.size(1) == K, "b", "must be [N, K] with K = a.shape[1] = ", K, " (K must match), got shape ",
                 b_in.sizes());
  const c10::Device device = a_in.device();
  check_device(b_in, "b", device, "a");
  const int act = parse_activation(activation);
  RK_CHECK_VALUE(a_scale_in.has_value() == b_scale_in.has_value(), a_scale_in.has_value() ? "b_scale" : "a_scale",
                 "is missing: give both a_scale and b_scale, or neither");
  const bool scaled = a_scale_in.has_value();
  std::optional<at::Tensor> bias;
  if (!scaled) {
    RK_CHECK_VALUE(!bias_in.has_value(), "bias", "needs a_scale and b_scale (the int32 result has no epilogue)");
    RK_CHECK_VALUE(act == kActNone, "activation", "needs a_scale and b_scale (the int32 result has no epilogue)");
    RK_CHECK_TYPE(!out_dtype.has_value() || *out_dtype == at::kInt, "out_dtype",
                  "must be None or int32 without scales, got ", dtype_name(out_dtype.value_or(at::kInt)));
  } else {
    check_scale(*a_scale_in, "a_scale", M, "M", device, "a");
    check_scale(*b_scale_in, "b_scale", N, "N", device, "a");
    bias = check_bias(bias_in, N, device, "a");
    check_float_out_dtype(out_dtype, " with scales");
  }
  const at::ScalarType result_dtype = scaled ? out_dtype.value_or(at::kFloat) : at::kInt;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor out = at::empty({M, N}, a.options().dtype(result_dtype));
  at::Tensor a_scale, b_scale;
  Flags flags(a);
  if (scaled) {
    a_scale = a_scale_in->contiguous();
    b_scale = b_scale_in->contiguous();
    // one slot for both: positions [0, M) name a_scale, [M, M + N) b_scale (a_scale first, as the reference)
    launch_check_finite(a_scale.data_ptr<float>(), M, 0, flags.slot(kFlagScale), stream);
    launch_check_finite(b_scale.data_ptr<float>(), N, M, flags.slot(kFlagScale), stream);
  }
  if (M > 0 && N > 0) {
    const Epilogue ep{scaled ? a_scale.data_ptr<float>() : nullptr,
                      scaled ? b_scale.data_ptr<float>() : nullptr,
                      bias.has_value() ? bias->data_ptr<float>() : nullptr,
                      act,
                      out_kind(result_dtype),
                      out.data_ptr(),
                      flags.slot(kFlagOverflow)};
    run_matmul(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, K, ep, stream);
  }
  if (!scaled && K <= kMaxExactK) return out;  // nothing can be flagged: no synchronisation
  const auto f = flags.read();
  if (f[kFlagScale] != cuda::DeviceFlag::kNone) {
    const bool is_a = f[kFlagScale] < M;
    TORCH_CHECK_VALUE(false, is_a ? "a_scale" : "b_scale", " has non-finite values (inf or nan; first at index ",
                      is_a ? f[kFlagScale] : f[kFlagScale] - M, ")");
  }
  raise_overflow(f[kFlagOverflow], N);
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& w_scale_in,
                            const std::optional<at::Tensor>& bias_in, c10::string_view activation,
                            c10::string_view act_quant, std::optional<at::ScalarType> out_dtype) {
  check_float_dtype(x_in, "x");
  check_dim(x_in, "x", 2);
  check_i8_matrix(w_in, "weight_q");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  RK_CHECK_VALUE(w_in.size(1) == K, "x", "must be [M, K] with K = weight_q.shape[1] = ", w_in.size(1),
                 ", got shape ", x_in.sizes());
  const c10::Device device = x_in.device();
  check_device(w_in, "weight_q", device, "x");
  check_scale(w_scale_in, "weight_scale", N, "N", device, "x");
  const std::optional<at::Tensor> bias = check_bias(bias_in, N, device, "x");
  const int act = parse_activation(activation);
  const bool dynamic = act_quant == "dynamic";
  RK_CHECK_VALUE(dynamic || act_quant == "none", "act_quant", "must be one of ('dynamic', 'none'), got '",
                 std::string(act_quant), "'");
  check_float_out_dtype(out_dtype, "");
  const at::ScalarType result_dtype = out_dtype.value_or(x_in.scalar_type());

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), w_scale = w_scale_in.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(result_dtype));
  Flags flags(x);
  launch_check_finite(w_scale.data_ptr<float>(), N, 0, flags.slot(kFlagScale), stream);
  Epilogue ep{nullptr, nullptr, bias.has_value() ? bias->data_ptr<float>() : nullptr, act, out_kind(result_dtype),
              out.data_ptr(), flags.slot(kFlagOverflow)};
  if (M > 0 && dynamic) {
    // The activations are the small side of a linear layer (M x K against the N x K weight), so
    // they are quantized into a separate int8 buffer, which stays in L2, before the matmul; also
    // when N == 0, so that a non-finite x raises as in the reference.
    at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
    at::Tensor xs = at::empty({M}, x.options().dtype(at::kFloat));
    launch_quantize_rows(x.const_data_ptr(), x_dtype_code(x.scalar_type()), xq.data_ptr<int8_t>(),
                         xs.data_ptr<float>(), M, K, flags.slot(kFlagInput), stream);
    ep.a_scale = xs.data_ptr<float>();
    ep.b_scale = w_scale.data_ptr<float>();
    if (N > 0) run_matmul(xq.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, K, ep, stream);
  } else if (M > 0 && N > 0) {
    if (M <= kGemvMaxRows) {
      launch_weight_only_gemv(x.const_data_ptr(), x_dtype_code(x.scalar_type()), w.data_ptr<int8_t>(),
                              w_scale.data_ptr<float>(), M, N, K, ep, stream);
    } else {
      // Weight-only with many rows: dequantize the weight once (fp32, as the reference), an fp32
      // matmul (TF32 only if the user enabled it for matmuls), then bias + activation + cast.
      at::Tensor wf = at::empty({N, K}, x.options().dtype(at::kFloat));
      launch_dequantize_weight(w.data_ptr<int8_t>(), w_scale.data_ptr<float>(), wf.data_ptr<float>(), N, K, stream);
      // (autocast off: the op has no autocast kernel, so inside torch.autocast this at::mm would
      // otherwise run in fp16 / bf16)
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      const at::Tensor y = at::mm(x.to(at::kFloat), wf.t()).contiguous();
      launch_bias_act(y.data_ptr<float>(), M, N, ep, stream);
    }
  }
  const auto f = flags.read();
  RK_CHECK_VALUE(f[kFlagScale] == cuda::DeviceFlag::kNone, "weight_scale",
                 "has non-finite values (inf or nan; first at index ", f[kFlagScale], ")");
  RK_CHECK_VALUE(f[kFlagInput] == cuda::DeviceFlag::kNone, "x", "has non-finite values (inf or nan; first in row ",
                 f[kFlagInput], ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) {
  m.impl("quantize_rows_int8", &quantize_rows_int8_cuda);
  m.impl("int8_matmul", &int8_matmul_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
}

}  // namespace recsys_kernels
