"""The serving runtime on a tiny run: same prompt -> same ranking as the generation stage,
field-named errors, filters that never shorten a list, one batched decoder call, every
baseline served, post-training events visible after reload, and `sigma recommend`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sigmarec.serving.events import EVENT_COLUMNS, events_dir
from sigmarec.serving.request import RecRequest, RequestError, Resolved
from sigmarec.serving.runtime import Runtime
from sigmarec.tasks.sft_data import most_bought, purchase_counts
from sigmarec.tasks.text import profile_text


@pytest.fixture(scope="module")
def served(tiny_run_dir, tmp_path_factory):
    """One Runtime over a private copy of the session's tiny run (tests write events into it)."""
    cfg, src = tiny_run_dir
    run_dir = tmp_path_factory.mktemp("serving_runtime") / "run"
    shutil.copytree(src, run_dir)
    return cfg, run_dir, Runtime.load(run_dir, cfg)


def _user(rt: Runtime, i: int = 0) -> str:
    return str(rt.data.users["user_id"].iloc[i])


def test_same_prompt_gives_the_generation_stage_ranking(served):
    """Plain check against the stage's own output: for test instances of every task, the
    runtime's prompt (history, frequent section, profile, instruction) and ranking equal what
    the generation stage wrote for that instance."""
    cfg, run_dir, rt = served
    inst = pd.read_parquet(run_dir / "tasks" / "test.parquet")
    gen = pd.read_parquet(run_dir / "generation" / "rankings" / "sigma_test.parquet")
    gen = gen.set_index("instance_id")
    rows = inst.groupby("task").head(2)
    assert rows["task"].nunique() >= 5
    resolved = [Resolved(user_idx=int(r.user_idx),
                         history=rt.data.history(int(r.user_idx), int(r.hist_len)),
                         profile=r.profile, task=r.task, params=json.loads(r.params),
                         instruction=r.instruction, k=10, model="sigma", allow=None)
                for r in rows.itertuples()]
    # The prompt the stage rendered for the instance: same history window and frequent items.
    ex = rt._examples(resolved)
    for e, r in zip(ex, rows.itertuples(), strict=True):
        assert e.item_ids == [*map(int, r.frequent), *map(int, r.history)]
        assert e.channel("counts")[0] == tuple(map(int, r.count_items))
        assert e.channel("counts")[1] == tuple(map(int, r.count_values))
    for r, got in zip(rows.itertuples(), rt.rank(resolved), strict=True):
        want = gen.loc[r.instance_id]
        assert [rt.item_idx(x.item_id) for x in got] == list(want["items"][:10]), r.task
        np.testing.assert_allclose([x.score for x in got], want["scores"][:10], rtol=1e-6,
                                   atol=5e-5)  # fp32: other batch, other padding


def test_fusion_settings_per_task_are_the_stages(served):
    """The runtime fuses each request at the (tau, copy scale) the generation stage chose for
    its task on validation (the two ranking tests around this one check the lists)."""
    from sigmarec.core.stage import read_manifest

    _, run_dir, rt = served
    per = read_manifest(run_dir / "generation")["summary"]["sigma"]["per_task"]
    choice = rt._state.fusion
    assert choice.mode == "joint" == read_manifest(run_dir / "generation")["summary"]["sigma"][
        "fusion"]
    assert per.get("joint"), "the tiny run chose nothing per task"
    assert choice.per_task == {t: tuple(v) for t, v in per["joint"].items()}
    assert choice.per_task_filtered == {t: tuple(v) for t, v in per.get("rule", {}).items()}
    with pytest.raises(ValueError, match="tasks for a batch"):
        choice.fuse(None, np.zeros(2, dtype=bool), 5, ["JustForYou"])


def test_filtered_requests_use_the_pair_sigma_rule_chose(served):
    """A request with a filter is fused at the tau and copy scale that sigma+rule chose on its
    rule-filtered validation lists: with the task's rule as the filter, the runtime's list is
    the generation stage's sigma+rule list."""
    from sigmarec.tasks.rules import instance_allow_masks

    cfg, run_dir, rt = served
    inst = pd.read_parquet(run_dir / "tasks" / "test.parquet")
    gen = pd.read_parquet(run_dir / "generation" / "rankings" / "sigma+rule_test.parquet")
    gen = gen.set_index("instance_id")
    rows = inst[inst["task"].isin(["Category", "Query", "Season"])].groupby("task").head(2)
    masks = instance_allow_masks(rt.data, rows, rt._state.tasks)
    resolved = [Resolved(user_idx=int(r.user_idx),
                         history=rt.data.history(int(r.user_idx), int(r.hist_len)),
                         profile=r.profile, task=r.task, params=json.loads(r.params),
                         instruction=r.instruction, k=10, model="sigma", allow=m)
                for r, m in zip(rows.itertuples(), masks, strict=True)]
    choice = rt._state.fusion
    assert choice.tau_filtered is not None and choice.copy_scale_filtered is not None
    for r, m, got in zip(rows.itertuples(), masks, rt.rank(resolved), strict=True):
        # The stage fills a list whose rule admits fewer than 10 items from popularity; the
        # runtime returns the admitted ones only.
        n = min(10, int(m.sum()))
        want = gen.loc[r.instance_id]
        assert len(got) == n
        assert [rt.item_idx(x.item_id) for x in got] == list(want["items"][:n]), r.task
        np.testing.assert_allclose([x.score for x in got], want["scores"][:n], rtol=1e-6,
                                   atol=5e-5)  # fp32: other batch, other padding


def test_known_user_gets_the_whole_history_and_profile(served):
    cfg, _, rt = served
    u = 3
    r = rt.resolve(RecRequest(user_id=_user(rt, u)))
    full = rt.data.sequence(u)
    np.testing.assert_array_equal(r.history, full)
    assert r.profile == rt.profile_of(u) and r.task == "JustForYou" and r.allow is None
    (ex,) = rt.prompt_examples([RecRequest(user_id=_user(rt, u))])
    tc = cfg.tasks
    freq = most_bought(full, tc.frequent_items, tc.frequent_min_count)
    assert ex.item_ids == [*map(int, freq), *map(int, full[-tc.history_len:])]
    assert ex.n_context == len(freq)
    counted, counts = purchase_counts(full, tc.count_items)
    assert ex.channel("counts") == (tuple(counted.tolist()), tuple(counts.tolist()))


def test_prompts_follow_the_runs_tasks_config_not_the_command_line(served):
    # A `--set tasks.*` at serve time must not change the prompts the model was trained on.
    from sigmarec.config import load_config

    cfg, run_dir, rt = served
    other = load_config("tiny", overrides=["tasks.history_len=2", "tasks.frequent_items=1",
                                           "tasks.system_prompt=Recommend anything."])
    rt2 = Runtime.load(run_dir, other)
    u = int(np.argmax([len(rt.data.sequence(i)) for i in range(rt.data.n_users)]))
    req = RecRequest(user_id=_user(rt, u))
    (ex,) = rt.prompt_examples([req])
    (ex2,) = rt2.prompt_examples([req])
    assert len(ex.item_ids) > other.tasks.history_len + other.tasks.frequent_items
    assert ex2.input_ids == ex.input_ids and ex2.item_ids == ex.item_ids
    assert rt2.run_config.tasks == cfg.tasks and rt2.cfg.tasks.history_len == 2
    assert [i.item_id for i in rt2.recommend([req])[0]] == [
        i.item_id for i in rt.recommend([req])[0]]


def test_prompts_read_the_prompt_style_the_runs_tasks_stage_chose(served):
    """Serving renders the style in the run's tasks/prompt.json, as training and generation do
    (to_examples over the stage's rows): a run whose tasks stage chose another system prompt
    and no profile line is served with exactly those prompts."""
    from sigmarec.tasks.prompt_style import (
        PROMPT_FILE,
        SYSTEM_PROMPT,
        PromptStyle,
        load_prompt_style,
        save_prompt_style,
    )
    from sigmarec.training.stage import to_examples

    cfg, run_dir, rt = served
    assert rt._state.prompt == load_prompt_style(run_dir / "tasks") == PromptStyle()
    inst = pd.read_parquet(run_dir / "tasks" / "test.parquet").groupby("task").head(1)
    resolved = [Resolved(user_idx=int(r.user_idx),
                         history=rt.data.history(int(r.user_idx), int(r.hist_len)),
                         profile=r.profile, task=r.task, params=json.loads(r.params),
                         instruction=r.instruction, k=10, model="sigma", allow=None)
                for r in inst.itertuples()]
    style = PromptStyle(system="Recommend a product.", profile_line=False)
    saved = (run_dir / "tasks" / PROMPT_FILE).read_text()
    save_prompt_style(run_dir / "tasks", style)
    try:
        rt3 = Runtime.load(run_dir, cfg)
    finally:
        (run_dir / "tasks" / PROMPT_FILE).write_text(saved)
    st = rt3._state
    served_ex = rt3._examples(resolved)
    trained_ex = to_examples(inst, st.model, st.vocab, st.parts.item_prefix, with_target=False,
                             matcher=st.matcher, style=style)
    assert [e.input_ids for e in served_ex] == [e.input_ids for e in trained_ex]
    text = st.model.tokenizer.decode(served_ex[0].input_ids)
    assert "Recommend a product." in text and SYSTEM_PROMPT not in text
    assert "Household profile" not in text
    assert served_ex[0].input_ids != rt._examples(resolved[:1])[0].input_ids


def test_explicit_history_and_profile(served):
    cfg, _, rt = served
    ids = [str(x) for x in rt.item_ids[[5, 9, 2]]]
    req = RecRequest(history=ids, profile={"age": "35-44", "income": "50-74K"}, k=4)
    r = rt.resolve(req)
    np.testing.assert_array_equal(r.history, [5, 9, 2])
    assert r.user_idx == -1
    assert r.profile == profile_text({"age": "35-44", "income": "50-74K"},
                                     [c for c in rt.data.users.columns
                                      if c not in ("user_idx", "user_id")])
    (items,) = rt.recommend([req])
    assert len(items) == 4 and [i.rank for i in items] == [1, 2, 3, 4]
    assert all(a.score >= b.score for a, b in zip(items, items[1:], strict=False))


def _bad(rt: Runtime) -> list[tuple[dict, str]]:
    u, item = _user(rt), str(rt.item_ids[0])
    return [
        ({"user_id": "no-such-user"}, "user_id"),
        ({}, "user_id"),
        ({"history": []}, "history"),
        ({"history": [item, "no-such-item"]}, "history[1]"),
        ({"history": [item, str(rt.item_ids[1]), item]}, "history[2]"),
        ({"history": [str(x) for x in rt.item_ids[:1001]]}, "history"),
        ({"history": [item], "profile": {"shoe_size": "9"}}, "profile.shoe_size"),
        ({"user_id": u, "history": [item]}, "history"),
        ({"user_id": u, "profile": {"age": "35-44"}}, "profile"),
        ({"user_id": u, "task": "Trending"}, "task"),
        ({"user_id": u, "instruction": "x" * 501}, "instruction"),
        ({"user_id": u, "instruction": "   "}, "instruction"),
        ({"user_id": u, "task": "Query"}, "instruction"),
        ({"user_id": u, "task": "Category"}, "category"),
        ({"user_id": u, "task": "Category", "category": "NO SUCH AISLE"}, "category"),
        ({"user_id": u, "task": "Query", "instruction": "something niche please"},
         "instruction"),
        ({"user_id": u, "k": 0}, "k"),
        ({"user_id": u, "k": -3}, "k"),
        ({"user_id": u, "k": rt.n_items + 1}, "k"),
        ({"user_id": u, "category": "NO SUCH AISLE"}, "category"),
        ({"user_id": u, "allow_items": []}, "allow_items"),
        ({"user_id": u, "allow_items": [item, "nope"]}, "allow_items[1]"),
        ({"user_id": u, "model": "gpt"}, "model"),
    ]


def test_bad_requests_name_the_field(served):
    _, _, rt = served
    for body, field in _bad(rt):
        with pytest.raises(RequestError) as e:
            rt.resolve(RecRequest(**body))
        assert e.value.field == field, (body, str(e.value))
        assert str(e.value).startswith(field)


def test_unknown_category_suggests_close_names(served):
    _, _, rt = served
    with pytest.raises(RequestError, match="did you mean COLD CEREAL"):
        rt.resolve(RecRequest(user_id=_user(rt), category="COLD CERAL"))


def test_instruction_is_mapped_onto_a_task_and_used_as_written(served):
    _, _, rt = served
    r = rt.resolve(RecRequest(user_id=_user(rt), instruction="find potato chips for me"))
    assert (r.task, r.params) == ("Query", {"query": "potato chips"})
    assert r.instruction == "find potato chips for me"
    r = rt.resolve(RecRequest(user_id=_user(rt), instruction="hello there"))
    assert (r.task, r.params) == ("JustForYou", {"text": "hello there"})
    # A parameter-free task named beside a free instruction keeps the instruction's words.
    r = rt.resolve(RecRequest(user_id=_user(rt), task="longtail", instruction="surprise me"))
    assert (r.task, r.instruction) == ("Longtail", "surprise me")
    r = rt.resolve(RecRequest(user_id=_user(rt), task="Category", category="cold cereal"))
    assert r.params["category"] == "COLD CEREAL" and "cold cereal" in r.instruction


def test_category_task_takes_what_the_category_filter_takes(served):
    # A deeper category (or a path) is asked as its level's category and filtered to itself;
    # a broader one is refused with the level the task takes.
    _, _, rt = served
    u = _user(rt)
    r = rt.resolve(RecRequest(user_id=u, task="Category", category="KIDS CEREAL", k=3))
    assert r.task == "Category" and r.params == {"category": "COLD CEREAL", "level": 1}
    assert r.allow is not None and r.allow.any()
    paths = rt.data.items["category_path"].astype(str).to_numpy()
    assert all(p.endswith("KIDS CEREAL") for p in paths[r.allow])
    got = rt.rank([r])[0]
    assert len(got) == 3 and all(_category_of(rt, i.item_id).endswith("KIDS CEREAL") for i in got)
    r = rt.resolve(RecRequest(user_id=u, task="Category", category="grocery > cold cereal"))
    assert r.params["category"] == "COLD CEREAL"
    with pytest.raises(RequestError, match=r"path level 1 \(tasks.category_level") as e:
        rt.resolve(RecRequest(user_id=u, task="Category", category="GROCERY"))
    assert e.value.field == "category"


def _category_of(rt: Runtime, item_id: str) -> str:
    return str(rt.data.items["category_path"].iloc[rt.item_idx(item_id)])


@pytest.mark.parametrize("model", ["sigma", "sasrec_ce", "cooccurrence"])
def test_filters_act_inside_the_search_and_keep_lists_full(served, model):
    _, _, rt = served
    u = _user(rt, 1)
    bought = {str(rt.item_ids[i]) for i in rt.user_history(rt.user_idx(u))}
    k = 25
    (cat, excl, both) = rt.recommend([
        RecRequest(user_id=u, category="GROCERY > COLD CEREAL", k=k, model=model),
        RecRequest(user_id=u, exclude_bought=True, k=k, model=model),
        RecRequest(user_id=u, category="KIDS CEREAL", exclude_bought=True, k=5, model=model),
    ])
    assert len(cat) == k and all(" > COLD CEREAL > " in _category_of(rt, i.item_id) for i in cat)
    assert len(excl) == k and not {i.item_id for i in excl} & bought
    assert len(both) == 5 and not {i.item_id for i in both} & bought
    assert all(_category_of(rt, i.item_id).endswith("KIDS CEREAL") for i in both)
    allow = [str(x) for x in rt.item_ids[[40, 7, 300]]]
    (few,) = rt.recommend([RecRequest(user_id=u, allow_items=allow, k=10, model=model)])
    assert sorted(i.item_id for i in few) == sorted(allow)  # fewer admitted than k: all of them


def test_sigma_requests_share_one_decoder_call(served, monkeypatch):
    _, _, rt = served
    reqs = [RecRequest(user_id=_user(rt, i), k=k, exclude_bought=i == 1)
            for i, k in ((0, 5), (1, 12), (2, 3))]
    alone = [rt.recommend([r])[0] for r in reqs]
    decoder = rt._state.decoder
    calls = []
    real = decoder.candidates

    def counted(batch, n, allow_mask=None):
        calls.append(batch.input_ids.shape[0])
        return real(batch, n, allow_mask)

    monkeypatch.setattr(decoder, "candidates", counted)
    together = rt.recommend([*reqs, RecRequest(user_id=_user(rt), model="mostpop", k=4)])
    assert calls == [3]
    for a, b in zip(alone, together, strict=False):
        assert [i.item_id for i in a] == [i.item_id for i in b]
        np.testing.assert_allclose([i.score for i in a], [i.score for i in b], atol=1e-5)
    assert len(together[3]) == 4


def test_every_model_of_the_run_is_served(served):
    cfg, _, rt = served
    assert rt.model_names == ["sigma", *cfg.baselines.enabled]
    lists = rt.recommend([RecRequest(user_id=_user(rt), model=m, k=7) for m in rt.model_names])
    for items in lists:
        assert len(items) == 7 and len({i.item_id for i in items}) == 7
        assert all(i.text and i.prefix.startswith("<a_") for i in items)


def test_events_published_after_training_are_seen_after_reload(served):
    _, run_dir, rt = served
    u = 4
    before = rt.user_history(u).copy()
    new_items = np.array([11, 12, 13], dtype=np.int64)
    assert rt.reload() is False  # nothing published: nothing reloaded
    folder = events_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ev = pd.DataFrame({"user_idx": np.full(3, u, dtype=np.int64), "item_idx": new_items,
                       "timestamp": pd.to_datetime(["2018-01-02"] * 3).astype("datetime64[ns]"),
                       "basket": np.full(3, 10**9, dtype=np.int64)})
    ev[list(EVENT_COLUMNS)].to_parquet(folder / "00000001.parquet")
    try:
        assert rt.reload() is True
        np.testing.assert_array_equal(rt.user_history(u), np.concatenate([before, new_items]))
        r = rt.resolve(RecRequest(user_id=_user(rt, u), exclude_bought=True))
        assert not r.allow[new_items].any()
        (ex,) = rt.prompt_examples([RecRequest(user_id=_user(rt, u))])
        assert ex.item_ids[-3:] == new_items.tolist()
    finally:
        shutil.rmtree(folder)
        rt.reload()
    np.testing.assert_array_equal(rt.user_history(u), before)


def test_a_directory_without_a_trained_model_is_a_clear_error(tmp_path, served):
    cfg, _, _ = served
    with pytest.raises(Exception, match="not a trained run directory"):
        Runtime.load(tmp_path, cfg)


# ---------------------------------------------------------------------------- the CLI
def _cli(*args: str, stdin: str | None = None):
    from sigmarec.cli import app

    return CliRunner().invoke(app, list(args), input=stdin)


def test_sigma_recommend_json_and_table(served, tmp_path):
    _, run_dir, rt = served
    u = _user(rt, 2)
    allow = tmp_path / "allow.txt"
    allow.write_text("# the allow list\n" + "\n".join(str(x) for x in rt.item_ids[:30]) + "\n")
    r = _cli("recommend", "--user", u, "-k", "3", "--json", "--allow", str(allow),
             "--exclude-bought", "-p", "tiny", "-o", str(run_dir))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["task"] == "JustForYou" and len(out["items"]) == 3
    assert {i["item_id"] for i in out["items"]} <= {str(x) for x in rt.item_ids[:30]}
    want = rt.recommend([RecRequest(user_id=u, k=3, exclude_bought=True,
                                    allow_items=[str(x) for x in rt.item_ids[:30]])])[0]
    assert [i["item_id"] for i in out["items"]] == [i.item_id for i in want]

    body = json.dumps({"history": [str(x) for x in rt.item_ids[[3, 4]]],
                       "profile": {"age": "25-34"}})
    r = _cli("recommend", "--history-json", "-", "--instruction", "find potato chips",
             "--model", "mostpop", "-k", "2", "-p", "tiny", "-o", str(run_dir), stdin=body)
    assert r.exit_code == 0, r.output
    assert "mostpop" in r.output and "Query" in r.output and "rank" in r.output


@pytest.mark.parametrize("args,field", [
    (["--user", "nobody"], "user_id"),
    (["--user", "1", "--history-json", "-"], "--history-json"),
    ([], "--user"),
    (["--history-json", "-"], "body"),
])
def test_sigma_recommend_bad_input(served, args, field):
    _, run_dir, _ = served
    r = _cli("recommend", *args, "-p", "tiny", "-o", str(run_dir), stdin="{not json")
    assert isinstance(r.exception, RequestError), r.output
    assert r.exception.field == field



def test_served_sigma_score_is_what_the_docs_say(served):
    # Joint fusion (the default, and tiny's): log P(prefix | T) + in-prefix score / tau, an
    # unnormalised log-score (docs/serving.md), not the log-probability log P(item | T).
    from pathlib import Path

    _, _, rt = served
    choice = rt.fusion
    assert choice.mode == "joint"
    req = RecRequest(user_id=_user(rt, 2), k=5)
    r = rt.resolve(req)
    (ex,) = rt.prompt_examples([req])
    n = max(rt.cfg.eval.top_n, r.k)
    cands = rt.decoder.candidates(rt.decoder.batch([ex]), n)
    tau, scale = choice.per_task.get(r.task, (choice.tau, choice.copy_scale))
    where = {int(i): (k, m) for k, row in enumerate(cands.items[0]) for m, i in enumerate(row)
             if i >= 0}
    got = rt.rank([r])[0]
    assert len(got) == 5
    for item in got:
        k, m = where[rt.item_idx(item.item_id)]
        want = cands.prefix_logp[0, k] + cands.scores(scale)[0, k, m] / tau
        assert item.score == pytest.approx(want, rel=1e-9, abs=1e-9)
    doc = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    assert "`log P(prefix | T) + s / τ`" in doc and "fused log-probability `log P(item | T)`;" \
        not in doc
