"""Small helpers over Hugging Face models and tokenizers that every backbone module uses."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from sigmarec.errors import SigmaError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def text_config(model: nn.Module) -> PretrainedConfig:
    """The text model's config (a multimodal wrapper's inner one)."""
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def all_configs(model: nn.Module) -> list[PretrainedConfig]:
    """The model's config and, when different, its text config."""
    configs = [model.config]
    text = text_config(model)
    if text is not model.config:
        configs.append(text)
    return configs


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> None:
    """Batched inputs need a pad token; many causal LMs define none, so eos stands in."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SigmaError("the tokenizer defines neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        for c in all_configs(model):
            if getattr(c, "pad_token_id", None) is None:
                c.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
