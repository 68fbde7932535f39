"""Model compression for the recommender: pruning, sparse layers, row-pruned and quantized
embeddings, whole-model quantization through the fused modules, and `optimize` with a measured
`CompressionReport`. See docs/design.md "Compression and graph passes"."""
from .embedding import (RemappedEmbedding, RemappedEmbeddingBag, prune_embedding,  # noqa: F401
                        prune_embedding_rows)
from .pipeline import CompressionReport, EvalData, StepResult, measure, optimize  # noqa: F401
from .pruning import (SparsityReport, check_nm_pattern, keep_zeros, magnitude_prune_, nm_prune_,  # noqa: F401
                      prune_linear_outputs_, structured_mask_, structured_prune_)
from .recommender import (freeze_int8_, model_bytes, prune_rows_, quantize_mlp_, quantize_tables_,  # noqa: F401
                          serving_params)
from .sparse import BREAK_EVEN_SPARSITY, SparseLinear, measure_break_even, sparsify_  # noqa: F401
