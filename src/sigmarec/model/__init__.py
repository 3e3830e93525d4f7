"""The SIGMA recommender model (hybrid item tokens in, prefix + query vector out)."""

from sigmarec.model.batch import HardNegativeSampler, PromptBatch, SFTExample, SigmaCollator
from sigmarec.model.config import ModelConfig
from sigmarec.model.sigma import (
    PromptCache,
    SigmaModel,
    build_sigma_model,
    load_sigma_model,
    positions_from_mask,
)

__all__ = [
    "HardNegativeSampler", "ModelConfig", "PromptBatch", "PromptCache", "SFTExample",
    "SigmaCollator", "SigmaModel", "build_sigma_model", "load_sigma_model",
    "positions_from_mask",
]
