"""Typed settings of the SIGMA recommender model (SIGMA part 3: the fine-tuned LLM).

Kept out of ``sigmarec.config`` so the model can be developed and tested on its own; the root
config embeds :class:`ModelConfig` as the section ``model``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The LLM around the hybrid item tokens, its adaptation and its two losses."""

    finetune: Literal["lora", "full", "frozen"] = Field(
        "lora", description="lora: adapters (+ new token rows, ProjFuse, head); full: everything; "
        "frozen: no backbone weight trains (the new token rows, ProjFuse, the head and the copy "
        "gates still do), so the SFT of the backbone can be measured (ablation frozen_llm)",
    )
    # Left out of the config dump (and so of the stage hash) while None, so runs made before
    # this option existed stay fresh.
    backbone_layers: int | None = Field(
        None, ge=0, exclude_if=lambda v: v is None,
        description="the model keeps only the first N transformer layers of the "
        "backbone that backbone.num_layers loaded (the grounding stage still reads all of them); "
        "0 = none: the token and item embeddings go straight to the final norm, the heads and "
        "the copy gates (ablation no_llm); None = all",
    )
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names that get LoRA adapters (add gate/up/down_proj for the MLP)",
    )
    train_new_tokens: bool = Field(
        True, description="train the input/output rows of the prefix tokens and <q>"
    )
    item_token: str = Field(
        "<|item|>", description="placeholder token whose embedding is replaced by the soft token"
    )
    prefix_init: Literal["shared", "item_text", "item_embedding", "random"] = Field(
        "shared", description="start values of the prefix-token rows: shared = the mean "
        "embedding for all (as added); item_text = plus the centred mean untrained-backbone text "
        "state of the items under each code (needs the grounding stage's ungrounded states); "
        "item_embedding = plus the centred mean soft token ṽ (ProjFuse at start) of the items "
        "under each code, so a prefix token starts where its items are; random = plus a random "
        "direction per code (breaks the symmetry only)",
    )
    fuse_dropout: float = Field(0.1, ge=0, lt=1, description="dropout inside ProjFuse")
    head: Literal["linear", "mlp"] = Field(
        "linear", description="projection of the <q> hidden state (hidden -> hidden)"
    )
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature")
    infonce_weight: float = Field(1.0, ge=0, description="lambda in L_NTP + lambda * L_InfoNCE")
    # Sample-efficient SFT (ours, not the paper's; see docs/training.md "Objective").
    dense_weight: float = Field(
        0.0, ge=0, description="weight of the next-item losses (NTP + lambda * InfoNCE) at every "
        "purchase-sequence item of the prompt; 0 = label losses only, as in the paper"
    )
    multi_positive: bool = Field(
        False, description="NTP label = the prefix mix of every admitted item of the target "
        "basket instead of the sampled target's prefix (they are never InfoNCE negatives either "
        "way)"
    )
    infonce_negatives: Literal["batch", "catalogue"] = Field(
        "batch", description="batch: the paper's InfoNCE against the other in-batch targets, "
        "the hard negatives (and a repeat-aware model's prompt items); catalogue: a full softmax "
        "over every item of the catalogue (as SASRec-CE), for the label and the dense losses, "
        "which the full-ranking evaluation matches (ProjFuse then runs over all items each step)",
    )
    repeat_aware: bool = Field(
        False, description="a learned copy prior: prefix logits and item scores gain a gated "
        "log(1 + count) term for the codes and items the prompt shows (purchase sequence and "
        "context section apart), and InfoNCE also contrasts the target with the prompt's other "
        "items (see sigmarec.model.repeat)",
    )
    repeat_init: float = Field(1.0, ge=0, description="start value of the copy gates")
    repeat_counts: bool = Field(
        False, description="repeat-aware models: a third copy channel, the household's purchase "
        "count of each item over its whole history before the cut (the tasks' count_items "
        "columns, tasks.count_items most bought), which the prompt does not show",
    )
    text_match: bool = Field(
        False, description="repeat-aware models: a further copy channel, the catalogue items "
        "whose text the instruction's words match (TF-IDF cosine over title, category path and "
        "brand, fitted on the catalogue; sigmarec.tasks.text_match): how a Category or Query "
        "instruction reaches the scores",
    )
    text_match_items: int = Field(200, ge=1, description="text match: the best-matching items "
                                  "kept per instruction")
    text_match_min: float = Field(0.1, gt=0, le=1, description="text match: the least cosine "
                                  "an item must reach to be kept")
    text_match_scale: float = Field(
        20.0, gt=0, description="text match: the channel reads cosine x scale, as the count "
        "channel reads purchase counts (log1p of it), so a full match weighs like ~20 purchases",
    )
    text_match_tags: bool = Field(
        False, description="text match: each item's text also carries, as words, the seasons "
        "whose training-window purchase rate it rises in (the tasks' season lift, from training "
        "data alone), so a request that names a season matches the season's items",
    )
    text_match_bought_first: bool = Field(
        False, description="text match: of an instruction's matches above text_match_min, the "
        "household's own purchases (its purchase counts) are kept first, then the best others, "
        "up to text_match_items (a broad category or a season matches thousands of items; the "
        "cosine order alone keeps 200 of them that say nothing of the household)",
    )
    repeat_rarity: bool = Field(
        False, description="repeat-aware models with purchase counts: a further copy channel "
        "over the same purchased items, each weighted by its rarity (the share of the catalogue "
        "at least as often bought in training) x rarity_scale, so an instruction can ask for "
        "the household's niche purchases rather than its staples",
    )
    rarity_scale: float = Field(20.0, gt=0, description="rarity channel: the channel reads "
                                "rarity x scale (log1p of it), as the text match reads cosines")
    novelty: bool = Field(
        False, description="repeat-aware models: a further copy channel over the most bought "
        "catalogue items of the categories the household never bought (tasks.novel_items of "
        "them, from its whole history before the cut; sigmarec.tasks.novelty), each weighted "
        "by its popularity over the best-seller's x novelty_scale: how a Discover request "
        "reaches the scores",
    )
    novelty_scale: float = Field(20.0, gt=0, description="novelty channel: the channel reads "
                                 "popularity x scale (log1p of it), as the text match reads "
                                 "cosines")
    task_gates: bool = Field(
        False, description="repeat-aware models: a learned offset of the copy gates per "
        "instruction task (the task the tasks stage or the serving runtime resolves from the "
        "instruction), so each task can read each channel with its own weight; the prompt's last "
        "hidden state alone did not tell the tasks apart (docs/experiments.md, round 10)",
    )
    shared_prefix_decode: bool = Field(
        True, description="generation: run the K continuations of a prompt in one row under a "
        "4D mask (no KV copies); False = repeat the cache K times (the plain reference path)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (less memory, ~30% slower)"
    )

    @model_validator(mode="after")
    def _counts_need_copy(self) -> ModelConfig:
        if self.backbone_layers == 0 and self.finetune == "lora":
            raise ValueError("model.backbone_layers = 0 leaves LoRA no layer to adapt: set "
                             "model.finetune to 'frozen' (or 'full', which also trains the "
                             "embeddings and the final norm)")
        if self.repeat_counts and not self.repeat_aware:
            raise ValueError("model.repeat_counts is a channel of the copy prior: it needs "
                             "model.repeat_aware=true")
        if self.text_match and not self.repeat_aware:
            raise ValueError("model.text_match is a channel of the copy prior: it needs "
                             "model.repeat_aware=true")
        if (self.text_match_tags or self.text_match_bought_first) and not self.text_match:
            raise ValueError("model.text_match_tags / text_match_bought_first refine the text "
                             "match: they need model.text_match=true")
        if self.repeat_rarity and not self.repeat_counts:
            raise ValueError("model.repeat_rarity weighs the purchase-count channel's items: it "
                             "needs model.repeat_counts=true")
        if self.task_gates and not self.repeat_aware:
            raise ValueError("model.task_gates offsets the copy prior's gates: it needs "
                             "model.repeat_aware=true")
        if self.novelty and not self.repeat_aware:
            raise ValueError("model.novelty is a channel of the copy prior: it needs "
                             "model.repeat_aware=true")
        return self
