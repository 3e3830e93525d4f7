"""The ``amazon`` source: the 2014, 2018 and 2023 public Amazon-reviews formats."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from sigmarec.config import AmazonSource, DataConfig
from sigmarec.data.schema import CATEGORY_SEP
from sigmarec.data.sources import load_source
from sigmarec.errors import DataError


def _cfg(reviews: Path | None, meta: Path | None = None, **kw: object) -> DataConfig:
    return DataConfig(source="amazon", amazon=AmazonSource(reviews=reviews, meta=meta), **kw)


def _lines(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _esc(path: Path) -> str:
    return re.escape(str(path))


def _check_interactions(inter: pd.DataFrame) -> None:
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "basket_id", "quantity",
                                   "event"]
    assert pd.api.types.is_string_dtype(inter["user_id"])
    assert pd.api.types.is_string_dtype(inter["item_id"])
    assert inter["timestamp"].dtype == "datetime64[ns]"
    assert inter["basket_id"].isna().all()
    assert inter["quantity"].tolist() == [1.0] * len(inter)
    assert inter["event"].tolist() == ["review"] * len(inter)


def test_2014_gzip_with_python_literal_meta(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    reviews = _lines(tmp_path / "reviews_Beauty_5.json.gz", [
        json.dumps({"reviewerID": "A1", "asin": "B01", "reviewerName": "x", "helpful": [0, 0],
                    "reviewText": "ok", "overall": 5.0, "summary": "s",
                    "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"}),
        json.dumps({"reviewerID": "A2", "asin": "B02", "overall": 3.0,
                    "unixReviewTime": 1252886400}),
        json.dumps({"reviewerID": "A1", "asin": "B03", "overall": 4.0,
                    "unixReviewTime": 1252972800}),
    ])
    meta = _lines(tmp_path / "meta_Beauty.json.gz", [
        repr({"asin": "B01", "title": "Rose 'Petal' Soap", "price": 12.5, "brand": "Acme",
              "categories": [["Beauty", "Skin Care", "Face"], ["Gifts"]],
              "salesRank": {"Beauty": 10}}),
        repr({"asin": "B02", "categories": [["Beauty"]]}),  # no title
        repr({"asin": "B99", "title": "never reviewed", "categories": [["Beauty"]]}),
    ])
    with caplog.at_level(logging.WARNING, logger="sigmarec"):
        ds = load_source(_cfg(reviews, meta))
    _check_interactions(ds.interactions)
    assert ds.interactions["user_id"].tolist() == ["A1", "A2", "A1"]
    assert ds.interactions["item_id"].tolist() == ["B01", "B02", "B03"]
    assert ds.interactions["timestamp"][0] == pd.Timestamp("2009-09-13")

    items = ds.items.set_index("item_id")
    assert list(items.index) == ["B01", "B02", "B03"]  # B99 was never reviewed
    assert items.loc["B01", "title"] == "Rose 'Petal' Soap"
    assert items.loc["B01", "category_path"] == CATEGORY_SEP.join(["Beauty", "Skin Care", "Face"])
    assert items.loc["B01", "brand"] == "Acme"
    assert json.loads(items.loc["B01", "attributes"]) == {"price": 12.5}
    assert items.loc["B02", "title"] == "B02"
    assert items.loc["B02", "brand"] is None
    # B03 is missing from the metadata: kept, titled by its ASIN, with a warning
    assert items.loc["B03", "title"] == "B03"
    assert items.loc["B03", "category_path"] == ""
    assert items.loc["B03", "attributes"] == "{}"
    assert any("1 of 3 reviewed items have no metadata" in r.getMessage() and "B03" in
               r.getMessage() for r in caplog.records)
    assert ds.item_source == str(meta)
    assert ds.interaction_source == str(reviews)
    assert list(ds.users.columns) == ["user_id"] and len(ds.users) == 0


def test_2018_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reviews = _lines(tmp_path / "Beauty_5.json", [
        json.dumps({"overall": 5.0, "verified": True, "reviewTime": "09 1, 2016",
                    "reviewerID": "U1", "asin": "P1", "style": {"Size:": " 8 oz"},
                    "unixReviewTime": 1472688000, "vote": "2"}),
        json.dumps({"overall": 1.0, "reviewerID": "U2", "asin": "P2",
                    "unixReviewTime": 1472774400}),
    ])
    meta = _lines(tmp_path / "meta_Beauty.json", [
        json.dumps({"asin": "P1", "title": "Salt &amp; Pepper", "brand": "Chef",
                    "category": ["Home &amp; Kitchen", "Spices", ""], "price": "$8.99",
                    "main_cat": "Grocery", "also_buy": ["P2"]}),
        json.dumps({"asin": "P1", "title": "duplicate record", "category": []}),
        json.dumps({"asin": "P2", "title": "Shoe", "brand": "", "category": [],
                    "main_cat": '<img src="x.png" alt="AMAZON FASHION"/>',
                    "price": "<span>long scraped html that is no price</span>"}),
    ])
    with caplog.at_level(logging.WARNING, logger="sigmarec"):
        ds = load_source(_cfg(reviews, meta))
    _check_interactions(ds.interactions)
    assert ds.interactions["timestamp"][0] == pd.Timestamp("2016-09-01")
    items = ds.items.set_index("item_id")
    assert items.loc["P1", "title"] == "Salt & Pepper"
    assert items.loc["P1", "category_path"] == f"Home & Kitchen{CATEGORY_SEP}Spices"
    assert json.loads(items.loc["P1", "attributes"]) == {"price": "$8.99",
                                                         "main_category": "Grocery"}
    assert items.loc["P2", "category_path"] == "AMAZON FASHION"  # main_cat as the fallback
    assert items.loc["P2", "brand"] is None
    assert json.loads(items.loc["P2", "attributes"]) == {}
    assert any("duplicate" in r.getMessage() for r in caplog.records)


def test_2023_format_and_min_rating(tmp_path: Path) -> None:
    reviews = _lines(tmp_path / "All_Beauty.jsonl", [
        json.dumps({"rating": 5.0, "title": "great", "text": "t", "images": [], "asin": "C1v",
                    "parent_asin": "C1", "user_id": "AG1", "timestamp": 1588687728923,
                    "helpful_vote": 0, "verified_purchase": True}),
        json.dumps({"rating": 2.0, "asin": "C2", "parent_asin": "C2", "user_id": "AG2",
                    "timestamp": 1588687729000}),
        json.dumps({"rating": 4.0, "asin": "C1w", "parent_asin": "C1", "user_id": "AG2",
                    "timestamp": 1588687730000}),
    ])
    meta = _lines(tmp_path / "meta_All_Beauty.jsonl", [
        json.dumps({"main_category": "All Beauty", "title": "Lip balm", "average_rating": 4.1,
                    "rating_number": 10, "features": [], "price": None, "store": "Balmy",
                    "categories": [], "details": {"Brand": "Balmy"}, "parent_asin": "C1"}),
        json.dumps({"main_category": "All Beauty", "title": "Comb", "price": 3.0,
                    "store": None, "categories": ["Beauty", "Tools"], "parent_asin": "C2"}),
    ])
    ds = load_source(_cfg(reviews, meta))
    _check_interactions(ds.interactions)
    assert ds.interactions["item_id"].tolist() == ["C1", "C2", "C1"]  # parent_asin
    assert ds.interactions["timestamp"][0] == pd.Timestamp(1588687728923, unit="ms")
    items = ds.items.set_index("item_id")
    assert list(items.index) == ["C1", "C2"]
    assert items.loc["C1", "title"] == "Lip balm"
    assert items.loc["C1", "category_path"] == "All Beauty"
    assert items.loc["C1", "brand"] == "Balmy"
    assert json.loads(items.loc["C1", "attributes"]) == {}
    assert items.loc["C2", "category_path"] == f"Beauty{CATEGORY_SEP}Tools"
    assert json.loads(items.loc["C2", "attributes"]) == {"price": 3.0,
                                                         "main_category": "All Beauty"}

    ds = load_source(_cfg(reviews, meta, min_rating=4.0))
    assert ds.interactions["user_id"].tolist() == ["AG1", "AG2"]


def test_without_meta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reviews = _lines(tmp_path / "r.jsonl.gz", [
        json.dumps({"reviewerID": "A", "asin": "X", "overall": 5, "unixReviewTime": 1}),
        json.dumps({"reviewerID": "B", "asin": "Y", "overall": 5, "unixReviewTime": "2"}),
    ])
    with caplog.at_level(logging.WARNING, logger="sigmarec"):
        ds = load_source(_cfg(reviews))
    assert ds.items["item_id"].tolist() == ["X", "Y"]
    assert ds.items["title"].tolist() == ["X", "Y"]
    assert any("data.amazon.meta is not set" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------- bad inputs


def test_reviews_not_set() -> None:
    with pytest.raises(DataError, match="data.amazon.reviews is not set"):
        load_source(_cfg(None))


def test_reviews_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "none.json.gz"
    with pytest.raises(DataError, match=_esc(path) + ": file not found"):
        load_source(_cfg(path))


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=_esc(path) + ": unknown file type"):
        load_source(_cfg(path))


def test_malformed_review_line(tmp_path: Path) -> None:
    path = _lines(tmp_path / "r.json.gz", [
        json.dumps({"reviewerID": "A", "asin": "X", "unixReviewTime": 1}),
        "",
        '{"reviewerID": "B", "asin": ',
    ])
    with pytest.raises(DataError, match=_esc(path) + r": line 3: not valid JSON"):
        load_source(_cfg(path))


def test_malformed_meta_line(tmp_path: Path) -> None:
    reviews = _lines(tmp_path / "r.json", [
        json.dumps({"reviewerID": "A", "asin": "X", "unixReviewTime": 1}),
    ])
    meta = _lines(tmp_path / "meta.json", [
        repr({"asin": "X", "title": "ok"}),
        "{'asin': 'Y', 'title': oops}",
    ])
    with pytest.raises(DataError, match=_esc(meta) + r": line 2: not valid JSON"):
        load_source(_cfg(reviews, meta))


def test_review_without_user_key(tmp_path: Path) -> None:
    path = _lines(tmp_path / "r.jsonl", [
        json.dumps({"reviewerID": "A", "asin": "X", "unixReviewTime": 1}),
        json.dumps({"asin": "X", "unixReviewTime": 1}),
    ])
    with pytest.raises(DataError, match=_esc(path) + r": line 2: no user id.*'reviewerID'"):
        load_source(_cfg(path))


def test_bad_review_time(tmp_path: Path) -> None:
    path = _lines(tmp_path / "r.jsonl", [
        json.dumps({"user_id": "A", "parent_asin": "X", "timestamp": "soon"}),
    ])
    with pytest.raises(DataError, match=_esc(path) + r": line 1, key 'timestamp'.*'soon'"):
        load_source(_cfg(path))


def test_empty_reviews(tmp_path: Path) -> None:
    path = _lines(tmp_path / "r.jsonl", [])
    with pytest.raises(DataError, match=_esc(path) + ": reviews file is empty"):
        load_source(_cfg(path))


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl.gz"
    line = json.dumps({"reviewerID": "A", "asin": "X", "unixReviewTime": 1}) + "\n"
    path.write_bytes(gzip.compress((line * 50).encode())[:-12])
    with pytest.raises(DataError, match=_esc(path) + ": cannot read after line"):
        load_source(_cfg(path))
