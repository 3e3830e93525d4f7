"""Typed settings of the SFT training loop (optimisation, precision, checkpoints, validation).

Kept out of ``sigmarec.config`` so the loop can be developed and tested on its own; the root
config embeds :class:`TrainingConfig` as the section ``training``. How many processes/GPUs run
is not set here but by ``accelerate launch`` (see docs/training.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainingConfig(_Strict):
    steps: int = Field(1000, ge=0, description="optimizer steps (each = batch x accum x procs)")
    per_device_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0, description="backbone (LoRA adapters or all weights)")
    new_params_lr: float = Field(
        1e-3, gt=0, description="ProjFuse, the <q> head and the new token rows"
    )
    gate_lr: float = Field(
        0.05, gt=0, description="the four copy-gate biases of a repeat-aware model: scalars "
        "that must move by whole nats within a few hundred steps (at new_params_lr they barely "
        "leave their start)"
    )
    weight_decay: float = Field(0.0, ge=0, description="on matrices only (not norms/biases/rows)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="linear warm-up share of steps")
    max_grad_norm: float | None = Field(1.0, gt=0, description="None = no clipping")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto = bf16 where the hardware has it natively (a "
        "bf16 GPU, a CPU with avx512_bf16/amx_bf16), else no (fp32); fp16 needs a GPU"
    )
    hard_negatives: int = Field(
        16, ge=0, description="InfoNCE negatives drawn from the target's prefix, per sample"
    )
    pad_to_multiple_of: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(1, ge=1, description="newest checkpoints kept on disk")
    eval_every: int = Field(200, ge=1, description="steps between validation runs")
    eval_at_end: bool = True
    max_valid_examples: int | None = Field(
        None, ge=1, description="validation-loss subset (first N, fixed); None = all"
    )
    valid_batch_size: int | None = Field(None, ge=1, description="None = per_device_batch_size")
    select_metric: str = Field(
        "valid_loss", description="metric that picks the best weights (valid_loss or a callback "
        "metric such as hr@10)"
    )
    select_mode: Literal["min", "max"] = "min"
    restore_best: bool = Field(
        True, description="end with the best validated weights instead of the last ones"
    )
    log_every: int = Field(10, ge=1)
    seed: int | None = Field(None, description="None = the run seed")
    time_budget_s: float | None = Field(
        None, gt=0, description="expected SFT wall time; a warning is logged when the estimate "
        "is far above it"
    )

    @model_validator(mode="after")
    def _metric_direction(self) -> TrainingConfig:
        if self.select_metric == "valid_loss" and self.select_mode != "min":
            raise ValueError("training.select_mode must be 'min' for select_metric valid_loss")
        return self
