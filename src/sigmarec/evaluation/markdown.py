"""``sigma report``: a Markdown report with PNG plots, written into ``<run>/report/``.

Reads what the evaluation and generation stages wrote (and, for a comparison, the per-seed runs
listed in ``compare.json``); computes nothing new, so it is cheap to rerun after edits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from sigmarec.core.atomic import atomic_path
from sigmarec.errors import StageError
from sigmarec.evaluation import plots
from sigmarec.evaluation.ablations import MAIN, PREFIX, RULE, paired_effects
from sigmarec.evaluation.report import task_table
from sigmarec.tasks.config import TASK_NAMES

REPORT_DIR = "report"


def _md_table(df: pd.DataFrame, fmt: str = "{:.4f}", first: str = "model") -> str:
    cols = [str(c) for c in df.columns]
    lines = [f"| {first} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for idx, row in df.iterrows():
        cells = [v if isinstance(v, str) else ("-" if pd.isna(v) else fmt.format(v))
                 for v in row.tolist()]
        lines.append(f"| {idx} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_tables(runs: list[dict[str, Any]], metric: str = "HR@10") -> tuple[pd.DataFrame,
                                                                              pd.DataFrame]:
    """Mean and standard deviation over seeds of the per-task table (rows = models)."""
    tables = [task_table(r, "test", metric) for r in runs]
    stacked = pd.concat(tables, keys=range(len(tables)))
    grouped = stacked.groupby(level=1)
    mean = grouped.mean()
    tail = [c for c in mean.columns if c.startswith("mean ") or c == "rule@10"]
    order = [t for t in TASK_NAMES if t in mean.columns]
    order += [c for c in mean.columns if c not in order and c not in tail]
    # A model run on one seed only (the generative baselines, the ablations) has no spread: NaN.
    return mean[order + tail], grouped.std(ddof=1)[order + tail]


def _mean_pm_std(mean: pd.DataFrame, std: pd.DataFrame, n: int) -> pd.DataFrame:
    if n < 2:
        return mean
    out = mean.copy().astype(object)
    for r in mean.index:
        for c in mean.columns:
            m, sd = mean.loc[r, c], std.loc[r, c]
            out.loc[r, c] = "-" if pd.isna(m) else (
                f"{m:.4f}" if pd.isna(sd) else f"{m:.4f} ± {sd:.4f}")
    return out


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report/report.md`` and its plots; returns the Markdown path."""
    run_dir = Path(run_dir)
    ev = run_dir / "evaluation"
    compare = run_dir / "compare.json"
    runs: list[dict[str, Any]] = []
    seeds: list[str] = []
    if compare.is_file():
        spec = json.loads(compare.read_text())
        done = []
        for entry in spec["runs"]:
            path = Path(entry["dir"]) / "evaluation" / "metrics_tasks.json"
            if path.is_file():
                runs.append(json.loads(path.read_text()))
                done.append(entry)
        if not runs:
            raise StageError(f"{compare}: none of its runs has evaluation/metrics_tasks.json")
        merged = merge_models(runs, done)
        ablations = list(dict.fromkeys(e.get("variant", "main") for e in done
                                       if e.get("variant", "main") != "main"))
        seeds = sorted({str(e.get("seed")) for e in done})
        adds = spec.get("adds", [])
    else:
        path = ev / "metrics_tasks.json"
        if not path.is_file():
            raise StageError(f"{path}: missing; run `sigma run` (through evaluation) first")
        merged = [json.loads(path.read_text())]
        ablations, adds = [], []
        seeds = ["single run"]
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    hr_mean, hr_std = seed_tables(merged, "HR@10")
    nd_mean, nd_std = seed_tables(merged, "NDCG@10")
    order = hr_mean.sort_values("mean HR@10", ascending=False).index
    hr_mean, hr_std = hr_mean.loc[order], hr_std.loc[order]
    nd_mean, nd_std = nd_mean.loc[order], nd_std.loc[order]
    task_cols = [c for c in hr_mean.columns if c not in ("mean HR@10", "rule@10")]
    n = len(merged)
    lines = [f"# SIGMA report: `{run_dir.name}`", "",
             f"Test window, full ranking over the catalogue. Seeds: {', '.join(seeds)}"
             + (" (mean ± sample standard deviation over seeds; models without ± ran on one "
                "seed)." if n > 1 else "."),
             "`rule@10` = share of the top 10 that satisfies the instruction's checkable rule "
             "(mean over the tasks that have one). `+rule` = the baseline with that rule "
             "applied as a filter.", "", "## HR@10 per task", "",
             _md_table(_mean_pm_std(hr_mean, hr_std, n)), "",
             "## NDCG@10 per task", "", _md_table(_mean_pm_std(nd_mean, nd_std, n)), ""]
    lines += _ablation_section(merged, ablations, adds)
    png = plots.task_bars(hr_mean[task_cols + ["mean HR@10"]], out / "tasks_hr10.png",
                          "HR@10 per task (test)",
                          hr_std[task_cols + ["mean HR@10"]].fillna(0) if n > 1 else None)
    lines += [f"![HR@10 per task]({png.name})", ""]
    png = plots.task_bars(nd_mean[task_cols + ["mean NDCG@10"]], out / "tasks_ndcg10.png",
                          "NDCG@10 per task (test)",
                          nd_std[task_cols + ["mean NDCG@10"]].fillna(0) if n > 1 else None)
    lines += [f"![NDCG@10 per task]({png.name})", ""]

    first = Path(json.loads(compare.read_text())["runs"][0]["dir"]) if compare.is_file() \
        else run_dir
    gen = first / "generation"
    curve_path = gen / "tau_curve.csv"
    if curve_path.is_file():
        curve = pd.read_csv(curve_path)
        png = plots.tau_curve(curve, out / "tau_curve.png")
        test = curve[curve["split"] == "test"].set_index(["mode", "tau"])
        lines += ["## Fusion: accuracy against diversity", "",
                  "Fixed-temperature fusion as tau varies, with the adaptive (APF) and joint "
                  "points where they were tuned (tau chosen on validation) and no fusion "
                  "(prefix, then score).", "",
                  f"![tau curve]({png.name})", "",
                  _md_table(test.reset_index().set_index("mode")), ""]
    usage_path = gen / "prefix_usage.json"
    if usage_path.is_file():
        usage = json.loads(usage_path.read_text())
        png = plots.prefix_usage(usage, out / "prefix_usage.png")
        lines += ["## Prefix utilisation", "",
                  f"A SIGMA top-10 draws on {usage['prefixes_per_top10_mean']:.2f} prefixes on "
                  f"average; {usage['prefixes_used']} of {usage['n_prefixes']} prefixes appear "
                  f"in some test top-10; mean probability of the top prefix "
                  f"{usage['top1_prefix_prob_mean']:.3f}.", "", f"![prefix usage]({png.name})",
                  ""]
    diag_path = gen / "diagnostics.json"
    if diag_path.is_file():
        diag = json.loads(diag_path.read_text()).get("test", {})
        used = diag.pop("_prefixes_in_top10_lists", None)
        if diag:
            lines += ["## Where SIGMA loses HR@10 (test)", "",
                      "Per task: the share of instances whose target prefixes are all outside "
                      "the K decoded prefixes (prefix miss), whose target prefix is decoded but "
                      "no target is among that prefix's M candidates (retrieval miss), and "
                      "whose target is a candidate that the fusion ranks below 10 (fusion "
                      "miss). HR@10 = 1 - the three."
                      + (f" Distinct prefixes across all test top-10 lists: {used}." if used
                         is not None else ""), "",
                      _md_table(pd.DataFrame(diag).T[["HR@10", "prefix_miss", "retrieval_miss",
                                                       "fusion_miss", "prefix_hit@K"]]), ""]
    lc_path = first / "training" / "learning_curve.json"
    if lc_path.is_file():
        lc = json.loads(lc_path.read_text())
        if lc.get("validations"):
            png = plots.learning_curve(lc, out / "learning_curve.png")
            refs = lc["references"]
            lines += ["## SFT learning curve (validation subset)", "",
                      "Prefix NTP of the targets against two model-free references: the prior "
                      f"of the training targets' prefixes ({refs['ref_ntp_prior']:.3f}) and the "
                      "prompt's own prefixes smoothed with it "
                      f"({refs['ref_ntp_history']:.3f}); then the prefix hit rate, the in-prefix "
                      "hit rate and quick HR@10, against steps and wall time.", "",
                      f"![learning curve]({png.name})", ""]
    ex_path = gen / "examples.json"
    if ex_path.is_file():
        lines += ["## Example recommendations (SIGMA, test)", ""]
        for ex in json.loads(ex_path.read_text())[:14]:
            lines += [f"**{ex['task']}** - *{ex['instruction']}*", "",
                      "- recent history: " + "; ".join(ex["history"]),
                      "- bought next (targets): " + "; ".join(ex["targets"]),
                      "- SIGMA top 5: " + "; ".join(
                          ("**" + r["item"] + "**") if r["hit"] else r["item"]
                          for r in ex["sigma_top5"]), ""]
    basket = ev / "metrics.json" if not compare.is_file() else first / "evaluation/metrics.json"
    if basket.is_file():
        from sigmarec.evaluation.report import results_table

        df = results_table(json.loads(basket.read_text()), "test")
        lines += ["## Next basket, every household (classical baselines)", "",
                  _md_table(df[[c for c in df.columns if c != "n"]]), ""]
    md = out / "report.md"
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return md


def merge_models(runs: list[dict[str, Any]], entries: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """One metrics dict per seed. The main run contributes all its models; an ablation run only
    its SIGMA and sigma+rule, renamed ``sigma_<variant>`` and ``sigma_<variant>+rule``.
    ``entries``: ``{"seed", "variant"}`` per run (``compare.json``'s runs)."""
    by_seed: dict[Any, dict[str, Any]] = {}
    for metrics, entry in zip(runs, entries, strict=True):
        variant = entry.get("variant", "main")
        tgt = by_seed.setdefault(entry.get("seed"), {"test": {}})["test"]
        for model, res in metrics.get("test", {}).items():
            if variant == "main":
                tgt[model] = res
            elif model in (MAIN, MAIN + RULE):
                tgt[f"{PREFIX}{variant}{model[len(MAIN):]}"] = res
    return [by_seed[s] for s in sorted(by_seed, key=str)]


def _ablation_section(merged: list[dict[str, Any]], ablations: list[str],
                      adds: list[str]) -> list[str]:
    """The paired per-seed effect of each ablated part (empty without ablation runs)."""
    eff = paired_effects(merged, ablations, adds)
    if eff.empty:
        return []
    shown = eff.copy().astype(object)
    shown["seeds"] = eff["seeds"].map(str)
    for c in ("effect on mean HR@10", "on instruction HR@10", "on rule@10", "on sigma+rule"):
        shown[c] = eff[c].map(lambda v: "-" if pd.isna(v) else f"{v:+.4f}")
    sd, test_sd = eff.attrs["seed_sd"], eff.attrs["test_sd"]
    return ["## Ablations: what each part adds (paired by seed)", "",
            "Effect of the part, on the same seed: SIGMA minus the variant where the variant "
            "removes it, the variant minus SIGMA where it adds one the configuration leaves off "
            "(positive: the part helps). A verdict of "
            "helps/hurts needs the same sign on every seed and a mean "
            "effect on the task mean larger than SIGMA's own seed-to-seed standard deviation"
            + ("" if pd.isna(sd) else f" ({sd:.4f})")
            + " and than the binomial standard deviation of one run's task mean on the test "
            "instances" + ("" if pd.isna(test_sd) else f" ({test_sd:.4f})")
            + "; anything else is a tie.", "",
            _md_table(shown, first="ablation"), ""]
