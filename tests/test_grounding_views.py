"""Pair mining reads the training period only and returns well-formed, budgeted pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset
from pydantic import ValidationError

from sigmarec.config import DataConfig, SplitConfig
from sigmarec.data.build import build
from sigmarec.data.schema import validate
from sigmarec.grounding import views

SPLIT = SplitConfig(kind="temporal", valid_start="2017-03-01", test_start="2017-04-01")


def _data(ds):
    return build(validate(ds), DataConfig(source="files", split=SPLIT), seed=0)


def test_co_interaction_ignores_evaluation_baskets():
    ds = make_dataset(n_users=20, n_items=30)
    # i28 and i29 are bought together 40 times, but only after the validation cut-off...
    late = [{"user_id": f"u{k % 20}", "item_id": it, "timestamp": pd.Timestamp("2017-03-15"),
             "basket_id": f"late{k}", "quantity": 1.0, "event": "purchase"}
            for k in range(40) for it in ("i28", "i29")]
    # ...and once each, apart, in training, so both are in the catalogue.
    early = [{"user_id": "u0", "item_id": it, "timestamp": pd.Timestamp(f"2017-01-0{j + 2}"),
              "basket_id": f"early{j}", "quantity": 1.0, "event": "purchase"}
             for j, it in enumerate(("i28", "i29"))]
    inter = ds.interactions[~ds.interactions["item_id"].isin(["i28", "i29"])]
    ds.interactions = pd.concat([inter, pd.DataFrame(late + early)], ignore_index=True)
    d = _data(ds)
    idx = dict(zip(d.items["item_id"], d.items["item_idx"], strict=True))
    pairs = views.co_interaction(d, budget=10_000, min_count=1)
    found = set(zip(pairs["a"], pairs["b"], strict=True))
    a, b = sorted((idx["i28"], idx["i29"]))
    assert (a, b) not in found
    assert len(pairs) > 0


def test_co_interaction_pairs_come_from_training_baskets():
    d = _data(make_dataset(n_users=25, n_items=30, baskets_per_user=15))
    pairs = views.co_interaction(d, budget=500, min_count=1)
    tr = d.train()
    together = set()
    for _, g in tr.groupby(["user_idx", "basket"]):
        it = sorted(set(g["item_idx"]))
        together.update((x, y) for i, x in enumerate(it) for y in it[i + 1:])
    assert set(zip(pairs["a"], pairs["b"], strict=True)) <= together


def test_views_are_well_formed_and_budgeted():
    d = _data(make_dataset())
    rng = np.random.default_rng(0)
    for name, p in {
        "co": views.co_interaction(d, budget=50, min_count=1),
        "search": views.search(d, budget=50, rng=rng),
        "knowledge": views.knowledge(d, budget=50, rng=rng, attribute="absent"),
    }.items():
        assert list(p.columns) == ["a", "b", "score"], name
        assert len(p) <= 50 and len(p) > 0, name
        assert (p["a"] < p["b"]).all(), name
        assert not p.duplicated(["a", "b"]).any(), name
    assert views.visual(d, budget=50).empty  # no image embeddings in this catalogue


def test_search_pairs_share_a_product_type():
    d = _data(make_dataset())
    p = views.search(d, budget=100, rng=np.random.default_rng(1))
    leaf = d.items["category_path"].str.split(" > ").str[-1].to_numpy()
    assert (leaf[p["a"]] == leaf[p["b"]]).all()


def test_visual_view_uses_image_embeddings():
    ds = make_dataset(n_items=12)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 8))
    # items 2k and 2k+1 look alike
    ds.items["image_embedding"] = [list(base[i // 2] + 0.01 * rng.normal(size=8))
                                   for i in range(12)]
    d = _data(ds)
    p = views.visual(d, budget=100, neighbours=1)
    ids = d.items["item_id"].str[1:].astype(int).to_numpy()
    assert ((ids[p["a"]] // 2) == (ids[p["b"]] // 2)).all()


def test_co_interaction_window_pairs_sequence_neighbours() -> None:
    """One item per basket (a sequence source): the same basket pairs nothing, a window of
    baskets pairs neighbours, and the run config reaches the view."""
    from sigmarec.config import GroundingConfig, ViewConfig
    from sigmarec.grounding.stage import mine_views

    tiny_data = _data(make_dataset(n_users=25, n_items=30, baskets_per_user=15))
    tr = tiny_data.train()
    seq = tr.assign(basket=np.arange(len(tr)))  # every interaction its own basket
    assert views.co_pairs(seq, tiny_data.n_items, 10_000, min_count=1, window=1).empty
    near = views.co_pairs(seq, tiny_data.n_items, 10_000, min_count=1, window=2)
    assert len(near) > 0
    # Every pair lies within one position of the same user's sequence.
    close = set()
    for _, g in seq.sort_values("basket").groupby("user_idx"):
        it = g["item_idx"].to_numpy()
        close.update(tuple(sorted((int(x), int(y)))) for x, y in zip(it[:-1], it[1:],
                                                                      strict=True) if x != y)
    assert set(zip(near["a"], near["b"], strict=True)) <= close
    cfg = GroundingConfig(views={"co_interaction": ViewConfig(budget=50, window=2, min_count=1),
                                 "search": ViewConfig(budget=0)})
    assert len(mine_views(tiny_data, cfg, 0)["co_interaction"]) == len(
        views.co_interaction(tiny_data, 50, min_count=1, window=2))
    with pytest.raises(ValidationError, match="co_interaction only"):
        GroundingConfig(views={"search": ViewConfig(window=2)})
    assert "window" not in GroundingConfig().model_dump()["views"]["co_interaction"]


def test_benchmark_pairs_on_leave_one_out_are_next_item_pairs() -> None:
    """One validation item per user pairs nothing inside the validation period: the benchmark's
    collaborative pairs are then (last training item, validation item), never a test item."""
    from sigmarec.grounding.benchmark import benchmark_pairs

    ds = make_dataset(n_users=30, n_items=25, baskets_per_user=6)
    ds.interactions["basket_id"] = None  # each row its own event
    d = build(validate(ds), DataConfig(source="files", split=SplitConfig(kind="leave_one_out"),
                                       shuffle_within_baskets=False), seed=0)
    co = benchmark_pairs(d, n_pairs=1000)["collaborative"]
    assert len(co) > 0
    want = set()
    for _, g in d.interactions.sort_values("pos").groupby("user_idx"):
        tr, va = g[g["split"] == "train"], g[g["split"] == "valid"]
        a, b = int(tr["item_idx"].iloc[-1]), int(va["item_idx"].iloc[0])
        if a != b:
            want.add((min(a, b), max(a, b)))
    assert set(zip(co["a"], co["b"], strict=True)) == want
    assert co["score"].is_monotonic_decreasing
