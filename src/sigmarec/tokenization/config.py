"""Typed settings of the tokenization stage (semantic IDs and the prefix-partitioned item index).

Kept here rather than in ``sigmarec.config`` so the tokenizer can be developed and tested on its
own; the root config can embed :class:`TokenizationConfig` as one more section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_CODEBOOK_SIZE = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SemanticIdConfig(_Strict):
    """Residual quantisation of ``v_text`` into ``levels`` codes per item (SIGMA part 2)."""

    levels: int = Field(3, ge=1, le=16)
    codebook_sizes: list[int] = Field(
        default_factory=lambda: [DEFAULT_CODEBOOK_SIZE] * 3,
        description="one codebook size per level; omitted = 256 at every level",
    )
    method: Literal["rq_kmeans", "rq_kmeans_balanced"] = "rq_kmeans"
    kmeans_iters: int = Field(20, ge=1)
    seed: int = 0
    # Balanced mode only: a code may hold at most ceil(n / K * (1 + balance_slack)) items.
    # 0 forces equal sizes (which splits natural clusters); a little slack keeps most items on
    # their nearest centroid while still cutting the giant groups that make a prefix useless.
    balance_slack: float = Field(0.25, ge=0)
    # Balanced mode only: rounds of (capacity-constrained assignment, centroid update) run after
    # the plain k-means fit; stops early when the assignment no longer changes.
    balance_iters: int = Field(10, ge=1)
    threads: int = Field(
        1, ge=1, description="faiss OpenMP threads for the k-means fit. Its result depends on "
        "the thread count, so 1 keeps the semantic IDs a function of the data and the seed "
        "alone; more only speeds up a very large catalogue, at that cost")

    @model_validator(mode="before")
    @classmethod
    def _default_sizes_follow_levels(cls, data: Any) -> Any:
        # Setting only ``levels`` should not force the user to spell out codebook_sizes too.
        if isinstance(data, dict) and "codebook_sizes" not in data:
            levels = data.get("levels")
            if isinstance(levels, int) and not isinstance(levels, bool) and levels >= 1:
                data = {**data, "codebook_sizes": [DEFAULT_CODEBOOK_SIZE] * levels}
        return data

    @model_validator(mode="after")
    def _sizes_match_levels(self) -> SemanticIdConfig:
        if len(self.codebook_sizes) != self.levels:
            raise ValueError(
                f"semantic_ids.codebook_sizes has {len(self.codebook_sizes)} entries "
                f"({self.codebook_sizes}) but levels is {self.levels}: give one size per level"
            )
        bad = [k for k in self.codebook_sizes if k < 1]
        if bad:
            raise ValueError(
                f"semantic_ids.codebook_sizes must be positive, got {self.codebook_sizes}"
            )
        return self


class PrefixIndexConfig(_Strict):
    """Which implementation serves the item-subset search of SIGMA's generation step 2."""

    backend: Literal["faiss", "exhaustive"] = "faiss"
    normalize: bool = Field(
        False, description="L2-normalise stored vectors and queries (cosine instead of raw IP)"
    )


class TokenizationConfig(_Strict):
    # Which item text space is quantised: the grounded ``v_text`` (SIGMA) or the untrained
    # backbone's pooled embedding (the "without grounding" ablation).
    embedding: Literal["grounded", "ungrounded"] = "grounded"
    semantic_ids: SemanticIdConfig = Field(default_factory=SemanticIdConfig)
    index: PrefixIndexConfig = Field(default_factory=PrefixIndexConfig)
    # Levels of the SID written as vocabulary tokens before the unique item embedding
    # (SIGMA: 1; the two-level-prefix ablation: 2).
    prefix_levels: int = Field(1, ge=1, le=16)
    query_token: str = "<q>"

    @model_validator(mode="after")
    def _prefix_within_levels(self) -> TokenizationConfig:
        if self.prefix_levels > self.semantic_ids.levels:
            raise ValueError(
                f"tokenization.prefix_levels ({self.prefix_levels}) exceeds "
                f"semantic_ids.levels ({self.semantic_ids.levels})"
            )
        return self
