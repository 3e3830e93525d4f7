"""The results table a user reads after a run: models side by side, accuracy next to diversity.

Accuracy at the first K in full, HR at the others, a few beyond-accuracy metrics, and HR split
into repeat and new targets - the last two tell a history-replaying model from one that
discovers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from sigmarec.evaluation.harness import ALL_TASKS, MEAN_TASK

ACCURACY = ("HR", "NDCG", "Recall", "MRR")
BEYOND = ("Coverage", "LongTail", "NewToUser", "Categories")


def results_table(
    metrics: dict[str, Any],
    split: str = "test",
    task: str = ALL_TASKS,
    ks: Sequence[int] = (10, 20),
) -> pd.DataFrame:
    """Rows = models; metrics missing for a model (an empty kind, an absent K) are NaN."""
    k0, rest = ks[0], ks[1:]
    rows = {}
    for model, tasks in metrics.get(split, {}).items():
        kinds = tasks.get(task, {})
        allk = kinds.get("all", {})
        row: dict[str, float] = {f"{m}@{k0}": allk.get(f"{m}@{k0}") for m in ACCURACY}
        row.update({f"HR@{k}": allk.get(f"HR@{k}") for k in rest})
        row.update({f"{m}@{k0}": allk.get(f"{m}@{k0}") for m in BEYOND})
        for kind in ("repeat", "new"):
            row[f"HR@{k0} {kind}"] = kinds.get(kind, {}).get(f"HR@{k0}")
        row["n"] = allk.get("n")
        rows[model] = row
    return pd.DataFrame.from_dict(rows, orient="index", dtype=float).rename_axis("model")


def _fmt(column: str, value: float) -> str:
    if pd.isna(value):
        return "-"
    if column == "n":
        return str(int(value))
    return f"{value:.2f}" if column.startswith("Categories") else f"{value:.4f}"


def _display_ks(models: dict[str, Any]) -> list[int]:
    """K = 10 and 20 when evaluated, else the largest two Ks the run has."""
    first = next(iter(models.values())).get(ALL_TASKS, {}).get("all", {})
    have = sorted(int(m.split("@")[1]) for m in first if m.startswith("HR@"))
    return [k for k in (10, 20) if k in have] or have[-2:] or [10]


def _table(title: str, df: pd.DataFrame, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", style="cyan", no_wrap=True)
    for col in columns:
        table.add_column(col.replace(" ", "\n"), justify="right", no_wrap=True)
    best = {c: df[c].max() for c in columns if c.split("@")[0] in ACCURACY and len(df) > 1}
    for model, row in df[columns].iterrows():
        table.add_row(str(model), *(
            f"[bold]{_fmt(c, v)}[/bold]" if c in best and v == best[c] else _fmt(c, v)
            for c, v in row.items()
        ))
    return table


def print_results(metrics: dict[str, Any], console: Console | None = None) -> None:
    """One rich table per split (valid, then test); the best accuracy per column is in bold.

    Beyond-accuracy columns are not highlighted: more long-tail or novelty is not always better.
    A table too wide for the console is split in two (accuracy, then beyond-accuracy) rather
    than letting rich truncate every number to "0.…".
    """
    console = console or Console()
    for split in [s for s in ("valid", "test") if metrics.get(s)]:
        df = results_table(metrics, split=split, ks=_display_ks(metrics[split]))
        title = f"{split} - task {ALL_TASKS}"
        table = _table(title, df, list(df.columns))
        wide = Measurement.get(console, console.options.update_width(10_000), table).maximum
        if wide <= console.width:
            console.print(table)
            continue
        beyond = [c for c in df.columns if c.split("@")[0] in BEYOND or c == "n"]
        console.print(_table(title, df, [c for c in df.columns if c not in beyond]))
        console.print(_table(f"{title} - beyond accuracy", df, beyond))


NO_RULE_TASKS = ("JustForYou",)


def task_table(metrics: dict[str, Any], split: str = "test", metric: str = "HR@10"
               ) -> pd.DataFrame:
    """Rows = models; one column per task with ``metric``, the task mean, and instruction
    following (RuleShare@10 averaged over the tasks that have a rule)."""
    rows = {}
    for model, tasks in metrics.get(split, {}).items():
        names = [t for t in tasks if t not in (ALL_TASKS, MEAN_TASK)]
        row = {t: tasks[t]["all"].get(metric) for t in sorted(names)}
        row[f"mean {metric}"] = tasks.get(MEAN_TASK, tasks.get(ALL_TASKS, {}))["all"].get(metric)
        shares = [tasks[t]["all"].get("RuleShare@10") for t in names if t not in NO_RULE_TASKS]
        shares = [v for v in shares if v is not None]
        row["rule@10"] = float(sum(shares) / len(shares)) if shares else float("nan")
        rows[model] = row
    return pd.DataFrame.from_dict(rows, orient="index", dtype=float).rename_axis("model")


def headline_figures(metrics: dict[str, Any], split: str = "test") -> pd.DataFrame:
    """Rows = models: the task mean of HR@10, the mean over the instruction tasks (those with a
    rule) and rule@10 - the three figures the targets and the ablations are read on."""
    t = task_table(metrics, split, "HR@10")
    instr = [c for c in t.columns if c not in ("mean HR@10", "rule@10", *NO_RULE_TASKS)]
    return pd.DataFrame({"mean HR@10": t["mean HR@10"], "instruction HR@10": t[instr].mean(axis=1),
                         "rule@10": t["rule@10"]})


def print_task_results(metrics: dict[str, Any], console: Console | None = None,
                       split: str = "test") -> None:
    """The instruction tasks: HR@10 per task and on average, and instruction following."""
    console = console or Console()
    if not metrics.get(split):
        return
    df = task_table(metrics, split).sort_values("mean HR@10", ascending=False)
    table = Table(title=f"{split} - instruction tasks (HR@10; rule@10 = share of the top 10 "
                  "that satisfies the instruction)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("model", style="cyan", no_wrap=True)
    for col in df.columns:
        table.add_column(col.replace(" ", "\n"), justify="right", no_wrap=True)
    best = {c: df[c].max() for c in df.columns}
    for model, row in df.iterrows():
        table.add_row(str(model), *(
            f"[bold]{_fmt(c, v)}[/bold]" if v == best[c] else _fmt(c, v) for c, v in row.items()
        ))
    console.print(table)


def print_diagnostics(diag: dict[str, Any], console: Console | None = None,
                      split: str = "test") -> None:
    """Where SIGMA's HR@10 is lost per task: prefix, retrieval and fusion misses."""
    console = console or Console()
    rows = {t: v for t, v in diag.get(split, {}).items() if not t.startswith("_")}
    if not rows:
        return
    cols = ("HR@10", "prefix_miss", "retrieval_miss", "fusion_miss")
    used = diag[split].get("_prefixes_in_top10_lists")
    table = Table(title=f"{split} - where SIGMA loses HR@10 (sums to 1 per task)"
                  + (f"; {used} distinct prefixes in all top-10 lists" if used is not None
                     else ""), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("task", style="cyan", no_wrap=True)
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    for task, v in rows.items():
        table.add_row(task, *(f"{v[c]:.3f}" for c in cols))
    console.print(table)
