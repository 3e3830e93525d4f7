"""Repurchase: recommend what the user already buys, most often (and, with decay, most recently)
bought first; the rest of the list is filled by training popularity.

Grocery shoppers mostly rebuy, so this is the baseline a sequence model has to beat there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from sigmarec.baselines.base import Recommender, evidence_then_popularity
from sigmarec.config import SigmaConfig
from sigmarec.core.atomic import write_json
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError


def decayed_counts(history: np.ndarray, n_items: int, decay: float) -> np.ndarray:
    """Per item, sum of ``decay ** (steps from the end)`` over its occurrences (1.0 = count)."""
    h = np.asarray(history, dtype=np.int64)
    if decay == 1.0:
        return np.bincount(h, minlength=n_items).astype(np.float64)
    # float64: decay ** 3000 is far below float32's range but still orders correctly here.
    w = decay ** np.arange(len(h) - 1, -1, -1, dtype=np.float64)
    return np.bincount(h, weights=w, minlength=n_items)


class Repurchase(Recommender):
    name: ClassVar[str] = "repurchase"

    def __init__(self, decay: float = 1.0) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"repurchase decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.popularity: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: SigmaConfig) -> Repurchase:
        return cls(decay=config.baselines.repurchase_decay)

    def fit(self, data: ProcessedData) -> dict[str, Any]:
        # Only the tie-break is fitted; the evidence is the history handed to score().
        self.popularity = np.asarray(data.train_item_counts, dtype=np.float64)
        return {"decay": self.decay}

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        if self.popularity is None:
            raise StageError("repurchase: score() called before fit()")
        n = len(self.popularity)
        ev = np.zeros((len(histories), n), dtype=np.float64)
        for row, h in enumerate(histories):
            if len(h):
                ev[row] = decayed_counts(h, n, self.decay)
        return evidence_then_popularity(ev, self.popularity)

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / "params.json", {"decay": self.decay})
