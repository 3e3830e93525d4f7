"""The contract every classical recommender follows, and full-catalogue ranking of instances."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from sigmarec.config import SigmaConfig
from sigmarec.data.processed import ProcessedData
from sigmarec.metrics import top_n


class Recommender(ABC):
    """Fitted on ``data.train()`` only; scores the whole catalogue for a batch of histories."""

    name: ClassVar[str]

    @classmethod
    def from_config(cls, config: SigmaConfig) -> Recommender:
        """Build from the run config; models without hyper-parameters need nothing from it."""
        return cls()

    @abstractmethod
    def fit(self, data: ProcessedData) -> dict[str, Any]:
        """Train; return a summary (epochs, losses, chosen hyper-parameters...) for the manifest."""

    @abstractmethod
    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        """(batch, n_items) scores, higher is better, for every item of the catalogue."""

    def save(self, folder: Path) -> None:  # noqa: B027 - stateless models have nothing to save
        """Persist what is needed to score again."""


def rank_instances(
    model: Recommender,
    data: ProcessedData,
    instances: pd.DataFrame,
    top: int,
    exclude_seen: bool = False,
    batch_size: int = 256,
) -> pd.DataFrame:
    """Full ranking over the catalogue: the ``top`` best items per instance, with their scores."""
    ranked: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    users = instances["user_idx"].to_numpy()
    hist = data.histories(instances)
    for s in range(0, len(instances), batch_size):
        b_users, b_hist = users[s : s + batch_size], hist[s : s + batch_size]
        with torch.no_grad():
            sc = model.score(b_users, b_hist).float()
        if exclude_seen:
            for row, h in enumerate(b_hist):
                if len(h):
                    sc[row, torch.as_tensor(h)] = -torch.inf
        idx, val = top_n(sc, top)
        ranked.append(idx)
        scores.append(val)
    if not ranked:
        return pd.DataFrame({"instance_id": [], "items": [], "scores": []})
    r, v = np.concatenate(ranked), np.concatenate(scores)
    return pd.DataFrame(
        {"instance_id": instances["instance_id"].to_numpy(), "items": list(r), "scores": list(v)}
    )


def evidence_then_popularity(evidence: np.ndarray, popularity: np.ndarray) -> torch.Tensor:
    """Float32 scores that rank by ``evidence`` first and fill the rest of the list by popularity.

    ``evidence`` (batch, n_items) is >= 0, where 0 means "no evidence". Items with evidence keep it,
    nudged by a relative 1e-4 x normalised popularity so exact ties go to the popular item; items
    without evidence get ``popularity - 2`` in [-2, -1), i.e. always below any evidence (even
    evidence that underflows to 0 in float32). A plain "+ eps * popularity" would not do:
    recency-decayed evidence spans many orders of magnitude, and in float32 (what
    ``rank_instances`` compares) a fixed eps either overturns real evidence or vanishes.
    """
    pop = np.asarray(popularity, dtype=np.float64)
    pop = pop / pop.max() if pop.max() > 0 else pop
    ev = np.asarray(evidence, dtype=np.float64)
    out = np.where(ev > 0, ev * (1.0 + 1e-4 * pop), pop - 2.0)
    return torch.from_numpy(out.astype(np.float32))
