"""Repeat-aware scores: a learned copy prior over the items and prefixes the prompt shows.

Grocery baskets are mostly repurchases (the repurchase baseline beats SASRec on JustForYou), yet
an LLM fine-tuned on thousands of prompts does not learn to copy from its prompt: its prefix head
stayed at the marginal prior in every run (docs/experiments.md). So, as pointer networks and
repeat-aware recommenders (RepeatNet, ReCANet) do, the scores get an explicit copy term:

* prefix logits at every level: ``+ g_seq · log(1 + n_seq(c)) + g_ctx · log(1 + n_ctx(c))``,
  ``n_seq(c)`` / ``n_ctx(c)`` = how many items of the purchase sequence / of the context section
  ("bought most often") carry code ``c`` below the partial prefix already chosen;
* item scores (the cosine scale of the ``<q>`` search): ``+ τ · (b_seq · log(1 + m_seq(i)) +
  b_ctx · log(1 + m_ctx(i)))``, ``m`` = the item's own occurrences, ``τ`` the InfoNCE
  temperature, so ``b`` is in nats of the training softmax.

The four gates are ``softplus`` of a linear map of the hidden state at the end of the prompt (the
token before the first label token): the instruction can switch copying off (a task that asks
for something new) or up (buy again). The linear map starts at zero and the bias at
``repeat_init``: the copy term is on from the first step, and learned from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

N_GATES = 4  # prefix-seq, prefix-ctx, item-seq, item-ctx


@dataclass
class PromptSlots:
    """The item placeholders of a batch of prompts as a table: ``items`` (R, J) item ids in
    prompt order (-1 = padding), ``seq`` (R, J) True for the purchase sequence, False for the
    context section."""

    items: torch.Tensor
    seq: torch.Tensor

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   item_ids: torch.Tensor, sequence_mask: torch.Tensor | None,
                   item_token_id: int) -> PromptSlots:
        slots = ((input_ids == item_token_id) & attention_mask.bool()).nonzero()  # row-major
        rows = slots[:, 0]
        b = input_ids.shape[0]
        per_row = torch.bincount(rows, minlength=b)
        width = max(int(per_row.max()) if rows.numel() else 0, 1)
        rank = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]
        items = torch.full((b, width), -1, dtype=torch.long, device=input_ids.device)
        items[rows, rank] = item_ids.view(-1).to(items.device)
        seq = torch.zeros((b, width), dtype=torch.bool, device=input_ids.device)
        mark = (torch.ones_like(rows, dtype=torch.bool) if sequence_mask is None
                else sequence_mask.view(-1).to(seq.device).bool())
        seq[rows, rank] = mark
        return cls(items, seq)

    def rows(self, idx: torch.Tensor) -> PromptSlots:
        return PromptSlots(self.items[idx], self.seq[idx])

    def ranks(self) -> torch.Tensor:
        """(N,) rank of each placeholder in its row, in row-major order (matches item_ids)."""
        j = torch.arange(self.items.shape[1], device=self.items.device)
        return j.expand_as(self.items)[self.items >= 0]


class RepeatGate(nn.Module):
    """hidden -> the four softplus gates (see the module docstring)."""

    def __init__(self, hidden: int, init: float) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, N_GATES)
        with torch.no_grad():
            self.proj.weight.zero_()
            # softplus^-1(init): the gates start at ``init``.
            self.proj.bias.fill_(math.log(math.expm1(init)) if init > 0 else -20.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.proj(h.float()))


def prefix_counts(slots: PromptSlots, item_codes: torch.Tensor, level: int, n_codes: int,
                  partial: torch.Tensor | None = None, before: torch.Tensor | None = None,
                  seq_only: bool = False) -> torch.Tensor:
    """(R, 2, n_codes) prompt items per code of ``level`` (sequence, context), counting only
    items whose first ``level`` codes equal ``partial`` (R, level) and, with ``before`` (R,),
    only placeholders of rank < before (the items that precede a history position)."""
    ok = slots.items >= 0
    codes = item_codes[slots.items.clamp(min=0)]  # (R, J, L)
    if level:
        ok = ok & (codes[:, :, :level] == partial[:, None, :level]).all(-1)
    if before is not None:
        ok = ok & (torch.arange(ok.shape[1], device=ok.device)[None, :] < before[:, None])
    seq = slots.seq
    out = torch.zeros(ok.shape[0], 2, n_codes, device=ok.device)
    code = codes[:, :, level]
    out[:, 0].scatter_add_(1, code, (ok & seq).float())
    if not seq_only:
        out[:, 1].scatter_add_(1, code, (ok & ~seq).float())
    return out


def item_counts(slots: PromptSlots, items: torch.Tensor, before: torch.Tensor | None = None,
                seq_only: bool = False) -> torch.Tensor:
    """(R, X, 2) occurrences of each of ``items`` (R, X) in its row's prompt (sequence,
    context); ``before`` / ``seq_only`` as in :func:`prefix_counts`."""
    ok = slots.items >= 0
    if before is not None:
        ok = ok & (torch.arange(ok.shape[1], device=ok.device)[None, :] < before[:, None])
    same = (slots.items[:, None, :] == items[:, :, None]) & ok[:, None, :]  # (R, X, J)
    seq = slots.seq[:, None, :]
    ctx = torch.zeros_like(same) if seq_only else same & ~seq
    return torch.stack([(same & seq).sum(-1), ctx.sum(-1)], dim=-1).float()


def column_counts(slots: PromptSlots, n_cols: int, before: torch.Tensor | None = None,
                  seq_only: bool = False) -> torch.Tensor:
    """(R, n_cols, 2) occurrences of every column id 0..n_cols-1 in each row's prompt, where
    ``slots.items`` already holds column ids (the item ids for a whole-catalogue softmax, or
    the batch's distinct-item index); the same counts as :func:`item_counts` with
    ``items = arange(n_cols)``, by scatter instead of a (R, n_cols, J) comparison."""
    ok = slots.items >= 0
    if before is not None:
        ok = ok & (torch.arange(ok.shape[1], device=ok.device)[None, :] < before[:, None])
    out = torch.zeros(ok.shape[0], 2, n_cols, device=ok.device)
    idx = slots.items.clamp(min=0)
    out[:, 0].scatter_add_(1, idx, (ok & slots.seq).float())
    if not seq_only:
        out[:, 1].scatter_add_(1, idx, (ok & ~slots.seq).float())
    return out.transpose(1, 2)


def prefix_bias(gates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(R, C) logit bias from gates (R, 4) and :func:`prefix_counts` (R, 2, C)."""
    return (gates[:, :2, None] * counts.log1p()).sum(1)


def item_bias(gates: torch.Tensor, counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """(R, X) bias on the cosine scale from gates (R, 4) and :func:`item_counts` (R, X, 2)."""
    return temperature * (gates[:, None, 2:] * counts.log1p()).sum(-1)
