"""New items without retraining (`sigma items add`), the catalogue overlay, the cold-start
holdout's leak guard and the cold-start bench, on one tiny run that holds new items out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_dataset

from sigmarec.config import DataConfig, ItemColumnMap, SplitConfig, load_config
from sigmarec.data.build import build
from sigmarec.data.processed import ProcessedData, load_holdout
from sigmarec.errors import DataError
from sigmarec.serving import catalog
from sigmarec.serving.catalog import CatalogError, load_overlay
from sigmarec.serving.config import NewItemsConfig
from sigmarec.serving.items import PAUSE_ENV, ItemSpace, add_frame, add_items, read_new_items
from sigmarec.serving.overlay import add_to_loaded, apply_overlay, load_model_with_items

WEEKS = 4
ITEM_COLS = ["item_id", "title", "category_path", "brand", "attributes"]


@pytest.fixture(scope="module")
def hold_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The tiny profile with the last weeks' new items held out, trained (read-only)."""
    from sigmarec.pipeline import run_pipeline

    cfg = load_config("tiny", overrides=[f"data.holdout_new_items_weeks={WEEKS}"])
    run_dir = tmp_path_factory.mktemp("hold") / "run"
    run_pipeline(cfg, run_dir, until="training")
    return cfg, run_dir


@pytest.fixture
def run(hold_run: tuple[object, Path], tmp_path: Path) -> tuple[object, Path]:
    cfg, src = hold_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return cfg, dst


@pytest.fixture(scope="module")
def model_and_decoder(hold_run: tuple[object, Path]):  # noqa: ANN201
    from sigmarec.generation.decode import SigmaDecoder
    from sigmarec.grounding.artifacts import load_item_features
    from sigmarec.model.sigma import load_sigma_model
    from sigmarec.tokenization.artifacts import load_vocab

    cfg, run_dir = hold_run
    _, prefix = load_vocab(run_dir / "tokenization")
    feats = load_item_features(run_dir / "grounding", run_dir / "baselines",
                               cfg.tokenization.embedding)
    return feats, prefix, lambda: (lambda m: (m, SigmaDecoder(m, 4, 8)))(
        load_sigma_model(run_dir / "training" / "model", cfg.backbone, feats, prefix))


def _held_items(run_dir: Path, n: int | None = None) -> pd.DataFrame:
    items = load_holdout(run_dir / "data").items[ITEM_COLS]
    return items if n is None else items.head(n).reset_index(drop=True)


# ------------------------------------------------------------------------ holdout / leak guard


def test_holdout_off_leaves_the_config_hash_alone() -> None:
    cfg = load_config("tiny")
    assert "holdout_new_items_weeks" not in cfg.model_dump(mode="json")["data"]
    held = load_config("tiny", overrides=["data.holdout_new_items_weeks=2"])
    assert held.section_hash("data") != cfg.section_hash("data")


def test_holdout_cuts_new_items_before_the_user_sample() -> None:
    ds = make_dataset(n_users=20, n_items=30, days=120)
    late = ds.interactions["timestamp"] >= ds.interactions["timestamp"].max() - pd.Timedelta(
        days=10)
    # Items 30 and 31 exist only in the last 10 days: new. Item 0 also sells late: not new.
    extra = ds.interactions[late].head(6).copy()
    extra["item_id"] = ["i30", "i30", "i31", "i0", "i31", "i30"]
    ds.interactions = pd.concat([ds.interactions, extra], ignore_index=True)
    ds.items = pd.concat([ds.items, ds.items.head(2).assign(item_id=["i30", "i31"])],
                         ignore_index=True)
    cfg = DataConfig(source="files", max_users=15,
                     split=SplitConfig(valid_days=14, test_days=14))
    plain = build(ds, cfg, 0)
    held = build(ds, cfg.model_copy(update={"holdout_new_items_weeks": 2}), 0)
    assert set(held.holdout.items["item_id"]) >= {"i30", "i31"}
    assert "i0" not in set(held.holdout.items["item_id"])
    assert not set(held.holdout.items["item_id"]) & set(held.items["item_id"])
    # Same users either way: the subset is drawn before anything is held out.
    assert set(plain.users["user_id"]) >= set(held.users["user_id"])
    assert held.info["holdout"]["items"] == len(held.holdout.items)
    with pytest.raises(DataError, match="holdout_new_items_weeks=100"):
        build(ds, cfg.model_copy(update={"holdout_new_items_weeks": 100}), 0)


def test_held_out_items_reach_no_stage(hold_run: tuple[object, Path]) -> None:
    """The leak guard: nothing any stage fitted on can name a held-out item."""
    _, run_dir = hold_run
    data = ProcessedData.load(run_dir / "data")
    assert data.holdout is None  # the stages' loader never reads data/holdout/
    hold = load_holdout(run_dir / "data")
    assert len(hold.items) > 0 and (hold.interactions["split"] == "test").all()
    held_ids = set(hold.items["item_id"].astype(str))
    assert not held_ids & set(data.items["item_id"].astype(str))
    n = data.n_items
    assert data.interactions["item_idx"].max() < n
    # Every per-item artifact is over the trained catalogue only.
    assert np.load(run_dir / "baselines" / "item_embeddings.npy").shape[0] == n
    assert np.load(run_dir / "grounding" / "v_text.npy").shape[0] == n
    assert np.load(run_dir / "tokenization" / "item_prefix.npy").shape[0] == n
    for pairs in (run_dir / "grounding" / "pairs").glob("*.parquet"):
        p = pd.read_parquet(pairs)
        assert not len(p) or max(p["a"].max(), p["b"].max()) < n
    sft = pd.read_parquet(run_dir / "tasks" / "train.parquet")
    for col in ("history", "frequent", "targets"):
        assert max((int(np.max(v)) for v in sft[col] if len(v)), default=-1) < n
    assert int(sft["target"].max()) < n
    meta = json.loads((run_dir / "training" / "model" / "sigma_model.json").read_text())
    assert meta["n_items"] == n
    # Held-out purchases are in the test window: first sold after the cut-off.
    cut = pd.Timestamp(data.info["holdout"]["first_sold_from"])
    assert (hold.interactions["timestamp"] >= cut).all()


# ------------------------------------------------------------------------ reading and errors


def test_reading_and_validation_errors(run: tuple[object, Path], tmp_path: Path) -> None:
    cfg, run_dir = run
    good = pd.DataFrame({"sku": ["n1", "n2"], "name": ["SOFT DRINKS", "BANANAS"],
                         "dept": ["GROCERY", "PRODUCE"], "sub": ["SODA", "FRUIT"]})
    cols = ItemColumnMap(item="sku", title="name", category_path=["dept", "sub"])
    good.to_csv(tmp_path / "good.csv", index=False)
    items, _ = read_new_items(tmp_path / "good.csv", cols)
    assert items["category_path"].tolist() == ["GROCERY > SODA", "PRODUCE > FRUIT"]

    good.drop(columns=["name"]).to_csv(tmp_path / "nocol.csv", index=False)
    with pytest.raises(DataError, match=r"nocol\.csv: missing column\(s\) \['name'\]"):
        read_new_items(tmp_path / "nocol.csv", cols)
    pd.concat([good, good.head(1)]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DataError, match=r"dup\.csv: row 2, column 'sku': duplicate item id"):
        read_new_items(tmp_path / "dup.csv", cols)
    common = _held_items(run_dir, 2)
    bad = common.assign(attributes=["{}", "not json"])
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"row 1, column 'attributes': not a JSON object"):
        read_new_items(tmp_path / "bad.parquet", ItemColumnMap())

    trained = pd.read_parquet(run_dir / "data" / "items.parquet")
    clash = pd.concat([common, trained[ITEM_COLS].head(1)], ignore_index=True)
    clash.to_parquet(tmp_path / "clash.parquet")
    with pytest.raises(DataError, match=r"row 2, column 'item_id': item already in the trained "
                       r"catalogue"):
        add_items(run_dir, cfg, tmp_path / "clash.parquet")
    assert load_overlay(run_dir) is None  # nothing was published


def test_cli_error_is_one_line(run: tuple[object, Path], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from sigmarec import cli

    _, run_dir = run
    pd.DataFrame({"item_id": ["x"]}).to_csv(tmp_path / "x.csv", index=False)
    monkeypatch.setattr(sys, "argv", ["sigma", "items", "add", str(tmp_path / "x.csv"),
                                      "-p", "tiny", "-o", str(run_dir)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['title']" in err and "Traceback" not in err


# ------------------------------------------------------------------------ computing / applying


def test_new_items_get_the_runs_embeddings(run: tuple[object, Path], model_and_decoder) -> None:
    cfg, run_dir = run
    space = ItemSpace(run_dir)
    # The restored encoder reproduces the grounding stage's v_text of trained items, and the
    # standalone ProjFuse the model's soft tokens.
    from sigmarec.grounding.stage import render_texts

    texts = list(render_texts(space.items.head(20), space.cfg.grounding.text_template))
    np.testing.assert_allclose(space.encode_texts(texts), space.text[:20], atol=1e-5)
    feats, prefix, load = model_and_decoder
    model, decoder = load()
    np.testing.assert_allclose(space.fused(feats["text"][:30], feats["id"][:30]),
                               model.item_vectors(np.arange(30)).numpy(), atol=1e-6)

    overlay = add_frame(run_dir, space, _held_items(run_dir, 12), "held", NewItemsConfig())
    assert overlay.version == "v000001" and catalog.current_version(run_dir) == "v000001"
    n = space.n_items
    assert overlay.items["item_idx"].tolist() == list(range(n, n + 12))
    np.testing.assert_array_equal(overlay.codes, space.sids.encode(overlay.v_text))
    np.testing.assert_array_equal(overlay.prefix, space.vocab.prefix_ids(overlay.codes))
    # The default stand-in: the mean ID vector of the 10 nearest trained items by text.
    sims = overlay.v_text[:1] @ space.text.T
    nearest = np.argsort(-sims[0])[:10]
    np.testing.assert_allclose(overlay.id_vectors[0], space.ids[nearest].mean(0), atol=1e-5)

    ids = add_to_loaded(overlay, model, decoder)
    assert ids.tolist() == list(range(n, n + 12)) and decoder.index.n_items == n + 12
    np.testing.assert_allclose(model.item_vectors(ids).numpy(), overlay.item_vectors, atol=1e-6)
    # A query at a new item's soft token finds it first within its prefix.
    scores, found = decoder.index.search(overlay.item_vectors[:3], overlay.prefix[:3], 1)
    assert found[:, 0].tolist() == ids[:3].tolist()
    # And the three-step decoder can return only new items when a filter asks for them.
    from sigmarec.serving.overlay import extend_items
    from sigmarec.tasks.prompt_style import load_prompt_style
    from sigmarec.tasks.text_match import data_matcher
    from sigmarec.training.stage import to_examples

    prompt = pd.DataFrame([{"targets": np.array([0]), "history": np.array([1, 2, n]),
                            "frequent": np.array([], dtype=np.int64), "instruction": "anything",
                            "profile": "unknown", "params": "{}",
                            # A novelty model reads the column (empty: nothing listed).
                            "novel_items": np.array([], dtype=np.int64),
                            "novel_values": np.array([]), "task": "JustForYou"}])
    # The text match runs over the extended catalogue: added items can be named too.
    data = ProcessedData.load(run_dir / "data")
    matcher = data_matcher(model.cfg, data, cfg.tasks, extend_items(data, overlay).items)
    ex = to_examples(prompt, model, model.vocab, model.item_prefix.numpy(), with_target=False,
                     matcher=matcher, style=load_prompt_style(run_dir / "tasks"))
    allow = np.arange(model.n_items) >= n
    items, _ = decoder.recommend(ex, 5, allow_mask=allow)
    assert (items[0] >= n).all()

    # The runtime's contract: parts extended before the model is built; the same soft tokens.
    from sigmarec.serving.overlay import RuntimeParts

    data = ProcessedData.load(run_dir / "data")
    parts = RuntimeParts(data=data, item_features=feats, item_prefix=prefix, n_trained_items=n)
    ext = apply_overlay(parts, overlay)
    assert ext.data.n_items == n + 12 and len(ext.item_prefix) == n + 12
    assert ext.data.train_item_counts.shape == (n + 12,)
    assert ext.data.items["item_id"].iloc[-1] == overlay.items["item_id"].iloc[-1]
    assert parts.data.n_items == n  # not modified
    m2 = load_model_with_items(run_dir / "training" / "model", cfg.backbone, ext)
    np.testing.assert_allclose(m2.item_vectors(ids).numpy(), overlay.item_vectors, atol=1e-6)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(m2.named_buffers())[name]), name


def test_versions_accumulate_and_stale_overlays_are_refused(run: tuple[object, Path]) -> None:
    _, run_dir = run
    space = ItemSpace(run_dir)
    held = _held_items(run_dir, 6)
    first = add_frame(run_dir, space, held.head(3), "a", NewItemsConfig())
    second = add_frame(run_dir, space, held.tail(3).reset_index(drop=True), "b",
                       NewItemsConfig(id_stand_in="prefix_mean"))
    assert (first.version, second.version) == ("v000001", "v000002")
    assert second.n_items == 6 and second.meta["batches"] == [3, 3]
    np.testing.assert_array_equal(second.item_vectors[:3], first.item_vectors)
    assert (catalog.catalog_dir(run_dir) / "v000001" / "meta.json").is_file()  # kept
    with pytest.raises(DataError, match="already in the added items"):
        add_frame(run_dir, space, held.head(1), "again", NewItemsConfig())
    # A retrained model makes the published soft tokens wrong: refused, then re-derived.
    manifest = run_dir / "training" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["run_id"] = "retrained000"
    manifest.write_text(json.dumps(m))
    with pytest.raises(CatalogError, match="recomputed \\(training\\)"):
        load_overlay(run_dir)
    third = add_frame(run_dir, space, _held_items(run_dir).iloc[6:8].reset_index(drop=True),
                      "c", NewItemsConfig())
    assert third.n_items == 8 and load_overlay(run_dir).version == third.version


# ------------------------------------------------------------------------ kill -9


@pytest.mark.parametrize("point", ["writing", "publish"])
def test_kill9_mid_add_leaves_the_published_catalogue(run: tuple[object, Path], tmp_path: Path,
                                                      point: str) -> None:
    cfg, run_dir = run
    space = ItemSpace(run_dir)
    held = _held_items(run_dir, 8)
    before = add_frame(run_dir, space, held.head(3), "first", NewItemsConfig())
    snapshot = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    held.iloc[3:].to_parquet(tmp_path / "more.parquet")
    env = {**os.environ, PAUSE_ENV: f"{point}:120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigmarec.cli", "items", "add", str(tmp_path / "more.parquet"),
         "-p", "tiny", "-o", str(run_dir)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # type: ignore[union-attr]
            if f"paused at {point}" in line:
                break
            assert time.monotonic() < deadline, "items add never reached the pause point"
        else:
            pytest.fail(f"items add exited ({proc.wait()}) before pausing")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # The published version is untouched and still what a reader gets.
    after = load_overlay(run_dir)
    assert after.version == before.version and after.n_items == 3
    np.testing.assert_array_equal(after.item_vectors, before.item_vectors)
    for rel, content in snapshot.items():
        assert (run_dir / rel).read_bytes() == content, rel
    # A rerun completes: the half-written folder is cleaned or skipped, never published.
    done = add_items(run_dir, cfg, tmp_path / "more.parquet")
    assert done.n_items == 8 and load_overlay(run_dir).version == done.version
    assert not list(catalog.catalog_dir(run_dir).glob(".v*.tmp"))


# ------------------------------------------------------------------------ cold-start bench


def test_coldstart_bench(run: tuple[object, Path]) -> None:
    from sigmarec.serving.coldstart import as_markdown, run_coldstart

    cfg, run_dir = run
    res = run_coldstart(run_dir, cfg, batch_size=8, max_instances=6)
    n_new = len(load_holdout(run_dir / "data").items)
    assert res["catalogue"]["new_items"] == n_new
    models = res["models"]
    assert {"sigma", "sigma (trained items only)", "mostpop", "sasrec_ce",
            "sasrec_ce + stand-in ID vectors", "gr_id"} <= set(models)
    for name in ("mostpop", "sasrec_ce", "sigma (trained items only)"):
        assert models[name]["HR@10 new items (new-item occasions)"] == 0.0
        assert models[name]["new-item share of top-10 slots (feed)"] == 0.0
    for m in models.values():
        for k, v in m.items():
            if k.startswith("HR@10") and v is not None:
                assert 0.0 <= v <= 1.0
    assert "no output token" in models["gr_id"]["note"]
    fid = res["stand_in_fidelity"]
    assert set(fid) == {"text_neighbours", "prefix_mean", "ridge", "overall mean"}
    assert fid["overall mean"]["centred cosine"] == 0.0
    assert "| sigma |" in as_markdown(res)


def test_runtime_serves_added_items(run: tuple[object, Path]) -> None:
    """Wired into the serving runtime: after `items add` the new items are recommendable."""
    from sigmarec.serving.request import RecRequest
    from sigmarec.serving.runtime import Runtime

    cfg, run_dir = run
    overlay = add_frame(run_dir, ItemSpace(run_dir), _held_items(run_dir, 5), "new",
                        NewItemsConfig())
    rt = Runtime.load(run_dir, cfg)
    n = overlay.n_base
    assert rt.n_items == n + 5
    new_ids = overlay.items["item_id"].astype(str).tolist()
    assert rt.item_info(n + 4)["added_after_training"]
    user = str(ProcessedData.load(run_dir / "data").users["user_id"].iloc[0])
    [recs] = rt.recommend([RecRequest(user_id=user, k=3, allow_items=new_ids)])
    assert len(recs) == 3 and {r.item_id for r in recs} <= set(new_ids)


def test_holdout_derived_for_a_run_trained_without_it(hold_run: tuple[object, Path]) -> None:
    """A temporal run whose catalogue could not contain the new items is evaluated as is; one
    whose catalogue would change is refused."""
    from sigmarec.errors import SigmaError
    from sigmarec.serving.coldstart import derive_holdout

    cfg, run_dir = hold_run
    plain = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"holdout_new_items_weeks": None})})
    data = ProcessedData.load(run_dir / "data")
    derived = derive_holdout(data, plain, WEEKS, "run")
    saved = load_holdout(run_dir / "data")
    assert derived.items["item_id"].tolist() == saved.items["item_id"].tolist()
    assert data.info["holdout"]["derived"]
    with pytest.raises(SigmaError, match="some stage trained on them"):
        derive_holdout(ProcessedData.load(run_dir / "data"), plain, 20, "run")


def test_items_add_shows_prefixes_as_tokens(run: tuple[object, Path], tmp_path: Path) -> None:
    # `<a_11>` as prompts, serving and the docs write a prefix; the flat id only as prefix_id.
    import re

    from typer.testing import CliRunner

    from sigmarec.cli import app

    _, run_dir = run
    _held_items(run_dir, 2).to_parquet(tmp_path / "two.parquet")
    _held_items(run_dir).iloc[2:4].to_parquet(tmp_path / "two_more.parquet")
    args = ["items", "add", "-p", "tiny", "-o", str(run_dir)]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "two.parquet"), "--json"])
    assert res.exit_code == 0, res.output
    added = json.loads(res.stdout)["added"]
    sizes = json.loads((run_dir / "tokenization" / "vocab.json").read_text())
    for row in added:
        assert re.fullmatch(r"(<[a-z]_\d+>)+", row["prefix"]), row
        assert row["prefix"].count("<") == len(sizes["prefix_codebook_sizes"])
        assert isinstance(row["prefix_id"], int)
    res = CliRunner().invoke(app, [*args, str(tmp_path / "two_more.parquet")])
    assert res.exit_code == 0, res.output
    assert re.search(r"<a_\d+>", res.stdout)
