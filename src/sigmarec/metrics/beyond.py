"""Beyond-accuracy metrics: what a list looks like, whatever the targets were.

Accuracy alone rewards a model that recommends the same popular items or replays a user's
history; these metrics expose that. For a ranked list R of a user with history H, at cut-off K:
  Categories@K = number of distinct categories in R[:K]
  Entropy@K    = Shannon entropy, in bits, of the category distribution of R[:K]
                 (0 = one category, log2(K) = every item from a different one)
  LongTail@K   = share of R[:K] outside the head (the most popular training items that together
                 cover ``head_share`` of training interactions)
  NewToUser@K  = share of R[:K] not in H
  Coverage@K   = distinct items in R[:K] over all lists / catalogue size (one value per set of
                 lists, not per instance)
Items with no category all share the category "" (unknown).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sigmarec.data.schema import category_at
from sigmarec.metrics.ranking import hit_matrix


def category_codes(category_paths: Sequence[str | None], level: int) -> np.ndarray:
    """Per item, an integer code of its category at ``level`` (0 = top of the path).

    A missing path (None, or NaN as pandas stores it) maps to the unknown category "".
    """
    names = [category_at(p if isinstance(p, str) else None, level) for p in category_paths]
    codes, _ = pd.factorize(pd.Series(names, dtype=object))
    return codes.astype(np.int64)


def head_mask(train_counts: np.ndarray, head_share: float) -> np.ndarray:
    """Per item, True if it is in the head: the fewest most-popular items covering ``head_share``.

    Ties in popularity break by item index so the head is reproducible. Items never bought in
    training are always in the tail.
    """
    counts = np.asarray(train_counts, dtype=np.float64)
    mask = np.zeros(len(counts), dtype=bool)
    total = counts.sum()
    if total <= 0:
        return mask
    order = np.argsort(-counts, kind="stable")
    covered = np.cumsum(counts[order])
    n_head = int(np.searchsorted(covered, head_share * total - 1e-9 * total)) + 1
    mask[order[: min(n_head, len(counts))]] = True
    return mask & (counts > 0)


def _diversity(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct categories and entropy (bits) per row of a (n, K) array of category codes."""
    n, k = codes.shape
    if n == 0 or k == 0:
        return np.zeros(n), np.zeros(n)
    width = int(codes.max()) + 1
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    keys, counts = np.unique(rows * width + codes.ravel(), return_counts=True)
    row_of = keys // width
    p = counts / k
    distinct = np.bincount(row_of, minlength=n).astype(np.float64)
    entropy = np.bincount(row_of, weights=-p * np.log2(p), minlength=n)
    return distinct, np.maximum(entropy, 0.0)


def beyond_metrics(
    ranked: np.ndarray,
    ks: Sequence[int],
    item_category: np.ndarray,
    item_in_head: np.ndarray,
    histories: Sequence[np.ndarray],
) -> dict[str, np.ndarray]:
    """Per-instance Categories, Entropy, LongTail and NewToUser at each K (see module doc)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    width = ranked.shape[1] if ranked.ndim == 2 else 0
    if len(histories) != len(ranked):
        raise ValueError(f"{len(ranked)} ranked lists but {len(histories)} histories")
    if ranked.size and (ranked.min() < 0 or ranked.max() >= len(item_category)):
        raise ValueError(f"item ids must lie in [0, {len(item_category)})")
    seen = hit_matrix(ranked, histories)
    tail = ~np.asarray(item_in_head, dtype=bool)[ranked]
    cats = np.asarray(item_category, dtype=np.int64)[ranked]
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k > width:
            raise ValueError(f"cut-off K={k} exceeds the ranked list length {width}")
        distinct, entropy = _diversity(cats[:, :k])
        out[f"Categories@{k}"] = distinct
        out[f"Entropy@{k}"] = entropy
        out[f"LongTail@{k}"] = tail[:, :k].mean(axis=1)
        out[f"NewToUser@{k}"] = 1.0 - seen[:, :k].mean(axis=1)
    return out


def coverage(ranked: np.ndarray, ks: Sequence[int], n_items: int) -> dict[str, float]:
    """Catalogue coverage at each K over a whole set of lists (0 when there are none)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if n_items <= 0:
        raise ValueError("coverage needs a non-empty catalogue")
    return {
        f"Coverage@{k}": float(len(np.unique(ranked[:, :k])) / n_items) if len(ranked) else 0.0
        for k in ks
    }
