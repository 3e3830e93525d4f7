"""The ``sequences`` source: a user-sequence file plus a RecBole atomic item file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from sigmarec.config import load_config
from sigmarec.data.build import build
from sigmarec.data.sources import load_source
from sigmarec.data.sources.sequences import parse_token_seq
from sigmarec.errors import DataError

HEADER = ("item_id:token\ttitle:token\tsales_type:token\tcategories:token_seq\tprice:float\t"
          "brand:token\n")
# i2's title holds a tab inside quotes, i3's a newline; i4 has an HTML entity and a category
# with an apostrophe (written by the export as a doubled double quote); i5 has no brand/price.
ITEMS = HEADER + (
    "i1\tRed Lipstick\tBeauty\t'Beauty', 'Makeup', 'Lips'\t5.5\tAcme\n"
    'i2\t"Body \t Lotion"\tBeauty\t\'Beauty\', \'Skin Care\', \'Body\'\t7.97\tDerm\n'
    'i3\t"Night Cream\nVanilla"\tBeauty\t\'Beauty\', \'Skin Care\', \'Face\'\t12\tDerm\n'
    "i4\tTom &amp; Jerry Eau\tBeauty\t\"'Beauty', 'Fragrance', \"\"Women's\"\"\"\t30.0\tB&amp;B\n"
    "i5\t\tBeauty\t'Beauty', 'Makeup'\t\t\n"
)
SEQUENCES = "u1 i1 i2 i3 i4\nu2 i2 i3 i5 i1 i4\n\nu3 i5 i4 i3\n"


def write(tmp_path: Path, items: str = ITEMS, sequences: str = SEQUENCES) -> Path:
    (tmp_path / "items.item").write_text(items, encoding="utf-8")
    (tmp_path / "seq.txt").write_text(sequences, encoding="utf-8")
    return tmp_path


def config(root: Path, *extra: str):
    return load_config(overrides=[
        "data.source=sequences", f"data.sequences.root={root}", "data.sequences.sequences=seq.txt",
        "data.sequences.items=items.item", "data.split.kind=leave_one_out",
        "data.min_item_count=1", "data.min_user_count=1", "data.shuffle_within_baskets=false",
        *extra,
    ]).data


def test_items_quote_aware_with_text_fields(tmp_path: Path) -> None:
    ds = load_source(config(write(tmp_path)))
    items = ds.items.set_index("item_id")
    assert list(items.index) == ["i1", "i2", "i3", "i4", "i5"]
    assert items.loc["i2", "title"] == "Body Lotion"  # the quoted tab made one space
    assert items.loc["i3", "title"] == "Night Cream Vanilla"
    assert items.loc["i4", "title"] == "Tom & Jerry Eau"
    assert items.loc["i4", "brand"] == "B&B"
    assert items.loc["i4", "category_path"] == "Beauty > Fragrance > Women's"
    assert items.loc["i1", "category_path"] == "Beauty > Makeup > Lips"
    assert json.loads(items.loc["i1", "attributes"]) == {"price": 5.5}
    # Empty title, brand and price: titled by the id, no brand, no price attribute.
    assert items.loc["i5", "title"] == "i5"
    assert items.loc["i5", "brand"] is None
    assert json.loads(items.loc["i5", "attributes"]) == {}


def test_sequences_keep_order_as_synthetic_time(tmp_path: Path) -> None:
    ds = load_source(config(write(tmp_path)))
    inter = ds.interactions
    assert len(inter) == 12 and inter["user_id"].nunique() == 3
    u2 = inter[inter["user_id"] == "u2"]
    assert list(u2["item_id"]) == ["i2", "i3", "i5", "i1", "i4"]
    assert u2["timestamp"].is_monotonic_increasing and u2["timestamp"].is_unique
    assert ds.name == "sequences"


def test_leave_one_out_on_sequences(tmp_path: Path) -> None:
    cfg = config(write(tmp_path))
    data = build(load_source(cfg), cfg, seed=0)
    assert data.n_users == 3 and data.n_items == 5 and data.info["dropped_by_filters"] == 0
    inter = data.interactions
    u2 = data.users.set_index("user_id").loc["u2", "user_idx"]
    rows = inter[inter["user_idx"] == u2].sort_values("pos")
    items = data.items.set_index("item_idx")["item_id"]
    assert list(rows["split"]) == ["train", "train", "train", "valid", "test"]
    assert list(items.loc[rows["item_idx"]]) == ["i2", "i3", "i5", "i1", "i4"]
    train = data.train_sequences()
    assert len(train) == 3 and list(items.loc[train[u2]]) == ["i2", "i3", "i5"]
    assert [len(s) for s in train] == [2, 3, 1]  # u1, u2, u3: all but the last two
    # Every user is evaluated once per split.
    assert (data.instances.groupby("split").size() == 3).all()
    text = data.items.set_index("item_id").loc["i4", "text"]
    assert "Tom & Jerry Eau" in text and "Women's" in text and "price 30.0" in text


def test_published_counts_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write(tmp_path)
    with caplog.at_level(logging.INFO, logger="sigmarec"):
        load_source(config(root, "data.sequences.expected.users=3",
                           "data.sequences.expected.interactions=13"))
    assert "3 users, 5 items, 12 interactions" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "12 interactions read, 13 expected" in warnings[0]


@pytest.mark.parametrize(
    ("items", "sequences", "message"),
    [
        (ITEMS, SEQUENCES + "u4\n", "seq.txt: line 5: user 'u4' has no items"),
        (ITEMS, SEQUENCES + "u1 i2 i3\n", "seq.txt: line 5: user 'u1' is listed again (first "
                                           "on line 1)"),
        (ITEMS, "u1 i1 i9\n", "seq.txt: line 1: item 'i9' of user 'u1' has no row in"),
        (ITEMS + "i6\tbroken\n", SEQUENCES, "items.item: line 8: 2 fields, the header has 6"),
        (ITEMS + "i6\tX\tBeauty\t'Beauty'\tcheap\tAcme\n", SEQUENCES,
         "items.item: line 8, field 'price': not a valid float"),
        (ITEMS + "i6\tX\tBeauty\t'Beauty', 'Skin\t1\tAcme\n", SEQUENCES,
         "items.item: line 8, field 'categories': not a list of categories"),
        (ITEMS + "i1\tAgain\tBeauty\t'Beauty'\t1\tAcme\n", SEQUENCES,
         "items.item: line 8, field 'item_id': item 'i1' is listed again (first on line 2)"),
        (ITEMS.replace("price:float", "price:number"), SEQUENCES,
         "items.item: line 1, field 'price': unknown type 'number'"),
        (ITEMS.replace("price:float", "price:token"), SEQUENCES,
         "items.item: line 1, field 'price': price must be of type float"),
        (ITEMS.replace("brand:token", "brand"), SEQUENCES,
         "items.item: line 1, field 6 'brand': expected 'name:type'"),
        (ITEMS.replace("title:token", "name:token"), SEQUENCES,
         "items.item: line 1: no field 'title' in the header"),
        (ITEMS, "\n\n", "seq.txt: sequences file is empty"),
    ],
)
def test_bad_input_one_line_error(tmp_path: Path, items: str, sequences: str,
                                  message: str) -> None:
    with pytest.raises(DataError) as e:
        load_source(config(write(tmp_path, items, sequences)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"seq\.txt: sequences file not found") as e:
        load_source(config(tmp_path / "absent"))
    assert str(tmp_path / "absent" / "seq.txt") in str(e.value)
    (tmp_path / "seq.txt").write_text(SEQUENCES, encoding="utf-8")
    with pytest.raises(DataError, match=r"items\.item: items file not found"):
        load_source(config(tmp_path))


def test_without_item_file_items_are_titled_by_id(tmp_path: Path) -> None:
    (tmp_path / "seq.txt").write_text(SEQUENCES, encoding="utf-8")
    cfg = load_config(overrides=["data.source=sequences", f"data.sequences.root={tmp_path}",
                                 "data.sequences.sequences=seq.txt"]).data
    ds = load_source(cfg)
    assert sorted(ds.items["title"]) == ["i1", "i2", "i3", "i4", "i5"]


def test_parse_token_seq() -> None:
    assert parse_token_seq("'A', \"B's\", 'C & D'") == ["A", "B's", "C & D"]
    assert parse_token_seq("['A', 'B']") == ["A", "B"]
    assert parse_token_seq("tok1 tok2") == ["tok1", "tok2"]
    assert parse_token_seq("  ") == []
    with pytest.raises(ValueError):
        parse_token_seq("'A', 3")


BEAUTY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "amazon-beauty"


@pytest.mark.skipif(not (BEAUTY / "user_sequence.txt").is_file(),
                    reason="../shared/data/amazon-beauty is absent")
def test_amazon_beauty_smoke(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(files=[Path(__file__).resolve().parents[1] / "configs" /
                             "amazon-beauty.yaml"],
                      overrides=[f"data.sequences.root={BEAUTY}"]).data
    with caplog.at_level(logging.INFO, logger="sigmarec"):
        ds = load_source(cfg)
    assert "22,363 users, 12,101 items, 198,502 interactions" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(ds.items) == 12_101
    assert not ds.items["title"].str.contains("&amp;|\t|\n").any()
    assert (ds.items["category_path"] != "").all()
    per_user = ds.interactions.groupby("user_id").size()
    assert per_user.min() >= 5 and isinstance(ds.interactions["timestamp"].iloc[0], pd.Timestamp)
