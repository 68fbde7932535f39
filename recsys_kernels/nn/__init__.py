"""Drop-in modules: FusedEmbeddingBag for nn.EmbeddingBag, Int8Linear for nn.Linear."""
from .embedding import FusedEmbeddingBag, FusedEmbeddingBagCollection, TableConfig  # noqa: F401
from .linear import Int8Linear  # noqa: F401
