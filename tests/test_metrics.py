"""Accuracy metrics: hand-computed cases, properties, and a cross-check against ranx."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sigmarec.metrics import accuracy_metrics, hit_matrix, repeated_mask, top_n

KS = (1, 5, 10, 20)
WIDTH = 20


@st.composite
def ranked_and_targets(draw: st.DrawFn) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique-item lists of length 20 over a small catalogue, 1-6 targets each (some unranked)."""
    n_items = draw(st.integers(WIDTH, 40))
    n = draw(st.integers(1, 6))
    ranked = [draw(st.permutations(range(n_items)))[:WIDTH] for _ in range(n)]
    targets = [
        np.array(sorted(draw(st.sets(st.integers(0, n_items - 1), min_size=1, max_size=6))))
        for _ in range(n)
    ]
    return np.array(ranked, dtype=np.int64), targets


@pytest.fixture(scope="module")
def ranx_eval():
    """ranx with its numba kernels compiled once for the module (the compile takes seconds)."""
    ranx = pytest.importorskip("ranx")
    names = [f"{m}@{k}" for k in KS for m in ("hit_rate", "recall", "ndcg", "mrr")]

    def run(ranked: np.ndarray, targets: list[np.ndarray]) -> dict[str, np.ndarray]:
        qrels = ranx.Qrels.from_dict(
            {f"q{i}": {f"d{t}": 1 for t in ts} for i, ts in enumerate(targets)}
        )
        # Strictly decreasing scores, so ranx's order is exactly the list's order.
        r = ranx.Run.from_dict(
            {f"q{i}": {f"d{d}": float(WIDTH - j) for j, d in enumerate(row)}
             for i, row in enumerate(ranked)}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranx.evaluate(qrels, r, names, threads=1)
        return {m: np.array([r.scores[m][f"q{i}"] for i in range(len(ranked))]) for m in names}

    run(np.arange(WIDTH)[None], [np.array([0, 3])])  # warm-up: JIT compile
    return run


def test_hand_computed_example() -> None:
    ranked = np.array([[5, 2, 1, 7, 9]])
    m = accuracy_metrics(ranked, [np.array([1, 2])], ks=[1, 2, 3, 5])
    assert m["HR@1"][0] == 0 and m["HR@2"][0] == 1
    assert m["Recall@2"][0] == 0.5 and m["Recall@3"][0] == 1.0
    assert m["MRR@1"][0] == 0 and m["MRR@3"][0] == 0.5
    ideal = 1 + 1 / np.log2(3)
    assert m["NDCG@2"][0] == pytest.approx((1 / np.log2(3)) / ideal)
    assert m["NDCG@3"][0] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / ideal)
    # One target, more targets than K: the ideal list is cut at K.
    m = accuracy_metrics(np.array([[4, 3, 2]]), [np.array([3, 8, 9])], ks=[1, 2])
    assert m["NDCG@2"][0] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert m["Recall@2"][0] == pytest.approx(1 / 3)


@settings(max_examples=40, deadline=None)
@given(ranked_and_targets())
def test_matches_ranx(ranx_eval, case) -> None:
    ranked, targets = case
    ours = accuracy_metrics(ranked, targets, KS)
    theirs = ranx_eval(ranked, targets)
    for k in KS:
        for mine, ref in (("HR", "hit_rate"), ("Recall", "recall"), ("NDCG", "ndcg"),
                          ("MRR", "mrr")):
            np.testing.assert_allclose(ours[f"{mine}@{k}"], theirs[f"{ref}@{k}"], atol=1e-6,
                                       err_msg=f"{mine}@{k}")


@settings(max_examples=60, deadline=None)
@given(ranked_and_targets())
def test_properties(case) -> None:
    ranked, targets = case
    m = accuracy_metrics(ranked, targets, KS)
    for values in m.values():
        assert ((values >= 0) & (values <= 1 + 1e-12)).all()
    for a, b in zip(KS, KS[1:], strict=False):
        assert (m[f"HR@{b}"] >= m[f"HR@{a}"]).all()
        assert (m[f"Recall@{b}"] >= m[f"Recall@{a}"] - 1e-12).all()
        assert (m[f"MRR@{b}"] >= m[f"MRR@{a}"]).all()
    for k in KS:
        expected = [bool(set(row[:k].tolist()) & set(t.tolist())) for row, t in
                    zip(ranked, targets, strict=True)]
        assert (m[f"HR@{k}"].astype(bool) == np.array(expected)).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(25, 60), st.sets(st.integers(0, 24), min_size=1, max_size=25), st.randoms())
def test_ndcg_is_one_when_targets_lead(n_items, target_set, rnd) -> None:
    targets = sorted(target_set)
    rnd.shuffle(targets)
    rest = [i for i in range(n_items) if i not in target_set]
    ranked = np.array([(targets + rest)[:WIDTH]])
    m = accuracy_metrics(ranked, [np.array(targets)], KS)
    for k in KS:
        assert m[f"NDCG@{k}"][0] == pytest.approx(1.0)
        assert m[f"HR@{k}"][0] == 1.0 and m[f"MRR@{k}"][0] == 1.0
        assert m[f"Recall@{k}"][0] == pytest.approx(min(k, len(targets)) / len(targets))


def test_repeated_item_counts_once() -> None:
    ranked = np.array([[3, 3, 3, 1], [1, 2, 1, 2]])
    assert repeated_mask(ranked).tolist() == [[False, True, True, False],
                                              [False, False, True, True]]
    m = accuracy_metrics(ranked, [np.array([3]), np.array([1, 2])], ks=[4])
    assert m["Recall@4"].tolist() == [1.0, 1.0]
    assert m["NDCG@4"][0] == pytest.approx(1.0) and m["NDCG@4"][1] == pytest.approx(1.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        accuracy_metrics(np.array([[1, 2]]), [np.array([1])], ks=[3])
    with pytest.raises(ValueError, match="at least one target"):
        accuracy_metrics(np.array([[1, 2]]), [np.array([], dtype=int)], ks=[1])
    with pytest.raises(ValueError, match="target sets"):
        accuracy_metrics(np.array([[1, 2]]), [], ks=[1])


def test_top_n_and_hit_matrix() -> None:
    idx, val = top_n(torch.tensor([[0.1, 0.5, 0.5, 0.2]]), 3)
    assert idx.tolist() == [[1, 2, 3]]  # ties keep item order
    assert val[0].tolist() == pytest.approx([0.5, 0.5, 0.2])
    hits = hit_matrix(np.array([[1, 2], [3, 4]]), [np.array([2]), np.array([], dtype=int)])
    assert hits.tolist() == [[False, True], [False, False]]


def test_top_n_matches_a_stable_sort() -> None:
    """The topk fast path gives exactly the stable full sort: ties inside the list and across
    its cut go to the lower index, and NaN / infinite scores land where the sort puts them."""
    gen = torch.Generator().manual_seed(0)
    few_values = torch.randint(0, 4, (64, 300), generator=gen).float()  # ties everywhere
    distinct = torch.randn(64, 300, generator=gen)
    odd = distinct.clone()
    odd[0, 5], odd[1, 7], odd[2, 9] = float("nan"), float("inf"), float("-inf")
    for scores in (few_values, distinct, odd):
        for n in (1, 10, 50, 300):
            vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
            got_idx, got_val = top_n(scores, n)
            assert np.array_equal(got_idx, idx[:, :n].numpy())
            assert np.array_equal(got_val, vals[:, :n].numpy(), equal_nan=True)
