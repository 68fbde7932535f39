"""The public ops, one module per family. Importing this package registers every op variant."""
from .embedding import embedding_bag  # noqa: F401
from . import embedding_triton  # noqa: F401,E402  (registers the triton backend of embedding_bag)
from .embedding_grouped import embedding_bag_grouped  # noqa: F401
from . import embedding_grouped_triton  # noqa: F401,E402  (registers the triton backend of embedding_bag_grouped)
from .int8_matmul import (int8_linear, int8_linear_packed, int8_matmul, pack_weight_int8,  # noqa: F401
                          quantize_rows_int8, quantize_weight_int8)
from . import int8_matmul_triton  # noqa: F401,E402  (registers the triton backend of the int8 ops)
from .rowwise import dequantize_rowwise, quantize_rowwise  # noqa: F401
from .scoring import candidate_scores, candidate_topk, pair_scores, topk_scores  # noqa: F401
from . import scoring_triton  # noqa: F401,E402  (registers the triton backend of the scoring ops)
from . import flops  # noqa: F401,E402  (FLOP formulas of every variant, for FlopCounterMode)
