"""Three-step generation: the batched decoder against the slow reference, APF, filters."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_model import N_ITEMS, example, make_model

from sigmarec.generation.decode import SigmaDecoder, union_prefixes
from sigmarec.generation.fusion import Candidates, fuse, fused_scores, prefix_spread
from sigmarec.generation.reference import reference_recommend

torch.set_num_threads(1)


def _trained_looking(sizes):
    # A fresh model gives every new token the same row, hence exact ties everywhere; random
    # new-token rows stand in for training so that the orderings being compared are strict.
    model = make_model(sizes).eval()
    with torch.no_grad():
        model.token_delta.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture(scope="module")
def one_level():
    return _trained_looking([4])


@pytest.fixture(scope="module")
def two_level():
    return _trained_looking([4, 3])


def _examples(model):
    return [example(model, [1, 2, 3], 5), example(model, [7, 8], 9, "Find snacks"),
            example(model, [10, 11, 12, 13, 14], 1), example(model, [20, 6], 5, "Something new")]


@pytest.mark.parametrize("fusion", ["adaptive", "fixed", "joint", "off"])
@pytest.mark.parametrize("levels", ["one_level", "two_level"])
def test_batched_decoder_equals_the_reference(request, levels, fusion) -> None:
    model = request.getfixturevalue(levels)
    exs = _examples(model)
    k, m, n = 2, 3, 5
    dec = SigmaDecoder(model, k, m)
    items, scores = dec.recommend(exs, n, fusion=fusion, tau=0.05)
    for b, ex in enumerate(exs):
        ref_items, ref_scores = reference_recommend(model, ex, k, m, n, fusion, 0.05)
        assert items[b].tolist() == ref_items
        assert np.allclose(scores[b], ref_scores, atol=1e-4)


@pytest.mark.parametrize("levels", ["one_level", "two_level"])
def test_filters_apply_inside_the_search_and_lists_stay_full(request, levels) -> None:
    model = request.getfixturevalue(levels)
    exs = _examples(model)
    rng = np.random.default_rng(1)
    # Few allowed items, scattered over prefixes: K=1 prefix cannot hold N of them.
    allow = np.zeros((len(exs), N_ITEMS), dtype=bool)
    for b in range(len(exs)):
        allow[b, rng.choice(N_ITEMS, size=8, replace=False)] = True
    dec = SigmaDecoder(model, 1, 2)
    items, _ = dec.recommend(exs, 6, fusion="adaptive", tau=0.1, allow_mask=allow)
    for b, ex in enumerate(exs):
        assert (items[b] >= 0).all(), "6 eligible items exist, so 6 must come back"
        assert allow[b, items[b]].all()
        assert len(set(items[b].tolist())) == 6
        ref, _ = reference_recommend(model, ex, 1, 2, 6, "adaptive", 0.1, allow[b])
        assert items[b].tolist() == ref


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(allowed=st.sets(st.integers(0, N_ITEMS - 1), max_size=N_ITEMS), n=st.integers(1, 12),
       k=st.integers(1, 4), m=st.integers(1, 5))
def test_exactly_min_n_eligible_items_come_back(one_level, allowed, n, k, m) -> None:
    mask = np.zeros(N_ITEMS, dtype=bool)
    mask[list(allowed)] = True
    dec = SigmaDecoder(one_level, k, m)
    items, scores = dec.recommend(_examples(one_level)[:2], n, allow_mask=mask, tau=0.1)
    for row, srow in zip(items, scores, strict=True):
        real = row[row >= 0]
        assert len(real) == min(n, len(allowed))
        assert mask[real].all() and len(set(real.tolist())) == len(real)
        assert np.all(np.diff(srow[: len(real)]) <= 1e-12)  # sorted best first


# ------------------------------------------------------------------------------------- fusion


def _cands(logp, cos, k_spread=None):
    logp = np.asarray(logp, dtype=float)
    cos = np.asarray(cos, dtype=float)
    b, k, m = cos.shape
    items = np.arange(b * k * m).reshape(b, k, m) % (k * m)
    return Candidates(np.tile(np.arange(k), (b, 1)), logp, items, cos, k_spread or k)


def test_fusion_is_a_distribution_and_adaptive_follows_the_spread() -> None:
    c = _cands(np.log([[0.7, 0.2, 0.1], [0.34, 0.33, 0.33]]),
               np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 4)))
    for mode in ("adaptive", "fixed"):
        p = np.exp(fused_scores(c, mode, 0.1))
        # Within-prefix softmax times the prefix probability: the K*M mass equals sum P(c_k).
        assert np.allclose(p.sum((1, 2)), np.exp(c.prefix_logp).sum(1))
    s = prefix_spread(c.prefix_logp, 3)
    assert s[0] > s[1] > 0
    # Adaptive == fixed with tau / s, request by request.
    a = fused_scores(c, "adaptive", 0.1)
    for b in range(2):
        f = fused_scores(_cands(c.prefix_logp[b:b + 1], c.cosine[b:b + 1]), "fixed", 0.1 / s[b])
        assert np.allclose(a[b], f[0])


def test_joint_is_the_prefix_prior_plus_the_unnormalised_score() -> None:
    rng = np.random.default_rng(3)
    c = _cands(np.log([[0.6, 0.3, 0.1]]), rng.uniform(-1, 1, size=(1, 3, 4)))
    j = fused_scores(c, "joint", 0.2)
    assert np.allclose(j, c.prefix_logp[:, :, None] + c.cosine / 0.2)
    # Within a prefix it ranks as fixed fusion does (same tau); only across prefixes it differs.
    f = fused_scores(c, "fixed", 0.2)
    for k in range(3):
        assert (np.argsort(-j[0, k]) == np.argsort(-f[0, k])).all()
    # An item alone in its prefix is no longer lifted to that prefix's whole probability mass:
    # prefix 1 holds one weak item; fixed fusion ranks it first, joint ranks the strong ones.
    cos = np.array([[[0.9, 0.85, 0.8], [0.1, -np.inf, -np.inf]]])
    lone = _cands(np.log([[0.5, 0.5]]), cos)
    lone.items[0, 1, 1:] = -1
    assert fuse(lone, "fixed", 0.1, 1)[0][0, 0] == 3
    assert fuse(lone, "joint", 0.1, 1)[0][0, 0] == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(1e-3, 10.0))
def test_joint_moves_a_shifted_prefix_by_the_shift_over_tau(seed: int, tau: float) -> None:
    # Unlike the per-prefix softmax, joint scores see absolute item scores: shifting one
    # prefix's scores by d moves exactly that prefix's candidates by d / tau.
    rng = np.random.default_rng(seed)
    c = _cands(np.log(rng.dirichlet(np.ones(3))[None]), rng.uniform(-1, 1, size=(1, 3, 4)))
    base = fused_scores(c, "joint", tau)
    shifted = c.cosine.copy()
    shifted[0, 1] += 0.5
    moved = fused_scores(_cands(c.prefix_logp, shifted), "joint", tau)
    assert np.allclose(moved[0, 1] - base[0, 1], 0.5 / tau)
    assert np.allclose(moved[0, [0, 2]], base[0, [0, 2]])


def test_off_is_lexicographic_prefix_then_cosine() -> None:
    cos = np.array([[[0.1, 0.2], [0.9, 0.8]]])
    items, _ = fuse(_cands(np.log([[0.6, 0.4]]), cos), "off", 1.0, 4)
    assert items.tolist() == [[1, 0, 2, 3]]  # prefix 0's items first, by cosine


def test_tau_moves_between_prefix_order_and_cosine_order() -> None:
    cos = np.array([[[0.0, -0.5], [0.95, 0.9]]])
    c = _cands(np.log([[0.55, 0.45]]), cos)
    sharp, _ = fuse(c, "fixed", 0.01, 2)  # near argmax within prefix: tops of both prefixes
    flat, _ = fuse(c, "fixed", 100.0, 2)  # near uniform within: the likelier prefix's pair
    assert sorted(sharp[0].tolist()) == [0, 2]
    assert sorted(flat[0].tolist()) == [0, 1]


def test_padding_never_reaches_the_list() -> None:
    cos = np.array([[[0.3, -np.inf], [0.2, 0.1]]])
    c = _cands(np.log([[0.5, 0.5]]), cos)
    c.items[0, 0, 1] = -1
    items, scores = fuse(c, "adaptive", 0.1, 5)
    assert sorted(items[0, :3].tolist()) == [0, 2, 3]
    assert items[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_truncated_candidates_equal_a_decode_with_the_smaller_k(one_level) -> None:
    # Exact for a one-level prefix (a top-K of one softmax); over several levels a wider beam
    # may keep other partial prefixes, so truncation is only the best-first part of its beam.
    from sigmarec.generation.fusion import truncate

    model = one_level
    dec_wide, dec_small = SigmaDecoder(model, 4, 3), SigmaDecoder(model, 2, 3)
    batch = dec_wide.batch(_examples(model))
    wide, small = dec_wide.candidates(batch, 5), dec_small.candidates(batch, 5)
    cut = truncate(wide, 2)
    assert np.array_equal(cut.prefixes, small.prefixes)
    assert np.array_equal(cut.items, small.items)
    assert np.allclose(cut.prefix_logp, small.prefix_logp)
    assert cut.k_for_spread == small.k_for_spread == 2


def test_several_filters_share_one_prompt_forward(one_level) -> None:
    model = one_level
    dec = SigmaDecoder(model, 2, 3)
    batch = dec.batch(_examples(model))
    allow = np.zeros((4, N_ITEMS), dtype=bool)
    allow[:, ::3] = True
    both = dec.candidates_multi(batch, 5, [None, allow])
    assert np.array_equal(both[0].items, dec.candidates(batch, 5).items)
    assert np.array_equal(both[1].items, dec.candidates(batch, 5, allow).items)
    # The continuations ran once for the union of both beams' prefixes: same query vectors.
    assert np.allclose(both[1].cosine, dec.candidates(batch, 5, allow).cosine, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 9), min_size=3, max_size=3), min_size=1, max_size=4),
       st.lists(st.lists(st.integers(-1, 9), min_size=5, max_size=5), min_size=1, max_size=4))
def test_union_prefixes_points_every_slot_at_its_prefix(a: list, b: list) -> None:
    rows = min(len(a), len(b))
    beams = [np.array(a[:rows]), np.array(b[:rows])]
    union, slots = union_prefixes(beams)
    for p, where in zip(beams, slots, strict=True):
        got = np.take_along_axis(union, where, axis=1)
        assert np.array_equal(got[p >= 0], p[p >= 0])
    for r in range(rows):
        real = union[r][union[r] >= 0]
        assert len(set(real)) == len(real)  # each prefix continued once
        assert set(real) == {int(x) for p in beams for x in p[r] if x >= 0}


# ------------------------------------------------------------------------ fusion per task
def _random_cands(b: int, k: int, m: int, seed: int) -> Candidates:
    rng = np.random.default_rng(seed)
    logp = np.log(rng.dirichlet(np.ones(k), size=b))
    items = rng.permutation(b * k * m).reshape(b, k, m) % 97
    cos = rng.uniform(-1, 1, size=(b, k, m))
    copy = np.where(rng.random((b, k, m)) < 0.3, rng.uniform(0, 2, size=(b, k, m)), 0.0)
    return Candidates(np.tile(np.arange(k), (b, 1)), logp, items, cos + copy, k, copy)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["A", "B", "C"]), min_size=1, max_size=12), st.integers(0, 99))
def test_fusion_by_group_equals_fusing_each_group_alone(groups, seed) -> None:
    from sigmarec.generation.fusion import fuse_by_group, take_rows

    c = _random_cands(len(groups), 3, 4, seed)
    settings_ = {"A": (0.01, 0.0), "B": (0.2, 2.0)}  # "C" has none: the default
    default = (0.05, 1.0)
    items, scores = fuse_by_group(c, np.array(groups), settings_, default, 6)
    for g in set(groups):
        idx = np.flatnonzero(np.array(groups) == g)
        tau, scale = settings_.get(g, default)
        want_i, want_s = fuse(take_rows(c, idx), "adaptive", tau, 6, scale)
        np.testing.assert_array_equal(items[idx], want_i)
        np.testing.assert_array_equal(scores[idx], want_s)
    with pytest.raises(ValueError, match="one entry per request"):
        fuse_by_group(c, np.array(groups + ["A"]), settings_, default, 6)


def test_per_task_choice_takes_each_tasks_own_best_and_keeps_the_global_for_small_tasks():
    import pandas as pd

    from sigmarec.generation.config import GenerationConfig
    from sigmarec.generation.stage import GenerationStage

    # Two prefixes of six items, equal cosines; prefix 0 is likelier and item 11 (prefix 1)
    # alone has a copy term. Copy scale 0: prefix 0's six, then items 6-9 make the top 10;
    # scale 5: item 11 first, and item 9 falls to rank 11.
    b = 60
    logp = np.log(np.tile([0.6, 0.4], (b, 1)))
    items = np.tile(np.arange(12).reshape(1, 2, 6), (b, 1, 1))
    copy = np.zeros((b, 2, 6))
    copy[:, 1, 5] = 3.0
    c = Candidates(np.tile(np.arange(2), (b, 1)), logp, items, copy.copy(), 2, copy)
    tasks = ["Wants0"] * 30 + ["Wants1"] * 25 + ["Small"] * 5
    targets = [np.array([9])] * 30 + [np.array([11])] * 25 + [np.array([11])] * 5
    df = pd.DataFrame({"task": tasks, "targets": targets})
    gcfg = GenerationConfig(per_task_min_valid=20)
    out = GenerationStage()._choose_per_task(gcfg, df, c, [0.1], [0.0, 5.0], (0.1, 1.0), 12,
                                             "test")
    assert out["Wants0"] == [0.1, 0.0]
    # Scale 5 and the single choice (scale 1) both rank item 11 first: a tie keeps the latter.
    assert out["Wants1"] == [0.1, 1.0]
    out = GenerationStage()._choose_per_task(gcfg, df, c, [0.1], [0.0, 5.0], (0.1, 0.0), 12,
                                             "test")
    assert out["Wants0"] == [0.1, 0.0] and out["Wants1"] == [0.1, 5.0]
    assert "Small" not in out  # too few validation instances: the global choice
