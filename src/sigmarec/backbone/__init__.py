"""The LLM backbone: loading (packaged GGUF, local folder or tiny), truncation and helpers."""

from sigmarec.backbone.config import BackboneConfig
from sigmarec.backbone.loading import (
    add_special_tokens,
    find_decoder_layers,
    last_token_hidden,
    load_backbone,
    truncate_layers,
)

__all__ = [
    "BackboneConfig",
    "add_special_tokens",
    "find_decoder_layers",
    "last_token_hidden",
    "load_backbone",
    "truncate_layers",
]
