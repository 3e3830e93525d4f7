"""Recall@K / NDCG@K of every model of run directories on the next-item instances of every user
(the columns of the published Amazon Beauty table).

    python scripts/beauty_metrics.py runs/beauty [runs/other ...] [--split test] [--exclude-seen]

Reads ``baselines/rankings`` (the leave-one-out instances of the data stage) and, where the run
went further, the rankings of the generation, GR and ranker stages on the JustForYou instances
of the tasks stage (the same users and targets; ``+rule`` lists are left out, JustForYou has no
rule). A model that ranked fewer instances than the split has is reported with its count.

``--exclude-seen`` re-ranks the saved SASRec models with the user's history removed from the
ranking (a diagnostic: some published harnesses mask history items, this project does not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from sigmarec.baselines.base import rank_instances
from sigmarec.baselines.sasrec import SASRecRecommender
from sigmarec.data.processed import ProcessedData
from sigmarec.metrics import accuracy_metrics

KS = [5, 10]
STAGES = ("generation", "gr_baselines", "ranker")


def row(name: str, ranked: pd.DataFrame, inst: pd.DataFrame) -> dict[str, object]:
    ranked = ranked.set_index("instance_id")
    inst = inst[inst["instance_id"].isin(ranked.index)]
    ranked = ranked.loc[inst["instance_id"]]
    m = accuracy_metrics(np.stack(ranked["items"].to_list()), list(inst["targets"]), KS)
    out: dict[str, object] = {"model": name, "instances": len(inst)}
    for k in KS:
        out[f"R@{k}"] = round(float(m[f"Recall@{k}"].mean()), 4)
        out[f"N@{k}"] = round(float(m[f"NDCG@{k}"].mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--exclude-seen", action="store_true")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        data = ProcessedData.load(run / "data")
        inst = data.eval_instances(args.split)
        for path in sorted((run / "baselines" / "rankings").glob(f"*_{args.split}.parquet")):
            name = path.name.removesuffix(f"_{args.split}.parquet")
            rows.append({"run": str(run), **row(name, pd.read_parquet(path), inst)})
            model_dir = run / "baselines" / "models" / name
            if args.exclude_seen and (model_dir / "model.pt").is_file():
                model = SASRecRecommender.load(model_dir)
                ranked = rank_instances(model, data, inst, top=10, exclude_seen=True)
                rows.append({"run": str(run), **row(name + " (seen excluded)", ranked, inst)})
        tasks = run / "tasks" / f"{args.split}.parquet"
        if not tasks.is_file():
            continue
        jfy = pd.read_parquet(tasks, columns=["instance_id", "task", "targets"])
        jfy = jfy[jfy["task"] == "JustForYou"].reset_index(drop=True)
        for stage in STAGES:
            for path in sorted((run / stage / "rankings").glob(f"*_{args.split}.parquet")):
                name = path.name.removesuffix(f"_{args.split}.parquet")
                if "+rule" in name or (stage == "generation" and not name.startswith("sigma")):
                    continue  # the baselines' lists there are those of baselines/ again
                rows.append({"run": str(run), **row(name, pd.read_parquet(path), jfy)})
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
