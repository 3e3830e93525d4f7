"""SASRec, the sequential baseline whose item embeddings become SIGMA's ID tower."""

from sigmarec.baselines.sasrec.model import SASRec
from sigmarec.baselines.sasrec.recommender import SASRecBCE, SASRecCE, SASRecRecommender

__all__ = ["SASRec", "SASRecBCE", "SASRecCE", "SASRecRecommender"]
