"""Beyond-accuracy metrics, the repeat/new split, input validation and the evaluation stage."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from sigmarec.config import DataConfig, EvalConfig, SigmaConfig, SplitConfig
from sigmarec.core.stage import execute
from sigmarec.data.build import build
from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import validate
from sigmarec.errors import SigmaError, StageError
from sigmarec.evaluation.harness import eval_instances, evaluate_rankings, instance_metrics
from sigmarec.evaluation.report import print_results, results_table
from sigmarec.evaluation.stage import EvaluationStage
from sigmarec.metrics import beyond_metrics, category_codes, coverage, head_mask

# Six items; level 0 categories A A B B C and one without a path.
PATHS = ["A > x", "A > y", "B > x", "B > z", "C > x", None]
TRAIN_COUNTS = np.array([5, 3, 1, 1, 0, 0])  # head at 0.8 = items {0, 1} (8 of 10 purchases)


def make_data() -> ProcessedData:
    """Two users with short sequences; user 1's instance belongs to a second task."""
    items = pd.DataFrame({
        "item_idx": range(6), "item_id": [f"i{i}" for i in range(6)], "title": "t",
        "category_path": PATHS, "brand": None, "attributes": "{}", "text": "t",
    })
    seqs = {0: [0, 0, 0, 1, 1, 2, 3, 4, 5], 1: [0, 0, 1, 3, 2]}
    splits = {0: ["train"] * 7 + ["valid", "test"], 1: ["train"] * 4 + ["test"]}
    rows = [
        {"user_idx": u, "item_idx": it, "timestamp": pd.Timestamp("2020-01-01"), "basket": p,
         "quantity": 1.0, "event": "purchase", "split": s, "pos": p}
        for u in seqs for p, (it, s) in enumerate(zip(seqs[u], splits[u], strict=True))
    ]
    inst = pd.DataFrame({
        "instance_id": [0, 1, 2, 3],
        "split": ["valid", "test", "test", "test"],
        "task": ["JustForYou", "JustForYou", "JustForYou", "Other"],
        "user_idx": [0, 0, 0, 1],
        "hist_len": [7, 7, 2, 4],
        # 1: targets 0 (repeat) and 4 (new); 2: history [0, 0], targets all new; 3: all repeat.
        "targets": [np.array([4]), np.array([0, 4]), np.array([3, 5]), np.array([1, 3])],
        "timestamp": pd.Timestamp("2020-02-01"),
    })
    users = pd.DataFrame({"user_idx": [0, 1], "user_id": ["u0", "u1"]})
    return ProcessedData(items=items, users=users, interactions=pd.DataFrame(rows), instances=inst)


def rankings(lists: dict[int, list[int]]) -> pd.DataFrame:
    return pd.DataFrame({
        "instance_id": list(lists), "items": [np.array(v) for v in lists.values()],
        "scores": [np.linspace(1, 0, len(v)) for v in lists.values()],
    })


CFG = EvalConfig(ks=[1, 3, 4], top_n=4, long_tail_head_share=0.8, category_level=0)
TEST_LISTS = {1: [0, 2, 4, 1], 2: [5, 3, 0, 1], 3: [1, 2, 0, 3]}


def test_category_codes_and_head() -> None:
    codes = category_codes(PATHS, level=0)
    assert codes[0] == codes[1] and codes[2] == codes[3] and len(set(codes.tolist())) == 4
    assert category_codes(PATHS, level=1).tolist() == [0, 1, 0, 2, 0, 3]  # x y x z x ""
    assert head_mask(TRAIN_COUNTS, 0.8).tolist() == [True, True, False, False, False, False]
    assert head_mask(TRAIN_COUNTS, 0.5).tolist() == [True] + [False] * 5
    assert not head_mask(np.zeros(3), 0.8).any()


def test_beyond_metrics_hand_example() -> None:
    ranked = np.array([[0, 2, 4, 1], [0, 1, 0, 1]])
    histories = [np.array([0, 3]), np.array([0, 1])]
    m = beyond_metrics(ranked, [1, 4], category_codes(PATHS, 0), head_mask(TRAIN_COUNTS, 0.8),
                       histories)
    # Row 0, top 4: categories A B C A -> 3 distinct, entropy of (1/2, 1/4, 1/4) = 1.5 bits.
    assert m["Categories@4"].tolist() == [3, 1]
    assert m["Entropy@4"] == pytest.approx([1.5, 0.0])
    assert m["Entropy@1"] == pytest.approx([0.0, 0.0])
    assert m["LongTail@4"] == pytest.approx([0.5, 0.0])
    assert m["NewToUser@4"] == pytest.approx([0.75, 0.0])
    assert m["NewToUser@1"] == pytest.approx([0.0, 0.0])
    assert coverage(ranked, [1, 4], n_items=6) == pytest.approx({"Coverage@1": 1 / 6,
                                                                 "Coverage@4": 4 / 6})


def test_repeat_new_split_and_tasks() -> None:
    data = make_data()
    res = evaluate_rankings(data, rankings(TEST_LISTS), "test", CFG)
    assert set(res) == {"ALL", "JustForYou", "Other", "MEAN"}
    # MEAN: each task once, whatever its size.
    assert res["MEAN"]["all"]["HR@1"] == pytest.approx(
        (res["JustForYou"]["all"]["HR@1"] + res["Other"]["all"]["HR@1"]) / 2)
    jfy = res["JustForYou"]
    # Instance 1: repeat {0} ranked 1st; new {4} ranked 3rd. Instance 2: only new {3, 5}.
    assert (jfy["all"]["n"], jfy["repeat"]["n"], jfy["new"]["n"]) == (2, 1, 2)
    assert jfy["repeat"]["HR@1"] == 1.0 and jfy["repeat"]["MRR@4"] == 1.0
    assert jfy["new"]["HR@1"] == pytest.approx(0.5)  # instance 2 hits 5 at rank 1
    assert jfy["new"]["MRR@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert jfy["new"]["Recall@1"] == pytest.approx((0 + 0.5) / 2)
    other = res["Other"]
    assert other["new"] == {"n": 0} and other["repeat"]["n"] == 1
    assert other["repeat"]["Recall@4"] == 1.0 and other["repeat"]["HR@1"] == 1.0
    everything = res["ALL"]
    assert (everything["all"]["n"], everything["repeat"]["n"], everything["new"]["n"]) == (3, 2, 2)
    assert everything["all"]["HR@1"] == pytest.approx(1.0)
    assert everything["all"]["Coverage@1"] == pytest.approx(3 / 6)
    # Beyond metrics of a kind average over that kind's instances only.
    per = instance_metrics(data, data.eval_instances("test"), np.array(list(TEST_LISTS.values())),
                           CFG)
    assert everything["repeat"]["LongTail@4"] == pytest.approx(per["LongTail@4"][[0, 2]].mean())
    assert np.isnan(per["new:HR@1"][2])


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        ({1: [0, 2, 4, 1], 2: [5, 3, 0, 1]}, "1 of 3 test instances have no ranking"),
        ({**TEST_LISTS, 0: [0, 1, 2, 3]}, "not test instances"),
        ({1: [0, 2, 4], 2: [5, 3, 0, 1], 3: [2, 1, 0, 3]}, "list of 3 items but eval.ks needs K=4"),
        ({**TEST_LISTS, 2: [5, 3, 6, 1]}, r"outside the catalogue \[0, 6\)"),
        ({**TEST_LISTS, 2: [5, 3, -1, 1]}, "outside the catalogue"),
        ({**TEST_LISTS, 2: [5, 3, 5, 1]}, "more than once"),
    ],
)
def test_validation_errors(lists, match) -> None:
    with pytest.raises(StageError, match=match):
        evaluate_rankings(make_data(), rankings(lists), "test", CFG, source="x.parquet")


def test_duplicate_ids_and_columns() -> None:
    df = rankings(TEST_LISTS)
    with pytest.raises(SigmaError, match=r"duplicate instance_id\(s\) \[1\]"):
        evaluate_rankings(make_data(), pd.concat([df, df.iloc[:1]]), "test", CFG)
    with pytest.raises(StageError, match="missing column"):
        evaluate_rankings(make_data(), df.drop(columns="items"), "test", CFG)
    with pytest.raises(StageError, match="unknown evaluation split"):
        evaluate_rankings(make_data(), df, "train", CFG)


def test_max_instances_subset() -> None:
    data, cfg = make_data(), CFG.model_copy(update={"max_instances": 2})
    subset = eval_instances(data, "test", cfg)
    assert len(subset) == 2 and subset.equals(eval_instances(data, "test", cfg))
    only = {i: TEST_LISTS[i] for i in subset["instance_id"]}
    assert evaluate_rankings(data, rankings(only), "test", cfg)["ALL"]["all"]["n"] == 2
    # Ranking more than the subset is fine: the extras are not scored.
    assert evaluate_rankings(data, rankings(TEST_LISTS), "test", cfg)["ALL"]["all"]["n"] == 2


def test_stage_end_to_end(tmp_path) -> None:
    run_dir = tmp_path / "run"
    data = make_data()
    data.save(run_dir / "data")
    (run_dir / "data" / "manifest.json").write_text(json.dumps({"run_id": "d1"}))
    base = run_dir / "baselines"
    (base / "rankings").mkdir(parents=True)
    (base / "manifest.json").write_text(json.dumps({"run_id": "b1"}))
    rankings(TEST_LISTS).to_parquet(base / "rankings" / "mostpop_test.parquet")
    rankings({0: [4, 1, 2, 3]}).to_parquet(base / "rankings" / "mostpop_valid.parquet")
    rankings({i: [3, 2, 1, 0] for i in TEST_LISTS}).to_parquet(
        base / "rankings" / "sasrec_ce_test.parquet")
    for stage in ("tasks", "gr_baselines", "ranker", "generation"):  # ran, ranked nothing here
        (run_dir / stage).mkdir()
        (run_dir / stage / "manifest.json").write_text(json.dumps({"run_id": stage}))
    cfg = SigmaConfig(eval=CFG.model_dump())

    manifest = execute(EvaluationStage(), cfg, run_dir)
    out = run_dir / "evaluation"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {"mostpop", "sasrec_ce"} and set(metrics["valid"]) == {"mostpop"}
    assert metrics["valid"]["mostpop"]["ALL"]["all"]["HR@4"] == 1.0
    assert manifest["summary"]["models"] == {"valid": ["mostpop"], "test": ["mostpop", "sasrec_ce"]}
    table = pd.read_csv(out / "metrics_table.csv")
    assert list(table.columns[:5]) == ["split", "model", "task", "kind", "n"]
    # test: 2 models x 3 tasks x 3 kinds + MEAN (kind all); valid: 1 model x 2 tasks x 3 kinds
    assert len(table) == 2 * 3 * 3 + 2 + 1 * 2 * 3
    assert execute(EvaluationStage(), cfg, run_dir)["skipped"]

    df = results_table(metrics, split="test", ks=(1, 3))
    assert list(df.index) == ["mostpop", "sasrec_ce"]
    assert {"HR@1", "NDCG@1", "HR@3", "HR@1 repeat", "HR@1 new", "Coverage@1"} <= set(df.columns)
    assert df.loc["mostpop", "HR@1"] == pytest.approx(1.0)
    buf = io.StringIO()
    print_results(metrics, console=Console(file=buf, width=80))
    text = buf.getvalue()
    assert "sasrec_ce" in text and "test" in text and "…" not in text


def test_stage_without_rankings_fails(tmp_path) -> None:
    run_dir = tmp_path / "run"
    make_data().save(run_dir / "data")
    for stage in ("data", "baselines", "tasks", "gr_baselines", "ranker", "generation"):
        (run_dir / stage).mkdir(exist_ok=True)
        (run_dir / stage / "manifest.json").write_text(json.dumps({"run_id": stage}))
    with pytest.raises(StageError, match="no rankings"):
        execute(EvaluationStage(), SigmaConfig(eval=CFG.model_dump()), run_dir)


def test_built_data_oracle_and_history_lists(synthetic) -> None:
    """On a built dataset: a list that leads with the targets scores 1; a history replay scores
    0 on new targets and recommends nothing new to the user."""
    split = SplitConfig(kind="temporal", valid_start="2017-03-01", test_start="2017-04-01")
    data = build(validate(synthetic), DataConfig(source="files", split=split), seed=0)
    cfg = EvalConfig(ks=[1, 5, 10], top_n=10)
    inst = data.eval_instances("test")
    oracle, replay = {}, {}
    for iid, t, h in zip(inst["instance_id"], inst["targets"], data.histories(inst), strict=True):
        t = list(dict.fromkeys(t.tolist()))
        oracle[iid] = (t + [i for i in range(data.n_items) if i not in t])[:10]
        seen = list(dict.fromkeys(h[::-1].tolist()))
        replay[iid] = (seen + [i for i in range(data.n_items) if i not in seen])[:10]
    res = evaluate_rankings(data, rankings(oracle), "test", cfg)["ALL"]
    assert res["all"]["n"] == len(inst) > 0
    assert res["all"]["NDCG@10"] == pytest.approx(1.0) and res["all"]["HR@1"] == 1.0
    assert res["repeat"]["n"] + res["new"]["n"] >= len(inst)
    # Every history holds >= 10 distinct items, so the replay lists are pure history.
    assert all(len(set(h.tolist())) >= 10 for h in data.histories(inst))
    rep = evaluate_rankings(data, rankings(replay), "test", cfg)["ALL"]
    assert rep["new"]["HR@10"] == 0.0 and rep["all"]["NewToUser@10"] == 0.0
    assert rep["repeat"]["HR@10"] > 0
