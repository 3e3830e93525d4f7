"""Typed settings of the generative-retrieval baselines GR(SID) and GR(ID) (SIGMA's comparison).

Kept out of ``sigmarec.config`` so the baselines can be developed and tested on their own; the
root config embeds :class:`GRConfig` as the section ``gr``. The backbone, LoRA and optimiser
settings are SIGMA's own (sections ``backbone``, ``model``, ``training``) so the comparison runs
on the same backbone and the same budget; only the fields below differ.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GRName = Literal["gr_sid", "gr_id"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GRConfig(_Strict):
    enabled: list[GRName] = Field(
        default_factory=list,
        description="baselines to train and rank with; empty (default) = the stage does nothing, "
        "which keeps the default CPU run within its time budget",
    )
    num_beams: int = Field(
        20, ge=1, description="beams = returned list length K; must be >= max(eval.ks)"
    )
    steps: int | None = Field(None, ge=0, description="None = training.steps (equal budget)")
    per_device_batch_size: int | None = Field(
        None, ge=1, description="None = training.per_device_batch_size"
    )
    lr: float | None = Field(None, gt=0, description="None = training.lr")
    dense_weight: float | None = Field(
        None, ge=0, description="weight of GR's dense next-token loss over the prompt's history "
        "tokens; None = model.dense_weight. Its own field because SIGMA's dense losses were "
        "ablated on SIGMA only: the default keeps GR's on while SIGMA's are off",
    )
    generate_batch_size: int = Field(8, ge=1, description="prompts decoded together")
    dedup_level: bool = Field(
        True, description="GR(SID): append TIGER's extra code numbering the items that share a "
        "full semantic ID, so every item has its own token sequence; off = a generated SID "
        "stands for all its items (listed by training popularity)",
    )
