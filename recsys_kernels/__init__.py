"""recsys_kernels: fused embedding lookup, int8 matmul and sparse scoring kernels for PyTorch."""
from ._loader import load_extensions as _load_extensions

_load_extensions()  # before the ops: their native variants need the schemas of _C

from ._backend import BackendUnavailableError, get_backend, set_backend  # noqa: E402
from ._info import format_info, info  # noqa: E402
from .nn import FusedEmbeddingBag, FusedEmbeddingBagCollection, Int8Linear, Retriever, TableConfig  # noqa: E402
from .ops import (  # noqa: E402
    candidate_scores,
    candidate_topk,
    dequantize_rowwise,
    embedding_bag,
    embedding_bag_grouped,
    int8_linear,
    int8_linear_packed,
    int8_matmul,
    pack_weight_int8,
    pair_scores,
    quantize_rowwise,
    quantize_rows_int8,
    quantize_weight_int8,
    topk_scores,
)
from .quant import quantize_  # noqa: E402

__version__ = "0.1.0"


def optimize(model, **kwargs):
    """recsys_kernels.compress.optimize (imported on first use): returns (optimized copy,
    CompressionReport)."""
    from .compress import optimize as _optimize

    return _optimize(model, **kwargs)
