"""From a validated ``Dataset`` to the indexed, split ``ProcessedData`` later stages read."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.config import DataConfig
from sigmarec.data.processed import Holdout, ProcessedData
from sigmarec.data.schema import CATEGORY_SEP, Dataset
from sigmarec.data.split import (
    assign_leave_one_out,
    assign_temporal,
    build_instances,
    filter_counts,
)
from sigmarec.errors import DataError


def render_item_text(row: pd.Series) -> str:
    """A plain description of an item: title, category path, brand and attributes."""
    parts = [str(row["title"])] if row.get("title") else []
    if row.get("category_path"):
        parts.append(str(row["category_path"]).replace(CATEGORY_SEP, " / "))
    if row.get("brand"):
        parts.append(f"brand {row['brand']}")
    attrs = json.loads(row["attributes"]) if row.get("attributes") else {}
    parts.extend(f"{k} {v}" for k, v in attrs.items() if v not in (None, ""))
    return " | ".join(parts)


def _order_and_baskets(
    inter: pd.DataFrame, shuffle: bool, rng: np.random.Generator
) -> pd.DataFrame:
    inter = inter.copy()
    # Ties in time are broken by file order; within a basket by a seeded shuffle, because sources
    # such as Complete Journey list a basket's products sorted by id.
    inter["_rand"] = rng.random(len(inter)) if shuffle else 0.0
    missing_basket = inter["basket_id"].isna()
    inter.loc[missing_basket, "basket_id"] = "row:" + inter.loc[
        missing_basket, "_file_order"
    ].astype(str)
    basket_time = inter.groupby(["user_id", "basket_id"], sort=False)["timestamp"].transform("min")
    inter["_basket_time"] = basket_time
    inter["_basket_first_row"] = inter.groupby(["user_id", "basket_id"], sort=False)[
        "_file_order"
    ].transform("min")
    inter = inter.sort_values(
        ["user_id", "_basket_time", "_basket_first_row", "_rand", "_file_order"], kind="stable"
    )
    return inter.drop(columns=["_rand"])


def _dedupe(inter: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, basket, item); quantities summed (grocery lists an item per scan)."""
    has_basket = inter["basket_id"].notna()
    grouped = (
        inter[has_basket]
        .groupby(["user_id", "basket_id", "item_id"], sort=False, as_index=False)
        .agg(
            timestamp=("timestamp", "min"),
            quantity=("quantity", "sum"),
            event=("event", "first"),
            _file_order=("_file_order", "min"),
        )
    )
    out = pd.concat([grouped, inter[~has_basket]], ignore_index=True)
    return out.sort_values("_file_order", kind="stable").reset_index(drop=True)


def build(ds: Dataset, cfg: DataConfig, seed: int) -> ProcessedData:
    rng = np.random.default_rng(seed)
    inter = ds.interactions.copy()
    inter["user_id"] = inter["user_id"].astype(str)
    inter["item_id"] = inter["item_id"].astype(str)
    inter["quantity"] = pd.to_numeric(inter["quantity"], errors="coerce").fillna(1.0)
    inter["_file_order"] = np.arange(len(inter))
    raw_counts = {
        "interactions": len(inter),
        "users": inter["user_id"].nunique(),
        "items": inter["item_id"].nunique(),
    }

    held, held_inter, cutoff = None, None, None
    if cfg.holdout_new_items_weeks is not None:
        # Before the user subset: an item is new only if nobody at all bought it earlier.
        held = new_item_rows(inter, cfg.holdout_new_items_weeks, ds.interaction_source)
        cutoff = held.attrs["cutoff"]
    if cfg.max_users is not None:
        users = np.sort(inter["user_id"].unique())
        if cfg.max_users < len(users):
            keep = inter["user_id"].isin(set(rng.choice(users, size=cfg.max_users,
                                                        replace=False)))
            inter = inter[keep]
            held = None if held is None else held[keep]
    if held is not None:
        held_inter = _dedupe(inter[held])
        inter = inter[~held]
    inter = _dedupe(inter)

    info: dict[str, Any] = {"dataset": ds.name, "split": cfg.split.kind, "raw": raw_counts}
    if not ds.has_dates:
        info["timestamps"] = "synthetic (order within a user only; no dates)"
    if cfg.split.kind == "temporal":
        inter, bounds = assign_temporal(inter, cfg.split)
        info.update(bounds)
        fit_on = inter[inter["split"] == "train"]
        info["filters_counted_on"] = "training period only"
    else:
        fit_on = inter
        info["filters_counted_on"] = "whole data (standard leave-one-out protocol)"
        info["tie_break"] = "equal timestamps keep file order"
    items_keep, users_keep = filter_counts(fit_on, cfg)
    before = len(inter)
    inter = inter[inter["item_id"].isin(items_keep) & inter["user_id"].isin(users_keep)]
    info["dropped_by_filters"] = before - len(inter)
    if inter.empty:
        raise DataError(
            f"{ds.interaction_source}: no interactions left after filtering "
            f"(min_item_count={cfg.min_item_count}, min_user_count={cfg.min_user_count}, "
            f"k_core={cfg.k_core}, max_users={cfg.max_users})"
        )

    inter = _order_and_baskets(inter, cfg.shuffle_within_baskets, rng)

    item_ids = np.sort(np.array(list(items_keep), dtype=object))
    items = ds.items.assign(item_id=ds.items["item_id"].astype(str))
    items = items.set_index("item_id").loc[item_ids].reset_index()
    items.insert(0, "item_idx", np.arange(len(items)))
    items["text"] = items.apply(render_item_text, axis=1)

    user_ids = np.sort(inter["user_id"].unique())
    users = pd.DataFrame({"user_id": user_ids})
    prof = ds.users.assign(user_id=ds.users["user_id"].astype(str))
    users = users.merge(prof, on="user_id", how="left")
    users.insert(0, "user_idx", np.arange(len(users)))

    inter["item_idx"] = pd.Index(item_ids).get_indexer(inter["item_id"])
    inter["user_idx"] = pd.Index(user_ids).get_indexer(inter["user_id"])
    inter = inter.sort_values(["user_idx"], kind="stable").reset_index(drop=True)
    inter["pos"] = inter.groupby("user_idx", sort=False).cumcount()
    # Baskets numbered per user in order of first appearance (users' rows are contiguous, so a
    # global first-appearance numbering minus the user's first number; no per-user Python call).
    ngroup = inter.groupby(["user_idx", "basket_id"], sort=False).ngroup()
    inter["basket"] = ngroup - ngroup.groupby(inter["user_idx"]).transform("min")
    if cfg.split.kind == "leave_one_out":
        inter = assign_leave_one_out(inter)
    inter_full = inter  # still has user_id / basket_id, for mapping held-out purchases

    instances = build_instances(inter, cfg.split.instances)
    cols = ["user_idx", "item_idx", "timestamp", "basket", "quantity", "event", "split", "pos"]
    inter = inter[cols].astype({"user_idx": np.int64, "item_idx": np.int64, "basket": np.int64})
    info["counts"] = {
        "users": len(users),
        "items": len(items),
        "interactions": len(inter),
        **{
            f"{s}_interactions": int((inter["split"] == s).sum())
            for s in ("train", "valid", "test")
        },
        **{f"{s}_instances": int((instances["split"] == s).sum()) for s in ("valid", "test")},
    }
    holdout = None
    if held_inter is not None:
        holdout = _holdout(ds, held_inter, inter_full, user_ids, cfg, info)
        info["holdout"] = {"weeks": cfg.holdout_new_items_weeks, "first_sold_from": str(cutoff),
                           "items": len(holdout.items),
                           "interactions": len(holdout.interactions),
                           **{f"{s}_interactions": int((holdout.interactions["split"] == s).sum())
                              for s in ("train", "valid", "test")}}
    return ProcessedData(
        items=items, users=users, interactions=inter, instances=instances, info=info,
        holdout=holdout,
    )


def new_item_rows(inter: pd.DataFrame, weeks: int, source: str) -> pd.Series:
    """Mask of the interactions of items first sold in the last ``weeks`` weeks (counted back
    from the midnight after the last event); the cut-off is in ``.attrs["cutoff"]``."""
    last = inter["timestamp"].max().normalize() + timedelta(days=1)
    cutoff = last - timedelta(weeks=weeks)
    if cutoff <= inter["timestamp"].min():
        raise DataError(f"data.holdout_new_items_weeks={weeks}: the window starts at "
                        f"{cutoff.date()}, before the first event of {source} "
                        f"({inter['timestamp'].min().date()}); every item would be held out")
    held = inter.groupby("item_id")["timestamp"].transform("min") >= cutoff
    held.attrs["cutoff"] = cutoff
    return held


def _holdout(ds: Dataset, held: pd.DataFrame, inter: pd.DataFrame, user_ids: np.ndarray,
             cfg: DataConfig, info: dict[str, Any]) -> Holdout:
    """The held-out items (common item schema plus ``text``) and their interactions by the
    users of the processed data; ``basket`` is the processed basket number the purchase shares
    (-1 when its basket holds no catalogue item), ``split`` follows the run's cut-offs."""
    ids = np.sort(held["item_id"].unique())
    items = ds.items.assign(item_id=ds.items["item_id"].astype(str))
    items = items.set_index("item_id").loc[ids].reset_index()
    items["text"] = items.apply(render_item_text, axis=1) if len(items) else pd.Series(dtype=str)
    held = held[held["user_id"].isin(user_ids)].copy()
    held["user_idx"] = pd.Index(user_ids).get_indexer(held["user_id"])
    baskets = inter[["user_id", "basket_id", "basket"]].drop_duplicates(["user_id", "basket_id"])
    held = held.merge(baskets, on=["user_id", "basket_id"], how="left")
    held["basket"] = held["basket"].fillna(-1).astype(np.int64)
    if cfg.split.kind == "temporal":
        valid_start, test_start = (pd.Timestamp(info[k]) for k in ("valid_start", "test_start"))
        held["split"] = np.where(held["timestamp"] < valid_start, "train",
                                 np.where(held["timestamp"] < test_start, "valid", "test"))
    else:
        held["split"] = "holdout"  # leave-one-out has no global evaluation window
    cols = ["user_idx", "item_id", "timestamp", "basket", "basket_id", "quantity", "event",
            "split"]
    held = held.sort_values(["user_idx", "timestamp"], kind="stable")[cols]
    return Holdout(items=items, interactions=held.reset_index(drop=True))
