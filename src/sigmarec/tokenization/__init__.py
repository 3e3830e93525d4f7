"""Hybrid item tokenization (SIGMA part 2): semantic IDs and the prefix-partitioned item index."""

from sigmarec.tokenization.config import PrefixIndexConfig, SemanticIdConfig, TokenizationConfig
from sigmarec.tokenization.prefix_index import (
    ExhaustivePrefixIndex,
    ItemSubsetIndex,
    PrefixIndex,
    make_prefix_index,
)
from sigmarec.tokenization.semantic_ids import SemanticIds, capacity_assign, fit_semantic_ids

__all__ = [
    "ExhaustivePrefixIndex",
    "ItemSubsetIndex",
    "PrefixIndex",
    "PrefixIndexConfig",
    "SemanticIdConfig",
    "SemanticIds",
    "TokenizationConfig",
    "capacity_assign",
    "fit_semantic_ids",
    "make_prefix_index",
]
