"""sigmarec: SIGMA, a semantic-grounded instruction-driven generative multi-task recommender."""

__version__ = "0.1.0"
