"""The whole pipeline on the tiny profile (real Complete Journey subset, tiny backbone)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sigmarec.config import load_config
from sigmarec.data.processed import ProcessedData
from sigmarec.pipeline import run_pipeline, stage_names, status


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny")
    cfg = load_config("tiny")
    manifests = run_pipeline(cfg, run_dir)
    return cfg, run_dir, manifests


def test_every_stage_ran_with_a_manifest(tiny_run):
    cfg, run_dir, manifests = tiny_run
    assert [m["stage"] for m in manifests] == stage_names()
    for m in manifests:
        assert not m["skipped"]
        assert m["wall_time_s"] >= 0 and m["peak_memory_mb"] > 0
        assert (run_dir / m["stage"] / "manifest.json").is_file()


def test_artifacts_are_consistent(tiny_run):
    cfg, run_dir, _ = tiny_run
    data = ProcessedData.load(run_dir / "data")
    n = data.n_items
    emb = np.load(run_dir / "baselines" / "item_embeddings.npy")
    assert emb.shape[0] == n
    v = np.load(run_dir / "grounding" / "v_text.npy")
    assert v.shape == (n, cfg.grounding.dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    prefixes = np.load(run_dir / "tokenization" / "item_prefix.npy")
    assert prefixes.shape == (n,) and prefixes.max() < 16
    vocab = json.loads((run_dir / "tokenization" / "vocab.json").read_text())
    assert vocab["tokens"][0] == "<a_0>" and vocab["tokens"][-1] == "<q>"
    report = json.loads((run_dir / "grounding" / "pairs_report.json").read_text())
    assert report["co_interaction"]["pairs"] > 0 and report["co_interaction"]["examples"]
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    for model in cfg.baselines.enabled:
        row = metrics["test"][model]["ALL"]["all"]
        assert 0 <= row["HR@10"] <= 1 and row["n"] > 0


def test_instruction_tasks_are_scored_for_sigma_and_every_baseline(tiny_run):
    cfg, run_dir, _ = tiny_run
    tasks = json.loads((run_dir / "evaluation" / "metrics_tasks.json").read_text())
    models = set(tasks["test"])
    assert {"sigma", "sigma_adaptive", "sigma_fixed", "sigma_off"} <= models
    for name in cfg.baselines.enabled:
        assert {name, f"{name}+rule"} <= models
    # The feature ranker (ranker stage), on both splits, unfiltered and under the rules.
    for split in ("valid", "test"):
        assert {"features_ltr", "features_ltr+rule"} <= set(tasks[split])
    ltr = tasks["test"]["features_ltr+rule"]["Category"]["all"]
    assert ltr["RuleShare@10"] >= tasks["test"]["features_ltr"]["Category"]["all"][
        "RuleShare@10"]
    for res in tasks["test"].values():
        for task, kinds in res.items():
            if task in ("ALL", "MEAN"):
                continue
            share = kinds["all"]["RuleShare@10"]
            assert 0 <= share <= 1
            if task == "JustForYou":
                assert share == 1.0  # no rule: every item satisfies it
        assert "MEAN" in res and 0 <= res["MEAN"]["all"]["HR@10"] <= 1
    # With the rule as a filter a baseline follows the instruction wherever it can.
    plain, ruled = tasks["test"]["mostpop"]["Category"], tasks["test"]["mostpop+rule"]["Category"]
    assert ruled["all"]["RuleShare@10"] >= plain["all"]["RuleShare@10"]
    gen = run_dir / "generation"
    assert (gen / "tau_curve.csv").is_file() and (gen / "prefix_usage.json").is_file()
    manifest = json.loads((gen / "manifest.json").read_text())
    taus = manifest["summary"]["sigma"]["tau"]
    assert set(taus) == {"joint", "adaptive", "fixed", "rule"} and taus["rule"] > 0
    scales = manifest["summary"]["sigma"]["copy_scale"]
    assert set(scales) == {"joint", "adaptive", "fixed", "rule"}
    assert set(scales.values()) <= {1.0, *cfg.generation.copy_scale_grid}
    # Fusion per task: sigma is fused at each task's pair; the single choice stays beside it.
    assert {"sigma_global", "sigma_global+rule"} <= models
    per = manifest["summary"]["sigma"]["per_task"]
    assert manifest["summary"]["sigma"]["fusion"] == "joint"
    assert set(per["joint"]) <= {t for t in tasks["test"]["sigma"] if t not in ("ALL", "MEAN")}
    # SIGMA with the rule as a business filter, beside the baselines' '+rule' rows; on
    # validation too, where its own tau is chosen.
    assert "sigma+rule" in models and "sigma+rule" in tasks.get("valid", {})
    ruled = tasks["test"]["sigma+rule"]
    for task, kinds in ruled.items():
        if task not in ("ALL", "MEAN", "JustForYou"):
            assert kinds["all"]["RuleShare@10"] >= tasks["test"]["sigma"][task]["all"][
                "RuleShare@10"] - 1e-9
    # HR@10 = 1 - prefix miss - retrieval miss - fusion miss, per task.
    diag = json.loads((gen / "diagnostics.json").read_text())["test"]
    for task, d in diag.items():
        if task.startswith("_"):
            continue
        total = d["HR@10"] + d["prefix_miss"] + d["retrieval_miss"] + d["fusion_miss"]
        assert abs(total - 1) < 1e-3, (task, d)
    lc = json.loads((run_dir / "training" / "learning_curve.json").read_text())
    assert lc["validations"] and {"ref_ntp_prior", "ref_ntp_history"} <= set(lc["references"])
    assert "valid_prefix_ntp" in lc["validations"][-1] and "wall_s" in lc["validations"][-1]


def test_report_writes_markdown_and_plots(tiny_run):
    from sigmarec.evaluation.markdown import write_report

    _, run_dir, _ = tiny_run
    md = write_report(run_dir)
    text = md.read_text()
    assert "## HR@10 per task" in text and "sigma" in text
    assert "## Where SIGMA loses HR@10" in text and "## SFT learning curve" in text
    for png in ("tasks_hr10.png", "tasks_ndcg10.png", "tau_curve.png", "prefix_usage.png",
                "learning_curve.png"):
        assert (md.parent / png).stat().st_size > 1000


def test_evaluate_and_report_commands(tiny_run):
    from typer.testing import CliRunner

    from sigmarec.cli import app

    _, run_dir, _ = tiny_run
    res = CliRunner().invoke(app, ["evaluate", "--profile", "tiny", "--out", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "instruction tasks" in res.output and "sigma" in res.output
    res = CliRunner().invoke(app, ["report", "--profile", "tiny", "--out", str(run_dir)])
    assert res.exit_code == 0 and (run_dir / "report" / "report.md").is_file()


def test_second_run_skips_everything(tiny_run):
    cfg, run_dir, _ = tiny_run
    again = run_pipeline(cfg, run_dir)
    assert all(m["skipped"] for m in again)
    assert {r["state"] for r in status(cfg, run_dir)} == {"fresh"}
    only = run_pipeline(cfg, run_dir, only=["evaluation"])
    assert [m["stage"] for m in only] == ["evaluation"] and only[0]["skipped"]
    # a change to the tokenizer config reruns tokenization (and what follows it), nothing before
    cfg2 = load_config("tiny", overrides=["tokenization.semantic_ids.kmeans_iters=5"])
    states = {r["stage"]: r["state"] for r in status(cfg2, run_dir)}
    assert states["data"] == states["baselines"] == states["grounding"] == "fresh"
    assert states["tokenization"] == "stale"


def test_sft_show_decodes_every_task(tiny_run):
    from typer.testing import CliRunner

    from sigmarec.cli import app

    cfg, run_dir, _ = tiny_run
    for task in ("JustForYou", "Query", "Category", "Longtail", "Discover", "Season", "Holiday"):
        res = CliRunner().invoke(app, ["sft", "show", "--task", task, "-n", "1", "--profile",
                                       "tiny", "--out", str(run_dir)])
        assert res.exit_code == 0, (task, res.output)
        assert "<- label; target = [" in res.output and "<q>" in res.output
