"""Mean ± half range over seeds of the instruction-task figures of finished runs (the tables of
BENCHMARKS.md and the README), read from each run's ``evaluation/metrics_tasks.json``.

    python scripts/seed_table.py RUN_DIR [RUN_DIR ...]

Columns: mean HR@10 over the seven tasks, JustForYou HR@10, the mean over the six instruction
tasks, rule@10 over those six, then each run's task mean; then SIGMA's per-task HR@10 / rule@10.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sigmarec.evaluation.report import headline_figures, task_table

TASKS = ("Category", "Discover", "Holiday", "JustForYou", "Longtail", "Query", "Season")
INSTRUCTION = tuple(t for t in TASKS if t != "JustForYou")


def _figures(m: dict, model: str) -> dict[str, float]:
    # The per-task HR@10 and the headline figures come from the report's own tables; only the
    # per-task rule shares are read here, since those tables keep just their mean.
    row = task_table({"test": m})[list(TASKS)].loc[model]
    head = headline_figures({"test": m}).loc[model]
    hr = {t: float(row[t]) for t in TASKS}
    rule = {t: m[model][t]["all"]["RuleShare@10"] for t in INSTRUCTION}
    return {"mean": float(head["mean HR@10"]), "jfy": hr["JustForYou"],
            "instr": float(head["instruction HR@10"]), "rule": float(head["rule@10"]),
            **{f"hr_{t}": hr[t] for t in TASKS}, **{f"rule_{t}": rule[t] for t in INSTRUCTION}}


def _pm(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def main(runs: list[Path]) -> None:
    metrics = [json.loads((r / "evaluation" / "metrics_tasks.json").read_text())["test"]
               for r in runs]
    models = [m for m in metrics[0] if all(m in x for x in metrics)]
    rows = {m: [_figures(x, m) for x in metrics] for m in models}
    print("| model | mean HR@10 (7) | JustForYou | instruction (6) | rule@10 (6) | per seed |")
    print("|---|---:|---:|---:|---:|---|")
    for m in sorted(models, key=lambda m: -np.mean([f["mean"] for f in rows[m]])):
        f = rows[m]
        per_seed = " / ".join(f"{x['mean']:.3f}" for x in f)
        print(f"| {m} | {_pm([x['mean'] for x in f])} | {_pm([x['jfy'] for x in f])} | "
              f"{_pm([x['instr'] for x in f])} | {_pm([x['rule'] for x in f])} | "
              f"{per_seed} |")
    print("\nSIGMA per task (HR@10, rule@10):")
    for t in TASKS:
        hr = [x[f"hr_{t}"] for x in rows["sigma"]]
        rule = [x.get(f"rule_{t}") for x in rows["sigma"]]
        extra = f", rule@10 {_pm(rule)}" if t in INSTRUCTION else ""
        print(f"- {t}: HR@10 {_pm(hr)}{extra}")
    rep = [x["instr"] for x in rows.get("repurchase", [])]
    if rep:
        ratios = [s["instr"] / r for s, r in zip(rows["sigma"], rep, strict=True)]
        print("\ninstruction tasks, SIGMA / repurchase per seed: "
              + " / ".join(f"{x:.2f}x" for x in ratios))


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
