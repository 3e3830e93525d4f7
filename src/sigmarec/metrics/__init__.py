"""Ranking metrics shared by every stage that scores a model (a library, not a stage)."""

from sigmarec.metrics.ranking import accuracy_metrics, hit_matrix, top_n

__all__ = ["accuracy_metrics", "hit_matrix", "top_n"]
