"""Typed settings of SIGMA's three-step generation (SIGMA part 4) and of the task rankings.

Kept out of ``sigmarec.config`` so generation can be developed and tested on its own; the root
config embeds :class:`GenerationConfig` as the section ``generation``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fusion = Literal["adaptive", "fixed", "joint", "off"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationConfig(_Strict):
    """Step 1 keeps ``k_prefixes`` prefixes, step 2 ``m_per_prefix`` items under each, step 3
    fuses them and keeps ``eval.top_n``."""

    k_prefixes: int = Field(20, ge=1, description="K: prefixes continued after step 1")
    m_per_prefix: int = Field(20, ge=1, description="M: items kept per prefix by the search")
    fusion: Fusion = Field(
        "adaptive",
        description="the fusion of the `sigma` and `sigma+rule` lists and of serving. adaptive "
        "(the paper's APF): log P(prefix) + log softmax(score*s/tau) within the prefix, s = std "
        "of the top-K prefix probabilities; fixed: s = 1; joint: log P(prefix) + score/tau, "
        "one softmax over every candidate (no per-prefix normalisation); off: prefix "
        "probability, then score (lexicographic)",
    )
    tau: float = Field(
        0.05, gt=0, description="APF temperature (adaptive and fixed); see select_tau"
    )
    select_tau: bool = Field(
        True, description="pick tau per fusion mode from tau_grid by validation HR@10 (test is "
        "never used); the chosen value is in the manifest",
    )
    tau_grid: list[float] = Field(
        default_factory=lambda: [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        description="tau values tried (validation choice, and the report's accuracy/diversity "
        "curve in fixed mode)",
    )
    copy_scale_grid: list[float] = Field(
        default_factory=list, description="repeat-aware models: weights of the copy term tried "
        "with the tau grid on validation (adaptive fusion and sigma+rule, each its own); a "
        "re-ranking of the decoded candidates, 1 = as trained (always tried); empty = only 1",
    )
    k_grid: list[int] = Field(
        default_factory=list, description="smaller K values (<= k_prefixes) tried on validation "
        "with the tau grid: decoding runs once at k_prefixes and a smaller K is the first K "
        "prefix slots of the same candidates; the best on validation HR@10 is used for every "
        "fusion mode (sigma+rule keeps k_prefixes); empty = always k_prefixes",
    )
    variants: list[Fusion] = Field(
        default_factory=lambda: ["adaptive", "fixed", "off"],
        description="fusion modes also written as separate models (sigma_<mode>, e.g. "
        "sigma_fixed; `fusion` itself is `sigma`): steps 1-2 are shared, so the fusion "
        "ablation costs one extra sort",
    )
    batch_size: int = Field(16, ge=1, description="prompts decoded together")
    exclude_seen: bool = Field(
        False, description="business filter: never return an item of the user's history"
    )
    rule_filtered_baselines: bool = Field(
        True, description="also rank every baseline with each task's checkable rule as a filter "
        "(models '<name>+rule')",
    )
    rule_filtered_sigma: bool = Field(
        True, description="also decode the task instances with each task's checkable rule as a "
        "business filter inside the subset search (model 'sigma+rule', adaptive fusion at a tau "
        "chosen on the rule-filtered validation lists); beside the baselines' '+rule' rows",
    )
    fusion_per_task: bool = Field(
        True, description="adaptive fusion's tau and copy scale chosen per task on validation "
        "HR@10 (a request's task is known: the instruction's), for sigma and sigma+rule; the "
        "single choice for all tasks is still written as sigma_global (and sigma_global+rule) "
        "to compare in the same run",
    )
    per_task_min_valid: int = Field(
        30, ge=1, description="fusion_per_task: a task with fewer validation instances keeps "
        "the choice made over all tasks",
    )
    baselines: list[str] | None = Field(
        None, description="baselines re-ranked on the task instances; None = baselines.enabled"
    )
    examples: int = Field(3, ge=0, description="example lists per task kept for the report")

    @model_validator(mode="after")
    def _grid(self) -> GenerationConfig:
        if any(a < 0 for a in self.copy_scale_grid):
            raise ValueError(f"generation.copy_scale_grid must be >= 0, got "
                             f"{self.copy_scale_grid}")
        if any(t <= 0 for t in self.tau_grid):
            raise ValueError(f"generation.tau_grid must be positive, got {self.tau_grid}")
        bad = [k for k in self.k_grid if not 1 <= k <= self.k_prefixes]
        if bad:
            raise ValueError(f"generation.k_grid values must lie in 1..k_prefixes "
                             f"({self.k_prefixes}), got {bad}")
        return self
