"""The instruction router alone (no model) on held-out wording files, per task.

    python scripts/router_eval.py --run runs/default [--wordings FILE ...] [--per-task 60]
        [--per-wording 5] [--seed 0] [--json OUT] [--misses]

For every wordings file (default: both packaged ones, ``unseen_instructions.yaml`` and the blind
``unseen_instructions_b.yaml``), ``match_instruction`` routes the wordings with the run's task
resources (built from ``<run>/data`` with the task settings of ``<run>/tasks``'s manifest, as
the serving runtime builds them), two ways:

* ``words``: every wording, each filled with up to ``--per-wording`` parameter sets of the run's
  test instances, for Season and Holiday of the whole calendar (the test split spans few
  seasons and holidays) (:func:`sigmarec.tasks.unseen.router_accuracy`, as the router test
  calls it): every wording counts alike;
* ``inst``: up to ``--per-task`` seeded test instances per task, the wordings cycled over them
  (:func:`sigmarec.tasks.unseen.route_instances`): the router columns of
  ``scripts/unseen_eval.py`` at the same ``--per-task``/``--seed``.

Each gives the task accuracy (the router picks the intended task) and the parameter accuracy
(and the intended query, category, season or holiday). Prints a table per file (MEAN: the mean
over tasks); ``--json`` writes the figures with up to 20 misses per task and file. Reads the
run only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sigmarec.config import SigmaConfig
from sigmarec.core.stage import read_manifest
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.tasks.definitions import Task
from sigmarec.tasks.registry import build_tasks, supported
from sigmarec.tasks.resources import TaskResources, build_resources
from sigmarec.tasks.unseen import (
    UNSEEN_FILE,
    UNSEEN_FILE_B,
    load_unseen,
    route_instances,
    router_accuracy,
    sample_instances,
)

COLS = ("words task", "words params", "inst task", "inst params")


def evaluate(res: TaskResources, tasks: dict[str, Task], test: pd.DataFrame, path: Path,
             per_task: int, per_wording: int, seed: int) -> dict[str, dict[str, Any]]:
    """{task: figures} of one wordings file; MEAN is the unweighted mean over tasks."""
    wordings = load_unseen(path)
    params = {t: g["params"].tolist() for t, g in test.groupby("task")}
    params["Holiday"] = [json.dumps({"holiday": h.name}) for h in res.holidays
                         if res.holiday_items[h.name].any()]
    params["Season"] = [json.dumps({"season": s}) for s in res.season_names]
    words = router_accuracy(res, tasks, params, wordings, per_wording=per_wording, seed=seed)
    inst = sample_instances(test[test["task"].isin(list(wordings))], per_task, seed)
    routed = route_instances(res, tasks, inst, wordings)
    names = inst["task"].to_numpy()
    table: dict[str, dict[str, Any]] = {}
    for name in sorted(words):
        m = names == name
        ok = np.asarray([r.task_ok for r in routed])[m]
        pk = np.asarray([r.params_ok for r in routed])[m]
        misses = [{"text": r.text, "got": r.task, "params": r.params}
                  for r, keep in zip(routed, m, strict=True) if keep and not r.params_ok]
        table[name] = {
            "words n": words[name]["n"], "words task": words[name]["task_acc"],
            "words params": words[name]["params_acc"], "inst n": int(m.sum()),
            "inst task": round(float(ok.mean()), 4) if m.any() else float("nan"),
            "inst params": round(float(pk.mean()), 4) if m.any() else float("nan"),
            "words misses": words[name]["misses"], "inst misses": misses[:20]}
    table["MEAN"] = {c: round(float(np.mean([table[t][c] for t in words])), 4) for c in COLS}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a run directory with data/, tasks/")
    ap.add_argument("--wordings", type=Path, nargs="+", default=[UNSEEN_FILE, UNSEEN_FILE_B])
    ap.add_argument("--per-task", type=int, default=60)
    ap.add_argument("--per-wording", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the figures and misses here")
    ap.add_argument("--misses", action="store_true", help="print the instances' misses")
    args = ap.parse_args()
    t0 = time.perf_counter()
    manifest = read_manifest(args.run / "tasks")
    if manifest is None or "config" not in manifest:
        raise StageError(f"{args.run / 'tasks'}: no tasks manifest; run the tasks stage first")
    cfg = SigmaConfig.model_validate(manifest["config"])
    data = ProcessedData.load(args.run / "data")
    res = build_resources(data, cfg.tasks)
    tasks, _ = supported(build_tasks(res, list(cfg.tasks.enabled)))
    test = pd.read_parquet(args.run / "tasks" / "test.parquet", columns=["task", "params"])
    out: dict[str, Any] = {"run": str(args.run), "per_task": args.per_task,
                           "per_wording": args.per_wording, "seed": args.seed, "files": {}}
    for path in args.wordings:
        table = evaluate(res, tasks, test, path, args.per_task, args.per_wording, args.seed)
        out["files"][str(path)] = table
        print(f"\n{path} (words: every wording x up to {args.per_wording} parameter sets, "
              "Season/Holiday over the calendar; "
              f"inst: {args.per_task} test instances per task, wordings cycled)")
        print("| task | " + " | ".join(COLS) + " |\n" + "|---" * (len(COLS) + 1) + "|")
        for name, row in table.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLS) + " |")
        if args.misses:
            for name, row in table.items():
                for miss in row.get("inst misses", []):
                    print(f"  miss {name}: {miss['text']!r} -> {miss['got']} {miss['params']}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"\n{out['seconds']}s")


if __name__ == "__main__":
    main()
