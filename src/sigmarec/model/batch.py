"""The SFT batch format: already-tokenised examples -> padded tensors, labels and hard negatives.

One example is a rendered chat prompt whose history items appear as ``<prefix> <|item|>``: the
prefix token(s) of the item followed by ONE placeholder token that the model replaces with the
item's soft token ``ṽ``. The collator appends the label tokens, the target's prefix token(s) then
``<q>``, and draws the InfoNCE hard negatives (other items with the target's prefix).

Padding is on the left, so the label tokens sit in the same columns of every row (the model
reads them at fixed offsets from the end) and a prompt-only batch ends in the same column, which
is what continuing every row over a shared KV cache needs. Position ids are derived from the
attention mask, so left padding does not shift the real tokens' positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from sigmarec.tasks.channels import CHANNELS, Channel, collated_channels
from sigmarec.tasks.config import TASK_NAMES
from sigmarec.tokenization.hybrid import flat_to_codes

# The instruction tasks a copy gate can be offset for (``model.task_gates``), in a fixed order:
# a saved model's offsets are rows of this table. "Align" is the catalogue-alignment samples.
GATE_TASKS: tuple[str, ...] = (*TASK_NAMES, "Align")


def gate_task_id(task: str) -> int:
    """The row of ``task`` in :data:`GATE_TASKS` (a ValueError naming the known ones)."""
    try:
        return GATE_TASKS.index(str(task))
    except ValueError:
        raise ValueError(f"unknown task {task!r} for the copy gates; known: "
                         f"{', '.join(GATE_TASKS)}") from None


@dataclass(frozen=True)
class SFTExample:
    """One rendered SFT sample (see the module docstring)."""

    input_ids: list[int]
    item_ids: list[int]
    target_item: int
    target_prefix: int
    # Leading placeholders that are context (the "bought most often" section), not the
    # purchase sequence: the dense next-item losses skip them.
    n_context: int = 0
    # Every item admitted under the same instruction in the target basket (the target among
    # them): never negatives, and with multi-positive NTP the label is their prefix mix.
    positives: tuple[int, ...] = ()
    # The copy prior's channel lists by channel name (sigmarec.tasks.channels): (items, values),
    # e.g. "counts" the household's purchase counts before the cut (its most bought items, not
    # shown in the prompt), "text_match" the catalogue items the instruction's words match and
    # their cosine, "novelty" popular items of the categories the household never bought.
    lists: Mapping[str, tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)
    # The instruction's task as a row of GATE_TASKS (-1 = none): the copy gates' per-task
    # offset (``model.task_gates``).
    task_id: int = -1

    def channel(self, name: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The (items, values) of channel ``name`` (empty when the example carries none)."""
        got = self.lists.get(name)
        return (tuple(got[0]), tuple(got[1])) if got is not None else ((), ())

    def with_lists(self, **lists: tuple[Sequence[int], Sequence[float]]) -> SFTExample:
        """A copy with the given channels' (items, values) set, by name; the others kept."""
        return replace(self, lists={**self.lists, **{k: (tuple(i), tuple(v))
                                                     for k, (i, v) in lists.items()}})


_REQUIRED = object()


def _field(example: Any, name: str, default: Any = _REQUIRED) -> Any:
    # Examples may be SFTExample objects or plain dicts (e.g. rows read back from parquet).
    if isinstance(example, Mapping):
        return example[name] if default is _REQUIRED else example.get(name, default)
    return getattr(example, name) if default is _REQUIRED else getattr(example, name, default)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple_of: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded on the left to one length (rounded up
    to ``multiple_of``): the last column is a real token in every row."""
    length = max(len(r) for r in rows)
    if multiple_of:
        length = (length + multiple_of - 1) // multiple_of * multiple_of
    input_ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            input_ids[i, length - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, length - len(r):] = 1
    return input_ids, mask


class HardNegativeSampler:
    """Draws, for each target, up to ``k`` distinct other items that share its flat prefix.

    Without replacement: a duplicated negative would count twice in the softmax denominator.
    Rows whose prefix holds fewer than ``k + 1`` items are padded with -1 (masked by the loss).
    """

    def __init__(self, item_prefix: np.ndarray, k: int) -> None:
        self.k = int(k)
        prefix = np.asarray(item_prefix, dtype=np.int64)
        self.item_prefix = prefix
        self.order = np.argsort(prefix, kind="stable")
        n_prefixes = int(prefix.max()) + 1 if len(prefix) else 0
        sorted_prefix = prefix[self.order]
        self.starts = np.searchsorted(sorted_prefix, np.arange(n_prefixes), side="left")
        self.ends = np.searchsorted(sorted_prefix, np.arange(n_prefixes), side="right")
        # Rank of each item inside its prefix group, to skip the target in O(1).
        self.rank = np.empty(len(prefix), dtype=np.int64)
        self.rank[self.order] = np.arange(len(prefix)) - self.starts[sorted_prefix]

    def sample(self, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        targets = np.asarray(targets, dtype=np.int64)
        out = np.full((len(targets), self.k), -1, dtype=np.int64)
        if self.k == 0:
            return out
        for row, t in enumerate(targets):
            p = self.item_prefix[t]
            start, end = self.starts[p], self.ends[p]
            others = end - start - 1
            if others <= 0:
                continue
            if others <= self.k:
                picks = np.arange(others)
            else:
                picks = rng.choice(others, size=self.k, replace=False)
            # Indices >= the target's rank shift by one: the target itself is never drawn.
            picks = picks + (picks >= self.rank[t])
            out[row, : len(picks)] = self.order[start + picks]
        return out


def _pad_weighted(items: list[list[int]], values: list[list[float]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (item, value) lists as (B, W) tensors, items -1 and values 0 padded (W >= 1)."""
    width = max(1, max(len(c) for c in items))
    out_i = torch.full((len(items), width), -1, dtype=torch.long)
    out_v = torch.zeros((len(items), width), dtype=torch.float32)
    for r, (ci, cv) in enumerate(zip(items, values, strict=True)):
        out_i[r, :len(ci)] = torch.tensor(ci, dtype=torch.long)
        out_v[r, :len(cv)] = torch.tensor(cv, dtype=torch.float32)
    return out_i, out_v


class SigmaCollator:
    """Pads examples (left), appends ``<prefix tokens><q>`` labels and samples hard negatives.

    Build it with :meth:`sigmarec.model.sigma.SigmaModel.collator`, which fills in the token ids.
    Output keys: ``input_ids``, ``attention_mask`` (B, T), ``item_ids`` (N,) the item of every
    placeholder in row-major order, ``sequence_mask`` (N,) whether that placeholder belongs to
    the purchase sequence (not the context section), and with labels ``target_item``,
    ``target_prefix`` (B,), ``hard_negatives`` (B, k) with -1 for "none" and ``positives``
    (B, P) every positive of the row (the target first), -1 padded. For every copy-prior
    channel with lists of its own (:func:`~sigmarec.tasks.channels.collated_channels`),
    ``<key>_items`` (B, W) (-1 padded, W >= 1) and ``<key>_values`` (B, W) (0 padded), e.g.
    ``count_items`` / ``count_values`` the purchase counts; :meth:`PromptBatch.from_collated`
    reads them back by channel name. ``task_ids`` (B,) the rows of :data:`GATE_TASKS`
    (-1 = none).
    """

    def __init__(
        self,
        *,
        pad_id: int,
        item_token_id: int,
        query_token_id: int,
        level_token_ids: Sequence[Sequence[int]],
        item_prefix: np.ndarray,
        hard_negatives: int = 0,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        self.pad_id = int(pad_id)
        self.item_token_id = int(item_token_id)
        self.query_token_id = int(query_token_id)
        self.level_token_ids = [np.asarray(ids, dtype=np.int64) for ids in level_token_ids]
        self.codebook_sizes = [len(ids) for ids in self.level_token_ids]
        self.n_prefixes = int(np.prod(self.codebook_sizes))
        self.item_prefix = np.asarray(item_prefix, dtype=np.int64)
        self.sampler = HardNegativeSampler(self.item_prefix, hard_negatives)
        self.pad_to_multiple_of = pad_to_multiple_of

    @property
    def n_label_tokens(self) -> int:
        return len(self.codebook_sizes) + 1

    def label_tokens(self, target_prefix: int) -> list[int]:
        codes = flat_to_codes(np.array([target_prefix]), self.codebook_sizes)[0]
        return [int(self.level_token_ids[lv][c]) for lv, c in enumerate(codes)] + [
            self.query_token_id
        ]

    def _weighted(self, ex: Any, i: int, channel: Channel) -> tuple[list[int], list[float]]:
        """Example ``i``'s lists of ``channel``, checked: an SFTExample's ``lists`` entry, or a
        plain row's ``<key>_items`` / ``<key>_values`` fields."""
        name, (items_col, values_col) = channel.name, channel.columns
        lists = _field(ex, "lists", None)
        if lists is not None:
            got_items, got_values = lists.get(name, ((), ()))
        else:
            got_items, got_values = _field(ex, items_col, ()), _field(ex, values_col, ())
        items = [int(x) for x in (got_items if got_items is not None else ())]
        values = [float(x) for x in (got_values if got_values is not None else ())]
        if len(items) != len(values):
            raise ValueError(f"example {i}: {len(items)} {items_col} but {len(values)} "
                             f"{values_col}")
        if items and not (min(items) >= 0 and max(items) < len(self.item_prefix)):
            raise ValueError(f"example {i}: {items_col} outside 0..{len(self.item_prefix) - 1}")
        if not all(channel.valid(v) for v in values):
            raise ValueError(f"example {i}: {values_col} must be {channel.what}")
        return items, values

    def __call__(
        self,
        examples: Sequence[Any],
        *,
        with_labels: bool = True,
        rng: np.random.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        rows: list[list[int]] = []
        items: list[int] = []
        seq: list[bool] = []
        targets, prefixes, positives = [], [], []
        channels = collated_channels()
        w_items: dict[str, list[list[int]]] = {c.name: [] for c in channels}
        w_values: dict[str, list[list[float]]] = {c.name: [] for c in channels}
        task_ids: list[int] = []
        for i, ex in enumerate(examples):
            ids = [int(t) for t in _field(ex, "input_ids")]
            ex_items = [int(t) for t in _field(ex, "item_ids")]
            n_slots = sum(t == self.item_token_id for t in ids)
            if n_slots != len(ex_items):
                raise ValueError(
                    f"example {i}: {n_slots} placeholder tokens but {len(ex_items)} item_ids"
                )
            if ex_items and not (min(ex_items) >= 0 and max(ex_items) < len(self.item_prefix)):
                raise ValueError(f"example {i}: item_ids outside 0..{len(self.item_prefix) - 1}")
            if with_labels:
                t, p = int(_field(ex, "target_item")), int(_field(ex, "target_prefix"))
                if not 0 <= t < len(self.item_prefix):
                    raise ValueError(f"example {i}: target_item {t} is not a known item")
                if p != self.item_prefix[t]:
                    # The NTP label and the hard negatives must agree on the target's prefix.
                    raise ValueError(
                        f"example {i}: target_prefix {p} but item {t} has prefix "
                        f"{self.item_prefix[t]}"
                    )
                ids = ids + self.label_tokens(p)
                targets.append(t)
                prefixes.append(p)
                extra = _field(ex, "positives", ())
                others = [int(x) for x in (extra if extra is not None else ()) if int(x) != t]
                n_items = len(self.item_prefix)
                if others and not (min(others) >= 0 and max(others) < n_items):
                    raise ValueError(f"example {i}: positives outside 0..{n_items - 1}")
                positives.append([t, *dict.fromkeys(others)])
            n_ctx = int(_field(ex, "n_context", 0) or 0)
            if not 0 <= n_ctx <= len(ex_items):
                raise ValueError(f"example {i}: n_context {n_ctx} outside 0..{len(ex_items)}")
            for channel in channels:
                wi, wv = self._weighted(ex, i, channel)
                w_items[channel.name].append(wi)
                w_values[channel.name].append(wv)
            tid = int(_field(ex, "task_id", -1))
            if not -1 <= tid < len(GATE_TASKS):
                raise ValueError(f"example {i}: task_id {tid} outside -1..{len(GATE_TASKS) - 1}")
            task_ids.append(tid)
            rows.append(ids)
            items.extend(ex_items)
            seq.extend([False] * n_ctx + [True] * (len(ex_items) - n_ctx))
        input_ids, mask = left_pad(rows, self.pad_id, self.pad_to_multiple_of)
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "item_ids": torch.tensor(items, dtype=torch.long),
            "sequence_mask": torch.tensor(seq, dtype=torch.bool),
        }
        for channel in channels:
            items_col, values_col = channel.columns
            batch[items_col], batch[values_col] = _pad_weighted(w_items[channel.name],
                                                                w_values[channel.name])
        batch["task_ids"] = torch.tensor(task_ids, dtype=torch.long)
        if with_labels:
            tgt = np.asarray(targets, dtype=np.int64)
            rng = rng if rng is not None else np.random.default_rng(0)
            batch["target_item"] = torch.from_numpy(tgt)
            batch["target_prefix"] = torch.tensor(prefixes, dtype=torch.long)
            hard = self.sampler.sample(tgt, rng)
            width = max(len(p) for p in positives)
            pos = np.full((len(positives), width), -1, dtype=np.int64)
            for r, p in enumerate(positives):
                pos[r, : len(p)] = p
            # A positive drawn as a hard negative is no negative: drop it.
            hard[(hard[:, :, None] == pos[:, None, :]).any(-1)] = -1
            batch["hard_negatives"] = torch.from_numpy(hard)
            batch["positives"] = torch.from_numpy(pos)
        return batch


@dataclass
class PromptBatch:
    """The prompt part of a collated batch, as the model reads it: ``input_ids`` /
    ``attention_mask`` (B, T) left-padded, ``item_ids`` (N,) the item of every placeholder in
    row-major order, ``sequence_mask`` (N,) whether it belongs to the purchase sequence (None:
    all), ``lists`` the copy-prior channels' (items, values) (B, W) by channel name and
    ``task_ids`` (B,) the rows of :data:`GATE_TASKS` (None where the model does not read
    them)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    item_ids: torch.Tensor
    sequence_mask: torch.Tensor | None = None
    lists: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    task_ids: torch.Tensor | None = None

    @classmethod
    def from_collated(cls, batch: Mapping[str, Any]) -> PromptBatch:
        """A :class:`SigmaCollator` batch's prompt fields (labels, if any, are left out)."""
        lists = {}
        for channel in CHANNELS.values():
            items_col, values_col = channel.columns
            if channel.collated and batch.get(items_col) is not None:
                lists[channel.name] = (batch[items_col], batch.get(values_col))
        return cls(batch["input_ids"], batch["attention_mask"], batch["item_ids"],
                   batch.get("sequence_mask"), lists, batch.get("task_ids"))

    def to(self, device: torch.device | str) -> PromptBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device),
                       item_ids=self.item_ids.to(device), sequence_mask=move(self.sequence_mask),
                       lists={k: (move(i), move(v)) for k, (i, v) in self.lists.items()},
                       task_ids=move(self.task_ids))
