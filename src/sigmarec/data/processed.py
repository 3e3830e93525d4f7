"""The data stage's artifacts as later stages read them.

Every later stage works with dense indices: ``item_idx`` in ``[0, n_items)`` (the catalogue, fixed
from the training period) and ``user_idx`` in ``[0, n_users)``. A user's interactions form one
chronological sequence (``pos`` = position in it); an evaluation instance sees the first
``hist_len`` positions of its user's sequence as history and must rank ``targets``.
Anything *fitted* (models, tokenizers, pair miners) must use ``train()`` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.core.atomic import write_json, write_parquet
from sigmarec.errors import StageError

FILES = ("items.parquet", "users.parquet", "interactions.parquet", "instances.parquet")


HOLDOUT_DIR = "holdout"


@dataclass
class Holdout:
    """Items held out for cold-start evaluation (``data.holdout_new_items_weeks``) and their
    purchases. Written to ``data/holdout/`` and read only by serving (:func:`load_holdout`):
    :meth:`ProcessedData.load` never reads it, so no stage can train on it."""

    items: pd.DataFrame  # common item schema + text; no item_idx (given when onboarded)
    # user_idx, item_id, timestamp, basket (processed basket shared, -1 if none), basket_id
    # (the source's), quantity, event, split
    interactions: pd.DataFrame

    def save(self, folder: Path) -> None:
        write_parquet(folder / "items.parquet", self.items)
        write_parquet(folder / "interactions.parquet", self.interactions)


def load_holdout(data_dir: Path) -> Holdout | None:
    """The held-out items of a data stage folder, or None when the run held none out."""
    folder = Path(data_dir) / HOLDOUT_DIR
    if not (folder / "items.parquet").is_file():
        return None
    return Holdout(items=pd.read_parquet(folder / "items.parquet"),
                   interactions=pd.read_parquet(folder / "interactions.parquet"))


@dataclass
class ProcessedData:
    items: pd.DataFrame  # item_idx, item_id, title, category_path, brand, attributes, text
    users: pd.DataFrame  # user_idx, user_id, profile columns...
    # user_idx, item_idx, timestamp, basket (int, increasing within a user), quantity, event,
    # split ("train" / "valid" / "test"), pos; sorted by (user_idx, pos)
    interactions: pd.DataFrame
    # instance_id, split ("valid"/"test"), task, user_idx, hist_len, targets (list[int]), timestamp
    instances: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    holdout: Holdout | None = None  # saved apart, never loaded back by load()

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def train(self) -> pd.DataFrame:
        """The only interactions a model, tokenizer or miner may be fitted on."""
        return self.interactions[self.interactions["split"] == "train"]

    @cached_property
    def _offsets(self) -> np.ndarray:
        counts = np.bincount(self.interactions["user_idx"].to_numpy(), minlength=self.n_users)
        return np.concatenate([[0], np.cumsum(counts)])

    @cached_property
    def _items_arr(self) -> np.ndarray:
        return self.interactions["item_idx"].to_numpy(np.int64)

    @cached_property
    def _baskets_arr(self) -> np.ndarray:
        return self.interactions["basket"].to_numpy(np.int64)

    def sequence(self, user_idx: int) -> np.ndarray:
        """All of a user's items in chronological order (every split)."""
        o = self._offsets
        return self._items_arr[o[user_idx] : o[user_idx + 1]]

    def baskets(self, user_idx: int) -> np.ndarray:
        o = self._offsets
        return self._baskets_arr[o[user_idx] : o[user_idx + 1]]

    def history(self, user_idx: int, hist_len: int) -> np.ndarray:
        return self.sequence(user_idx)[:hist_len]

    def train_sequences(self) -> list[np.ndarray]:
        """Per user, the training-period items in order (empty arrays for users with none)."""
        # Cut one sorted array at the user boundaries: iterating a pandas groupby costs ~17 ms a
        # user here (string columns sliced per group), 6 minutes on Amazon Beauty's 22,363 users.
        tr = self.train()
        users = tr["user_idx"].to_numpy(np.int64)
        order = np.argsort(users, kind="stable")  # rows are (user, pos)-sorted; stable keeps pos
        items = tr["item_idx"].to_numpy(np.int64)[order]
        counts = np.bincount(users, minlength=self.n_users)
        return [a.copy() for a in np.split(items, np.cumsum(counts)[:-1])]

    def eval_instances(self, split: str) -> pd.DataFrame:
        if split not in ("valid", "test"):
            raise StageError(f"unknown evaluation split {split!r}; use 'valid' or 'test'")
        return self.instances[self.instances["split"] == split].reset_index(drop=True)

    def histories(self, instances: pd.DataFrame) -> list[np.ndarray]:
        return [
            self.history(int(u), int(h))
            for u, h in zip(instances["user_idx"], instances["hist_len"], strict=True)
        ]

    @cached_property
    def train_item_counts(self) -> np.ndarray:
        return np.bincount(self.train()["item_idx"].to_numpy(), minlength=self.n_items)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, df in zip(
            FILES, (self.items, self.users, self.interactions, self.instances), strict=True
        ):
            write_parquet(folder / name, df)
        if self.holdout is not None:
            self.holdout.save(folder / HOLDOUT_DIR)
        write_json(folder / "info.json", self.info)

    @classmethod
    def load(cls, folder: Path) -> ProcessedData:
        folder = Path(folder)
        missing = [f for f in (*FILES, "info.json") if not (folder / f).is_file()]
        if missing:
            raise StageError(f"{folder}: data artifacts missing {missing}; run the data stage")
        items, users, inter, inst = (pd.read_parquet(folder / f) for f in FILES)
        inst["targets"] = inst["targets"].map(lambda t: np.asarray(t, dtype=np.int64))
        info = json.loads((folder / "info.json").read_text())
        return cls(items=items, users=users, interactions=inter, instances=inst, info=info)
