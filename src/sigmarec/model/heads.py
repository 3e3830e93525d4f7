"""The query head: the projection of the final hidden state at ``<q>`` that is compared with
the items' fused embeddings (generation step 2 and the InfoNCE losses)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class QueryHead(nn.Module):
    """hidden -> hidden projection of the <q> state. Starts as the identity: the query begins
    as the LLM's own representation and training learns the correction."""

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            if kind == "linear":
                self.proj.weight.copy_(torch.eye(hidden))
                self.proj.bias.zero_()
            else:
                self.out = nn.Linear(hidden, hidden)
                self.out.weight.zero_()
                self.out.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.proj(h)
        return h + self.out(F.gelu(self.proj(h)))

