"""MostPop: the same list for everyone, items ordered by training-period purchase count."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from sigmarec.baselines.base import Recommender
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError


class MostPop(Recommender):
    name: ClassVar[str] = "mostpop"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, data: ProcessedData) -> dict[str, Any]:
        # Counted on train() only: evaluation-period purchases would leak the answer's popularity.
        self.counts = np.asarray(data.train_item_counts, dtype=np.int64)
        return {"train_interactions": int(self.counts.sum()),
                "items_never_bought": int((self.counts == 0).sum())}

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        if self.counts is None:
            raise StageError("mostpop: score() called before fit()")
        row = torch.from_numpy(self.counts.astype(np.float32))
        return row.unsqueeze(0).expand(len(histories), -1).clone()

    def save(self, folder: Path) -> None:
        if self.counts is not None:
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "train_item_counts.npy", self.counts)
