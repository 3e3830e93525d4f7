"""The user's own catalogue and logs: CSV, TSV, Parquet or JSON lines, chosen by file suffix.

Every problem becomes a one-line ``DataError`` naming the file and, where there is one, the
0-based data row, the column and the value, because these files come from outside the project
and their author needs to find the fault without a traceback. JSON-lines parse errors name the
1-based line of the file instead (what an editor shows), since a broken line has no row yet.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa

from sigmarec.config import DataConfig, FilesSource, ItemColumnMap
from sigmarec.data.schema import CATEGORY_SEP, Dataset, require_columns
from sigmarec.errors import DataError

SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".json")
DEFAULT_EVENT = "interaction"


# ----------------------------------------------------------------------------- reading


def _one_line(e: BaseException) -> str:
    """Parser messages can span lines; the CLI prints errors as a single line."""
    return " ".join(str(e).split()) or type(e).__name__


def _fail(src: str, row: int, column: str, what: str, value: Any) -> NoReturn:
    raise DataError(f"{src}: row {row}, column '{column}': {what} (value {_py(value)!r})")


def _py(v: Any) -> Any:
    """numpy scalars -> Python, so messages and JSON read ``1`` rather than ``np.int64(1)``."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v.item() if isinstance(v, np.generic) else v


def _kind(path: Path) -> str:
    """The format suffix, looking through a trailing ``.gz`` (``x.csv.gz`` is CSV)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unknown file type {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(SUFFIXES)} (optionally .gz)"
        )
    return suffix


def _open_text(path: Path) -> Any:
    """Open as UTF-8 text, gunzipping by content rather than name (downloads get renamed)."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115


def _parse_json_line(
    text: str, path: Path, lineno: int, fallback: Callable[[str], Any] | None
) -> dict[str, Any]:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        rec = None
        if fallback is not None:
            try:
                rec = fallback(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                rec = None
        if rec is None:
            raise DataError(
                f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno}) "
                f"(text {text[:60]!r})"
            ) from None
    if not isinstance(rec, dict):
        raise DataError(
            f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__} "
            f"(text {text[:60]!r})"
        )
    return rec


def iter_json_lines(
    path: Path, fallback: Callable[[str], Any] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a (gzipped) JSON-lines file.

    Streamed so that large public dumps (Amazon reviews) need not fit in memory as text.
    ``fallback`` parses a line that is not strict JSON (the 2014 Amazon metadata files are
    Python literals); errors name the 1-based line.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lineno = 0
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                text = line.strip()
                if text:
                    yield lineno, _parse_json_line(text, path, lineno, fallback)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise DataError(f"{path}: cannot read after line {lineno} ({_one_line(e)})") from None


def _read_json(path: Path) -> pd.DataFrame:
    # A ``.json`` file may also hold one JSON array of objects rather than one object a line.
    with _open_text(path) as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        try:
            with _open_text(path) as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: row {bad}: expected a JSON object, got "
                            f"{type(data[bad]).__name__} (value {data[bad]!r})")
        records = data
    else:
        records = [rec for _, rec in iter_json_lines(path)]
    # object dtype keeps ids exactly as written (no int -> float when some are missing).
    return pd.DataFrame(records, dtype=object)


def read_table(path: Path | str, role: str) -> pd.DataFrame:
    """Read one user file by suffix; any reader failure becomes a ``DataError`` naming it."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise DataError(f"{path}: {role} file not found")
    try:
        if kind in (".csv", ".tsv"):
            # Text cells stay text (ids such as "007" survive) and only empty cells are missing:
            # pandas' default would also turn ids or brands like "NA" or "None" into NaN.
            df = pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", dtype=str,
                             keep_default_na=False, na_values=[""])
        elif kind == ".parquet":
            # Nullable dtypes keep integer ids integral when some are missing.
            df = pd.read_parquet(path, dtype_backend="numpy_nullable")
        else:
            df = _read_json(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: {role} file is empty") from None
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zlib.error, pa.ArrowException) as e:
        # ParserError, ArrowInvalid and UnicodeDecodeError are all ValueErrors.
        what = {".tsv": "TSV", ".csv": "CSV", ".parquet": "Parquet"}.get(kind, "JSON")
        raise DataError(f"{path}: cannot read as {what} ({_one_line(e)})") from None
    if len(df) == 0:
        raise DataError(f"{path}: {role} file is empty (no data rows)")
    return df.reset_index(drop=True)


def _require(df: pd.DataFrame, columns: list[str], src: str, setting: str) -> None:
    try:
        require_columns(df, columns, src)
    except DataError as e:
        raise DataError(f"{e}; map them with data.files.{setting}") from None


# ----------------------------------------------------------------------------- converting


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    if isinstance(v, float | np.floating):
        return math.isnan(v)
    return False


def _text(v: Any) -> str | None:
    """A cell as text: ints written as ints (``1``, not ``1.0``), blanks as missing."""
    if _missing(v):
        return None
    v = _py(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    out = str(v).strip()
    return out or None


def _texts(col: pd.Series) -> pd.Series:
    """``_text`` for a whole column (object dtype, None for missing); vectorised when possible."""
    if pd.api.types.is_string_dtype(col.dtype) or pd.api.types.is_integer_dtype(col.dtype):
        s = col.astype("string").str.strip()  # CSV text, integer ids: the common, large cases
        s = s.mask(s == "")
        return pd.Series(s.astype(object).where(s.notna(), None), index=col.index, dtype=object)
    return pd.Series([_text(v) for v in col], index=col.index, dtype=object)


def _ids(df: pd.DataFrame, column: str, src: str, what: str) -> pd.Series:
    values = _texts(df[column])
    missing = values.isna()
    if missing.any():
        row = int(missing.to_numpy().nonzero()[0][0])
        _fail(src, row, column, f"missing {what}", df[column].iloc[row])
    return values.astype("str")


def _optional_text(df: pd.DataFrame, column: str) -> pd.Series:
    # object dtype keeps None (not NaN) for missing values, which downstream code tests as falsy.
    return _texts(df[column])


def _timestamps(df: pd.DataFrame, column: str, unit: str, src: str) -> pd.Series:
    col = df[column]
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        parsed = col  # Parquet timestamps arrive typed
    elif unit == "iso":
        # Numbers would be read as nanoseconds since 1970 without complaint: refuse them.
        if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
            is_number = col.notna()
        elif col.dtype == object:  # JSON values keep their Python types
            is_number = col.map(type).isin([int, float]) & col.notna()
        else:
            is_number = pd.Series(False, index=col.index)
        if is_number.any():
            row = int(is_number.to_numpy().nonzero()[0][0])
            _fail(src, row, column, "a number where a date/time was expected; set "
                  "data.files.timestamp_unit to 's', 'ms', 'us' or 'ns' for epoch times",
                  col.iloc[row])
        parsed = pd.to_datetime(col.astype(object), format="mixed", errors="coerce", utc=True)
    else:
        numbers = pd.to_numeric(col.astype(object), errors="coerce")
        parsed = pd.to_datetime(numbers, unit=unit, errors="coerce")
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    # datetime64[ns] spans 1677-2262; anything outside cannot be stored and is reported too.
    bad = parsed.isna() | (parsed < pd.Timestamp.min) | (parsed > pd.Timestamp.max)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        how = "ISO date/time" if unit == "iso" else f"epoch time in unit '{unit}'"
        _fail(src, row, column, f"missing or unparseable timestamp (expected {how}, "
              "set by data.files.timestamp_unit)", col.iloc[row])
    return pd.Series(parsed.to_numpy().astype("datetime64[ns]"), index=df.index)


def _quantity(df: pd.DataFrame, column: str, src: str) -> pd.Series:
    col = df[column]
    q = pd.to_numeric(col.astype(object), errors="coerce")
    bad = q.isna() | ~np.isfinite(q.astype(float))
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        _fail(src, row, column, "quantity is missing or not a number", col.iloc[row])
    return q.astype(float)


def _attributes(df: pd.DataFrame, columns: list[str]) -> list[str]:
    rows = df[columns].to_dict("records") if columns else [{}] * len(df)
    return [
        json.dumps({k: _py(v) for k, v in r.items() if not _missing(v)}, ensure_ascii=False,
                   default=str)
        for r in rows
    ]


def _category_paths(df: pd.DataFrame, columns: list[str]) -> list[str]:
    if not columns:
        return [""] * len(df)
    levels = [[_text(v) for v in df[c]] for c in columns]
    return [CATEGORY_SEP.join(x for x in row if x) for row in zip(*levels, strict=True)]


def _embedding(v: Any) -> list[float] | None:
    v = _py(v)
    if isinstance(v, str):
        text = v.strip()
        try:
            v = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
        except json.JSONDecodeError:
            return None
    if not isinstance(v, list | tuple) or not v:
        return None
    try:
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(x) for x in out) else None


def _embeddings(df: pd.DataFrame, column: str, src: str) -> pd.Series:
    vectors = []
    for row, v in enumerate(df[column]):
        vec = _embedding(v) if not (np.isscalar(v) and _missing(v)) else None
        if vec is None:
            _fail(src, row, column, "image embedding must be a non-empty list of numbers", v)
        if vectors and len(vec) != len(vectors[0]):
            _fail(src, row, column, f"image embedding has {len(vec)} values, row 0 has "
                  f"{len(vectors[0])}", v)
        vectors.append(vec)
    return pd.Series(vectors, index=df.index, dtype=object)


# ----------------------------------------------------------------------------- tables


def _interactions(fs: FilesSource) -> tuple[pd.DataFrame, str]:
    if fs.interactions is None:
        raise DataError("data.files.interactions is not set (path to the interactions file)")
    src = str(fs.interactions)
    df = read_table(fs.interactions, "interactions")
    m = fs.interaction_columns
    wanted = [m.user, m.item, m.timestamp, *(c for c in (m.basket, m.quantity, m.event) if c)]
    _require(df, wanted, src, "interaction_columns")
    out = pd.DataFrame({
        "user_id": _ids(df, m.user, src, "user id"),
        "item_id": _ids(df, m.item, src, "item id"),
        "timestamp": _timestamps(df, m.timestamp, fs.timestamp_unit, src),
        "basket_id": _optional_text(df, m.basket) if m.basket else pd.Series(
            [None] * len(df), index=df.index, dtype=object),
        "quantity": _quantity(df, m.quantity, src) if m.quantity else 1.0,
        "event": (_optional_text(df, m.event).fillna(DEFAULT_EVENT).astype("str")
                  if m.event else DEFAULT_EVENT),
    })
    return out, src


def _items(fs: FilesSource, item_ids: pd.Series, inter_src: str) -> tuple[pd.DataFrame, str]:
    if fs.items is None:
        # No catalogue: the ids seen are the catalogue, each titled by its id.
        ids = pd.Series(pd.unique(item_ids), dtype="str")
        items = pd.DataFrame({
            "item_id": ids,
            "title": ids,
            "category_path": "",
            "brand": pd.Series([None] * len(ids), dtype=object),
            "attributes": "{}",
        })
        return items, f"items (built from the item ids of {inter_src})"
    src = str(fs.items)
    df = read_table(fs.items, "items")
    m = fs.item_columns
    wanted = [m.item, *(c for c in (m.title, m.brand, m.image_embedding) if c),
              *m.category_path, *m.attributes]
    _require(df, list(dict.fromkeys(wanted)), src, "item_columns")
    ids = _ids(df, m.item, src, "item id")
    title = _optional_text(df, m.title) if m.title else pd.Series([None] * len(df), dtype=object)
    items = pd.DataFrame({
        "item_id": ids,
        "title": title.fillna(ids).astype("str"),  # an untitled item is named by its id
        "category_path": pd.Series(_category_paths(df, m.category_path), dtype="str"),
        "brand": _optional_text(df, m.brand) if m.brand else pd.Series(
            [None] * len(df), dtype=object),
        "attributes": pd.Series(_attributes(df, m.attributes), dtype="str"),
    })
    if m.image_embedding:
        items["image_embedding"] = _embeddings(df, m.image_embedding, src)
    return items, src


def read_items(path: Path, columns: ItemColumnMap) -> tuple[pd.DataFrame, str]:
    """One item file in the common item schema, columns mapped by ``columns`` (as the files
    source maps ``data.files.items``); returns (items, source name for messages)."""
    return _items(FilesSource(items=path, item_columns=columns), pd.Series(dtype=str), str(path))


def _users(fs: FilesSource) -> tuple[pd.DataFrame, str]:
    if fs.users is None:
        return pd.DataFrame({"user_id": pd.Series([], dtype="str")}), "users (no users file)"
    src = str(fs.users)
    df = read_table(fs.users, "users")
    uid = fs.user_id_column
    profile = fs.user_profile_columns or [c for c in df.columns if c != uid]
    _require(df, [uid, *profile], src, "user_id_column / data.files.user_profile_columns")
    users = pd.DataFrame({"user_id": _ids(df, uid, src, "user id")})
    for c in profile:
        if c == uid:
            continue
        name = "user_profile_" + c if c == "user_id" else str(c)
        users[name] = _optional_text(df, c)
    return users, src


def load(cfg: DataConfig) -> Dataset:
    """Read ``data.files`` into the common schema; ``validate`` then checks cross-table facts."""
    fs = cfg.files
    inter, inter_src = _interactions(fs)
    items, item_src = _items(fs, inter["item_id"], inter_src)
    users, user_src = _users(fs)
    return Dataset("files", items, inter, users, item_source=item_src,
                   interaction_source=inter_src, user_source=user_src)
