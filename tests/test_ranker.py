"""The features_ltr ranker: its features by hand, its pools, its leak guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sigmarec.config import DataConfig, SplitConfig
from sigmarec.data.build import build
from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import validate
from sigmarec.errors import StageError
from sigmarec.ranker.features import (
    FEATURES,
    TASK_CODES,
    ItemStats,
    Sources,
    build_groups,
    channel_items,
    instance_features,
    novelty_scores,
    purchase_stats,
    training_histories,
)
from sigmarec.ranker.stage import ranked_lists
from sigmarec.tasks.text_match import InstructionMatcher

# Five items: training counts and categories (item 3 has none).
COUNTS = np.array([4, 0, 2, 2, 1])
CATS = np.array([0, 0, 1, -1, 2])


def test_item_stats_by_hand() -> None:
    s = ItemStats.from_counts(COUNTS, CATS)
    np.testing.assert_allclose(s.popularity, [1, 0, 0.5, 0.5, 0.25])
    # Bought at least as often, over 5 items: 4 -> 1 item, 0 -> 5, 2 -> 3, 1 -> 4.
    np.testing.assert_allclose(s.rarity, [0.2, 1.0, 0.6, 0.6, 0.8])
    # Only items with a category and a purchase have a novelty value.
    np.testing.assert_allclose(s.novelty_value, [1, 0, 0.5, 0, 0.25])
    assert s.popular.tolist() == [0, 2, 3, 4, 1]  # ties by id


def test_purchase_stats_and_novelty_by_hand() -> None:
    count, recency = purchase_stats(np.array([2, 0, 2, 4]), np.array([0, 1, 2, 3, 4]))
    np.testing.assert_allclose(count, [1, 0, 2, 0, 1])
    # Purchases ago: item 4 was the last bought (1), item 2 the one before (2), item 0 (3).
    np.testing.assert_allclose(recency, [3, np.nan, 2, np.nan, 1])
    s = ItemStats.from_counts(COUNTS, CATS)
    # History [4] has seen category 2 only: items of categories 0 and 1 are new.
    np.testing.assert_allclose(novelty_scores(s, np.array([4]), np.arange(5)),
                               [1, 0, 0.5, 0, 0])
    np.testing.assert_allclose(novelty_scores(s, np.array([2, 0, 2, 4]), np.arange(5)), 0)


def test_instance_features_by_hand() -> None:
    s = ItemStats.from_counts(COUNTS, CATS)
    items = np.array([2, 1, 0])
    x = instance_features("Discover", np.array([4, 2, 2, 4]), items, s,
                          text=np.array([0.5, 0.0, 0.25]), sasrec=np.array([1.0, -2.0, 3.0]),
                          cooc=np.array([0.3, -1.5, 0.0]))
    assert x.shape == (3, len(FEATURES)) and x.dtype == np.float32
    f = {name: x[:, i] for i, name in enumerate(FEATURES)}
    np.testing.assert_array_equal(f["task"], TASK_CODES["Discover"])
    np.testing.assert_array_equal(f["hist_len"], 4)
    np.testing.assert_allclose(f["count"], [2, 0, 0])
    np.testing.assert_allclose(f["count_share"], [0.5, 0, 0])
    np.testing.assert_allclose(f["recency"], [2, np.nan, np.nan])
    np.testing.assert_allclose(f["text_match"], [0.5, 0, 0.25])
    np.testing.assert_allclose(f["rarity"], [0.6, 1.0, 0.2])
    # Seen categories {1, 2}: item 0 (category 0) is new, item 1 new but never bought.
    np.testing.assert_allclose(f["novelty"], [0, 0, 1])
    np.testing.assert_allclose(f["popularity"], [0.5, 0, 1])
    np.testing.assert_allclose(f["sasrec"], [1, -2, 3])
    # Co-occurrence's "no evidence" scores (below 0, popularity order) count as none.
    np.testing.assert_allclose(f["cooccurrence"], [0.3, 0, 0])
    with pytest.raises(StageError, match="unknown task"):
        instance_features("Align", np.array([4]), items, s, np.zeros(3), np.zeros(3),
                          np.zeros(3))


def _sources(n_items: int, sasrec_top: int) -> Sources:
    titles = pd.DataFrame({"title": ["potato chips", "whole milk", "dish soap", "tortilla chips",
                                     "apple juice", "orange juice"][:n_items],
                           "category_path": [""] * n_items, "brand": [""] * n_items})
    stats = ItemStats.from_counts(np.arange(n_items, 0, -1), np.arange(n_items) % 3)

    def sasrec(users: np.ndarray, hist: list[np.ndarray]) -> np.ndarray:
        return np.tile(np.arange(n_items, dtype=np.float32), (len(users), 1))  # last id best

    def cooc(users: np.ndarray, hist: list[np.ndarray]) -> np.ndarray:
        return np.zeros((len(users), n_items), dtype=np.float32)

    return Sources(stats, InstructionMatcher.from_items(titles, top=10, min_score=0.1),
                   sasrec, cooc, sasrec_top=sasrec_top)


def test_pools_are_the_channels_plus_sasrec_top() -> None:
    row = pd.DataFrame({"task": ["Query"], "user_idx": [0], "instruction": ["find chips"],
                        "history": [np.array([1])], "frequent": [np.array([1])],
                        "count_items": [np.array([1, 2])], "novel_items": [np.array([4])],
                        "targets": [np.array([3, 1])]})
    assert channel_items(next(row.itertuples(index=False)), np.array([0, 3])).tolist() == \
        [1, 2, 0, 3, 4]
    src = _sources(6, sasrec_top=1)
    g = build_groups(row, [np.array([1, 2, 1])], src)
    # Channels (1, 2, then the chips 0 and 3, novelty 4) and SASRec's best (5).
    assert sorted(g.items.tolist()) == [0, 1, 2, 3, 4, 5] and g.sizes.tolist() == [6]
    assert dict(zip(g.items.tolist(), g.labels.tolist(), strict=True))[3] == 1
    assert g.labels.sum() == 2
    text = g.features[:, FEATURES.index("text_match")]
    assert (text[np.isin(g.items, [0, 3])] > 0).all() and (text[~np.isin(g.items, [0, 3])] == 0
                                                           ).all()
    # Under a rule that admits items 0, 3 and 4 only: the admitted pool items, SASRec's best
    # admitted item, the most popular admitted one (fill=1).
    allow = np.zeros((1, 6), dtype=bool)
    allow[0, [0, 3, 4]] = True
    r = build_groups(row, [np.array([1, 2, 1])], src, allow=allow, fill=1)
    assert sorted(r.items.tolist()) == [0, 3, 4]
    items, _ = ranked_lists(r, -r.items.astype(float), 1, 5, src.stats.popular)
    assert items[0, :3].tolist() == [0, 3, 4] and len(set(items[0].tolist())) == 5
    # Training: every positive kept, negatives sampled down.
    t = build_groups(row, [np.array([1, 2, 1])], src, negatives=1, seed=0)
    assert t.labels.tolist().count(1) == 2 and len(t.items) == 3


def _data(synthetic) -> ProcessedData:
    split = SplitConfig(kind="temporal", valid_start="2017-03-15", test_start="2017-04-10")
    return build(validate(synthetic), DataConfig(source="files", split=split), seed=0)


def _train_rows(data: ProcessedData) -> pd.DataFrame:
    """One training sample per user, cut at the middle of its training interactions."""
    n_train = np.bincount(data.train()["user_idx"], minlength=data.n_users)
    rows = []
    for u in np.flatnonzero(n_train >= 4):
        h = int(n_train[u] // 2)
        seq = data.sequence(int(u))
        rows.append({"task": "JustForYou", "user_idx": int(u), "hist_len": h,
                     "instruction": "item chips", "history": seq[max(0, h - 3):h],
                     "frequent": seq[:0], "count_items": np.unique(seq[:h]),
                     "novel_items": seq[:0], "targets": seq[h:h + 1]})
    return pd.DataFrame(rows)


def test_training_rows_never_read_the_evaluation_window(synthetic) -> None:
    """Rewriting every validation/test interaction (its items, hence every evaluation target
    and post-cut purchase) leaves every training row's features and pool unchanged, and a
    sample whose target basket is outside the training window is refused."""
    data = _data(synthetic)
    df = _train_rows(data)
    assert len(df) > 5

    def sources(d: ProcessedData) -> Sources:
        n = d.n_items

        def by_history(users: np.ndarray, hist: list[np.ndarray]) -> np.ndarray:
            return np.stack([np.bincount(h, minlength=n).astype(np.float32) for h in hist])

        cats = d.items["category_path"].astype("category").cat.codes.to_numpy()
        return Sources(ItemStats.from_counts(d.train_item_counts, cats),
                       InstructionMatcher.from_items(d.items, 10, 0.1), by_history, by_history,
                       sasrec_top=5)

    before = build_groups(df, training_histories(data, df), sources(data))
    inter = data.interactions.copy()
    late = (inter["split"] != "train").to_numpy()
    assert late.any()
    inter.loc[late, "item_idx"] = (inter.loc[late, "item_idx"] + 7) % data.n_items
    moved = ProcessedData(data.items, data.users, inter, data.instances, data.info)
    after = build_groups(df, training_histories(moved, df), sources(moved))
    np.testing.assert_array_equal(before.items, after.items)
    np.testing.assert_array_equal(before.features, after.features)
    np.testing.assert_array_equal(before.labels, after.labels)

    n_train = np.bincount(data.train()["user_idx"], minlength=data.n_users)
    bad = df.copy()
    bad.loc[0, "hist_len"] = int(n_train[int(bad.loc[0, "user_idx"])])
    with pytest.raises(StageError, match="not in the training window"):
        training_histories(data, bad)
