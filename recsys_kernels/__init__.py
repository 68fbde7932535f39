"""recsys_kernels: fused embedding lookup, int8 matmul and sparse scoring kernels for PyTorch."""
from ._loader import load_extensions as _load_extensions

_load_extensions()  # before the ops: their native variants need the schemas of _C

from ._backend import BackendUnavailableError, get_backend, set_backend  # noqa: E402
from .ops import dequantize_rowwise, quantize_rowwise  # noqa: E402

__version__ = "0.1.0"
