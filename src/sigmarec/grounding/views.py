"""Relevance-pair views for semantic grounding: each view is a pluggable pair miner.

Every miner reads the catalogue and ``ProcessedData.train()`` only, so no validation or test
interaction can shape the embedding space. A miner returns a frame of pairs ``(a, b, score)`` with
``a < b`` (item indices), at most ``budget`` rows, the strongest first. A view whose signal the
dataset lacks (no image embeddings, no baskets) returns an empty frame and says why in the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import category_at

log = logging.getLogger("sigmarec")

PAIR_COLUMNS = ["a", "b", "score"]


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"a": np.empty(0, np.int64), "b": np.empty(0, np.int64),
                         "score": np.empty(0, np.float64)})


def _top_pairs(mat: sp.spmatrix, budget: int, per_item: int) -> pd.DataFrame:
    """The ``budget`` best upper-triangle entries, at most ``per_item`` per row item, so a few
    hubs cannot take the whole budget."""
    coo = sp.triu(mat, k=1).tocoo()
    if coo.nnz == 0:
        return _empty()
    df = pd.DataFrame({"a": coo.row.astype(np.int64), "b": coo.col.astype(np.int64),
                       "score": coo.data.astype(np.float64)})
    df = df.sort_values("score", ascending=False, kind="stable")
    df = df[df.groupby("a").cumcount() < per_item]
    return df.head(budget).reset_index(drop=True)


def co_interaction(data: ProcessedData, budget: int, min_count: int = 3, window: int = 1,
                   per_item: int = 20, shrink: float = 5.0) -> pd.DataFrame:
    """Items bought in the same basket, or within ``window`` baskets of each other by the same
    user, scored by positive PMI so ubiquitous items (milk, bananas) do not dominate. PMI favours
    rare pairs seen by chance, so it is shrunk by ``count / (count + shrink)``."""
    return co_pairs(data.train(), data.n_items, budget, min_count, window, per_item, shrink)


def co_pairs(tr: pd.DataFrame, n_items: int, budget: int, min_count: int = 3, window: int = 1,
             per_item: int = 20, shrink: float = 5.0) -> pd.DataFrame:
    """Co-interaction pairs of the given interactions (see ``co_interaction``)."""
    if tr.empty:
        return _empty()
    # A "context" is a user's basket merged with the next ``window - 1`` baskets.
    ctx_key = tr["user_idx"].to_numpy(np.int64) * 1_000_000 + tr["basket"].to_numpy(np.int64)
    rows, cols = [], []
    for shift in range(window):
        rows.append(ctx_key + shift)
        cols.append(tr["item_idx"].to_numpy(np.int64))
    ctx, ctx_idx = np.unique(np.concatenate(rows), return_inverse=True)
    items = np.concatenate(cols)
    b = sp.csr_matrix((np.ones(len(items), np.float32), (ctx_idx, items)),
                      shape=(len(ctx), n_items))
    b.data[:] = 1.0
    b.sum_duplicates()
    b.data[:] = 1.0
    co = (b.T @ b).tocoo()
    n_ctx = float(len(ctx))
    freq = np.asarray(b.sum(axis=0)).ravel()
    keep = (co.row != co.col) & (co.data >= min_count)
    r, c, v = co.row[keep], co.col[keep], co.data[keep]
    pmi = np.log(v * n_ctx / (freq[r] * freq[c])) * (v / (v + shrink))
    pos = pmi > 0
    mat = sp.coo_matrix((pmi[pos], (r[pos], c[pos])), shape=(n_items, n_items))
    return _top_pairs(mat.tocsr(), budget, per_item)


def _group_pairs(keys: pd.Series, budget: int, rng: np.random.Generator,
                 per_item: int = 5) -> pd.DataFrame:
    """Random pairs of items sharing a key, spread evenly over groups (each item gets up to
    ``per_item`` partners), so large groups do not swallow the budget."""
    keys = keys.fillna("").astype(str)
    pairs: list[np.ndarray] = []
    for _, idx in keys[keys != ""].groupby(keys[keys != ""]).groups.items():
        members = np.asarray(idx, dtype=np.int64)
        if len(members) < 2:
            continue
        for _ in range(min(per_item, len(members) - 1)):
            partner = rng.permutation(members)
            p = np.stack([members, partner], axis=1)
            pairs.append(p[p[:, 0] != p[:, 1]])
    if not pairs:
        return _empty()
    p = np.concatenate(pairs)
    p = np.sort(p, axis=1)
    df = pd.DataFrame({"a": p[:, 0], "b": p[:, 1]}).drop_duplicates()
    df = df.sample(frac=1.0, random_state=int(rng.integers(2**31))).head(budget)
    df["score"] = 1.0
    return df.reset_index(drop=True)


def search(data: ProcessedData, budget: int, rng: np.random.Generator,
           level: int = -1) -> pd.DataFrame:
    """Items a shopper reaches with the same query: here, items sharing the most specific product
    type (the last category level), the closest signal to a query a catalogue without search
    logs has."""
    paths = data.items["category_path"].fillna("")
    keys = paths.map(lambda p: p.split(" > ")[level] if p else "")
    return _group_pairs(keys, budget, rng)


def knowledge(data: ProcessedData, budget: int, rng: np.random.Generator,
              attribute: str = "manufacturer", level: int = 1) -> pd.DataFrame:
    """World knowledge from catalogue structure: same maker (an attribute) within the same
    category (a brand family: one maker's cereals); falls back to the category hierarchy when
    the attribute is absent."""
    attrs = data.items["attributes"].fillna("{}").map(json.loads)
    maker = attrs.map(lambda a: str(a.get(attribute, "")) if a.get(attribute) else "")
    top = data.items["category_path"].map(lambda p: category_at(p, level))
    if (maker != "").mean() < 0.5:
        log.info("view knowledge: attribute %r mostly absent; using category level %d", attribute,
                 level + 1)
        keys = data.items["category_path"].map(lambda p: category_at(p, level + 1))
    else:
        keys = (maker + "|" + top).where(maker != "", "")
    return _group_pairs(keys, budget, rng)


def visual(data: ProcessedData, budget: int, neighbours: int = 5) -> pd.DataFrame:
    """Nearest neighbours in image-embedding space; absent when the catalogue has no images."""
    if "image_embedding" not in data.items.columns or data.items["image_embedding"].isna().all():
        log.info("view visual: the catalogue has no image_embedding column; view skipped")
        return _empty()
    import faiss

    x = np.stack(data.items["image_embedding"].to_numpy()).astype(np.float32)
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nn = index.search(x, neighbours + 1)
    a = np.repeat(np.arange(len(x)), neighbours + 1)
    df = pd.DataFrame({"a": a, "b": nn.ravel(), "score": sims.ravel()})
    df = df[(df["b"] >= 0) & (df["a"] != df["b"])]
    df[["a", "b"]] = np.sort(df[["a", "b"]].to_numpy(), axis=1)
    df = df.drop_duplicates(["a", "b"]).sort_values("score", ascending=False)
    return df.head(budget).reset_index(drop=True)


VIEWS: dict[str, Callable[..., pd.DataFrame]] = {
    "co_interaction": co_interaction,
    "search": search,
    "knowledge": knowledge,
    "visual": visual,
}


def examples(data: ProcessedData, pairs: pd.DataFrame, n: int = 5) -> list[tuple[str, str, float]]:
    """A few pairs with item text, for a person to judge whether a view makes sense."""
    text = data.items["text"].to_numpy()
    head = pairs.head(n)
    return [(str(text[a]), str(text[b]), float(s))
            for a, b, s in zip(head["a"], head["b"], head["score"], strict=True)]
