"""How a backbone is made trainable for SFT, shared by SIGMA and the GR baselines (which must get
the same adaptation for the comparison to be fair)."""

from __future__ import annotations

import inspect
import logging
import warnings

from torch import nn

from sigmarec.backbone.loading import truncate_layers
from sigmarec.model.config import ModelConfig

log = logging.getLogger("sigmarec")


def adapt_backbone(backbone: nn.Module, cfg: ModelConfig) -> nn.Module:
    """The backbone cut to ``backbone_layers`` (if set), activation checkpointing if asked,
    then LoRA adapters (``finetune: lora``), every weight trainable (``full``) or none
    (``frozen``). Returns the module to train (the peft wrapper with LoRA)."""
    if cfg.backbone_layers is not None:
        # The cut is the model's (the grounding stage reads the whole loaded backbone), so it
        # happens here, where SIGMA and the GR baselines both pass, and again on every load of
        # a checkpoint (its meta holds this config).
        kept, total = truncate_layers(backbone, cfg.backbone_layers,
                                      field="model.backbone_layers", least=0)
        log.info("model: the backbone cut to %d of its %d layers (model.backbone_layers)",
                 kept, total)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works although only inputs_embeds (not the weights) need grads.
        kw = {"use_reentrant": False}
        if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if cfg.finetune != "lora":
        backbone.requires_grad_(cfg.finetune == "full")
        return backbone
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        # peft probes a deprecated transformers attribute; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(backbone, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets), bias="none",
        ))


def cache_keyword(decoder: nn.Module) -> str:
    """The decoder's KV-cache argument: transformers 5.x renamed ``past_key_values`` to
    ``cache``."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
