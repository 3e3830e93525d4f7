"""The evaluation stage: scores every ranked list the model stages wrote, on valid and test.

Two scopes, each scored by one harness on the same instances so numbers are comparable:

* ``basket`` (``metrics.json``): the data stage's instances, every user's next basket; the
  baselines stage ranks them. The classical next-basket benchmark.
* ``tasks`` (``metrics_tasks.json``): the tasks stage's instances of every instruction task;
  the generation and generative-baseline stages rank them. Adds ``RuleShare@K``, the share of
  listed items that satisfy the instruction's checkable rule, and the task mean "MEAN".

Model stages write ``<stage>/rankings/{model}_{split}.parquet`` (instance_id, items, scores).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from sigmarec.core.atomic import write_json
from sigmarec.core.stage import Stage, StageContext
from sigmarec.data.processed import ProcessedData
from sigmarec.errors import StageError
from sigmarec.evaluation.harness import ALL_TASKS, MEAN_TASK, evaluate_rankings
from sigmarec.tasks.rules import instance_allow_masks, load_tasks

SPLITS = ("valid", "test")
SUMMARY_METRICS = ("HR@10", "NDCG@10", "Recall@10", "RuleShare@10")
BASKET_STAGES = ("baselines",)


def find_rankings(ctx: StageContext, split: str, stages: Iterable[str]) -> dict[str, Path]:
    """Model name -> rankings file of ``split``, over the given required stages."""
    found: dict[str, Path] = {}
    for dep in stages:
        for path in sorted((ctx.input(dep) / "rankings").glob(f"*_{split}.parquet")):
            model = path.name.removesuffix(f"_{split}.parquet")
            if model in found:
                raise StageError(
                    f"model {model!r} has {split} rankings in both {found[model]} and {path}; "
                    "model names must be unique across stages"
                )
            found[model] = path
    return found


def metrics_table(metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Flatten ``{split: {model: {task: {kind: {...}}}}}`` to one row per split/model/task/kind."""
    rows = [
        {"split": split, "model": model, "task": task, "kind": kind, **values}
        for split, models in metrics.items()
        for model, tasks in models.items()
        for task, kinds in tasks.items()
        for kind, values in kinds.items()
    ]
    return pd.DataFrame(rows)


def _summary(metrics: dict[str, Any], task: str) -> dict[str, Any]:
    return {model: {k: round(res[task]["all"][k], 4) for k in SUMMARY_METRICS
                    if k in res.get(task, {}).get("all", {})}
            for model, res in metrics.get("test", {}).items()}


class EvaluationStage(Stage):
    name: ClassVar[str] = "evaluation"
    requires: ClassVar[tuple[str, ...]] = ("data", "baselines", "tasks", "gr_baselines",
                                           "ranker", "generation")
    config_sections: ClassVar[tuple[str, ...]] = ("eval",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        data = ProcessedData.load(ctx.input("data"))
        cfg = ctx.config.eval
        basket: dict[str, dict[str, Any]] = {}
        tasks_m: dict[str, dict[str, Any]] = {}
        task_stages = [d for d in ctx.inputs if d not in ("data", "tasks", *BASKET_STAGES)]
        tasks = None
        for split in SPLITS:
            basket[split] = {
                model: evaluate_rankings(data, pd.read_parquet(path), split, cfg, source=str(path))
                for model, path in find_rankings(ctx, split, BASKET_STAGES).items()
            }
            found = find_rankings(ctx, split, task_stages)
            inst_path = ctx.input("tasks") / f"{split}.parquet"
            if not found:
                continue
            inst = pd.read_parquet(inst_path)
            tasks = tasks if tasks is not None else load_tasks(data, ctx.config.tasks)
            allow = instance_allow_masks(data, inst, tasks)
            tasks_m[split] = {
                model: evaluate_rankings(data, pd.read_parquet(path), split, cfg,
                                         source=str(path), instances=inst, allow=allow)
                for model, path in found.items()
            }
        if not any(basket.values()) and not any(tasks_m.values()):
            raise StageError(
                f"no rankings/*_<split>.parquet found in stages {list(ctx.inputs)}; "
                "did the model stages run?"
            )
        write_json(ctx.out / "metrics.json", basket)
        metrics_table(basket).to_csv(ctx.out / "metrics_table.csv", index=False)
        write_json(ctx.out / "metrics_tasks.json", tasks_m)
        metrics_table(tasks_m).to_csv(ctx.out / "metrics_tasks_table.csv", index=False)
        return {
            "models": {split: sorted(m) for split, m in basket.items()},
            "task_models": {split: sorted(m) for split, m in tasks_m.items()},
            "test": _summary(basket, ALL_TASKS),
            "test_tasks_mean": _summary(tasks_m, MEAN_TASK),
        }
