"""The public ops, one module per family. Importing this package registers every op variant."""
from .rowwise import dequantize_rowwise, quantize_rowwise  # noqa: F401
