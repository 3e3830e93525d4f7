"""The copy prior's novelty list: popular items of the categories a household never bought.

A Discover instruction asks for an item of a category (at ``discover_level``) that is new to the
household, judged on its whole history before the cut. Nothing in the prompt says which
categories those are: it shows 40 of a median 340 purchases, and the purchase-count channel
keeps the 200 most bought items, which miss about 12 of a household's 73 categories for half the
households. So the list is computed where the whole history is at hand (the tasks stage, the
serving runtime, the cold-start check), as the purchase counts are, and the model reads it as a
gated channel (``model.novelty``): the instruction decides whether it counts.

Values are the item's training purchase count over the catalogue's largest, in (0, 1]: what a
most-popular baseline filtered by the Discover rule would rank by. Only the catalogue and the
training period are read (``TaskResources.train_counts``), so the list is as leak-free as the
history it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sigmarec.tasks.resources import TaskResources


@dataclass(frozen=True)
class NoveltyLister:
    """Lists, for a history, the ``n`` most bought training items whose category is absent
    from it (see the module docstring)."""

    candidates: np.ndarray  # (C,) items with a category and a training purchase, best first
    codes: np.ndarray  # (C,) their category code
    values: np.ndarray  # (C,) their training count over the catalogue's largest, in (0, 1]
    item_codes: np.ndarray  # (n_items,) every item's category code, -1 = none
    n_codes: int
    n: int

    @classmethod
    def from_resources(cls, res: TaskResources, n: int) -> NoveltyLister:
        if res.depth == 0:
            raise ValueError("the novelty list needs category paths: the catalogue has none")
        if n < 1:
            raise ValueError(f"the novelty list needs n >= 1 items, got {n}")
        codes = np.asarray(res.level_codes[res.discover_level], dtype=np.int64)
        counts = np.asarray(res.train_counts, dtype=np.float64)
        ok = (codes >= 0) & (counts > 0)
        idx = np.flatnonzero(ok)
        # Most bought first; ties by item index, so the list is deterministic.
        order = idx[np.lexsort((idx, -counts[idx]))]
        top = counts[order[0]] if len(order) else 1.0
        return cls(candidates=order.astype(np.int64), codes=codes[order],
                   values=(counts[order] / top).astype(np.float64), item_codes=codes,
                   n_codes=int(codes.max(initial=-1)) + 1, n=int(n))

    def list(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items, values) for one household's whole history before the cut, best first."""
        h = np.asarray(history, dtype=np.int64)
        seen = np.zeros(self.n_codes + 1, dtype=bool)
        if len(h):
            known = h[(h >= 0) & (h < len(self.item_codes))]
            seen[self.item_codes[known]] = True  # code -1 lands on the spare last slot
        keep = np.flatnonzero(~seen[self.codes])[: self.n]
        return self.candidates[keep].copy(), self.values[keep].copy()
