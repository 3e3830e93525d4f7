"""Baselines: shapes, the behaviour each one promises, no look-ahead in what is fitted, SASRec's
training contract (learns, deterministic, causal), and the stage's artifacts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset

from sigmarec.baselines.base import rank_instances
from sigmarec.baselines.cooccurrence import Cooccurrence
from sigmarec.baselines.popularity import MostPop
from sigmarec.baselines.registry import REGISTRY, create
from sigmarec.baselines.repurchase import Repurchase
from sigmarec.baselines.sasrec import SASRec, SASRecCE, SASRecRecommender
from sigmarec.baselines.sasrec.train import (
    sasrec_loss,
    training_windows,
    unseen_negatives,
    validation_instances,
)
from sigmarec.baselines.stage import BaselinesStage, id_tower_source
from sigmarec.config import CooccurrenceConfig, DataConfig, SASRecConfig, SigmaConfig
from sigmarec.core.stage import StageContext
from sigmarec.data.build import build
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import ConfigError
from sigmarec.metrics import top_n

TINY_SASREC = {"hidden": 16, "blocks": 1, "heads": 2, "max_len": 8, "batch_size": 16,
               "max_epochs": 2, "patience": 1, "max_steps_per_epoch": 3, "dropout": 0.1,
               "device": "cpu"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine an oversubscribed
    # OpenMP pool makes each small op orders of magnitude slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> ProcessedData:
    cfg = DataConfig(split={"kind": "temporal", "valid_days": 28, "test_days": 28})
    return build(make_dataset(n_users=30, n_items=40, baskets_per_user=14), cfg, seed=0)


def config(**baselines) -> SigmaConfig:
    return SigmaConfig.model_validate(
        {"seed": 0, "eval": {"ks": [1, 5, 10], "top_n": 10},
         "baselines": {"sasrec": TINY_SASREC, **baselines}}
    )


def processed(rows: list[tuple[int, int, int, str]], n_items: int) -> ProcessedData:
    """Hand-made data: rows of (user, item, basket, split) in chronological order per user."""
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx", "basket", "split"])
    inter["pos"] = inter.groupby("user_idx").cumcount()
    inter["timestamp"] = pd.Timestamp("2017-01-01") + pd.to_timedelta(inter["basket"], unit="D")
    inter["quantity"], inter["event"] = 1.0, "purchase"
    n_users = int(inter["user_idx"].max()) + 1
    items = pd.DataFrame({"item_idx": range(n_items), "item_id": [f"i{i}" for i in range(n_items)]})
    users = pd.DataFrame({"user_idx": range(n_users), "user_id": [f"u{u}" for u in range(n_users)]})
    inst = pd.DataFrame(columns=["instance_id", "split", "task", "user_idx", "hist_len", "targets",
                                 "timestamp"])
    return ProcessedData(items=items, users=users, interactions=inter, instances=inst)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_baseline_scores_the_whole_catalogue(data, name):
    model = create(name, config())
    model.fit(data)
    inst = data.eval_instances("test")
    hist = data.histories(inst)[:5]
    scores = model.score(inst["user_idx"].to_numpy()[:5], hist)
    assert scores.shape == (5, data.n_items)
    assert torch.isfinite(scores).all()
    ranked = rank_instances(model, data, inst, top=10)
    assert len(ranked) == len(inst) and all(len(r) == 10 for r in ranked["items"])


def test_mostpop_counts_training_purchases_only():
    rows = [(0, 0, 0, "train"), (0, 1, 1, "train"), (1, 1, 0, "train"),
            (0, 2, 2, "test"), (1, 2, 1, "test"), (1, 2, 2, "test")]
    model = MostPop()
    model.fit(processed(rows, n_items=3))
    assert model.score(np.zeros(2), [np.array([0]), np.array([2])]).tolist() == [[1, 2, 0]] * 2


def test_repurchase_ranks_the_most_bought_item_first_then_fills_by_popularity(data):
    model = Repurchase()
    model.fit(data)
    hist = np.array([3, 7, 3, 9, 3, 7])
    top = top_n(model.score(np.array([0]), [hist]), 6)[0][0].tolist()
    assert top[:3] == [3, 7, 9]
    pop_order = [int(i) for i in np.argsort(-data.train_item_counts, kind="stable")]
    assert top[3:6] == [i for i in pop_order if i not in (3, 7, 9)][:3]


def test_repurchase_decay_prefers_recent_purchases(data):
    model = Repurchase(decay=0.5)
    model.fit(data)
    # Item 3 twice long ago, item 5 once most recently: decay lets the recent one win.
    top = torch.argsort(model.score(np.array([0]), [np.array([3, 3, 1, 2, 4, 5])])[0],
                        descending=True)
    assert int(top[0]) == 5


def test_cooccurrence_learns_only_from_the_training_period():
    rows = [
        (0, 0, 0, "train"), (0, 1, 0, "train"), (0, 2, 1, "train"),
        (1, 0, 0, "train"), (1, 1, 0, "train"), (1, 3, 1, "train"),
        # Items 2 and 3 share a basket only in the evaluation periods.
        (0, 2, 2, "valid"), (0, 3, 2, "valid"), (1, 2, 2, "test"), (1, 3, 2, "test"),
    ]
    data = processed(rows, n_items=5)
    model = Cooccurrence(CooccurrenceConfig(window=2, history=5, decay=0.9))
    model.fit(data)
    sim = model.similarity.toarray()
    assert sim[0, 1] > 0 and sim[1, 0] == sim[0, 1]
    assert sim[2, 3] == 0 and sim[3, 2] == 0
    assert np.all(np.diag(sim) == 0)
    scores = model.score(np.array([0]), [np.array([2])])[0]
    assert scores[3] < 0  # popularity fallback only, below any co-occurrence evidence


def test_cooccurrence_uses_a_window_for_singleton_baskets():
    # Every interaction its own basket (a rating log): neighbours within `window` co-occur.
    rows = [(0, i, b, "train") for b, i in enumerate([0, 1, 2, 3])]
    model = Cooccurrence(CooccurrenceConfig(window=1))
    model.fit(processed(rows, n_items=4))
    sim = model.similarity.toarray()
    assert sim[0, 1] > 0 and sim[1, 2] > 0 and sim[0, 2] == 0


def test_training_windows_make_every_purchase_but_the_first_a_target():
    seq = np.arange(23)
    for stride in (None, 3):
        w = training_windows([seq, np.array([5])], max_len=5, stride=stride)
        assert w.shape[1] == 6
        inp, tgt = w[:, :-1], w[:, 1:]
        targets = {int(t) - 1 for t in tgt[(inp != 0) & (tgt != 0)]}
        assert targets == set(range(1, 23))
    # Left padding: real items are right-aligned.
    w = training_windows([np.array([4, 2])], max_len=5)
    assert w.tolist() == [[0, 0, 0, 0, 5, 3]]


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_sasrec_loss_decreases_on_a_fixed_batch(loss):
    torch.manual_seed(0)
    model = SASRec(n_items=30, hidden=16, blocks=1, heads=1, dropout=0.0, max_len=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(1, 31, (8, 9))
    batch[:2, :4] = 0  # some left padding
    values = []
    for _ in range(15):
        # The same negatives every step, so the BCE objective itself is fixed.
        value = sasrec_loss(model, batch, loss, torch.Generator().manual_seed(1))
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert values[-1] < 0.8 * values[0]


def test_sasrec_ce_target_fraction_scores_a_random_subset_of_the_targets():
    torch.manual_seed(0)
    model = SASRec(n_items=30, hidden=16, blocks=1, heads=1, dropout=0.0, max_len=8)
    batch = torch.randint(1, 31, (8, 9))
    batch[:2, :4] = 0
    full = sasrec_loss(model, batch, "ce")
    # The whole share is the plain loss, whatever the generator.
    assert torch.equal(full, sasrec_loss(model, batch, "ce", torch.Generator().manual_seed(3), 1.0))
    # A share draws a subset: each draw is a mean over fewer targets, and over many draws the
    # estimate is unbiased.
    with torch.no_grad():
        draws = [sasrec_loss(model, batch, "ce", torch.Generator().manual_seed(s), 0.25).item()
                 for s in range(400)]
    assert len(set(np.round(draws, 6))) > 10
    assert abs(np.mean(draws) - full.item()) < 0.02 * full.item()
    with pytest.raises(ValueError, match="ce_target_fraction"):
        SASRecConfig(ce_target_fraction=0.0)


@pytest.mark.parametrize("cls", ["sasrec_bce", "sasrec_ce"])
def test_sasrec_training_is_deterministic_given_the_seed(data, cls):
    runs = []
    for _ in range(2):
        model = create(cls, config())
        summary = model.fit(data)
        runs.append(model.item_embeddings())
    assert runs[0].shape == (data.n_items, 16) and runs[0].dtype == np.float32
    np.testing.assert_array_equal(runs[0], runs[1])
    assert summary["valid_ndcg10"] is not None and summary["epochs_run"] >= 1


def test_sasrec_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = SASRec(n_items=20, hidden=16, blocks=2, heads=2, dropout=0.0, max_len=6).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    changed = seq.clone()
    changed[:, -1] = 11  # a later item
    with torch.no_grad():
        a, b = model(seq), model(changed)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a[:, :-1], b[:, :-1])
        assert not torch.allclose(a[:, -1], b[:, -1])
        # Extra leading padding changes nothing for the real positions.
        shorter = model(seq[:1, 2:])
        torch.testing.assert_close(shorter, a[:1, 2:])


def test_sasrec_tuning_reports_every_tried_configuration(data):
    model = create("sasrec_ce", config(sasrec={**TINY_SASREC, "max_epochs": 1,
                                               "tune": {"lr": [1e-3, 1e-2]}}))
    summary = model.fit(data)
    assert [row["lr"] for row in summary["tune"]] == [1e-3, 1e-2]
    best = max(summary["tune"], key=lambda r: r["valid_ndcg10"])
    assert summary["chosen"] == {"lr": best["lr"]}
    assert model.trained_cfg.lr == best["lr"]


def test_sasrec_save_and_load_score_identically(data, tmp_path):
    model = SASRecCE(SASRecConfig(**{**TINY_SASREC, "max_epochs": 1}), seed=0)
    model.fit(data)
    model.save(tmp_path)
    again = SASRecRecommender.load(tmp_path)
    assert isinstance(again, SASRecCE)
    hist = [np.array([1, 2, 3]), np.arange(20) % data.n_items, np.array([], dtype=np.int64)]
    torch.testing.assert_close(model.score(np.zeros(3), hist), again.score(np.zeros(3), hist))


def test_id_tower_falls_back_to_the_other_sasrec():
    assert id_tower_source(["sasrec_bce", "sasrec_ce"], "sasrec_ce") == "sasrec_ce"
    assert id_tower_source(["mostpop", "sasrec_bce"], "sasrec_ce") == "sasrec_bce"
    assert id_tower_source(["mostpop"], "sasrec_ce") is None


def test_stage_writes_rankings_models_and_the_id_tower(data, tmp_path):
    data.save(tmp_path / "data")
    cfg = config(enabled=["mostpop", "repurchase", "cooccurrence", "sasrec_bce"])
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(config=cfg, run_dir=tmp_path, out=out, inputs={"data": tmp_path / "data"})
    summary = BaselinesStage().run(ctx)
    for name in cfg.baselines.enabled:
        assert "valid_ndcg10" in summary[name] and summary[name]["fit_seconds"] >= 0
        for split in ("valid", "test"):
            ranked = pd.read_parquet(out / "rankings" / f"{name}_{split}.parquet")
            assert len(ranked) == len(data.eval_instances(split))
            assert len(ranked["items"].iloc[0]) == cfg.eval.top_n
    assert (out / "models" / "sasrec_bce" / "model.pt").is_file()
    assert json.loads((out / "models" / "sasrec_bce" / "hparams.json").read_text())["loss"] == "bce"
    emb = np.load(out / "item_embeddings.npy")
    assert emb.shape == (data.n_items, 16) and emb.dtype == np.float32
    meta = json.loads((out / "item_embeddings.json").read_text())
    assert meta["source"] == "sasrec_bce" and meta["shape"] == [data.n_items, 16]


def test_stage_without_sasrec_skips_the_id_tower(data, tmp_path):
    data.save(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(config=config(enabled=["mostpop"]), run_dir=tmp_path, out=out,
                       inputs={"data": tmp_path / "data"})
    summary = BaselinesStage().run(ctx)
    assert "id_tower" not in summary and not (out / "item_embeddings.npy").exists()


def test_sasrec_loss_ignores_all_padding_columns() -> None:
    """Dropping the columns that are padding in every row (short histories) changes nothing."""
    torch.manual_seed(0)
    model = SASRec(30, 16, 2, 1, 0.0, 10).eval()
    batch = torch.zeros(3, 11, dtype=torch.long)
    batch[0, 6:] = torch.tensor([1, 2, 3, 4, 5])
    batch[1, 8:] = torch.tensor([7, 8, 9])
    batch[2, 9:] = torch.tensor([3, 4])
    inp, tgt = batch[:, :-1], batch[:, 1:]
    valid = (tgt != 0) & (inp != 0)
    full = F.cross_entropy(model.logits(model(inp)[valid]), tgt[valid] - 1)
    assert torch.allclose(sasrec_loss(model, batch, "ce"), full, atol=1e-6)


def test_unseen_negatives_avoid_every_item_of_their_window() -> None:
    gen = torch.Generator().manual_seed(0)
    # A small catalogue, so uniform draws hit the window often and the redraw has work to do.
    windows = torch.zeros(64, 11, dtype=torch.long)
    for r in range(64):
        windows[r, 3:] = torch.randperm(20, generator=gen)[:8] + 1
    neg = unseen_negatives(windows, n_items=20, width=10, generator=gen)
    assert neg.shape == (64, 10) and neg.min() >= 1 and neg.max() <= 20
    assert not (neg.unsqueeze(-1) == windows.unsqueeze(1)).any()
    uniform = torch.randint(1, 21, (64, 10), generator=gen)
    assert (uniform.unsqueeze(-1) == windows.unsqueeze(1)).any()  # the check can fail


def test_sasrec_bce_default_negatives_are_the_uniform_draw() -> None:
    """The default ("uniform") consumes the generator exactly as before the option existed."""
    torch.manual_seed(0)
    model = SASRec(30, 16, 1, 1, 0.0, 8).eval()
    batch = torch.randint(1, 31, (6, 9))
    batch[:2, :3] = 0
    inp, tgt = batch[:, :-1], batch[:, 1:]
    valid = (tgt != 0) & (inp != 0)
    h, pos = model(inp)[valid], tgt[valid]
    neg = torch.randint(1, 31, pos.shape, generator=torch.Generator().manual_seed(4))
    pos_logit = (h * model.item_emb(pos)).sum(-1)
    neg_logit = (h * model.item_emb(neg)).sum(-1)
    old = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
        F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))
    got = sasrec_loss(model, batch, "bce", torch.Generator().manual_seed(4))
    assert torch.allclose(got, old, atol=1e-6)
    unseen = sasrec_loss(model, batch, "bce", torch.Generator().manual_seed(4), negatives="unseen")
    assert torch.isfinite(unseen) and not torch.allclose(unseen, old)
    with pytest.raises(ConfigError, match="negatives"):
        sasrec_loss(model, batch, "bce", negatives="popular")


def test_sasrec_validates_every_nth_epoch_on_a_fixed_user_subset(data):
    cfg = {**TINY_SASREC, "max_epochs": 5, "patience": 5, "valid_every": 2, "valid_users": 10}
    model = create("sasrec_bce", config(sasrec=cfg))
    summary = model.fit(data)
    validated = [row["epoch"] for row in summary["history"] if "valid_ndcg10" in row]
    assert validated == [2, 4, 5]  # and the last epoch, which is no multiple of 2
    assert summary["best_epoch"] in validated
    sub = validation_instances(data, 10, seed=0)
    assert sub["user_idx"].nunique() == 10
    assert sub.equals(validation_instances(data, 10, seed=0))
    assert len(validation_instances(data, None, seed=0)) == len(data.eval_instances("valid"))
