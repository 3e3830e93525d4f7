"""Nearline updates on a tiny run: the U2I store (atomic versions, reads, pruning, specs), prompt
KV-cache reuse equal to a from-scratch forward, event ingestion with file/row/column errors,
idempotent reruns, a real kill -9 mid-run, and `sigma u2i get`."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sigmarec.errors import ConfigError, DataError, SigmaError
from sigmarec.serving import kv_cache as kc
from sigmarec.serving.events import events_dir, load_events
from sigmarec.serving.nearline import (
    PAUSE_ENV,
    Recomputer,
    file_sha256,
    ingested_batch,
    open_kv,
    run_nearline,
)
from sigmarec.serving.request import RecRequest
from sigmarec.serving.runtime import Runtime
from sigmarec.serving.store import SQLiteStore, StoreError, U2IRow, open_store
from sigmarec.tasks.sft_data import prompt_columns
from sigmarec.training.stage import to_examples

# ------------------------------------------------------------------------------ the store


def _rows(users, task="JustForYou", base=0.0):
    return [U2IRow(u, task, [f"i{j}" for j in range(3)], [base + 3 - j for j in range(3)])
            for u in users]


def test_store_versions_rows_and_pins(tmp_path):
    store = SQLiteStore(tmp_path / "u2i.sqlite")
    assert store.get("a", "JustForYou") is None and store.latest_version() is None
    assert not store.path.exists(), "reading an absent store must not create it"
    v1 = store.publish(_rows(["a", "b"]), source="events:1", meta={"users": 2})
    v2 = store.publish(_rows(["b"], base=10), source="events:2")
    assert (v1, v2) == (1, 2) and store.latest_version() == 2
    # b was recomputed in v2; a keeps its v1 row.
    assert store.get("b", "JustForYou").version == 2
    assert store.get("b", "JustForYou").scores == [13.0, 12.0, 11.0]
    assert store.get("a", "JustForYou").version == 1
    assert store.get("b", "JustForYou", version=1).scores == [3.0, 2.0, 1.0]
    assert store.get("a", "Discover") is None
    assert store.find_source("events:1").meta == {"users": 2}
    assert store.find_source("events:9") is None
    assert [v.version for v in store.versions()] == [1, 2]
    with pytest.raises(StoreError, match="already published"):
        store.publish(_rows(["c"]), source="events:1")
    assert store.latest_version() == 2
    assert store.integrity_check() == "ok"
    store.close()


def test_store_publish_is_all_or_nothing(tmp_path):
    store = SQLiteStore(tmp_path / "u2i.sqlite")
    store.publish(_rows(["a"]))

    def broken():
        yield from _rows(["x", "y"])
        raise RuntimeError("the job died while producing rows")

    with pytest.raises(RuntimeError):
        store.publish(broken())
    with pytest.raises(StoreError, match="twice"):
        store.publish(_rows(["x", "x"]))
    with pytest.raises(StoreError, match="non-finite"):
        store.publish([*_rows(["x"]), U2IRow("y", "JustForYou", ["i0"], [float("nan")])])
    with pytest.raises(StoreError, match="2 items but 1 scores"):
        store.publish([U2IRow("y", "JustForYou", ["i0", "i1"], [1.0])])
    assert store.latest_version() == 1
    assert store.get("x", "JustForYou") is None
    # Straight from the file: no row of a failed publication exists.
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT COUNT(*), MAX(version) FROM u2i").fetchone() == (1, 1)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    store.close()


def test_store_reader_sees_whole_versions_while_a_writer_commits(tmp_path):
    """A reader on its own connection during a writer's open transaction sees the previous
    version only, then the whole new one after the commit (WAL snapshot isolation)."""
    path = tmp_path / "u2i.sqlite"
    store = SQLiteStore(path)
    store.publish(_rows(["a", "b"]))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO versions VALUES (2, 'now', 2, NULL, '{}')")
    writer.execute("INSERT INTO u2i VALUES ('a', 'JustForYou', 2, 'sigma', '[\"z\"]', '[1.0]')")
    reader = SQLiteStore(path)
    assert reader.latest_version() == 1 and reader.get("a", "JustForYou").version == 1
    writer.execute("COMMIT")
    assert reader.latest_version() == 2 and reader.get("a", "JustForYou").items == ["z"]
    writer.close()
    reader.close()
    store.close()


def test_store_prune_keeps_what_pinned_readers_reach(tmp_path):
    store = SQLiteStore(tmp_path / "u2i.sqlite")
    store.publish(_rows(["a", "b"]))  # v1
    store.publish(_rows(["a"], base=10))  # v2
    store.publish(_rows(["a"], base=20))  # v3
    assert store.prune(keep=2) == 1  # a@v1 is shadowed by a@v2 for every kept pin (v2, v3)
    assert store.get("a", "JustForYou", version=2).version == 2
    assert store.get("b", "JustForYou").version == 1  # b's only row stays
    assert store.prune(keep=3) == 0
    store.close()


def test_open_store_specs(tmp_path):
    s = open_store("sqlite:u2i.sqlite", tmp_path)
    assert s.path == tmp_path / "serving" / "u2i.sqlite"
    assert open_store(f"sqlite:{tmp_path / 'x.db'}", Path("elsewhere")).path == tmp_path / "x.db"
    with pytest.raises(ConfigError, match="unknown backend 'redis'.*sqlite"):
        open_store("redis:localhost:6379", tmp_path)
    with pytest.raises(ConfigError, match="backend:location"):
        open_store("u2i.sqlite", tmp_path)


# ------------------------------------------------------------------------- on a tiny run


@pytest.fixture(scope="module")
def served(tiny_run_dir, tmp_path_factory):
    """A private copy of the session's tiny run and one Runtime over it."""
    cfg, src = tiny_run_dir
    run_dir = tmp_path_factory.mktemp("serving_nearline") / "run"
    shutil.copytree(src, run_dir)
    return cfg, run_dir, Runtime.load(run_dir, cfg)


_CLOCK = [pd.Timestamp("2019-01-01")]


def _events(path: Path, rt: Runtime, users: list[int], per_user: int = 2, seed: int = 0,
            repurchase: bool = True) -> Path:
    """One new basket per user, after everything the run knows (every call later than the
    last): items the user bought before (grocery repurchase) or popular ones."""
    rng = np.random.default_rng(seed)
    _CLOCK[0] += pd.Timedelta(days=1)
    rows = []
    for u in users:
        pool = np.unique(rt.user_history(u)) if repurchase else np.arange(50)
        for j, item in enumerate(rng.choice(pool, size=per_user, replace=False)):
            rows.append({"user_id": str(rt.data.users["user_id"].iat[u]),
                         "item_id": str(rt._state.item_ids[item]),
                         "timestamp": (_CLOCK[0] + pd.Timedelta(minutes=j)).isoformat(),
                         "basket_id": f"nl{seed}-{u}"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _prompts(rt: Runtime, users: list[int], extra: dict[int, list[int]] | None = None,
             instruction: str | None = None):
    """Prompts of the users' JustForYou requests, optionally with items appended to their
    histories (as new events would): rendered the way the runtime renders them."""
    tc, extra = rt.cfg.tasks, extra or {}
    base = [rt.resolve(RecRequest(user_id=str(rt.data.users["user_id"].iat[u]))) for u in users]
    hist = [np.concatenate([r.history, np.asarray(extra.get(u, []), dtype=np.int64)])
            for u, r in zip(users, base, strict=True)]
    st = rt._state
    cols = [prompt_columns(h, tc, st.listers) for h in hist]
    df = pd.DataFrame({
        **{k: [c[k] for c in cols] for k in cols[0]},
        "profile": [r.profile for r in base],
        "instruction": [instruction or r.instruction for r in base],
        "task": [r.task for r in base],
        "targets": [np.zeros(1, dtype=np.int64)] * len(users)})
    return to_examples(df, st.model, st.vocab, st.parts.item_prefix, with_target=False,
                       matcher=st.matcher, style=st.prompt)


def _step2(model, cache, k=6):
    top = torch.topk(cache.logprobs, k, dim=1).indices
    return model.query_vectors(cache, top, return_prefix_logprobs=True)


def _assert_same_as_scratch(model, decoder, new_examples, cached):
    batch = decoder.batch(new_examples)
    _, ref = kc._from_scratch(model, batch)
    got, entries, stats = kc.prompt_forward(model, batch, new_examples, cached)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    q_ref, lp_ref = _step2(model, ref)
    # Same prefixes for both, so the query vectors are compared one for one.
    top = torch.topk(ref.logprobs, 6, dim=1).indices
    q_got, lp_got = model.query_vectors(got, top, return_prefix_logprobs=True)
    torch.testing.assert_close(q_got, q_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp_got, lp_ref, atol=1e-4, rtol=0)
    if model.levels > 1:
        nxt_ref = model.next_level_logprobs(ref, top, 1)
        torch.testing.assert_close(model.next_level_logprobs(got, top, 1), nxt_ref, atol=1e-4,
                                   rtol=0)
    return entries, stats


def test_kv_reuse_equals_a_from_scratch_forward(served):
    """Prefix log-probs, chained prefix log-probs and query vectors of prompts re-encoded from
    cached KV equal a from-scratch forward (1e-4), for a batch mixing a cold row, rows with
    new items, a row whose prompt did not change and a row whose request line changed."""
    _, _, rt = served
    model, decoder = rt._state.model, rt._state.decoder
    users = [0, 1, 2, 3, 4]
    old = _prompts(rt, users)
    _, cold, stats0 = kc.prompt_forward(model, decoder.batch(old), old, None)
    assert stats0.reused == 0 and len(cold) == 5
    assert all(e.length == len(x.input_ids) for e, x in zip(cold, old, strict=True))
    extra = {0: [5, 6], 1: [7], 2: [rt.user_history(2)[-1]]}  # 3: unchanged
    new = _prompts(rt, users, extra)
    new[4] = _prompts(rt, [4], instruction="something for the weekend")[0]
    cached = [cold[0], cold[1], cold[2], cold[3], cold[4]]
    cached[1] = None  # no entry for this user
    entries, stats = _assert_same_as_scratch(model, decoder, new, cached)
    assert stats.reused > 0 and stats.hits == 4 and stats.by_cut["no entry"] == 1
    assert stats.by_cut.get("unchanged prompt") == 1  # user 3: only the last token re-runs
    assert stats.by_cut.get("request") == 1  # user 4: reuse runs up to the request line
    # The new entries (read back from the assembled cache with holes) serve a second update.
    again = _prompts(rt, users, {u: [*extra.get(u, []), 11] for u in users})
    _assert_same_as_scratch(model, decoder, again, entries)


def test_kv_reuse_with_a_repeat_aware_model(served):
    """The copy term of a repeat-aware model reads the whole prompt's items: still exact."""
    _, _, rt = served
    from sigmarec.model.repeat import RepeatGate, n_gates

    model = copy.deepcopy(rt._state.model)
    # The tiny profile's model also reads purchase counts, text matches, rarities and novelty
    # lists (twelve gates): their update is exact too.
    model.repeat = RepeatGate(model.hidden, 1.0, n_gates(model.cfg))
    torch.nn.init.normal_(model.repeat.proj.weight, std=0.5)
    decoder = copy.copy(rt._state.decoder)
    decoder.model = model
    old = _prompts(rt, [5, 6, 7])
    _, cold, _ = kc.prompt_forward(model, decoder.batch(old), old, None)
    new = _prompts(rt, [5, 6, 7], {5: [1, 2], 6: [3], 7: [rt.user_history(7)[0]]})
    _assert_same_as_scratch(model, decoder, new, cold)


def test_kv_store_on_disk(served, tmp_path):
    _, run_dir, rt = served
    model, decoder = rt._state.model, rt._state.decoder
    ex = _prompts(rt, [0, 1])
    _, entries, _ = kc.prompt_forward(model, decoder.batch(ex), ex, None)
    root = tmp_path / "kv"
    store = kc.KVCacheStore(root, "fp1", max_bytes=10**9)
    store.put(0, "JustForYou", entries[0])
    (store.dir / "0" / ".Discover.safetensors.x.tmp").write_bytes(b"torn")
    keys = kc.token_keys(ex[0], model.item_token_id)
    back = kc.KVCacheStore(root, "fp1", max_bytes=10**9).best(0, keys)
    assert back is not None and np.array_equal(back.keys, entries[0].keys)
    for (k1, v1), (k2, v2) in zip(back.layers, entries[0].layers, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert not list((store.dir / "0").glob("*.tmp")), "a torn temporary file is cleaned up"
    assert store.best(1, keys) is None  # no entry of user 1
    # The best entry of the user across tasks: the one sharing the longest prefix.
    other = dataclasses.replace(entries[0], keys=entries[0].keys.copy())
    other.keys[5:] = -999
    store.put(0, "Discover", other)
    assert store.best(0, keys).keys[5] != -999
    # Another model's fingerprint: its entries are gone.
    fresh = kc.KVCacheStore(root, "fp2", max_bytes=10**9)
    assert len(fresh) == 0 and not (root / "fp1").exists()
    # Over the size limit the least recently used entries go.
    small = kc.KVCacheStore(tmp_path / "kv2", "fp", max_bytes=10**9)
    small.put(0, "JustForYou", entries[0])
    small.max_bytes = small.nbytes + 1  # room for one entry more than entries[0] only if small
    time.sleep(0.01)
    small.put(1, "JustForYou", entries[1])
    assert len(small) == 1 and small.best(1, kc.token_keys(ex[1], model.item_token_id))
    # The fingerprint follows the trained weights.
    assert kc.model_fingerprint(run_dir / "training" / "model", rt.cfg.backbone) == \
        kc.model_fingerprint(run_dir / "training" / "model", rt.cfg.backbone)


def test_nearline_ingests_recomputes_and_publishes(served, tmp_path):
    cfg, run_dir, rt = served
    users = [10, 11, 12]
    f = _events(tmp_path / "ev.csv", rt, users, seed=1)
    last_basket = {u: int(rt.data.baskets(u).max()) for u in users}
    for u in users:  # earlier event batches of other tests count as known baskets too
        ev = load_events(run_dir)
        mine = ev[ev["user_idx"] == u]
        if len(mine):
            last_basket[u] = max(last_basket[u], int(mine["basket"].max()))
    res = run_nearline(run_dir, cfg, f, runtime=rt)
    assert res.appended and not res.already_published
    assert res.users == 3 and res.rows == 3 and res.tasks == ["JustForYou"]
    batch = events_dir(run_dir) / res.events_file
    ev = pd.read_parquet(batch)
    assert list(ev.columns) == ["user_idx", "item_idx", "timestamp", "basket"]
    assert {int(u): int(b) for u, b in ev.groupby("user_idx")["basket"].max().items()} == \
        {u: last_basket[u] + 1 for u in users}
    # The histories the runtime serves now end with the new items.
    for u in users:
        assert list(rt.user_history(u)[-2:]) == list(ev[ev["user_idx"] == u]["item_idx"])
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        entry = store.get(str(rt.data.users["user_id"].iat[10]), "JustForYou")
        assert entry.version == res.version and len(entry.items) == cfg.serving.nearline.k
        assert entry.scores == sorted(entry.scores, reverse=True)
        assert store.find_source(res.source).meta["events_file"] == res.events_file
    # Same file again: nothing appended, nothing published.
    n_files = len(list(events_dir(run_dir).glob("*.parquet")))
    again = run_nearline(run_dir, cfg, f, runtime=rt)
    assert again.already_published and again.version == res.version
    assert len(list(events_dir(run_dir).glob("*.parquet"))) == n_files


def test_nearline_lists_with_kv_reuse_equal_lists_without(served, tmp_path):
    """The second update of the same users reuses their cached prompts (and the second task
    the first task's), and publishes what a full recompute gives."""
    cfg, run_dir, rt = served
    users = [20, 21, 22, 23]
    two = cfg.model_copy(deep=True)
    two.serving.nearline.tasks = ["JustForYou", "Discover"]
    run_nearline(run_dir, two, _events(tmp_path / "a.csv", rt, users, seed=2), runtime=rt)
    res = run_nearline(run_dir, two, _events(tmp_path / "b.csv", rt, users, seed=3), runtime=rt)
    assert res.reuse["prompts_with_reuse"] == 8 and res.reuse["reused_share"] > 0.3
    pairs = [(u, t) for t in res.tasks for u in users]
    plain = Recomputer(rt, cfg.serving.nearline.k).lists(pairs, kc.ReuseStats())
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        for (u, t), (items, scores) in zip(pairs, plain, strict=True):
            entry = store.get(str(rt.data.users["user_id"].iat[u]), t)
            assert entry.version == res.version
            assert entry.items == [str(x) for x in rt._state.item_ids[items]]
            np.testing.assert_allclose(entry.scores, scores, atol=1e-4)
    assert len(open_kv(run_dir, cfg)) >= 8


@pytest.mark.parametrize("edit, match", [
    (lambda df: df.assign(user_id="nobody"), r"row 0, column 'user_id': unknown user"),
    (lambda df: df.assign(item_id=["x", *df["item_id"][1:]]),
     r"row 0, column 'item_id': unknown item"),
    (lambda df: df.assign(timestamp=[*df["timestamp"][:1], "soon", *df["timestamp"][2:]]),
     r"row 1, column 'timestamp': missing or unparseable timestamp"),
    (lambda df: df.assign(timestamp="2001-01-01"),
     r"row 0, column 'timestamp': timestamp 2001-01-01.*before user"),
    (lambda df: df.drop(columns="item_id"), r"missing column\(s\) \['item_id'\]"),
])
def test_bad_events_are_named_and_change_nothing(served, tmp_path, edit, match):
    cfg, run_dir, rt = served
    f = _events(tmp_path / "ev.csv", rt, [30, 31], seed=4)
    edit(pd.read_csv(f, dtype=str)).to_csv(f, index=False)
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        before = store.latest_version()
    n_files = len(list(events_dir(run_dir).glob("*.parquet")))
    with pytest.raises(DataError, match=match) as e:
        run_nearline(run_dir, cfg, f, runtime=rt)
    assert str(f) in str(e.value)
    assert len(list(events_dir(run_dir).glob("*.parquet"))) == n_files
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        assert store.latest_version() == before


def test_nearline_config_errors(served, tmp_path):
    cfg, run_dir, rt = served
    f = _events(tmp_path / "ev.csv", rt, [40], seed=5)
    bad = cfg.model_copy(deep=True)
    bad.serving.nearline.tasks = ["Query"]
    with pytest.raises(ConfigError, match="serving.nearline.tasks: 'Query'"):
        run_nearline(run_dir, bad, f, runtime=rt)
    bad.serving.nearline.tasks = ["JustForYou"]
    bad.serving.nearline.model = "nope"
    with pytest.raises(ConfigError, match="serving.nearline.model 'nope'"):
        run_nearline(run_dir, bad, f, runtime=rt)
    with pytest.raises(DataError, match="not found"):
        run_nearline(run_dir, cfg, tmp_path / "missing.csv", runtime=rt)


def test_nearline_serves_a_baseline(served, tmp_path):
    cfg, run_dir, rt = served
    base = cfg.model_copy(deep=True)
    base.serving.nearline.model = "mostpop"
    res = run_nearline(run_dir, base, _events(tmp_path / "ev.csv", rt, [41], seed=6),
                       runtime=rt)
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        entry = store.get(str(rt.data.users["user_id"].iat[41]), "JustForYou")
    assert entry.version == res.version and entry.model == "mostpop" and res.reuse == {}


def test_kill_9_mid_run_leaves_the_store_intact_and_a_rerun_completes(served, tmp_path):
    """A real `sigma nearline` subprocess, paused after every user, killed with SIGKILL once it
    has appended the events and started recomputing: the previous version is still the newest
    and whole, the events are appended once, and rerunning the same command publishes."""
    cfg, run_dir, rt = served
    first = run_nearline(run_dir, cfg, _events(tmp_path / "a.csv", rt, [50, 51], seed=7),
                         runtime=rt)
    users = [50, 51, 52, 53, 54, 55]
    f = _events(tmp_path / "b.csv", rt, users, seed=8)
    n_files = len(list(events_dir(run_dir).glob("*.parquet")))
    kv_root = kc.kv_dir(run_dir)
    kv_before = {p: p.stat().st_mtime_ns for p in kv_root.rglob("*.safetensors")}
    env = {**os.environ, PAUSE_ENV: "0.5", "HF_HUB_OFFLINE": "1"}
    sigma = Path(sys.executable).with_name("sigma")
    cmd = [*([str(sigma)] if sigma.is_file() else [sys.executable, "-m", "sigmarec.cli"]),
           "nearline", "--events", str(f), "-p", "tiny", "-o", str(run_dir),
           "--set", "serving.nearline.batch_size=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    try:
        # Mid-run: the batch is appended and at least one user's KV entry was rewritten.
        while time.time() < deadline and proc.poll() is None:
            fresh = [p for p in kv_root.rglob("*.safetensors")
                     if kv_before.get(p) != p.stat().st_mtime_ns]
            if len(list(events_dir(run_dir).glob("*.parquet"))) > n_files and fresh:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with open_store(cfg.serving.u2i_store, run_dir) as store:
        assert store.latest_version() == first.version
        assert store.integrity_check() == "ok"
        entry = store.get(str(rt.data.users["user_id"].iat[50]), "JustForYou")
        assert entry.version == first.version and len(entry.items) == cfg.serving.nearline.k
    assert len(list(events_dir(run_dir).glob("*.parquet"))) == n_files + 1
    assert not [p for p in events_dir(run_dir).iterdir() if not p.name[0].isdigit()]
    assert ingested_batch(run_dir, file_sha256(f)) is not None
    # The rerun finds the batch, does not append it again, recomputes and publishes.
    res = run_nearline(run_dir, cfg, f, runtime=rt)
    assert not res.appended and res.version == first.version + 1 and res.users == len(users)
    assert len(list(events_dir(run_dir).glob("*.parquet"))) == n_files + 1
    assert int((load_events(run_dir)["user_idx"] == 52).sum()) == 2


def test_u2i_cli(served, tmp_path):
    from sigmarec.cli import app

    cfg, run_dir, rt = served
    user = str(rt.data.users["user_id"].iat[60])
    run_nearline(run_dir, cfg, _events(tmp_path / "ev.csv", rt, [60], seed=9), runtime=rt)
    runner = CliRunner()
    base = ["-p", "tiny", "-o", str(run_dir)]
    r = runner.invoke(app, ["u2i", "get", "--user", user, "--json", *base])
    assert r.exit_code == 0, r.output
    assert '"user_id": "' + user + '"' in r.output
    r = runner.invoke(app, ["u2i", "get", "--user", user, *base])
    assert r.exit_code == 0 and "rank" in r.output
    r = runner.invoke(app, ["u2i", "versions", *base])
    assert r.exit_code == 0 and "events file" in r.output
    r = runner.invoke(app, ["u2i", "get", "--user", "nobody", *base])
    assert isinstance(r.exception, SigmaError) and "no list for user 'nobody'" in str(r.exception)
