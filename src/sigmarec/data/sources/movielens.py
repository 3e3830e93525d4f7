"""MovieLens-100K, read from the atomic files inside the ``recbole`` package (never imported)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from sigmarec.config import DataConfig
from sigmarec.data.schema import Dataset, require_columns
from sigmarec.data.sources.packaged import package_dir
from sigmarec.errors import DataError


def _read_atomic(path: Path) -> pd.DataFrame:
    """RecBole atomic file: TSV whose header cells read ``name:type``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def ml100k_dir() -> Path:
    return (
        package_dir("recbole", "recbole==1.2.1", extra="--no-deps ") / "dataset_example" / "ml-100k"
    )


def load(cfg: DataConfig) -> Dataset:
    folder = ml100k_dir()
    inter_src, item_src, user_src = (
        str(folder / f"ml-100k.{x}") for x in ("inter", "item", "user")
    )
    inter = _read_atomic(Path(inter_src))
    require_columns(inter, ["user_id", "item_id", "rating", "timestamp"], inter_src)
    items = _read_atomic(Path(item_src))
    require_columns(items, ["item_id", "movie_title", "class"], item_src)
    users = _read_atomic(Path(user_src))

    ts = pd.to_numeric(inter["timestamp"], errors="coerce")
    bad = ts.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{inter_src}: row {row}, column 'timestamp': unparseable "
            f"(value {inter['timestamp'].iloc[row]!r})"
        )
    rating = pd.to_numeric(inter["rating"], errors="coerce")
    out = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "timestamp": pd.to_datetime(ts.astype("int64"), unit="s").astype("datetime64[ns]"),
            "basket_id": None,
            "quantity": 1.0,
            "event": "rating",
            "rating": rating,
        }
    )
    if cfg.min_rating is not None:
        out = out[out["rating"] >= cfg.min_rating]
    out = out.drop(columns=["rating"]).reset_index(drop=True)

    genres = items["class"].str.split()
    item_df = pd.DataFrame(
        {
            "item_id": items["item_id"],
            "title": items["movie_title"].str.strip(),
            # Movies have several genres; the first is the category, all of them are attributes.
            "category_path": genres.map(lambda g: g[0] if g else ""),
            "brand": None,
            "attributes": [
                json.dumps({"year": y, "genres": " ".join(g)})
                for y, g in zip(
                    items.get("release_year", pd.Series([""] * len(items))), genres, strict=True
                )
            ],
        }
    )
    user_df = users[[c for c in ("user_id", "age", "gender", "occupation") if c in users.columns]]
    return Dataset(
        "ml100k",
        item_df,
        out,
        user_df.reset_index(drop=True),
        item_source=item_src,
        interaction_source=inter_src,
        user_source=user_src,
    )
