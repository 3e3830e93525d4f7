"""Hybrid item tokens: a semantic-ID prefix written as vocabulary tokens, then a soft token.

The prefix tokens (``<a_3>``, or ``<a_3><b_7>`` with two prefix levels) partition the catalogue
and make generation a small softmax; the soft token ``ṽ = ProjFuse(v_ID, v_text, v_img)`` makes
every item distinguishable, so SID collisions do not matter and a new item needs only embeddings.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

LEVEL_LETTERS = string.ascii_lowercase

_Ids = TypeVar("_Ids", np.ndarray, torch.Tensor)


def prefix_token(level: int, code: int) -> str:
    return f"<{LEVEL_LETTERS[level]}_{code}>"


@dataclass
class HybridVocab:
    """The new vocabulary tokens and each item's prefix token sequence."""

    codebook_sizes: list[int]  # sizes of the prefix levels only
    query_token: str = "<q>"

    @property
    def prefix_tokens(self) -> list[str]:
        return [prefix_token(lv, c) for lv, k in enumerate(self.codebook_sizes) for c in range(k)]

    @property
    def tokens(self) -> list[str]:
        return [*self.prefix_tokens, self.query_token]

    def item_prefix(self, codes: np.ndarray) -> list[str]:
        """Prefix tokens of one item from its SID codes."""
        return [prefix_token(lv, int(codes[lv])) for lv in range(len(self.codebook_sizes))]

    def prefix_ids(self, codes: np.ndarray) -> np.ndarray:
        """(n_items,) flat prefix index per item: the generation target space."""
        flat = np.zeros(len(codes), dtype=np.int64)
        for lv, k in enumerate(self.codebook_sizes):
            flat = flat * k + codes[:, lv]
        return flat

    def prefix_text(self, flat: int) -> str:
        """A flat prefix id written as its tokens (``<a_3>``, or ``<a_3><b_7>``)."""
        codes = flat_to_codes(np.array([int(flat)]), self.codebook_sizes)[0]
        return "".join(prefix_token(lv, int(c)) for lv, c in enumerate(codes))

    @property
    def n_prefixes(self) -> int:
        return int(np.prod(self.codebook_sizes))


def flat_to_codes(flat: _Ids, codebook_sizes: Sequence[int]) -> _Ids:
    """(n,) flat prefix ids -> (n, levels) per-level codes, int64 (the inverse of
    :meth:`HybridVocab.prefix_ids`); a tensor stays on its device (no host sync)."""
    sizes = [int(k) for k in codebook_sizes]
    if isinstance(flat, torch.Tensor):
        rest, cols = flat.reshape(-1).long(), []
        for size in reversed(sizes):
            cols.append(rest % size)
            rest = torch.div(rest, size, rounding_mode="floor")
        return torch.stack(cols[::-1], dim=1)
    rest = np.asarray(flat, dtype=np.int64).copy()
    codes = np.zeros((len(rest), len(sizes)), dtype=np.int64)
    for lv in range(len(sizes) - 1, -1, -1):
        codes[:, lv] = rest % sizes[lv]
        rest //= sizes[lv]
    return codes


class ProjFuse(nn.Module):
    """ṽ = ProjFuse(v_ID, v_text[, v_img]): frozen item embeddings -> one vector of the
    backbone's hidden size. Each source is normalised and projected, a learned gate weighs the
    sources, and an MLP fuses them; the output is rescaled to the typical norm of the backbone's
    token embeddings so a soft token looks like a token to the LLM."""

    def __init__(self, dims: dict[str, int], hidden: int, target_norm: float,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.sources = sorted(dims)
        self.inputs = nn.ModuleDict({
            s: nn.Sequential(nn.LayerNorm(dims[s]), nn.Linear(dims[s], hidden))
            for s in self.sources
        })
        self.gate = nn.Parameter(torch.zeros(len(self.sources)))
        self.mlp = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.register_buffer("scale", torch.tensor(float(target_norm) / hidden**0.5))

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = set(self.sources) - set(feats)
        if missing:
            raise ValueError(f"ProjFuse needs {sorted(missing)} embeddings too")
        w = torch.softmax(self.gate, dim=0)
        x = sum(w[i] * self.inputs[s](feats[s]) for i, s in enumerate(self.sources))
        return self.norm(x + self.mlp(x)) * self.scale
