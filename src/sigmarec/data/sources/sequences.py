"""Item-id sequences plus a RecBole atomic item file: the layout of the public sequential
benchmarks (Amazon Beauty / Sports / Toys of P5, TIGER, LC-Rec; RecBole's own exports).

* ``sequences``: one user a line, ``USER_ID ITEM ITEM ...`` separated by whitespace, the items in
  time order. Blank lines are skipped; a user listed twice or with no item is an error.
* ``items``: a RecBole atomic file, tab-separated with a typed header
  (``item_id:token title:token categories:token_seq price:float brand:token``). It is read
  quote-aware (``csv``, quote character ``"``) because titles may hold a tab or a newline inside
  quotes; a plain split then yields wrong rows. A ``token_seq`` of categories is a quoted list
  (``'Beauty', 'Makeup', "Women's"``, read as a Python literal) or space-separated tokens.

These files carry no timestamps. Each interaction is given an order-preserving synthetic time:
its 0-based position in the user's sequence, as seconds after 1970-01-01. Only the order within a
user means anything (position 3 of one user is not "at the same time" as position 3 of another),
so this source suits the leave-one-out split, not the temporal one, nor tasks that read dates.

Item text follows TIGER and its ports: title, brand, category path and price, HTML entities
decoded (``amazon.clean_text``). Every problem is a one-line ``DataError`` naming the file, the
1-based line and the field.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.config import AtomicItemFields, DataConfig, ExpectedCounts, SequencesSource
from sigmarec.data.schema import Dataset
from sigmarec.data.sources.amazon import category_path, clean_text
from sigmarec.errors import DataError

log = logging.getLogger("sigmarec")

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")


def _require_file(path: Path, role: str) -> None:
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataError(f"{path}: {role} file not found{where}; set data.sequences.root or "
                        f"data.sequences.{role}")


# ----------------------------------------------------------------------------- sequences


def read_sequences(path: Path) -> pd.DataFrame:
    """The interactions of a sequence file in the common schema (synthetic position times)."""
    _require_file(path, "sequences")
    users: list[str] = []
    items: list[str] = []
    pos: list[int] = []
    first_line: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                tokens = line.split()
                if not tokens:
                    continue
                user, seq = tokens[0], tokens[1:]
                if not seq:
                    raise DataError(f"{path}: line {lineno}: user {user!r} has no items "
                                    "(expected 'USER_ID ITEM ITEM ...')")
                if user in first_line:
                    raise DataError(f"{path}: line {lineno}: user {user!r} is listed again "
                                    f"(first on line {first_line[user]})")
                first_line[user] = lineno
                users.extend([user] * len(seq))
                items.extend(seq)
                pos.extend(range(len(seq)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not users:
        raise DataError(f"{path}: sequences file is empty (no users)")
    inter = pd.DataFrame({
        "user_id": pd.Series(users, dtype="str"),
        "item_id": pd.Series(items, dtype="str"),
        "timestamp": pd.to_datetime(np.asarray(pos, dtype=np.int64), unit="s").astype(
            "datetime64[ns]"),
        "basket_id": pd.Series([None] * len(users), dtype=object),
        "quantity": 1.0,
        "event": "interaction",
    })
    inter.attrs["first_line"] = first_line  # for messages about a user's items
    return inter


# ----------------------------------------------------------------------------- atomic items


def _header(row: list[str], path: Path) -> tuple[list[str], list[str]]:
    names, types = [], []
    for col, field in enumerate(row, start=1):
        name, sep, kind = field.strip().partition(":")
        if not sep or not name:
            raise DataError(f"{path}: line 1, field {col} {field!r}: expected 'name:type' "
                            f"(a RecBole atomic header, type one of {', '.join(ATOMIC_TYPES)})")
        if kind not in ATOMIC_TYPES:
            raise DataError(f"{path}: line 1, field {name!r}: unknown type {kind!r}; expected "
                            f"one of {', '.join(ATOMIC_TYPES)}")
        if name in names:
            raise DataError(f"{path}: line 1, field {name!r}: listed twice in the header")
        names.append(name)
        types.append(kind)
    return names, types


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(first line of the record, fields)``; a quoted field may span lines."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t", quotechar='"', strict=True)
            start = 1
            for row in reader:
                yield start, row
                start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed quoting ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_token_seq(text: str) -> list[str]:
    """A ``token_seq`` cell: a quoted list (``'A', "B's"``) or space-separated tokens."""
    text = text.strip()
    if not text:
        return []
    if text[0] in "'\"[":
        value = ast.literal_eval(text if text.startswith("[") else f"[{text}]")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("not a list of strings")
        return value
    return text.split()


def _float(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def read_atomic_items(path: Path, fields: AtomicItemFields) -> pd.DataFrame:
    """The rows of a RecBole atomic ``.item`` file in the common item schema."""
    _require_file(path, "items")
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path}: items file is empty (no header)")
    names, types = _header(first[1], path)
    kind = dict(zip(names, types, strict=True))
    wanted = [fields.item, fields.title, fields.categories, fields.brand, fields.price,
              *fields.attributes]
    for name in (w for w in wanted if w is not None):
        if name not in kind:
            raise DataError(f"{path}: line 1: no field {name!r} in the header {names}; map the "
                            "fields with data.sequences.item_fields")
    if fields.price is not None and kind[fields.price] != "float":
        raise DataError(f"{path}: line 1, field {fields.price!r}: price must be of type float, "
                        f"header says {kind[fields.price]!r}")
    col = {n: i for i, n in enumerate(names)}
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise DataError(f"{path}: line {lineno}: {len(row)} fields, the header has "
                            f"{len(names)} (a tab or newline outside quotes?)")

        def cell(name: str | None, row: list[str] = row) -> str:
            return row[col[name]] if name is not None else ""

        item = cell(fields.item).strip()
        if not item:
            raise DataError(f"{path}: line {lineno}, field {fields.item!r}: missing item id")
        if item in seen:
            raise DataError(f"{path}: line {lineno}, field {fields.item!r}: item {item!r} is "
                            f"listed again (first on line {seen[item]})")
        seen[item] = lineno
        attrs: dict[str, Any] = {}
        for name in [fields.price, *fields.attributes]:
            if name is None:
                continue
            try:
                value = _typed(cell(name), kind[name])
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}: line {lineno}, field {name!r}: not a valid "
                                f"{kind[name]} ({e}) (value {cell(name)!r})") from None
            if value not in (None, "", []):
                attrs[name] = value
        try:
            levels = (parse_token_seq(cell(fields.categories))
                      if fields.categories and kind[fields.categories] == "token_seq"
                      else [cell(fields.categories)])
        except (ValueError, SyntaxError) as e:
            raise DataError(f"{path}: line {lineno}, field {fields.categories!r}: not a list of "
                            f"categories ({e}) (value {cell(fields.categories)!r})") from None
        brand = clean_text(cell(fields.brand))
        out.append({
            "item_id": item,
            "title": clean_text(cell(fields.title)) or item,  # an untitled item is named by id
            "category_path": category_path(levels),
            "brand": brand or None,
            "attributes": json.dumps(attrs, ensure_ascii=False),
        })
    if not out:
        raise DataError(f"{path}: items file has a header but no rows")
    return pd.DataFrame({
        "item_id": pd.Series([r["item_id"] for r in out], dtype="str"),
        "title": pd.Series([r["title"] for r in out], dtype="str"),
        "category_path": pd.Series([r["category_path"] for r in out], dtype="str"),
        "brand": pd.Series([r["brand"] for r in out], dtype=object),
        "attributes": pd.Series([r["attributes"] for r in out], dtype="str"),
    })


def _typed(text: str, kind: str) -> Any:
    if kind == "float":
        return _float(text)
    if kind == "float_seq":
        return [float(x) for x in text.split()]
    if kind == "token_seq":
        return [clean_text(t) for t in parse_token_seq(text)]
    return clean_text(text)


# ----------------------------------------------------------------------------- loading


def check_counts(inter: pd.DataFrame, expected: ExpectedCounts, source: str) -> dict[str, int]:
    """Log the counts read; warn, naming both numbers, where a published count differs."""
    counts = {"users": int(inter["user_id"].nunique()), "items": int(inter["item_id"].nunique()),
              "interactions": len(inter)}
    log.info("%s: %s users, %s items, %s interactions", source,
             *(f"{counts[k]:,}" for k in ("users", "items", "interactions")))
    for key, got in counts.items():
        want = getattr(expected, key)
        if want is not None and want != got:
            log.warning("%s: %s %s read, %s expected (data.sequences.expected.%s); is this the "
                        "intended file?", source, f"{got:,}", key, f"{want:,}", key)
    return counts


def load(cfg: DataConfig) -> Dataset:
    """Read ``data.sequences`` into the common schema (no baskets, no user profiles)."""
    src: SequencesSource = cfg.sequences
    seq_path = src.path(src.sequences)
    inter = read_sequences(seq_path)
    repeats = inter.duplicated(["user_id", "item_id"])
    if repeats.any():
        log.info("%s: %d repeated (user, item) pairs kept as separate interactions", seq_path,
                 int(repeats.sum()))
    check_counts(inter, src.expected, str(seq_path))
    if src.items is None:
        ids = pd.Series(pd.unique(inter["item_id"]), dtype="str")
        items = pd.DataFrame({"item_id": ids, "title": ids, "category_path": "",
                              "brand": pd.Series([None] * len(ids), dtype=object),
                              "attributes": "{}"})
        item_src = f"items (built from the item ids of {seq_path})"
    else:
        item_path = src.path(src.items)
        items = read_atomic_items(item_path, src.item_fields)
        item_src = str(item_path)
        unknown = ~inter["item_id"].isin(items["item_id"])
        if unknown.any():
            r = int(unknown.to_numpy().nonzero()[0][0])
            user = inter["user_id"].iloc[r]
            raise DataError(f"{seq_path}: line {inter.attrs['first_line'][user]}: item "
                            f"{inter['item_id'].iloc[r]!r} of user {user!r} has no row in "
                            f"{item_path}")
    users = pd.DataFrame({"user_id": pd.Series([], dtype="str")})
    return Dataset(src.name, items, inter, users, item_source=item_src,
                   interaction_source=str(seq_path),
                   user_source="users (a sequence file has no user profiles)",
                   has_dates=False)
