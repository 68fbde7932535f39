// The schema of every recsys_kernels op. Always compiled into recsys_kernels._C.
// CPU kernels register with TORCH_LIBRARY_IMPL(recsys_kernels, CPU, m) in their own files, CUDA
// kernels with TORCH_LIBRARY_IMPL(recsys_kernels, CUDA, m) in the _C_cuda extension. Fake (meta)
// kernels, autograd and the pure-PyTorch reference are registered from Python
// (recsys_kernels/ops/). Keep these strings identical to the reference ops' schemas: a test checks.
#include <torch/extension.h>
#include <torch/version.h>

#include "common/cpu_features.h"

TORCH_LIBRARY(recsys_kernels, m) {
  // Embedding. weight: float [N, D] or a uint8 fused row-wise table (bits = 8 | 4).
  m.def("embedding_bag(Tensor weight, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
        "str mode, int? padding_idx, str bounds, int bits, ScalarType? output_dtype, bool sparse) -> Tensor");
  // Returns (grad_weight, grad_per_sample_weights). grad_weight is [N, D] dense, or, with
  // sparse=True, the per-index rows [nnz, D] (each index's share, unsummed). The autograd formula
  // calls it with sparse=False: its sparse gradient, coalesced, is the dense gradient of a compact
  // table of the rows read (ops/embedding.py, weight_and_psw_grads). The table is read only for
  // max mode and per-sample weights.
  // grad_per_sample_weights is [nnz], or empty when there are no per-sample weights.
  m.def("embedding_bag_backward(Tensor grad_output, Tensor weight, Tensor indices, Tensor offsets, "
        "Tensor? per_sample_weights, str mode, int? padding_idx, str bounds, bool sparse) -> (Tensor, Tensor)");
  // Several lookups in one launch: lookup f = embedding_bag(weights[f], indices[f], offsets[f], ...)
  // computed in fp32, written to its own columns of one [B, sum_f D_f] output. Every offsets[f]
  // has B + 1 entries; padding_idx[f] < 0 means none; tables fp32/fp16/bf16 or uint8 (bits[f]).
  m.def("embedding_bag_grouped(Tensor[] weights, Tensor[] indices, Tensor[] offsets, "
        "Tensor?[] per_sample_weights, str[] modes, int[] padding_idx, int[] bits, bool[] sparse, str bounds, "
        "ScalarType output_dtype) -> Tensor");
  m.def("quantize_rowwise(Tensor weight, int bits) -> Tensor");
  m.def("dequantize_rowwise(Tensor packed, int bits, ScalarType? output_dtype) -> Tensor");

  // Int8 matmul. Per-row symmetric int8: scale = absmax / 127 (1 for an all-zero row).
  m.def("quantize_rows_int8(Tensor x) -> (Tensor, Tensor)");
  // a [M, K] int8, b [N, K] int8 (nn.Linear weight layout) -> a @ b.T; int32 without scales.
  m.def("int8_matmul(Tensor a, Tensor b, Tensor? a_scale, Tensor? b_scale, Tensor? bias, "
        "str activation, ScalarType? out_dtype) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight_q, Tensor weight_scale, Tensor? bias, str activation, "
        "str act_quant, ScalarType? out_dtype) -> Tensor");
  // int8_linear with the weight prepacked by pack_weight_int8 (recsys_kernels/ops/int8_matmul.py:
  // the CPU kernels' panel layout) instead of weight_q; N = weight_scale.shape[0], K = x.shape[1].
  m.def("int8_linear_packed(Tensor x, Tensor packed_weight, Tensor weight_scale, Tensor? bias, "
        "str activation, str act_quant, ScalarType? out_dtype) -> Tensor");

  // Scoring. items: float [I, D] or an int8 fused row-wise table [I, D + 8].
  m.def("pair_scores(Tensor user_emb, Tensor item_emb, Tensor user_idx, Tensor item_idx, "
        "Tensor? item_bias) -> Tensor");
  // Returns (grad_user_emb, grad_item_emb, grad_item_bias); grad_item_bias is empty without a bias.
  m.def("pair_scores_backward(Tensor grad_output, Tensor user_emb, Tensor item_emb, Tensor user_idx, "
        "Tensor item_idx, Tensor? item_bias) -> (Tensor, Tensor, Tensor)");
  m.def("candidate_scores(Tensor queries, Tensor items, Tensor cand_offsets, Tensor cand_items, "
        "Tensor? item_bias) -> Tensor");
  m.def("candidate_topk(Tensor queries, Tensor items, Tensor cand_offsets, Tensor cand_items, SymInt k, "
        "Tensor? item_bias) -> (Tensor, Tensor)");
  m.def("topk_scores(Tensor queries, Tensor items, SymInt k, Tensor? exclude_offsets, "
        "Tensor? exclude_items, Tensor? item_bias) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recsys_kernels C++ CPU kernels and op schemas";
  m.def("built_with_torch", [] { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("cpu_features", &recsys_kernels::cpu_features_dict,
        "CPU features detected at run time and the highest path enabled (after RECSYS_KERNELS_CPU_ISA).");
}
