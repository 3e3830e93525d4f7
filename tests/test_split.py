"""The split must never let an evaluation-period interaction reach anything fitted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from sigmarec.config import DataConfig, SplitConfig
from sigmarec.data.build import build
from sigmarec.data.schema import validate
from sigmarec.errors import DataError

TEMPORAL = SplitConfig(kind="temporal", valid_start="2017-03-01", test_start="2017-04-01")


def _build(ds, seed=0, **kw):
    cfg = DataConfig(source="files", split=kw.pop("split", TEMPORAL), **kw)
    return build(validate(ds), cfg, seed=seed)


def test_temporal_split_respects_cutoffs(synthetic):
    d = _build(synthetic)
    inter = d.interactions
    vs, ts = pd.Timestamp("2017-03-01"), pd.Timestamp("2017-04-01")
    assert (inter.loc[inter["split"] == "train", "timestamp"] < vs).all()
    valid = inter[inter["split"] == "valid"]["timestamp"]
    assert ((valid >= vs) & (valid < ts)).all()
    assert (inter.loc[inter["split"] == "test", "timestamp"] >= ts).all()
    assert d.info["valid_start"].startswith("2017-03-01")


def test_instance_histories_end_before_their_window(synthetic):
    d = _build(synthetic)
    cut = {"valid": pd.Timestamp("2017-03-01"), "test": pd.Timestamp("2017-04-01")}
    inter = d.interactions
    for _, r in d.instances.iterrows():
        seq = inter[inter["user_idx"] == r["user_idx"]]
        hist = seq.iloc[: r["hist_len"]]
        assert (hist["timestamp"] < cut[r["split"]]).all()
        # the targets are exactly the first basket after the history
        first = seq.iloc[r["hist_len"]]
        basket = seq[seq["basket"] == first["basket"]]
        assert set(basket["item_idx"]) == set(r["targets"].tolist())
        assert first["split"] == r["split"]


def test_catalogue_counts_training_period_only():
    ds = make_dataset(n_items=40)
    # An item bought 50 times, but only in the test period, must not enter the catalogue.
    extra = pd.DataFrame({
        "user_id": [f"u{i % 30}" for i in range(50)], "item_id": "i39",
        "timestamp": pd.Timestamp("2017-04-10"), "basket_id": [f"late{i}" for i in range(50)],
        "quantity": 1.0, "event": "purchase"})
    inter = ds.interactions[ds.interactions["item_id"] != "i39"]
    ds.interactions = pd.concat([inter, extra], ignore_index=True)
    d = _build(ds, min_item_count=2)
    assert "i39" not in set(d.items["item_id"])
    assert d.n_items == len(set(d.items["item_id"]))


def test_train_is_a_prefix_of_each_sequence(synthetic):
    d = _build(synthetic)
    order = {"train": 0, "valid": 1, "test": 2}
    for _, g in d.interactions.groupby("user_idx"):
        codes = g["split"].map(order).to_numpy()
        assert (np.diff(codes) >= 0).all()
        assert (g["pos"].to_numpy() == np.arange(len(g))).all()


def test_leave_one_out_last_two_and_tie_break():
    ds = make_dataset(n_users=5, baskets_per_user=6)
    ds.interactions["basket_id"] = None  # each row its own event
    # two events of user u0 share the last timestamp: file order must decide
    last = ds.interactions[ds.interactions["user_id"] == "u0"]["timestamp"].max()
    tie = pd.DataFrame({"user_id": ["u0", "u0"], "item_id": ["i1", "i2"],
                        "timestamp": [last + pd.Timedelta(days=1)] * 2, "basket_id": None,
                        "quantity": 1.0, "event": "rating"})
    ds.interactions = pd.concat([ds.interactions, tie], ignore_index=True)
    d = _build(ds, split=SplitConfig(kind="leave_one_out"), shuffle_within_baskets=False)
    u0 = d.users.index[d.users["user_id"] == "u0"][0]
    seq = d.interactions[d.interactions["user_idx"] == u0]
    assert seq["split"].tolist()[-2:] == ["valid", "test"]
    assert (seq["split"].iloc[:-2] == "train").all()
    item_of = dict(zip(d.items["item_idx"], d.items["item_id"], strict=True))
    assert [item_of[i] for i in seq["item_idx"].iloc[-2:]] == ["i1", "i2"]
    test = d.eval_instances("test")
    row = test[test["user_idx"] == u0].iloc[0]
    assert row["hist_len"] == len(seq) - 1


def test_basket_shuffle_is_seeded_and_breaks_id_order():
    ds = make_dataset(n_users=10, baskets_per_user=20)
    a = _build(ds, seed=0).interactions["item_idx"].to_numpy()
    b = _build(ds, seed=0).interactions["item_idx"].to_numpy()
    np.testing.assert_array_equal(a, b)
    unshuffled = _build(ds, shuffle_within_baskets=False).interactions["item_idx"].to_numpy()
    assert not np.array_equal(a, unshuffled)


def test_empty_after_filter_is_a_clear_error(synthetic):
    with pytest.raises(DataError, match="no interactions left after filtering"):
        _build(synthetic, min_item_count=10_000)


def test_cutoffs_outside_data_are_a_clear_error(synthetic):
    bad = SplitConfig(kind="temporal", valid_start="2030-01-01", test_start="2030-02-01")
    with pytest.raises(DataError, match="must fall inside the data"):
        _build(synthetic, split=bad)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), min_count=st.integers(1, 4),
       valid_day=st.integers(30, 80))
def test_no_evaluation_interaction_in_train_property(seed, min_count, valid_day):
    """Whatever the data and cut-offs: training rows precede valid_start, the catalogue is
    computable from training rows alone, and every history ends before its window."""
    ds = make_dataset(n_users=12, n_items=25, seed=seed, days=120)
    vs = pd.Timestamp("2017-01-01") + pd.Timedelta(days=valid_day)
    split = SplitConfig(kind="temporal", valid_start=vs.date(),
                        test_start=(vs + pd.Timedelta(days=20)).date())
    try:
        d = _build(ds, split=split, min_item_count=min_count)
    except DataError:
        return
    tr = d.train()
    assert (tr["timestamp"] < vs).all()
    counts = np.bincount(tr["item_idx"], minlength=d.n_items)
    assert (counts >= min_count).all()
    for _, r in d.instances.iterrows():
        seq = d.interactions[d.interactions["user_idx"] == r["user_idx"]]
        assert (seq.iloc[: r["hist_len"]]["timestamp"] < pd.Timestamp(r["timestamp"])).all()
