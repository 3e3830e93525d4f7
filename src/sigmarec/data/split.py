"""Chronological splits and evaluation instances, built so nothing from an evaluation period can
reach what is fitted on training data.

* ``temporal`` (Complete Journey default): global cut-offs. Interactions before ``valid_start`` are
  training data; ``[valid_start, test_start)`` is validation; from ``test_start`` on is test.
  Catalogue and user filters count training interactions only.
* ``leave_one_out`` (MovieLens default): per user, the last interaction is test and the one before
  it validation, ordered by timestamp with ties broken by file order. Filters count the whole data
  before splitting, as that protocol is usually run; this is stated in ``info.json``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.config import DataConfig, SplitConfig
from sigmarec.errors import DataError


def temporal_boundaries(ts: pd.Series, cfg: SplitConfig) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``(valid_start, test_start)`` from explicit dates or windows counted back from the end."""
    last = ts.max().normalize() + timedelta(days=1)  # midnight after the last event
    test_start = (
        pd.Timestamp(cfg.test_start) if cfg.test_start else last - timedelta(days=cfg.test_days)
    )
    valid_start = (
        pd.Timestamp(cfg.valid_start)
        if cfg.valid_start
        else test_start - timedelta(days=cfg.valid_days)
    )
    first = ts.min()
    if not first < valid_start < test_start <= ts.max():
        raise DataError(
            f"split: cut-offs valid_start={valid_start.date()} test_start={test_start.date()} "
            f"must fall inside the data ({first.date()} .. {ts.max().date()}) in that order"
        )
    return valid_start, test_start


def assign_temporal(inter: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    valid_start, test_start = temporal_boundaries(inter["timestamp"], cfg)
    split = np.where(
        inter["timestamp"] < valid_start,
        "train",
        np.where(inter["timestamp"] < test_start, "valid", "test"),
    )
    out = inter.assign(split=split)
    return out, {"valid_start": str(valid_start), "test_start": str(test_start)}


def assign_leave_one_out(inter: pd.DataFrame) -> pd.DataFrame:
    """Expects rows sorted by (user, chronological order)."""
    from_end = inter.groupby("user_idx", sort=False).cumcount(ascending=False).to_numpy()
    split = np.where(from_end == 0, "test", np.where(from_end == 1, "valid", "train"))
    return inter.assign(split=split)


def filter_counts(inter: pd.DataFrame, cfg: DataConfig) -> tuple[set, set]:
    """Items and users that pass min counts and the optional iterative k-core on ``inter``."""
    cur = inter[["user_id", "item_id"]]
    while True:
        n = len(cur)
        ic = cur["item_id"].value_counts()
        cur = cur[cur["item_id"].map(ic) >= max(cfg.min_item_count, cfg.k_core)]
        uc = cur["user_id"].value_counts()
        cur = cur[cur["user_id"].map(uc) >= max(cfg.min_user_count, cfg.k_core)]
        if cfg.k_core == 0 or len(cur) == n:
            break
    return set(cur["item_id"].unique()), set(cur["user_id"].unique())


def build_instances(inter: pd.DataFrame, how: str) -> pd.DataFrame:
    """One instance per (user, evaluation basket): history = every earlier position.

    ``inter`` holds catalogue items only, sorted by (user_idx, pos), with ``split`` and ``basket``.
    Vectorised (no per-user Python loop): leave-one-out data has a group per user and split, tens
    of thousands on the public benchmarks.
    """
    cols = ["instance_id", "split", "task", "user_idx", "hist_len", "targets", "timestamp"]
    ev = inter.loc[inter["split"] != "train", ["user_idx", "split", "basket", "pos", "item_idx",
                                                "timestamp"]]
    if ev.empty:
        return pd.DataFrame(columns=cols)
    keys = ["user_idx", "split", "basket"]
    grouped = ev.groupby(keys, sort=True)
    baskets = grouped.agg(hist_len=("pos", "min"), timestamp=("timestamp", "min")).reset_index()
    # Each basket's distinct items, sorted: the rows sorted by (basket keys, item), one per item,
    # cut at the basket boundaries (baskets come out in the same order as ``grouped``).
    items = ev[[*keys, "item_idx"]].drop_duplicates().sort_values([*keys, "item_idx"])
    sizes = items.groupby(keys, sort=True).size().to_numpy()
    targets = np.split(items["item_idx"].to_numpy(np.int64), np.cumsum(sizes)[:-1])
    baskets["targets"] = pd.Series(targets, index=baskets.index, dtype=object)
    if how == "first_basket":
        baskets = baskets[baskets.groupby(["user_idx", "split"]).cumcount() == 0]
    baskets = baskets[baskets["hist_len"] > 0]  # nothing to condition on
    if baskets.empty:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame({
        "split": baskets["split"].astype(str).to_numpy(),
        "task": "JustForYou",
        "user_idx": baskets["user_idx"].astype(int).to_numpy(),
        "hist_len": baskets["hist_len"].astype(int).to_numpy(),
        "targets": baskets["targets"].to_numpy(),
        "timestamp": baskets["timestamp"].to_numpy(),
    })
    df = df.sort_values(["split", "user_idx", "hist_len"], kind="stable")
    df.insert(0, "instance_id", np.arange(len(df)))
    return df[cols].reset_index(drop=True)
