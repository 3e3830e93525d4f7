"""Does an item-embedding space carry collaborative relations without losing semantics?

Collaborative measure: pairs of items bought together in the **validation** period (never used for
fitting), and Recall@K of finding an item's partner among its K nearest neighbours (cosine, the
item itself excluded). Semantic measure: the same Recall@K over random pairs of items that share a
category, so a space that collapses categories scores low.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import category_at
from sigmarec.grounding.views import _group_pairs, co_pairs


def neighbour_recall(emb: np.ndarray, pairs: pd.DataFrame, ks: Sequence[int] = (10, 50),
                     batch: int = 1024) -> dict[str, float]:
    """Recall@K of ``b`` among the K nearest neighbours of ``a`` and vice versa (both directions
    count), cosine similarity, the query item excluded. Items tied with the partner (identical
    texts give identical text embeddings) count half, the expected rank under random tie-breaking,
    so a space is not rewarded for collapsing items together."""
    if pairs.empty:
        return {f"Recall@{k}": float("nan") for k in ks}
    x = torch.nn.functional.normalize(torch.as_tensor(emb, dtype=torch.float32), dim=1)
    q = np.concatenate([pairs["a"].to_numpy(), pairs["b"].to_numpy()])
    t = np.concatenate([pairs["b"].to_numpy(), pairs["a"].to_numpy()])
    kmax = max(ks)
    ranks = np.empty(len(q), dtype=np.float64)
    for s in range(0, len(q), batch):
        qi = torch.as_tensor(q[s : s + batch])
        sims = x[qi] @ x.T
        sims[torch.arange(len(qi)), qi] = -torch.inf  # never find yourself
        target = sims[torch.arange(len(qi)), torch.as_tensor(t[s : s + batch])]
        higher = (sims > target[:, None]).sum(dim=1)
        ties = (sims == target[:, None]).sum(dim=1) - 1  # the partner itself
        ranks[s : s + batch] = (higher + 0.5 * ties).numpy()
    return {f"Recall@{k}": float((ranks < k).mean()) for k in ks if k <= kmax}


def benchmark_pairs(data: ProcessedData, n_pairs: int = 5000, seed: int = 0,
                    category_level: int = 1) -> dict[str, pd.DataFrame]:
    """The validation-period co-interaction pairs and same-category pairs the benchmark scores."""
    valid = data.interactions[data.interactions["split"] == "valid"]
    rng = np.random.default_rng(seed)
    co = co_pairs(valid, data.n_items, budget=n_pairs, min_count=2, per_item=5)
    if co.empty and not valid.empty:
        co = next_item_pairs(data, valid, n_pairs)
    cats = data.items["category_path"].map(lambda p: category_at(p, category_level))
    same_cat = _group_pairs(cats, n_pairs, rng, per_item=1)
    return {"collaborative": co, "semantic": same_cat}


def next_item_pairs(data: ProcessedData, valid: pd.DataFrame, n_pairs: int) -> pd.DataFrame:
    """Leave-one-out data has one validation item per user, so no validation basket pairs two
    items: the collaborative pairs are then (the user's last training item, the validation item),
    the next-item relation the models are asked for. Pairs seen most often come first."""
    tr = data.train()
    last = tr.sort_values(["user_idx", "timestamp"], kind="stable").groupby("user_idx").tail(1)
    both = valid[["user_idx", "item_idx"]].merge(
        last[["user_idx", "item_idx"]], on="user_idx", suffixes=("_v", "_t"))
    ab = np.sort(both[["item_idx_t", "item_idx_v"]].to_numpy(np.int64), axis=1)
    ab = ab[ab[:, 0] != ab[:, 1]]
    df = pd.DataFrame({"a": ab[:, 0], "b": ab[:, 1]})
    df = df.value_counts(["a", "b"]).rename("score").reset_index()
    df["score"] = df["score"].astype(np.float64)
    return df.sort_values(["score", "a", "b"], ascending=[False, True, True],
                          kind="stable").head(n_pairs).reset_index(drop=True)


def grounding_table(spaces: dict[str, np.ndarray], pairs: dict[str, pd.DataFrame],
                    ks: Sequence[int] = (10, 50)) -> pd.DataFrame:
    rows = []
    for name, emb in spaces.items():
        row: dict[str, float | str] = {"embedding": name, "dim": emb.shape[1]}
        for measure, p in pairs.items():
            for metric, v in neighbour_recall(emb, p, ks).items():
                row[f"{measure} {metric}"] = round(v, 4)
        rows.append(row)
    return pd.DataFrame(rows)
