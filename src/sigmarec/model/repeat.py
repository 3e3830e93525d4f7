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
* with ``model.repeat_counts``, a third channel in both: the household's purchase count of each
  item over its whole history before the cut (``tasks.count_items`` most bought), which the
  prompt does not show: a median household bought ~340 items and the prompt names 40 of them,
  while the repurchase baseline reads them all. ``n_cnt(c)`` sums the counts of the items under
  code ``c`` (the history-frequency estimate of the prefix), ``m_cnt(i)`` is the item's count.

* with ``model.text_match``, a further channel in both: the catalogue items whose text the
  instruction's words match (:mod:`sigmarec.tasks.text_match`), each with its cosine times
  ``model.text_match_scale``; ``n_txt(c)`` sums them per code. It is how a Category or Query
  instruction reaches the scores: the LLM alone did not learn it at this budget.

* with ``model.repeat_rarity``, a further channel over the purchase-count channel's items, each
  valued by its rarity (the share of the catalogue bought at least as often in training) times
  ``model.rarity_scale``: how a request for something niche can prefer the household's rare
  purchases (a long-tail request) where the count channel prefers its staples.

* with ``model.novelty``, a further channel in both: the most bought catalogue items of the
  categories the household never bought (:mod:`sigmarec.tasks.novelty`, from its whole history
  before the cut), each valued by its popularity (over the catalogue's best-seller) times
  ``model.novelty_scale``: how a Discover request reaches the scores, which every other
  channel pulls towards what the household already buys.

Each channel after sequence and context is a class of the registry
:data:`sigmarec.tasks.channels.CHANNELS` (where its lists come from, how the model scales them);
the tables and gates below follow the registry's order.

The four gates (two more per extra channel) are ``softplus`` of a linear map of the hidden
state at the end of the prompt (the token before the first label token): the instruction can
switch copying off (a task that asks for something new) or up (buy again). The linear map
starts at zero and the bias at ``repeat_init``: the copy term is on from the first step, and
learned from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sigmarec.tasks.channels import CHANNELS, active_channels

N_GATES = 4  # prefix-seq, prefix-ctx, item-seq, item-ctx (without further channels)


def n_gates(model_cfg: Any) -> int:
    """Gates per row for a model with ``model_cfg``: one per channel (sequence, context, then
    each active channel of :data:`~sigmarec.tasks.channels.CHANNELS`) for the prefix logits and
    one per channel for the item scores."""
    return 2 * (2 + len(active_channels(model_cfg)))


def gate_channels(model_cfg: Any) -> list[str]:
    """The channels a model's gates read, in gate order (what a checkpoint records)."""
    return ["sequence", "context", *(c.name for c in active_channels(model_cfg))]


@dataclass
class PromptSlots:
    """The item placeholders of a batch of prompts as a table: ``items`` (R, J) item ids in
    prompt order (-1 = padding), ``seq`` (R, J) True for the purchase sequence, False for the
    context section, and ``lists`` the further channels' (items (R, W) with -1 = padding,
    values (R, W) as the model scales them) by channel name, in gate order."""

    items: torch.Tensor
    seq: torch.Tensor
    lists: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def weighted(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The channels after sequence and context, in gate order: (items, values) tables."""
        return list(self.lists.values())

    def listed_items(self) -> torch.Tensor:
        """(R, J + ...) every item the table names (placeholders, then each channel's items
        that the decoder merges, in gate order)."""
        named = [items for name, (items, _) in self.lists.items() if CHANNELS[name].merged]
        return torch.cat([self.items, *named], dim=1)

    @property
    def channels(self) -> int:
        return 2 + len(self.lists)

    def with_items(self, items: torch.Tensor) -> PromptSlots:
        """The same table with another placeholder-item table (e.g. column ids)."""
        return PromptSlots(items, self.seq, dict(self.lists))

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   item_ids: torch.Tensor, sequence_mask: torch.Tensor | None,
                   item_token_id: int,
                   lists: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
                   ) -> PromptSlots:
        """The table of collated prompts; ``lists`` the channels' (items, values) (B, W) by
        name, in gate order, values already scaled."""
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
        weighted = {}
        for name, (it, val) in (lists or {}).items():
            key = CHANNELS[name].key if name in CHANNELS else name
            if val is None or val.shape != it.shape or it.shape[0] != b:
                raise ValueError(f"{key}_items {tuple(it.shape)} and {key}_values "
                                 f"{None if val is None else tuple(val.shape)}"
                                 f" must both be (B={b}, H)")
            weighted[name] = (it.to(items.device).long(), val.to(items.device).float())
        return cls(items, seq, weighted)

    def rows(self, idx: torch.Tensor) -> PromptSlots:
        return PromptSlots(self.items[idx], self.seq[idx],
                           {k: (i[idx], v[idx]) for k, (i, v) in self.lists.items()})

    def ranks(self) -> torch.Tensor:
        """(N,) rank of each placeholder in its row, in row-major order (matches item_ids)."""
        j = torch.arange(self.items.shape[1], device=self.items.device)
        return j.expand_as(self.items)[self.items >= 0]


class RepeatGate(nn.Module):
    """hidden -> the softplus gates, two per channel (see the module docstring).

    With ``n_tasks`` (``model.task_gates``), a learned offset per instruction task is added
    before the softplus: the prompt's last hidden state barely tells one instruction from
    another (docs/experiments.md, round 10), so without it every task reads the channels with
    the same weights. Offsets start at zero; ``task_ids`` -1 (a dense history position, which
    answers no instruction) adds none."""

    def __init__(self, hidden: int, init: float, gates: int = N_GATES, n_tasks: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, gates)
        self.task_bias = nn.Embedding(n_tasks, gates) if n_tasks else None
        with torch.no_grad():
            self.proj.weight.zero_()
            # softplus^-1(init): the gates start at ``init``.
            self.proj.bias.fill_(math.log(math.expm1(init)) if init > 0 else -20.0)
            if self.task_bias is not None:
                self.task_bias.weight.zero_()

    def forward(self, h: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        z = self.proj(h.float())
        if self.task_bias is not None and task_ids is not None:
            ids = task_ids.to(z.device).long().view(-1)
            known = (ids >= 0)[:, None]
            z = z + torch.where(known, self.task_bias(ids.clamp(min=0)), 0.0).view_as(z)
        return F.softplus(z)


def prefix_counts(slots: PromptSlots, item_codes: torch.Tensor, level: int, n_codes: int,
                  partial: torch.Tensor | None = None, before: torch.Tensor | None = None,
                  seq_only: bool = False) -> torch.Tensor:
    """(R, C, n_codes) prompt items per code of ``level`` (sequence, context[, the summed
    purchase counts]), counting only items whose first ``level`` codes equal ``partial``
    (R, level) and, with ``before`` (R,), only placeholders of rank < before (the items that
    precede a history position). ``seq_only`` leaves every channel but the sequence at 0."""
    ok = slots.items >= 0
    codes = item_codes[slots.items.clamp(min=0)]  # (R, J, L)
    if level:
        ok = ok & (codes[:, :, :level] == partial[:, None, :level]).all(-1)
    if before is not None:
        ok = ok & (torch.arange(ok.shape[1], device=ok.device)[None, :] < before[:, None])
    seq = slots.seq
    out = torch.zeros(ok.shape[0], slots.channels, n_codes, device=ok.device)
    code = codes[:, :, level]
    out[:, 0].scatter_add_(1, code, (ok & seq).float())
    if not seq_only:
        out[:, 1].scatter_add_(1, code, (ok & ~seq).float())
        for ch, (w_items, w_values) in enumerate(slots.weighted(), start=2):
            c_ok = w_items >= 0
            c_codes = item_codes[w_items.clamp(min=0)]
            if level:
                c_ok = c_ok & (c_codes[:, :, :level] == partial[:, None, :level]).all(-1)
            out[:, ch].scatter_add_(1, c_codes[:, :, level], torch.where(c_ok, w_values, 0.0))
    return out


def item_counts(slots: PromptSlots, items: torch.Tensor, before: torch.Tensor | None = None,
                seq_only: bool = False) -> torch.Tensor:
    """(R, X, C) occurrences of each of ``items`` (R, X) in its row's prompt (sequence,
    context[, its purchase count]); ``before`` / ``seq_only`` as in :func:`prefix_counts`."""
    ok = slots.items >= 0
    if before is not None:
        ok = ok & (torch.arange(ok.shape[1], device=ok.device)[None, :] < before[:, None])
    same = (slots.items[:, None, :] == items[:, :, None]) & ok[:, None, :]  # (R, X, J)
    seq = slots.seq[:, None, :]
    ctx = torch.zeros_like(same) if seq_only else same & ~seq
    chans = [(same & seq).sum(-1).float(), ctx.sum(-1).float()]
    for w_items, w_values in slots.weighted():
        hit = (w_items[:, None, :] == items[:, :, None]) & (w_items >= 0)[:, None, :]  # (R,X,H)
        cnt = (hit * w_values[:, None, :]).sum(-1)
        chans.append(torch.zeros_like(cnt) if seq_only else cnt)
    return torch.stack(chans, dim=-1)


def column_counts(slots: PromptSlots, n_cols: int, before: torch.Tensor | None = None,
                  seq_only: bool = False) -> torch.Tensor:
    """(R, n_cols, C) occurrences of every column id 0..n_cols-1 in each row's prompt, where
    ``slots.items`` already holds column ids (the item ids for a whole-catalogue softmax, or
    the batch's distinct-item index); the same counts as :func:`item_counts` with
    ``items = arange(n_cols)``, by scatter instead of a (R, n_cols, J) comparison. The
    purchase-count and text-match channels read their items as column ids too: they are only
    filled when the columns are the catalogue's item ids (or with ``seq_only``, when they are
    0)."""
    ok = slots.items >= 0
    if before is not None:
        ok = ok & (torch.arange(ok.shape[1], device=ok.device)[None, :] < before[:, None])
    out = torch.zeros(ok.shape[0], slots.channels, n_cols, device=ok.device)
    idx = slots.items.clamp(min=0)
    out[:, 0].scatter_add_(1, idx, (ok & slots.seq).float())
    if not seq_only:
        out[:, 1].scatter_add_(1, idx, (ok & ~slots.seq).float())
        for ch, (w_items, w_values) in enumerate(slots.weighted(), start=2):
            out[:, ch].scatter_add_(1, w_items.clamp(min=0),
                                    torch.where(w_items >= 0, w_values, 0.0))
    return out.transpose(1, 2)


def _split(gates: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    if gates.shape[1] != 2 * channels:
        flags = " / ".join(f"model.{c.flag}" for c in CHANNELS.values())
        raise ValueError(f"{gates.shape[1]} copy gates for {channels} count channels: the "
                         f"model's channels ({flags}) and the prompts' channel lists disagree")
    return gates[:, :channels], gates[:, channels:]


def prefix_bias(gates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(R, n) logit bias from gates (R, 2C) and :func:`prefix_counts` (R, C, n)."""
    return (_split(gates, counts.shape[1])[0][:, :, None] * counts.log1p()).sum(1)


def item_bias(gates: torch.Tensor, counts: torch.Tensor, temperature: float) -> torch.Tensor:
    """(R, X) bias on the cosine scale from gates (R, 2C) and :func:`item_counts` (R, X, C)."""
    return temperature * (_split(gates, counts.shape[-1])[1][:, None, :] * counts.log1p()
                          ).sum(-1)
