"""Models: the seed article's Recommender, with training and evaluation."""
from .recommender import Recommender, evaluate, train_model  # noqa: F401
