"""The common schema every source is converted into, and its validation.

items:        item_id (str), title (str), category_path (str, levels joined by " > "),
              brand (str|None), attributes (str, JSON object), [image_embedding (list[float])]
interactions: user_id (str), item_id (str), timestamp (datetime64[ns]), basket_id (str|None),
              quantity (float), event (str)
users:        user_id (str), then any profile columns (str)
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sigmarec.errors import DataError

CATEGORY_SEP = " > "
ITEM_COLUMNS = ("item_id", "title", "category_path", "brand", "attributes")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "basket_id", "quantity", "event")


@dataclass
class Dataset:
    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    users: pd.DataFrame
    # Where each table came from, for error messages.
    item_source: str = "items"
    interaction_source: str = "interactions"
    user_source: str = "users"
    # False where the source has no times and orders events by a synthetic time (the sequence
    # position): only the order within a user means anything, so no task may read dates.
    has_dates: bool = True

    @property
    def profile_columns(self) -> list[str]:
        return [c for c in self.users.columns if c != "user_id"]


def require_columns(df: pd.DataFrame, columns: list[str] | tuple[str, ...], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {list(df.columns)}")


def _first_bad(mask: pd.Series, df: pd.DataFrame, column: str, source: str, what: str) -> None:
    if mask.any():
        row = int(mask.to_numpy().nonzero()[0][0])
        value = df[column].iloc[row]
        raise DataError(f"{source}: row {row}, column '{column}': {what} (value {value!r})")


def validate(ds: Dataset) -> Dataset:
    """Check the common schema; raise ``DataError`` naming file, row, column and value."""
    require_columns(ds.items, ITEM_COLUMNS, ds.item_source)
    require_columns(ds.interactions, INTERACTION_COLUMNS, ds.interaction_source)
    require_columns(ds.users, ["user_id"], ds.user_source)
    items, inter, users = ds.items, ds.interactions, ds.users

    _first_bad(items["item_id"].isna(), items, "item_id", ds.item_source, "missing item id")
    _first_bad(items["item_id"].duplicated(), items, "item_id", ds.item_source, "duplicate item id")
    _first_bad(users["user_id"].isna(), users, "user_id", ds.user_source, "missing user id")
    _first_bad(users["user_id"].duplicated(), users, "user_id", ds.user_source, "duplicate user id")
    _first_bad(inter["user_id"].isna(), inter, "user_id", ds.interaction_source, "missing user id")
    _first_bad(inter["item_id"].isna(), inter, "item_id", ds.interaction_source, "missing item id")
    if not pd.api.types.is_datetime64_any_dtype(inter["timestamp"]):
        raise DataError(
            f"{ds.interaction_source}: column 'timestamp' must be parsed to datetimes before "
            f"validation (dtype {inter['timestamp'].dtype})"
        )
    _first_bad(
        inter["timestamp"].isna(),
        inter,
        "timestamp",
        ds.interaction_source,
        "missing or unparseable timestamp",
    )
    q = pd.to_numeric(inter["quantity"], errors="coerce")
    _first_bad(
        q.isna() & inter["quantity"].notna(),
        inter,
        "quantity",
        ds.interaction_source,
        "quantity is not a number",
    )
    unknown = ~inter["item_id"].isin(items["item_id"])
    _first_bad(
        unknown,
        inter,
        "item_id",
        ds.interaction_source,
        f"item not in the catalogue ({ds.item_source})",
    )
    if len(inter) == 0:
        raise DataError(f"{ds.interaction_source}: no interactions")
    return ds


def category_at(path: str | None, level: int) -> str:
    """The category at ``level`` (0 = top) of a path, the deepest one if the path is shorter."""
    if not path:
        return ""
    parts = path.split(CATEGORY_SEP)
    return parts[min(level, len(parts) - 1)]
