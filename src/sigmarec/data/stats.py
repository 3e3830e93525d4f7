"""Descriptive statistics of a dataset (``sigma data stats``) and of the processed split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import Dataset

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {f"p{int(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    inter = ds.interactions
    per_user = inter.groupby("user_id").size().to_numpy()
    per_item = inter.groupby("item_id").size().to_numpy()
    baskets = inter["basket_id"].dropna()
    out: dict[str, Any] = {
        "dataset": ds.name,
        "users": int(inter["user_id"].nunique()),
        "items": int(inter["item_id"].nunique()),
        "catalogue_items": len(ds.items),
        "interactions": len(inter),
        "baskets": int(
            inter.loc[baskets.index, ["user_id", "basket_id"]].drop_duplicates().shape[0]
        )
        if len(baskets)
        else None,
        "users_with_profile": len(ds.users),
        "profile_fields": ds.profile_columns,
        "time_range": [str(inter["timestamp"].min()), str(inter["timestamp"].max())],
        "sequence_length_quantiles": _quantiles(per_user),
        "item_popularity_quantiles": _quantiles(per_item),
        "density": float(len(inter) / max(1, inter["user_id"].nunique() * len(ds.items))),
    }
    return out


def processed_stats(data: ProcessedData) -> dict[str, Any]:
    inter = data.interactions
    per_user = np.bincount(inter["user_idx"].to_numpy(), minlength=data.n_users)
    tr = data.train()
    out: dict[str, Any] = {
        "users": data.n_users,
        "catalogue_items": data.n_items,
        "interactions": {s: int((inter["split"] == s).sum()) for s in ("train", "valid", "test")},
        "time_range": {
            s: [str(g["timestamp"].min()), str(g["timestamp"].max())]
            for s, g in inter.groupby("split")
        },
        "sequence_length_quantiles": _quantiles(per_user),
        "train_item_popularity_quantiles": _quantiles(
            np.bincount(tr["item_idx"], minlength=data.n_items)
        ),
    }
    inst = data.instances
    if len(inst):
        hist_items = {}
        for split, grp in inst.groupby("split"):
            sizes = grp["targets"].map(len).to_numpy()
            # Repeat targets were in the user's history; new targets were not.
            repeat = [
                float(np.isin(t, data.history(int(u), int(h))).mean())
                for u, h, t in zip(grp["user_idx"], grp["hist_len"], grp["targets"], strict=True)
            ]
            hist_items[split] = {
                "instances": len(grp),
                "targets_per_instance_mean": float(sizes.mean()),
                "repeat_target_share": float(np.mean(repeat)),
            }
        out["instances"] = hist_items
    return out


def format_table(stats: dict[str, Any]) -> pd.DataFrame:
    rows = [(k, v) for k, v in stats.items() if not isinstance(v, dict | list)]
    return pd.DataFrame(rows, columns=["stat", "value"])
