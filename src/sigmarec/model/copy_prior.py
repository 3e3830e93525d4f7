"""The SIGMA model's copy prior (see :mod:`sigmarec.model.repeat`): the item table of a prompt
batch with each active channel's lists (:mod:`sigmarec.tasks.channels`), and the copy terms of
the prefix logits and item scores. A mixin of :class:`~sigmarec.model.sigma.SigmaModel`, which
holds the gates (``repeat``), the item codes and the config."""

from __future__ import annotations

import numpy as np
import torch

from sigmarec.model.batch import PromptBatch
from sigmarec.model.repeat import PromptSlots, item_bias, item_counts, prefix_bias, prefix_counts
from sigmarec.tasks.channels import active_channels


class CopyPrior:
    """The copy-prior methods of the SIGMA model."""

    def prompt_slots(self, prompt: PromptBatch) -> PromptSlots:
        """The copy prior's item table of a prompt batch, with the lists of every channel the
        model reads (``model.<flag>`` of :data:`~sigmarec.tasks.channels.CHANNELS`), in gate
        order, as the channel scales them; a model cannot score without its channels' lists."""
        lists = {ch.name: ch.slot_lists(prompt.lists, self) for ch in active_channels(self.cfg)}
        return PromptSlots.from_batch(prompt.input_ids, prompt.attention_mask, prompt.item_ids,
                                      prompt.sequence_mask, self.item_token_id, lists)

    def set_item_rarity(self, train_counts: np.ndarray) -> None:
        """The rarity channel's values from each item's training purchase count: the share of
        the catalogue bought at least as often (about 0 for the best-seller, 1 for an item
        never bought), the same popularity order a long-tail quantile cuts."""
        counts = np.asarray(train_counts, dtype=np.float64)
        if counts.shape != (self.n_items,):
            raise ValueError(f"train_counts must have shape ({self.n_items},), got "
                             f"{counts.shape}")
        order = np.sort(counts)
        at_least = len(counts) - np.searchsorted(order, counts, side="left")
        rarity = at_least / max(len(counts), 1)
        self.item_rarity.copy_(torch.as_tensor(rarity, dtype=torch.float32))

    def gate_task_ids(self, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's task rows for the gates; a model with per-task offsets cannot score
        without them."""
        if not self.cfg.task_gates:
            return None
        if task_ids is None:
            raise ValueError("this model offsets its copy gates per task (model.task_gates) but "
                             "the batch has no task_ids: build the examples with to_examples "
                             "from rows that carry their task")
        return task_ids

    def copy_bias(self, gates: torch.Tensor | None, slots: PromptSlots | None, level: int,
                  partial: torch.Tensor | None = None, before: torch.Tensor | None = None,
                  seq_only: bool = False) -> torch.Tensor | None:
        """The copy term of ``level``'s logits for rows of ``slots`` whose partial prefix is
        ``partial`` (R, level); None for a model without it."""
        if self.repeat is None or gates is None or slots is None:
            return None
        counts = prefix_counts(slots, self.item_codes, level, self.codebook_sizes[level],
                               partial, before, seq_only)
        return prefix_bias(gates, counts)

    def item_copy_bias(self, gates: torch.Tensor, slots: PromptSlots, items: torch.Tensor,
                       before: torch.Tensor | None = None, seq_only: bool = False
                       ) -> torch.Tensor:
        """(R, X) copy term of the cosine scores of ``items`` (R, X) (-1 entries get 0)."""
        return item_bias(gates, item_counts(slots, items, before, seq_only),
                         self.cfg.temperature)

