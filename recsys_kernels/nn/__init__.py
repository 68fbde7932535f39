"""Drop-in modules: FusedEmbeddingBag for nn.EmbeddingBag, Int8Linear for nn.Linear, and Retriever,
an item catalog searched by the fused scoring ops."""
from .embedding import FusedEmbeddingBag, FusedEmbeddingBagCollection, TableConfig  # noqa: F401
from .linear import Int8Linear  # noqa: F401
from .retriever import Retriever  # noqa: F401
