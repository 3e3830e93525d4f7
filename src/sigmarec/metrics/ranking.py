"""Accuracy of ranked lists against target sets (a basket can hold several targets).

For a ranked list R and target set T, at cut-off K:
  HR@K     = 1 if any target is in R[:K]
  Recall@K = |T ∩ R[:K]| / |T|
  NDCG@K   = sum_{i<K, R_i in T} 1/log2(i+2)  /  sum_{i<min(|T|,K)} 1/log2(i+2)
  MRR@K    = 1 / (rank of the first target in R[:K]), 0 if none
Values are returned per instance so callers can aggregate by task, by target kind, or by seed.
An item repeated within a list counts only at its first position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def top_n(scores: torch.Tensor | np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the ``n`` best items per row, best first (ties: lower index)."""
    t = torch.as_tensor(scores)
    n = min(n, t.shape[1])
    # Ties go to the lower index, so lists are reproducible across runs. A full stable sort of
    # every row gives that but costs most of a full-catalogue evaluation (22,363 rows of 12,101
    # on Amazon Beauty); topk then orders its n picks by (score, index), and only rows where a
    # tie straddles the cut (or a NaN) fall back to the stable sort.
    vals, idx = torch.topk(t, n, dim=1)
    order = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    redo = ((t >= vals[:, -1:]).sum(1) > n) | torch.isnan(vals).any(1)
    if redo.any():
        rows = redo.nonzero().squeeze(1)
        v, i = torch.sort(t[rows], dim=1, descending=True, stable=True)
        idx[rows], vals[rows] = i[:, :n], v[:, :n]
    return idx.numpy(), vals.numpy()


def hit_matrix(ranked: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean (n, N): ``ranked[i, j]`` is one of instance i's targets."""
    ranked = np.asarray(ranked)
    out = np.zeros(ranked.shape, dtype=bool)
    for i, t in enumerate(targets):
        if len(t):
            out[i] = np.isin(ranked[i], t)
    return out


def repeated_mask(ranked: np.ndarray) -> np.ndarray:
    """Boolean (n, N): ``ranked[i, j]`` already appeared earlier in row i.

    A list that repeats a target must not earn it twice (Recall or NDCG above 1), so accuracy
    counts only an item's first occurrence.
    """
    ranked = np.asarray(ranked)
    out = np.zeros(ranked.shape, dtype=bool)
    if ranked.ndim != 2 or ranked.shape[1] < 2:
        return out
    # A stable sort keeps equal items in list order, so each later copy follows its first one.
    order = np.argsort(ranked, axis=1, kind="stable")
    s = np.take_along_axis(ranked, order, axis=1)
    np.put_along_axis(out, order[:, 1:], s[:, 1:] == s[:, :-1], axis=1)
    return out


def accuracy_metrics(
    ranked: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-instance HR, Recall, NDCG and MRR at each K. Instances need >= 1 target."""
    ranked = np.asarray(ranked)
    if len(targets) != len(ranked):
        raise ValueError(f"{len(ranked)} ranked lists but {len(targets)} target sets")
    n_targets = np.array([len(set(np.asarray(t).tolist())) for t in targets], dtype=np.float64)
    if (n_targets == 0).any():
        raise ValueError("every instance needs at least one target")
    hits = hit_matrix(ranked, targets) & ~repeated_mask(ranked)
    width = ranked.shape[1] if ranked.ndim == 2 else 0
    discounts = 1.0 / np.log2(np.arange(2, max(width, max(ks)) + 2))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        if k > width:
            raise ValueError(f"cut-off K={k} exceeds the ranked list length {width}")
        h = hits[:, :k]
        any_hit = h.any(axis=1)
        out[f"HR@{k}"] = any_hit.astype(np.float64)
        out[f"Recall@{k}"] = h.sum(axis=1) / n_targets
        dcg = (h * discounts[:k]).sum(axis=1)
        ideal_len = np.minimum(n_targets, k).astype(int)
        idcg = np.cumsum(discounts[:k])[ideal_len - 1]
        out[f"NDCG@{k}"] = dcg / idcg
        first = np.where(any_hit, h.argmax(axis=1) + 1, np.inf)
        out[f"MRR@{k}"] = np.where(any_hit, 1.0 / first, 0.0)
    return out
