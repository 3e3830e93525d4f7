"""SIGMA on instructions never seen in training, end to end through the serving path.

    python scripts/unseen_eval.py --profile default --out runs/default [--per-task 30] [--seed 0]
        [--wordings src/sigmarec/tasks/unseen_instructions_b.yaml]

For up to ``--per-task`` test instances of every task (a seeded sample), one held-out wording
(``--wordings``, by default ``src/sigmarec/tasks/unseen_instructions.yaml``; cycled over the
instances) is filled with the instance's parameters and answered by the serving runtime
(``sigmarec.serving.runtime``) with the instance's history before its cut, three ways:

* ``template``: the instance's own evaluation instruction and task, as the generation stage
  asks it (the reference);
* ``unseen+router``: the held-out wording, routed by ``match_instruction`` as a served request
  is (task and parameters from the words), then the model;
* ``unseen, router off``: the held-out wording with the task unknown: JustForYou, so only the
  words reach the model (its copy prior's text match included), no task gate offset of the
  intended task and no task-specific fusion.

HR@10 is scored against the instance's targets, rule@10 against the intended task's rule.
Writes ``<out>/unseen/unseen_eval.json`` and ``unseen_eval.md`` (per task, router accuracy
beside the three ways' HR@10 and rule@10; ``unseen_eval_<file stem>.*`` for another wordings
file) and prints the table. ``scripts/router_eval.py`` measures the router alone (no model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sigmarec.config import load_config
from sigmarec.data.processed import ProcessedData
from sigmarec.metrics import accuracy_metrics
from sigmarec.serving.runtime import Resolved, Runtime
from sigmarec.tasks.rules import instance_allow_masks, load_tasks
from sigmarec.tasks.unseen import UNSEEN_FILE, load_unseen, route_instances, sample_instances

WAYS = ("template", "unseen+router", "unseen, router off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", required=True, type=Path, help="a finished run directory")
    ap.add_argument("--per-task", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--wordings", type=Path, default=UNSEEN_FILE,
                    help="held-out wordings file (default: the packaged first file)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(args.profile)
    run = args.out
    data = ProcessedData.load(run / "data")
    inst = sample_instances(pd.read_parquet(run / "tasks" / "test.parquet"), args.per_task,
                            args.seed)
    allow = instance_allow_masks(data, inst, load_tasks(data, cfg.tasks))
    rt = Runtime.load(run, cfg)
    res, tasks = rt._state.resources, rt._state.tasks  # the runtime's own, as requests see them
    wordings = load_unseen(args.wordings)
    routed = route_instances(res, tasks, inst, wordings)
    routed_ok = [r.task_ok for r in routed]
    params_ok = [r.params_ok for r in routed]
    rows: dict[str, list[Resolved]] = {w: [] for w in WAYS}
    for r, ro in zip(inst.itertuples(index=False), routed, strict=True):
        hist = data.history(int(r.user_idx), int(r.hist_len))
        base = {"user_idx": int(r.user_idx), "history": hist,
                "profile": rt.profile_of(int(r.user_idx)), "k": 10, "model": "sigma",
                "allow": None}
        rows["template"].append(Resolved(task=r.task, params=json.loads(r.params),
                                         instruction=str(r.instruction), **base))
        rows["unseen+router"].append(Resolved(task=ro.task, params=ro.params,
                                              instruction=ro.text, **base))
        rows["unseen, router off"].append(Resolved(task="JustForYou", params={"text": ro.text},
                                                   instruction=ro.text, **base))
    targets = list(inst["targets"])
    per_way: dict[str, dict[str, np.ndarray]] = {}
    for way, resolved in rows.items():
        top = np.full((len(resolved), 10), -1, dtype=np.int64)
        for s in range(0, len(resolved), args.batch):
            for j, items in enumerate(rt.rank(resolved[s:s + args.batch])):
                ids = [rt.item_idx(x.item_id) for x in items][:10]
                top[s + j, :len(ids)] = ids
        hr = np.asarray(accuracy_metrics(np.where(top < 0, 0, top), targets, [10])["HR@10"])
        ok = np.take_along_axis(allow, np.where(top < 0, 0, top), axis=1) & (top >= 0)
        per_way[way] = {"HR@10": hr, "rule@10": ok.mean(axis=1)}
        print(f"{way}: {len(resolved)} requests, {time.perf_counter() - t0:.0f}s", flush=True)
    task = inst["task"].to_numpy()
    table: dict[str, dict[str, float]] = {}
    for name in [*sorted(set(task.tolist())), "MEAN"]:
        m = np.ones(len(task), bool) if name == "MEAN" else task == name
        row: dict[str, float] = {"n": int(m.sum())}

        def avg(x: np.ndarray, mask: np.ndarray = m, name: str = name) -> float:
            if name != "MEAN":
                return float(np.mean(x[mask]))
            return float(np.mean([np.mean(x[task == t]) for t in sorted(set(task.tolist()))]))

        row["router_task_acc"] = avg(np.asarray(routed_ok, float))
        row["router_params_acc"] = avg(np.asarray(params_ok, float))
        for way in WAYS:
            for metric in ("HR@10", "rule@10"):
                row[f"{way} {metric}"] = avg(per_way[way][metric])
        table[name] = {k: round(v, 4) for k, v in row.items()}
    out = run / "unseen"
    out.mkdir(parents=True, exist_ok=True)
    default = args.wordings.resolve() == UNSEEN_FILE.resolve()
    stem = "unseen_eval" if default else f"unseen_eval_{args.wordings.stem}"
    (out / f"{stem}.json").write_text(json.dumps(
        {"per_task": args.per_task, "seed": args.seed, "wordings": str(args.wordings),
         "table": table, "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    cols = ["n", "router_task_acc", "router_params_acc",
            *[f"{w} {m}" for m in ("HR@10", "rule@10") for w in WAYS]]
    lines = ["| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{v[c]:g}" for c in cols) + " |" for t, v in
              table.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
