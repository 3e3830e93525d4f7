"""Small tensor helpers of the SIGMA model: positions, modes, the backbone's text config.

The bottom layer of :mod:`sigmarec.model`: it imports nothing of the package, so every other
module of the model (heads, copy prior, losses, generation, checkpoints) can use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def text_config(model: nn.Module) -> Any:
    get = getattr(model.config, "gettext_config", None)
    return get() if callable(get) else model.config


def typical_embedding_norm(model: nn.Module, vocab_size: int, sample: int = 8192) -> float:
    """Median norm of the embedding layer's outputs (scaled embeddings included)."""
    emb = model.get_input_embeddings()
    n = min(vocab_size, emb.weight.shape[0])
    ids = torch.linspace(0, n - 1, steps=min(n, sample)).long().to(emb.weight.device)
    with torch.no_grad():
        return float(emb(ids).float().norm(dim=-1).median())



@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    # Losses in fp32: cosine logits divided by a small temperature lose too much in bf16.
    with torch.autocast(device_type=device_type, enabled=False):
        yield


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
