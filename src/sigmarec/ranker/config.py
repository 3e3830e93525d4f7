"""Typed settings of the ``features_ltr`` ranker (section ``ranker``).

Kept out of ``sigmarec.config`` like the GR baselines' section, so the ranker is developed and
tested on its own. Its text-match settings are its own copies of the copy prior's (``model``
section) defaults rather than reads of that section: a SIGMA ablation that changes the model
section must not retrain the ranker.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RankerConfig(_Strict):
    enabled: bool = Field(True, description="train features_ltr and write its rankings (valid "
                          "and test, unfiltered and +rule); off = the stage writes nothing")
    sasrec_model: Literal["sasrec_ce", "sasrec_bce"] = Field(
        "sasrec_ce", description="the SASRec whose scores are a feature and whose top "
        "sasrec_top items join the candidate pool")
    sasrec_top: int = Field(100, ge=0, description="SASRec's best items added to each "
                            "instance's pool (the copy prior's channel lists are the rest)")
    match_items: int = Field(200, ge=1, description="text-match channel: best-matching items "
                             "in the pool (model.text_match_items of the copy prior)")
    match_min: float = Field(0.1, gt=0, le=1, description="text-match channel: the least "
                             "cosine listed (model.text_match_min)")
    match_tags: bool = Field(True, description="item texts carry their season tags "
                             "(model.text_match_tags)")
    match_bought_first: bool = Field(True, description="the household's purchases that match "
                                     "are listed first (model.text_match_bought_first)")
    num_leaves: list[int] = Field(default_factory=lambda: [15, 63], min_length=1,
                                  description="grid, chosen on validation HR@10")
    learning_rate: list[float] = Field(default_factory=lambda: [0.05, 0.15], min_length=1,
                                       description="grid, chosen on validation HR@10")
    n_estimators: int = Field(400, ge=1, description="most boosting rounds; early stopping on "
                              "validation NDCG@10 picks fewer")
    early_stopping_rounds: int = Field(30, ge=1)
    train_negatives: int | None = Field(
        None, ge=1, description="negatives kept per training group (all positives, then a "
        "seeded sample of the rest); None = the whole pool")
    max_train_groups: int | None = Field(None, ge=1, description="training instances used "
                                         "(a seeded sample); None = all")
    batch_size: int = Field(256, ge=1, description="instances scored by SASRec together")

    @field_validator("num_leaves")
    @classmethod
    def _leaves(cls, v: list[int]) -> list[int]:
        if any(n < 2 for n in v):
            raise ValueError(f"ranker.num_leaves must all be >= 2, got {v}")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if any(r <= 0 for r in v):
            raise ValueError(f"ranker.learning_rate must all be > 0, got {v}")
        return v
