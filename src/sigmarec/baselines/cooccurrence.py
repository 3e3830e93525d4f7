"""Item-to-item co-occurrence ("people who bought X also bought Y"), fitted on training data only.

Two items co-occur when they are in the same basket, or - for interactions that are alone in their
basket, as in rating logs such as MovieLens - when they are at most ``window`` positions apart in a
user's sequence. Raw counts favour ubiquitous items (milk co-occurs with everything), so counts are
cosine-normalised: ``S[i, j] = C[i, j] / sqrt(n_i * n_j)`` with ``n_i`` the item's training count.
A history votes with its last ``history`` items, the most recent weighing most (``decay`` per step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from sigmarec.baselines.base import Recommender, evidence_then_popularity
from sigmarec.config import CooccurrenceConfig, SigmaConfig
from sigmarec.core.atomic import write_json
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError


def cooccurrence_counts(
    users: np.ndarray, items: np.ndarray, baskets: np.ndarray, n_items: int, window: int
) -> sp.csr_matrix:
    """Symmetric (n_items, n_items) co-occurrence counts with a zero diagonal.

    Rows must be sorted by (user, position). Same-basket pairs count once per basket; pairs of
    singleton-basket interactions count once per occurrence within ``window`` positions.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if len(items) == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float64)
    # A global basket id per (user, basket) so baskets of different users never merge.
    key = users * (int(np.max(baskets)) + 1) + np.asarray(baskets, dtype=np.int64)
    basket_id, basket_size = np.unique(key, return_inverse=True, return_counts=True)[1:]
    single = basket_size[basket_id] == 1

    multi = ~single
    incidence = sp.csr_matrix(
        (np.ones(int(multi.sum())), (basket_id[multi], items[multi])),
        shape=(len(basket_size), n_items),
    )
    incidence.data[:] = 1.0  # an item scanned twice in a basket still co-occurs once
    incidence.sum_duplicates()
    incidence.data = np.minimum(incidence.data, 1.0)
    counts = (incidence.T @ incidence).tocsr()

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for d in range(1, window + 1):
        a = np.arange(len(items) - d)
        b = a + d
        ok = (users[a] == users[b]) & single[a] & single[b] & (items[a] != items[b])
        rows += [items[a[ok]], items[b[ok]]]
        cols += [items[b[ok]], items[a[ok]]]
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
        counts = counts + sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n_items, n_items))
    counts = counts.tocsr()
    counts.setdiag(0)
    counts.eliminate_zeros()
    return counts


def cosine_normalise(counts: sp.csr_matrix, item_counts: np.ndarray) -> sp.csr_matrix:
    """``C[i, j] / sqrt(n_i n_j)``: pairs with a ubiquitous item need many more co-purchases."""
    inv = 1.0 / np.sqrt(np.maximum(np.asarray(item_counts, dtype=np.float64), 1.0))
    d = sp.diags(inv)
    return (d @ counts @ d).tocsr()


class Cooccurrence(Recommender):
    name: ClassVar[str] = "cooccurrence"

    def __init__(self, cfg: CooccurrenceConfig | None = None) -> None:
        self.cfg = cfg or CooccurrenceConfig()
        self.similarity: sp.csr_matrix | None = None
        self.popularity: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: SigmaConfig) -> Cooccurrence:
        return cls(config.baselines.cooccurrence)

    def fit(self, data: ProcessedData) -> dict[str, Any]:
        tr = data.train()  # never the evaluation periods: their pairs are what we are asked for
        self.popularity = np.asarray(data.train_item_counts, dtype=np.float64)
        counts = cooccurrence_counts(
            tr["user_idx"].to_numpy(), tr["item_idx"].to_numpy(), tr["basket"].to_numpy(),
            data.n_items, self.cfg.window,
        )
        self.similarity = cosine_normalise(counts, self.popularity)
        return {
            **self.cfg.model_dump(),
            "pairs": int(self.similarity.nnz // 2),
            "density": round(self.similarity.nnz / max(data.n_items**2, 1), 5),
        }

    def _vote_weights(self, histories: list[np.ndarray], n_items: int) -> sp.csr_matrix:
        rows, cols, vals = [], [], []
        for row, h in enumerate(histories):
            last = np.asarray(h, dtype=np.int64)[-self.cfg.history :]
            rows.append(np.full(len(last), row))
            cols.append(last)
            vals.append(self.cfg.decay ** np.arange(len(last) - 1, -1, -1, dtype=np.float64))
        if not rows:
            return sp.csr_matrix((0, n_items))
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(histories), n_items),
        )

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        if self.similarity is None or self.popularity is None:
            raise StageError("cooccurrence: score() called before fit()")
        n = self.similarity.shape[0]
        evidence = (self._vote_weights(histories, n) @ self.similarity).toarray()
        return evidence_then_popularity(evidence, self.popularity)

    def save(self, folder: Path) -> None:
        # Only the parameters: the similarity matrix (tens of millions of entries on the default
        # profile, >100 MB) is rebuilt from train() by fit() in about a second.
        params = {**self.cfg.model_dump(), "normalisation": "cosine"}
        write_json(Path(folder) / "params.json", params)
