"""Ranking metrics shared by every stage that scores a model (a library, not a stage)."""

from sigmarec.metrics.beyond import beyond_metrics, category_codes, coverage, head_mask
from sigmarec.metrics.ranking import accuracy_metrics, hit_matrix, repeated_mask, top_n

__all__ = [
    "accuracy_metrics",
    "beyond_metrics",
    "category_codes",
    "coverage",
    "head_mask",
    "hit_matrix",
    "repeated_mask",
    "top_n",
]
