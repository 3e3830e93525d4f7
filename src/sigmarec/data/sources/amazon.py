"""Public Amazon-reviews dumps (McAuley lab): the 2014, 2018 and 2023 releases.

One reader serves all three because they differ only in key names:

=========  ==========================  =====================  ==============================
release    reviews: user, item, time   meta: id, categories   meta: brand
=========  ==========================  =====================  ==============================
2014       reviewerID, asin,           asin, categories       brand
           unixReviewTime (s)          [[top, ..., leaf]]
2018       reviewerID, asin,           asin, category         brand
           unixReviewTime (s)          [top, ..., leaf]
2023       user_id, parent_asin,       parent_asin,           store
           timestamp (ms)              categories [...]
=========  ==========================  =====================  ==============================

The 2014 metadata files hold Python literals (single quotes), not JSON, so each line that is not
JSON is read with ``ast.literal_eval``. Files are streamed line by line and only the fields used
are kept, since the metadata of one category can run to millions of products; products nobody
reviewed are skipped for the same reason (they can be neither trained on nor evaluated).
"""

from __future__ import annotations

import ast
import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.config import DataConfig
from sigmarec.data.schema import CATEGORY_SEP, Dataset
from sigmarec.data.sources.files import iter_json_lines
from sigmarec.errors import DataError

log = logging.getLogger("sigmarec")

SUFFIXES = (".json", ".jsonl")
USER_KEYS = ("reviewerID", "user_id")
ITEM_KEYS = ("parent_asin", "asin")  # 2023 reviews carry both; its meta is keyed by parent_asin
# datetime64[ns] spans 1677-2262; in milliseconds:
_MS_MIN = pd.Timestamp.min.value // 1_000_000 + 1
_MS_MAX = pd.Timestamp.max.value // 1_000_000
_IMG_ALT = re.compile(r"""alt=["']([^"']*)["']""")


def _check_suffix(path: Path, setting: str) -> None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in SUFFIXES:
        raise DataError(f"{path}: unknown file type for data.amazon.{setting}; expected "
                        ".json or .jsonl, optionally gzipped (.json.gz, .jsonl.gz)")


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    """The first of ``keys`` holding a non-blank value, and that value."""
    for k in keys:
        v = rec.get(k)
        if v is not None and str(v).strip():
            return k, v
    return None, None


def clean_text(v: Any) -> str:
    """Metadata text with HTML entities (``&amp;``, in the 2014 and 2018 releases and their
    derivatives) decoded and runs of whitespace (tabs, newlines inside a title) made one space."""
    return " ".join(html.unescape(str(v)).split())


def category_path(levels: list[Any] | tuple[Any, ...]) -> str:
    """Category levels (top first) as one ``CATEGORY_SEP``-joined path, cleaned; a level that
    holds the separator itself is rewritten so the path splits back into the same levels."""
    cleaned = (clean_text(c) for c in levels)
    return CATEGORY_SEP.join(c.replace(CATEGORY_SEP, " / ") for c in cleaned if c)


def _epoch_ms(rec: dict[str, Any], path: Path, lineno: int) -> int:
    if rec.get("unixReviewTime") is not None:  # 2014 / 2018: seconds
        key, scale = "unixReviewTime", 1000
    elif rec.get("timestamp") is not None:  # 2023: milliseconds
        key, scale = "timestamp", 1
    elif rec.get("reviewTime"):  # 2014 / 2018 also write e.g. "09 13, 2009"
        value = rec["reviewTime"]
        ts = pd.to_datetime(value, format="%m %d, %Y", errors="coerce")
        if pd.isna(ts):
            raise DataError(f"{path}: line {lineno}, key 'reviewTime': unparseable date "
                            f"(value {value!r})")
        return int(ts.value // 1_000_000)
    else:
        raise DataError(f"{path}: line {lineno}: no review time (expected key 'unixReviewTime' "
                        f"or 'timestamp'); keys {sorted(rec)}")
    value = rec[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ms = number * scale
    if not (_MS_MIN <= ms <= _MS_MAX):  # also false for NaN
        raise DataError(f"{path}: line {lineno}, key '{key}': not a valid epoch time "
                        f"(value {value!r})")
    return int(ms)


def _reviews(path: Path) -> pd.DataFrame:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    ratings: list[float] = []
    for lineno, rec in iter_json_lines(path, fallback=ast.literal_eval):
        ukey, user = _first(rec, USER_KEYS)
        ikey, item = _first(rec, ITEM_KEYS)
        if ukey is None or ikey is None:
            want = USER_KEYS if ukey is None else ITEM_KEYS
            raise DataError(f"{path}: line {lineno}: no {'user' if ukey is None else 'item'} id "
                            f"(expected key {' or '.join(map(repr, want))}); keys {sorted(rec)}")
        rating = rec.get("overall", rec.get("rating"))
        try:
            rating = float(rating) if rating is not None else float("nan")
        except (TypeError, ValueError):
            raise DataError(f"{path}: line {lineno}, key 'overall'/'rating': rating is not a "
                            f"number (value {rating!r})") from None
        users.append(str(user).strip())
        items.append(str(item).strip())
        times.append(_epoch_ms(rec, path, lineno))
        ratings.append(rating)
    if not users:
        raise DataError(f"{path}: reviews file is empty (no reviews)")
    return pd.DataFrame({
        "user_id": pd.Series(users, dtype="str"),
        "item_id": pd.Series(items, dtype="str"),
        "timestamp": pd.to_datetime(np.asarray(times, dtype=np.int64), unit="ms").astype(
            "datetime64[ns]"),
        "basket_id": pd.Series([None] * len(users), dtype=object),
        "quantity": 1.0,
        "event": "review",
        "rating": np.asarray(ratings, dtype=float),
    })


def _category_path(rec: dict[str, Any]) -> str:
    cats = rec.get("categories")
    if not cats:
        cats = rec.get("category")
    if isinstance(cats, list) and cats and isinstance(cats[0], list | tuple):
        cats = cats[0]  # 2014: a list of paths; the first is the product's main one
    path = category_path(cats) if isinstance(cats, list | tuple) else ""
    if not path and (main := _main_category(rec)):
        path = category_path([main])
    return path


def _main_category(rec: dict[str, Any]) -> str:
    main = rec.get("main_category") or rec.get("main_cat")
    if not main:
        return ""
    main = str(main)
    if main.lstrip().startswith("<img"):  # 2018 writes some as an <img alt="..."> tag
        m = _IMG_ALT.search(main)
        main = m.group(1) if m else ""
    return clean_text(main)


def _attributes(rec: dict[str, Any], path_: str) -> str:
    attrs: dict[str, Any] = {}
    price = rec.get("price")
    if isinstance(price, int | float) and not isinstance(price, bool) and price == price:
        attrs["price"] = float(price)
    elif isinstance(price, str) and 0 < len(price.strip()) <= 20 and price.strip() != "None":
        attrs["price"] = clean_text(price)  # 2018: "$12.99"; longer strings are scraped HTML
    main = _main_category(rec)
    if main and not path_.startswith(main):
        attrs["main_category"] = main
    return json.dumps(attrs, ensure_ascii=False)


def _meta(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Catalogue rows of the reviewed items, keyed by item id (first record of a duplicate)."""
    out: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for lineno, rec in iter_json_lines(path, fallback=ast.literal_eval):
        key, iid = _first(rec, ITEM_KEYS)
        if key is None:
            raise DataError(f"{path}: line {lineno}: no item id (expected key 'parent_asin' or "
                            f"'asin'); keys {sorted(rec)}")
        iid = str(iid).strip()
        if iid not in wanted:
            continue
        if iid in out:
            duplicates += 1  # the 2018 metadata repeats some products
            continue
        cat = _category_path(rec)
        brand = rec.get("brand") or rec.get("store")
        brand = clean_text(brand) if brand is not None else ""
        title = clean_text(rec["title"]) if rec.get("title") is not None else ""
        out[iid] = {
            "title": title or iid,
            "category_path": cat,
            "brand": brand or None,
            "attributes": _attributes(rec, cat),
        }
    if duplicates:
        log.warning("%s: %d duplicate product record(s); the first of each was kept", path,
                    duplicates)
    return out


def load(cfg: DataConfig) -> Dataset:
    """Read ``data.amazon`` into the common schema (event 'review', no baskets, no profiles)."""
    src = cfg.amazon
    if src.reviews is None:
        raise DataError("data.amazon.reviews is not set (path to the reviews .json/.jsonl[.gz])")
    reviews_path = Path(src.reviews)
    _check_suffix(reviews_path, "reviews")
    inter = _reviews(reviews_path)
    if cfg.min_rating is not None:
        inter = inter[inter["rating"] >= cfg.min_rating].reset_index(drop=True)
        if inter.empty:
            raise DataError(f"{reviews_path}: no reviews rated >= data.min_rating "
                            f"({cfg.min_rating})")
    inter = inter.drop(columns=["rating"])

    item_ids = list(dict.fromkeys(inter["item_id"]))
    if src.meta is not None:
        meta_path = Path(src.meta)
        _check_suffix(meta_path, "meta")
        meta = _meta(meta_path, set(item_ids))
        item_src = str(meta_path)
    else:
        meta, item_src = {}, f"items (built from the item ids of {reviews_path})"
    missing = [i for i in item_ids if i not in meta]
    if missing:
        where = f"in {src.meta}" if src.meta is not None else "(data.amazon.meta is not set)"
        log.warning("%d of %d reviewed items have no metadata %s; they are titled by their "
                    "ASIN (e.g. %s)", len(missing), len(item_ids), where,
                    ", ".join(missing[:5]))
    blank = {"category_path": "", "brand": None, "attributes": "{}"}
    rows = [meta.get(i) or {"title": i, **blank} for i in item_ids]
    items = pd.DataFrame({
        "item_id": pd.Series(item_ids, dtype="str"),
        "title": pd.Series([r["title"] for r in rows], dtype="str"),
        "category_path": pd.Series([r["category_path"] for r in rows], dtype="str"),
        "brand": pd.Series([r["brand"] for r in rows], dtype=object),
        "attributes": pd.Series([r["attributes"] for r in rows], dtype="str"),
    })
    users = pd.DataFrame({"user_id": pd.Series([], dtype="str")})
    return Dataset("amazon", items, inter, users, item_source=item_src,
                   interaction_source=str(reviews_path),
                   user_source="users (the Amazon data has no user profiles)")
