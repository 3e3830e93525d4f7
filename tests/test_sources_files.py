"""The ``files`` source: the user's own CSV / TSV / Parquet / JSON-lines tables."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from sigmarec.config import ColumnMap, DataConfig, FilesSource, ItemColumnMap
from sigmarec.data.schema import CATEGORY_SEP
from sigmarec.data.sources import load_source
from sigmarec.errors import DataError


def _cfg(**files: object) -> DataConfig:
    return DataConfig(source="files", files=FilesSource(**files))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _esc(path: Path) -> str:
    return re.escape(str(path))


# ------------------------------------------------------------------- happy paths


@pytest.fixture
def csv_files(tmp_path: Path) -> dict[str, Path]:
    inter = tmp_path / "log.csv"
    inter.write_text(
        "customer,sku,when,order,qty,kind\n"
        "u1,007,2024-01-01 10:00:00,b1,2,purchase\n"
        "u1,NA,2024-01-01T10:00:00Z,b1,1.5,purchase\n"
        "u2,007,2024-01-02,,1,\n"
    )
    items = tmp_path / "catalogue.csv"
    items.write_text(
        "sku,name,dept,aisle,maker,price,size\n"
        "007,Bond soap,Health,Soap,Acme,2.5,100g\n"
        "NA,,Food,,,1,\n"
    )
    users = tmp_path / "people.csv"
    users.write_text("cid,age,income,unused\nu1,30,high,x\nu2,,low,y\n")
    return {"interactions": inter, "items": items, "users": users}


def test_csv_happy_path(csv_files: dict[str, Path]) -> None:
    cfg = _cfg(
        **csv_files,
        interaction_columns=ColumnMap(user="customer", item="sku", timestamp="when",
                                      basket="order", quantity="qty", event="kind"),
        item_columns=ItemColumnMap(item="sku", title="name", category_path=["dept", "aisle"],
                                   brand="maker", attributes=["price", "size"]),
        user_id_column="cid",
        user_profile_columns=["age", "income"],
    )
    ds = load_source(cfg)
    inter, items, users = ds.interactions, ds.items, ds.users

    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "basket_id", "quantity",
                                   "event"]
    # ids stay text exactly as written: no "7" for "007", no NaN for the id "NA"
    assert inter["item_id"].tolist() == ["007", "NA", "007"]
    assert pd.api.types.is_string_dtype(inter["user_id"])
    assert inter["timestamp"].dtype == "datetime64[ns]"
    assert inter["timestamp"].tolist() == [pd.Timestamp("2024-01-01 10:00"),
                                           pd.Timestamp("2024-01-01 10:00"),
                                           pd.Timestamp("2024-01-02")]
    assert inter["basket_id"].tolist() == ["b1", "b1", None]
    assert inter["quantity"].dtype == "float64"
    assert inter["quantity"].tolist() == [2.0, 1.5, 1.0]
    assert inter["event"].tolist() == ["purchase", "purchase", "interaction"]

    assert items["item_id"].tolist() == ["007", "NA"]
    assert items["title"].tolist() == ["Bond soap", "NA"]  # untitled -> its id
    assert items["category_path"].tolist() == [f"Health{CATEGORY_SEP}Soap", "Food"]
    assert items["brand"].tolist() == ["Acme", None]
    assert json.loads(items["attributes"][0]) == {"price": "2.5", "size": "100g"}
    assert json.loads(items["attributes"][1]) == {"price": "1"}
    assert "image_embedding" not in items

    assert list(users.columns) == ["user_id", "age", "income"]
    assert users["user_id"].tolist() == ["u1", "u2"]
    assert users["age"].tolist() == ["30", None]
    assert ds.interaction_source == str(csv_files["interactions"])
    assert ds.item_source == str(csv_files["items"])
    assert ds.user_source == str(csv_files["users"])


def test_all_profile_columns_when_list_empty(csv_files: dict[str, Path]) -> None:
    cfg = _cfg(users=csv_files["users"], interactions=csv_files["interactions"],
               interaction_columns=ColumnMap(user="customer", item="sku", timestamp="when"),
               user_id_column="cid")
    ds = load_source(cfg)
    assert list(ds.users.columns) == ["user_id", "age", "income", "unused"]


def test_parquet_happy_path(tmp_path: Path) -> None:
    inter = tmp_path / "log.parquet"
    pd.DataFrame({
        "user_id": [10, 10, 11],
        "item_id": pd.array([1, 2, 1], dtype="int64"),
        "timestamp": [1_700_000_000, 1_700_000_060, 1_700_000_120],
        "quantity": [1, 3, 2],
    }).to_parquet(inter)
    items = tmp_path / "items.parquet"
    pd.DataFrame({
        "item_id": [1, 2],
        "title": ["one", "two"],
        "cat": ["A", "B"],
        "weight": [1.5, None],
        "emb": [[0.1, 0.2], [0.3, 0.4]],
    }).to_parquet(items)
    cfg = _cfg(interactions=inter, items=items, timestamp_unit="s",
               interaction_columns=ColumnMap(quantity="quantity"),
               item_columns=ItemColumnMap(category_path=["cat"], attributes=["weight"],
                                          image_embedding="emb"))
    ds = load_source(cfg)
    assert ds.interactions["user_id"].tolist() == ["10", "10", "11"]
    assert ds.interactions["item_id"].tolist() == ["1", "2", "1"]
    assert ds.interactions["timestamp"].dtype == "datetime64[ns]"
    assert ds.interactions["timestamp"][1] == pd.Timestamp("2023-11-14 22:14:20")
    assert ds.interactions["quantity"].tolist() == [1.0, 3.0, 2.0]
    assert ds.interactions["basket_id"].isna().all()
    assert ds.items["item_id"].tolist() == ["1", "2"]
    assert ds.items["category_path"].tolist() == ["A", "B"]
    assert json.loads(ds.items["attributes"][0]) == {"weight": 1.5}
    assert json.loads(ds.items["attributes"][1]) == {}
    assert ds.items["image_embedding"].tolist() == [[0.1, 0.2], [0.3, 0.4]]
    assert all(isinstance(x, float) for x in ds.items["image_embedding"][0])


def test_parquet_typed_timestamps_are_used(tmp_path: Path) -> None:
    inter = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": ["a"], "item_id": ["x"],
                  "timestamp": pd.to_datetime(["2024-03-01T12:00:00+01:00"])}).to_parquet(inter)
    ds = load_source(_cfg(interactions=inter))
    assert ds.interactions["timestamp"].tolist() == [pd.Timestamp("2024-03-01 11:00")]
    assert ds.interactions["timestamp"].dtype == "datetime64[ns]"


def test_jsonl_happy_path_without_items_or_users(tmp_path: Path) -> None:
    inter = _write_jsonl(tmp_path / "log.jsonl", [
        {"user_id": "a", "item_id": 5, "timestamp": 1_700_000_000_000},
        {"user_id": "b", "item_id": "x9", "timestamp": 1_700_000_001_000},
        {"user_id": "a", "item_id": 5, "timestamp": 1_700_000_002_000},
    ])
    ds = load_source(_cfg(interactions=inter, timestamp_unit="ms"))
    inter_df = ds.interactions
    assert inter_df["item_id"].tolist() == ["5", "x9", "5"]
    assert inter_df["timestamp"].dtype == "datetime64[ns]"
    assert inter_df["timestamp"][0] == pd.Timestamp("2023-11-14 22:13:20")
    assert inter_df["quantity"].tolist() == [1.0, 1.0, 1.0]
    assert inter_df["event"].tolist() == ["interaction"] * 3
    assert inter_df["basket_id"].tolist() == [None, None, None]
    # minimal catalogue: the ids seen, titled by themselves
    assert ds.items["item_id"].tolist() == ["5", "x9"]
    assert ds.items["title"].tolist() == ["5", "x9"]
    assert ds.items["category_path"].tolist() == ["", ""]
    assert ds.items["brand"].tolist() == [None, None]
    assert ds.items["attributes"].tolist() == ["{}", "{}"]
    assert list(ds.users.columns) == ["user_id"]
    assert len(ds.users) == 0


def test_tsv_gz_and_json_array(tmp_path: Path) -> None:
    inter = tmp_path / "log.tsv.gz"
    with gzip.open(inter, "wt") as fh:
        fh.write("user_id\titem_id\ttimestamp\nu\ti\t2024-05-01\n")
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"item_id": "i", "title": "Thing"}], indent=2))
    ds = load_source(_cfg(interactions=inter, items=items))
    assert ds.interactions["item_id"].tolist() == ["i"]
    assert ds.items["title"].tolist() == ["Thing"]


# ------------------------------------------------------------------- bad inputs


def test_interactions_not_set() -> None:
    with pytest.raises(DataError, match="data.files.interactions is not set"):
        load_source(_cfg())


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=_esc(path) + ".*not found"):
        load_source(_cfg(interactions=path))


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "log.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=_esc(path) + r".*unknown file type '\.xlsx'"):
        load_source(_cfg(interactions=path))


def test_malformed_csv(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu,i,2024-01-01\nu,i,2024-01-01,extra,cells\n")
    with pytest.raises(DataError, match=_esc(path) + r": cannot read as CSV \(.*line 3") as e:
        load_source(_cfg(interactions=path))
    assert "\n" not in str(e.value)


def test_malformed_parquet(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=_esc(path) + ": cannot read as Parquet"):
        load_source(_cfg(interactions=path))


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"user_id": "u", "item_id": "i", "timestamp": "2024-01-01"}\n\n'
                    '{"user_id": "u", "item_id": \n')
    with pytest.raises(DataError, match=_esc(path) + ": line 3: not valid JSON"):
        load_source(_cfg(interactions=path))


def test_jsonl_line_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"user_id": "u", "item_id": "i", "timestamp": "2024-01-01"}\n[1, 2]\n')
    with pytest.raises(DataError, match=_esc(path) + ": line 2: expected a JSON object"):
        load_source(_cfg(interactions=path))


def test_missing_mapped_column(csv_files: dict[str, Path]) -> None:
    path = csv_files["interactions"]
    cfg = _cfg(interactions=path,
               interaction_columns=ColumnMap(user="client", item="sku", timestamp="when"))
    with pytest.raises(DataError, match=_esc(path) + r": missing column\(s\) \['client'\]"):
        load_source(cfg)


def test_missing_item_column(csv_files: dict[str, Path]) -> None:
    path = csv_files["items"]
    cfg = _cfg(interactions=csv_files["interactions"], items=path,
               interaction_columns=ColumnMap(user="customer", item="sku", timestamp="when"),
               item_columns=ItemColumnMap(item="sku", title="name", brand="label"))
    with pytest.raises(DataError, match=_esc(path) + r": missing column\(s\) \['label'\]"):
        load_source(cfg)


def test_unparseable_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,ts\nu,i,2024-01-01\nu,i,not a date\nu,i,also bad\n")
    cfg = _cfg(interactions=path, interaction_columns=ColumnMap(timestamp="ts"))
    with pytest.raises(DataError,
                       match=_esc(path) + r": row 1, column 'ts': .*timestamp.*'not a date'"):
        load_source(cfg)


def test_epoch_number_with_iso_unit(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "log.jsonl",
                        [{"user_id": "u", "item_id": "i", "timestamp": 1_700_000_000}])
    with pytest.raises(DataError, match=_esc(path) + r": row 0, column 'timestamp'.*"
                       r"timestamp_unit.*1700000000"):
        load_source(_cfg(interactions=path))


def test_epoch_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu,i,1700000000\nu,i,1e30\nu,i,\n")
    with pytest.raises(DataError, match=_esc(path) + r": row 1, column 'timestamp'.*'1e30'"):
        load_source(_cfg(interactions=path, timestamp_unit="s"))


def test_missing_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu,i,2024-01-01\nu,i,\n")
    with pytest.raises(DataError, match=_esc(path) + r": row 1, column 'timestamp'"):
        load_source(_cfg(interactions=path))


def test_non_numeric_quantity(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,qty\nu,i,2024-01-01,1\nu,i,2024-01-01,2\n"
                    "u,i,2024-01-01,two\n")
    cfg = _cfg(interactions=path, interaction_columns=ColumnMap(quantity="qty"))
    with pytest.raises(DataError, match=_esc(path) + r": row 2, column 'qty': .*'two'"):
        load_source(cfg)


def test_missing_user_id(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\nu,i,2024-01-01\n,i,2024-01-01\n")
    with pytest.raises(DataError, match=_esc(path) + r": row 1, column 'user_id': missing user"):
        load_source(_cfg(interactions=path))


@pytest.mark.parametrize(("name", "text"), [
    ("log.csv", ""),
    ("log.csv", "user_id,item_id,timestamp\n"),
    ("log.jsonl", "\n\n"),
])
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=_esc(path) + ": interactions file is empty"):
        load_source(_cfg(interactions=path))


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    pd.DataFrame({"item_id": pd.Series([], dtype=str)}).to_parquet(path)
    inter = tmp_path / "log.csv"
    inter.write_text("user_id,item_id,timestamp\nu,i,2024-01-01\n")
    with pytest.raises(DataError, match=_esc(path) + ": items file is empty"):
        load_source(_cfg(interactions=inter, items=path))


def test_unknown_item_named_by_validate(tmp_path: Path) -> None:
    inter = tmp_path / "log.csv"
    inter.write_text("user_id,item_id,timestamp\nu,i1,2024-01-01\nu,ghost,2024-01-02\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni1,One\n")
    with pytest.raises(DataError, match=_esc(inter) + r": row 1, column 'item_id': item not in "
                       r"the catalogue \(" + _esc(items) + r"\) \(value 'ghost'\)"):
        load_source(_cfg(interactions=inter, items=items))


def test_duplicate_item_named_by_validate(tmp_path: Path) -> None:
    inter = tmp_path / "log.csv"
    inter.write_text("user_id,item_id,timestamp\nu,i1,2024-01-01\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni1,One\ni2,Two\ni1,Again\n")
    with pytest.raises(DataError,
                       match=_esc(items) + r": row 2, column 'item_id': duplicate item id"):
        load_source(_cfg(interactions=inter, items=items))


def test_bad_image_embedding(tmp_path: Path) -> None:
    inter = tmp_path / "log.csv"
    inter.write_text("user_id,item_id,timestamp\nu,a,2024-01-01\n")
    items = _write_jsonl(tmp_path / "items.jsonl", [
        {"item_id": "a", "emb": [0.1, 0.2]},
        {"item_id": "b", "emb": [0.1, "x"]},
    ])
    cfg = _cfg(interactions=inter, items=items,
               item_columns=ItemColumnMap(title=None, image_embedding="emb"))
    with pytest.raises(DataError, match=_esc(items) + r": row 1, column 'emb'.*'x'"):
        load_source(cfg)


def test_embedding_length_mismatch_from_csv(tmp_path: Path) -> None:
    inter = tmp_path / "log.csv"
    inter.write_text("user_id,item_id,timestamp\nu,a,2024-01-01\n")
    items = tmp_path / "items.csv"
    items.write_text('item_id,emb\na,"[0.1, 0.2]"\nb,0.5 0.6 0.7\n')
    cfg = _cfg(interactions=inter, items=items,
               item_columns=ItemColumnMap(title=None, image_embedding="emb"))
    with pytest.raises(DataError, match=_esc(items) + r": row 1, column 'emb': .*3 values"):
        load_source(cfg)
