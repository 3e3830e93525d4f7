"""Semantic IDs (residual k-means) and the prefix-partitioned item index."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sigmarec.errors import DataError
from sigmarec.tokenization import (
    ExhaustivePrefixIndex,
    PrefixIndex,
    SemanticIdConfig,
    SemanticIds,
    capacity_assign,
    fit_semantic_ids,
    make_prefix_index,
)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int = 600, d: int = 16, centres: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    return unit(c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d)))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum(axis=1).mean())


# ---------------------------------------------------------------------- config
def test_config_sizes_follow_levels_and_are_validated() -> None:
    assert SemanticIdConfig().codebook_sizes == [256, 256, 256]
    assert SemanticIdConfig(levels=2).codebook_sizes == [256, 256]
    assert SemanticIdConfig(levels=2, codebook_sizes=[64, 32]).codebook_sizes == [64, 32]
    with pytest.raises(ValidationError, match="one size per level"):
        SemanticIdConfig(levels=2, codebook_sizes=[64, 32, 16])
    with pytest.raises(ValidationError, match="positive"):
        SemanticIdConfig(levels=2, codebook_sizes=[64, 0])
    with pytest.raises(ValidationError):
        SemanticIdConfig(method="rq_vae")
    with pytest.raises(ValidationError):
        SemanticIdConfig(codebook_size=[1])  # typo: unknown keys are errors


# ---------------------------------------------------------------------- quantiser
def test_reconstruction_beats_random_codes_and_improves_with_levels() -> None:
    x = clustered()
    sids = fit_semantic_ids(x, SemanticIdConfig(levels=3, codebook_sizes=[16, 16, 16]))
    assert sids.codes.shape == (600, 3) and sids.codes.dtype == np.int32
    errors = [mse(sids.reconstruct(lvl), x) for lvl in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    rng = np.random.default_rng(1)
    random_codes = np.stack([rng.integers(0, k, 600) for k in sids.codebook_sizes], axis=1)
    chance = SemanticIds(random_codes, sids.codebooks)
    assert errors[3] < 0.5 * mse(chance.reconstruct(), x)
    # encode() with the fitted codebooks reproduces the plain method's codes.
    np.testing.assert_array_equal(sids.encode(x), sids.codes)


def test_fit_is_deterministic_and_independent_of_thread_count() -> None:
    x = clustered(n=3000, d=32)
    cfg = SemanticIdConfig(levels=2, codebook_sizes=[32, 16])
    first = fit_semantic_ids(x, cfg)
    second = fit_semantic_ids(x, cfg)
    np.testing.assert_array_equal(first.codes, second.codes)
    for a, b in zip(first.codebooks, second.codebooks, strict=True):
        np.testing.assert_array_equal(a, b)
    other = fit_semantic_ids(x, cfg.model_copy(update={"seed": 1}))
    assert not np.array_equal(first.codes, other.codes)
    balanced = cfg.model_copy(update={"method": "rq_kmeans_balanced"})
    np.testing.assert_array_equal(fit_semantic_ids(x, balanced).codes,
                                  fit_semantic_ids(x, balanced).codes)


def test_fit_does_not_depend_on_the_callers_thread_count() -> None:
    # At this size faiss's own k-means gives other codes on one and on two OpenMP threads (940 of
    # 3,000 items on the 2-core dev machine); the fit pins its thread count, so the caller's
    # setting must not matter, and it is restored afterwards.
    x = clustered(n=3000, d=256)
    cfg = SemanticIdConfig(levels=2, codebook_sizes=[32, 16])
    before = faiss.omp_get_max_threads()
    codes = []
    try:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            codes.append(fit_semantic_ids(x, cfg).codes)
            assert faiss.omp_get_max_threads() == threads
    finally:
        faiss.omp_set_num_threads(before)
    np.testing.assert_array_equal(codes[0], codes[1])


def test_balanced_mode_shrinks_the_largest_prefix_group() -> None:
    rng = np.random.default_rng(0)
    d, n = 8, 800
    # 80% of the catalogue is one tight blob: plain k-means spends its centroids on the spread
    # 20% (that is where the squared error is) and leaves the blob as one giant prefix.
    blob = rng.standard_normal(d) + 0.01 * rng.standard_normal((640, d))
    spread = 3.0 * rng.standard_normal((160, d))
    x = np.concatenate([blob, spread]).astype(np.float32)
    plain = fit_semantic_ids(x, SemanticIdConfig(levels=1, codebook_sizes=[8]))
    cfg = SemanticIdConfig(levels=1, codebook_sizes=[8], method="rq_kmeans_balanced",
                           balance_slack=0.25)
    balanced = fit_semantic_ids(x, cfg)
    cap = math.ceil(n / 8 * 1.25)
    assert plain.stats()["largest_prefix_group"] > 2 * cap
    assert balanced.stats()["largest_prefix_group"] <= cap
    assert balanced.stats()["levels"][0]["entropy_bits"] > plain.stats()["levels"][0][
        "entropy_bits"]


def test_capacity_assign_respects_the_cap_and_prefers_near_codes() -> None:
    rng = np.random.default_rng(0)
    dist = rng.random((500, 7))
    labels = capacity_assign(dist, capacity=80)
    assert labels.min() >= 0 and np.bincount(labels, minlength=7).max() <= 80
    # Loose capacity: everyone gets their nearest code.
    np.testing.assert_array_equal(capacity_assign(dist, 500), dist.argmin(axis=1))
    # Everybody prefers code 0; it keeps the 2 closest, the rest move to code 1.
    d = np.array([[0.3, 1.0], [0.1, 1.0], [0.2, 1.0], [0.4, 1.0]])
    np.testing.assert_array_equal(capacity_assign(d, 2), [1, 0, 0, 1])
    with pytest.raises(ValueError):
        capacity_assign(d, 1)


def test_codebook_is_capped_at_the_number_of_distinct_points(caplog) -> None:
    base = unit(np.random.default_rng(0).standard_normal((3, 4)))
    x = base[[0, 1, 2, 0, 1, 2, 0]]  # 7 items, 3 distinct embeddings
    with caplog.at_level(logging.INFO, logger="sigmarec"):
        sids = fit_semantic_ids(x, SemanticIdConfig(levels=2, codebook_sizes=[256, 4]))
    assert sids.codebook_sizes == [3, 1]  # level 2: residuals are all zero -> one vector
    assert sids.requested_sizes == [256, 4]
    assert "capped" in caplog.text
    np.testing.assert_allclose(sids.reconstruct(), x, atol=1e-6)
    assert sids.stats()["distinct_sids"] == 3


def test_bad_input_is_a_data_error() -> None:
    with pytest.raises(DataError, match="NaN"):
        fit_semantic_ids(np.array([[0.0, np.nan]]), SemanticIdConfig(levels=1,
                                                                      codebook_sizes=[2]))
    with pytest.raises(DataError, match="2-D"):
        fit_semantic_ids(np.zeros(5), SemanticIdConfig())
    with pytest.raises(DataError, match="empty"):
        fit_semantic_ids(np.zeros((0, 4)), SemanticIdConfig())


def test_stats_on_a_hand_example() -> None:
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [2, 1], [2, 1]])
    sids = SemanticIds(codes, [np.eye(4, 3), np.eye(2, 3)])
    s = sids.stats()
    l1, l2 = s["levels"]
    assert l1["used_codes"] == 3 and l1["utilisation"] == pytest.approx(0.75)
    expected_h = -(0.5 * math.log2(0.5) + (1 / 6) * math.log2(1 / 6) + (1 / 3) * math.log2(1 / 3))
    assert l1["entropy_bits"] == pytest.approx(expected_h)
    assert l1["max_entropy_bits"] == pytest.approx(2.0)
    assert l2["utilisation"] == 1.0 and l2["entropy_bits"] == pytest.approx(1.0)
    assert s["largest_prefix_group"] == 3 and s["largest_prefix_group_share"] == pytest.approx(0.5)
    assert s["median_prefix_group"] == 2 and s["median_prefix_group_share"] == pytest.approx(1 / 3)
    assert s["prefix_groups"] == 3
    # Full SIDs: (0,0) x2, (0,1), (1,0), (2,1) x2 -> 4 distinct, 4 of 6 items collide.
    assert s["distinct_sids"] == 4 and s["collision_rate"] == pytest.approx(4 / 6)
    groups = sids.prefix_groups()
    assert sorted(groups) == [0, 1, 2]
    np.testing.assert_array_equal(groups[0], [0, 1, 2])
    np.testing.assert_array_equal(groups[2], [4, 5])
    np.testing.assert_allclose(sids.reconstruct()[2], np.eye(4, 3)[0] + np.eye(2, 3)[1])
    with pytest.raises(DataError):
        SemanticIds(np.array([[5, 0]]), [np.eye(4, 3), np.eye(2, 3)])


def test_save_load_round_trip(tmp_path) -> None:
    x = clustered(n=300)
    cfg = SemanticIdConfig(levels=2, codebook_sizes=[8, 8], method="rq_kmeans_balanced")
    sids = fit_semantic_ids(x, cfg)
    sids.save(tmp_path / "sids")
    back = SemanticIds.load(tmp_path / "sids")
    np.testing.assert_array_equal(back.codes, sids.codes)
    for a, b in zip(back.codebooks, sids.codebooks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.method == "rq_kmeans_balanced" and back.requested_sizes == [8, 8]
    assert back.stats() == sids.stats()
    assert sorted(p.name for p in (tmp_path / "sids").iterdir()) == [
        "semantic_ids.json", "semantic_ids.npz"]
    with pytest.raises(DataError, match="not found"):
        SemanticIds.load(tmp_path / "missing")


# ---------------------------------------------------------------------- prefix index
def assert_same_results(fast: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray],
                        vectors: np.ndarray, queries: np.ndarray,
                        eligible: np.ndarray) -> None:
    """Equal up to float noise: same scores, same padding, same item sets except exact ties."""
    (fs, fi), (rs, ri) = fast, ref
    assert fs.shape == rs.shape and fi.shape == ri.shape
    np.testing.assert_array_equal(fi < 0, ri < 0)
    np.testing.assert_array_equal(np.isneginf(fs), ri < 0)
    valid = ri >= 0
    np.testing.assert_allclose(fs[valid], rs[valid], atol=1e-5, rtol=0)
    for b in range(fi.shape[0]):
        got = fi[b][fi[b] >= 0]
        assert len(set(got.tolist())) == got.size  # no duplicates
        assert eligible[b, got].all()  # only the query's prefix, only allowed items
        np.testing.assert_allclose(fs[b][fi[b] >= 0], vectors[got] @ queries[b], atol=1e-5)
        want = ri[b][ri[b] >= 0]
        if want.size:
            cut = rs[b][valid[b]].min() + 1e-5  # items at the boundary may tie: ignore them
            sure = set(want[rs[b][valid[b]] > cut].tolist())
            assert sure <= set(got.tolist())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 150),
    dim=st.integers(1, 12),
    n_prefixes=st.integers(1, 10),
    batch=st.integers(1, 6),
    k=st.integers(1, 40),
    mask_kind=st.sampled_from(["none", "shared", "per_query"]),
    allow_p=st.floats(0.0, 1.0),
)
def test_prefix_index_matches_exhaustive(seed: int, n: int, dim: int, n_prefixes: int,
                                         batch: int, k: int, mask_kind: str,
                                         allow_p: float) -> None:
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    prefixes = rng.integers(0, n_prefixes, n)  # some prefixes empty, many smaller than k
    queries = unit(rng.standard_normal((batch, dim)))
    q_prefixes = rng.integers(0, n_prefixes, batch)
    mask = {
        "none": None,
        "shared": rng.random(n) < allow_p,
        "per_query": rng.random((batch, n)) < allow_p,
    }[mask_kind]
    if mask_kind == "per_query" and batch > 1:
        mask[-1] = mask[0]  # repeated rows exercise the merging of identical masks
    fast = PrefixIndex.build(vectors, prefixes, n_prefixes)
    ref = ExhaustivePrefixIndex.build(vectors, prefixes, n_prefixes)
    eligible = prefixes[None, :] == q_prefixes[:, None]
    if mask is not None:
        eligible &= mask if mask.ndim == 2 else mask[None, :]
    got = fast.search(queries, q_prefixes, k, mask)
    want = ref.search(queries, q_prefixes, k, mask)
    assert_same_results(got, want, vectors, queries, eligible)
    # Exactly min(k, eligible) results: filtering happens inside the search, not after it.
    np.testing.assert_array_equal((got[1] >= 0).sum(axis=1), np.minimum(k, eligible.sum(axis=1)))


def test_mask_is_applied_inside_the_search() -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((60, 8)))
    prefixes = np.repeat([0, 1, 2], 20)
    index = PrefixIndex.build(vectors, prefixes, 3)
    query = vectors[[5]]
    top = index.search(query, np.array([0]), 10)[1][0]
    allow = np.ones(60, dtype=bool)
    allow[top] = False  # deny the 10 best of prefix 0: the next 10 must come back
    scores, items = index.search(query, np.array([0]), 10, allow)
    assert (items >= 0).all() and not set(items[0]) & set(top)
    assert (prefixes[items[0]] == 0).all()
    expected = np.setdiff1d(np.arange(20), top)
    assert set(items[0]) == set(expected)
    assert np.all(np.diff(scores[0]) <= 0)
    # Only 3 eligible items left: 3 results, then padding.
    allow[:] = False
    allow[[1, 7, 30]] = True
    scores, items = index.search(query, np.array([0]), 5, allow)
    assert set(items[0][:2]) == {1, 7} and (items[0][2:] == -1).all()
    assert np.isneginf(scores[0][2:]).all()


def test_search_multi_equals_separate_searches_with_per_request_masks() -> None:
    rng = np.random.default_rng(3)
    n, dim, n_prefixes, b, kk, m = 400, 16, 12, 5, 4, 7
    vectors = unit(rng.standard_normal((n, dim)))
    prefixes = rng.integers(0, n_prefixes, n)
    queries = unit(rng.standard_normal((b, kk, dim)))
    q_prefixes = rng.integers(0, n_prefixes, (b, kk))
    q_prefixes[0, -1] = -1  # a beam that produced fewer than K prefixes
    mask = rng.random((b, n)) < 0.6
    for cls in (PrefixIndex, ExhaustivePrefixIndex):
        index = cls.build(vectors, prefixes, n_prefixes)
        scores, items = index.search_multi(queries, q_prefixes, m, mask)
        assert scores.shape == items.shape == (b, kk, m)
        assert (items[0, -1] == -1).all() and np.isneginf(scores[0, -1]).all()
        for r in range(b):
            s, i = index.search(queries[r], q_prefixes[r], m, np.tile(mask[r], (kk, 1)))
            np.testing.assert_array_equal(i, items[r])
            np.testing.assert_allclose(s, scores[r], atol=1e-6)
            assert mask[r, i[i >= 0]].all()


def test_add_items_makes_new_items_searchable() -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((200, 8)))
    prefixes = rng.integers(0, 5, 200)
    full = ExhaustivePrefixIndex.build(vectors, prefixes, 5)
    for cls in (PrefixIndex, ExhaustivePrefixIndex):
        index = cls.build(vectors[:150], prefixes[:150], 5)
        ids = index.add_items(vectors[150:], prefixes[150:])
        np.testing.assert_array_equal(ids, np.arange(150, 200))
        assert index.n_items == 200
        np.testing.assert_array_equal(index.prefix_sizes(), np.bincount(prefixes, minlength=5))
        # A new item is its own nearest neighbour within its prefix.
        s, i = index.search(vectors[[170]], prefixes[[170]], 3)
        assert i[0, 0] == 170 and s[0, 0] == pytest.approx(1.0, abs=1e-5)
        q = unit(rng.standard_normal((10, 8)))
        qp = rng.integers(0, 5, 10)
        mask = rng.random(200) < 0.5
        got, want = index.search(q, qp, 15, mask), full.search(q, qp, 15, mask)
        eligible = (prefixes[None, :] == qp[:, None]) & mask[None, :]
        assert_same_results(got, want, vectors, q, eligible)


def test_index_input_checks_and_empty_index() -> None:
    vectors = unit(np.random.default_rng(0).standard_normal((10, 4)))
    prefixes = np.arange(10) % 3
    index = PrefixIndex.build(vectors, prefixes, 3)
    with pytest.raises(ValueError, match="prefixes"):
        index.search(vectors[:2], np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="allow_mask"):
        index.search(vectors[:2], np.array([0, 1]), 2, np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        index.search(vectors[:2], np.array([0, 1]), 2, np.ones(10))
    with pytest.raises(ValueError, match="item prefixes"):
        index.add_items(vectors[:1], np.array([7]))
    with pytest.raises(ValueError):
        make_prefix_index("annoy", vectors, prefixes, 3)
    empty = PrefixIndex(4, 3)
    s, i = empty.search(vectors[:2], np.array([0, 1]), 4)
    assert (i == -1).all() and np.isneginf(s).all()


def test_normalize_gives_cosine_scores() -> None:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((50, 6)).astype(np.float32) * 5
    prefixes = np.zeros(50, dtype=np.int64)
    for backend in ("faiss", "exhaustive"):
        index = make_prefix_index(backend, raw, prefixes, 1, normalize=True)
        s, i = index.search(raw[[4]] * 3, np.array([0]), 1)
        assert i[0, 0] == 4 and s[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_semantic_ids_feed_the_prefix_index() -> None:
    x = clustered(n=500)
    sids = fit_semantic_ids(x, SemanticIdConfig(levels=2, codebook_sizes=[10, 8]))
    index = PrefixIndex.build(x, sids.prefixes, sids.n_prefixes)
    np.testing.assert_array_equal(
        index.prefix_sizes(), [len(sids.prefix_groups().get(c, [])) for c in range(10)])
    # A new item: encode its prefix with the fitted codebooks, then it is searchable at once.
    new = clustered(n=1, seed=9)
    prefix = sids.encode(new)[:, 0]
    (item_id,) = index.add_items(new, prefix)
    assert index.search(new, prefix, 1)[1][0, 0] == item_id


def test_flat_to_codes_inverts_prefix_ids_for_arrays_and_tensors() -> None:
    from sigmarec.tokenization.hybrid import HybridVocab, flat_to_codes

    vocab = HybridVocab([3, 4, 5])
    codes = np.array([[a, b, c] for a in range(3) for b in range(4) for c in range(5)])
    flat = vocab.prefix_ids(codes)
    np.testing.assert_array_equal(flat_to_codes(flat, vocab.codebook_sizes), codes)
    t = flat_to_codes(torch.as_tensor(flat), vocab.codebook_sizes)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.long
    np.testing.assert_array_equal(t.numpy(), codes)


def test_prefix_text_writes_a_flat_prefix_as_its_tokens() -> None:
    from sigmarec.tokenization.hybrid import HybridVocab

    assert HybridVocab([3, 4]).prefix_text(7) == "<a_1><b_3>"
    assert HybridVocab([16]).prefix_text(11) == "<a_11>"
