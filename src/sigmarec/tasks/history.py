"""What a household's history before the cut says without a model: its most bought items.

Shared by the prompt's "bought most often" section and the copy prior's purchase-count channel
(:mod:`sigmarec.tasks.channels.counts`); both read only the given history, so they are as
leak-free as the history itself.
"""

from __future__ import annotations

import numpy as np


def purchase_counts(history: np.ndarray, n: int, min_count: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` items bought most often in ``history`` (at least ``min_count`` times) and their
    counts, most bought first; ties go to the item bought most recently. Reads only the given
    history, so it is as leak-free as the history itself."""
    h = np.asarray(history, dtype=np.int64)
    if n <= 0 or not len(h):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    items, first_rev, counts = np.unique(h[::-1], return_index=True, return_counts=True)
    keep = counts >= min_count
    items, first_rev, counts = items[keep], first_rev[keep], counts[keep]
    # lexsort: last key is primary -> count descending, then most recent (smallest reversed idx).
    order = np.lexsort((first_rev, -counts))[:n]
    return items[order].astype(np.int64), counts[order].astype(np.int64)


def most_bought(history: np.ndarray, n: int, min_count: int = 2) -> np.ndarray:
    """The items of the "bought most often" section: :func:`purchase_counts` without counts."""
    return purchase_counts(history, n, min_count)[0]
